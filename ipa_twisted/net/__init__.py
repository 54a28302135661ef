"""Networking the agent does itself: LLDP (raw AF_PACKET sockets on the reactor), VLAN
bring-up, mDNS discovery of Ironic, and automatic TLS for the agent's API."""
