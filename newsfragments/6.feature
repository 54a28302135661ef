Network: LLDP from raw sockets, VLAN interfaces from LLDP, mDNS discovery of Ironic, automatic TLS for the API (on by default) and client TLS settings.
