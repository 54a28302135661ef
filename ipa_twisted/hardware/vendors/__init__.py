"""Vendor hardware managers shipped with the agent (found as plugins, like the generic one).

- ``mellanox.MellanoxDeviceHardwareManager``: InfiniBand interfaces of Mellanox NICs;
- ``intel_cna.IntelCnaHardwareManager``: turns off the LLDP agent of Intel CNA (i40e) NICs.
"""
