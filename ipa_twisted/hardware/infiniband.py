"""InfiniBand addresses: the Ethernet-like MAC and DHCP client-id Ironic needs.

An InfiniBand interface's hardware address is 20 bytes (59 characters): flags, the GID
prefix and the port GUID, its last 8 bytes. The MAC is the GUID's first 3 and last 3
bytes; the DHCP client-id is ``ff:00:00:00:00:00:02:00:00:02:c9:00:`` + the GUID.
"""

from __future__ import annotations

INFINIBAND_CLIENT_ID_PREFIX = "ff:00:00:00:00:00:02:00:00:02:c9:00:"
INFINIBAND_ADDR_LEN = 59


def infiniband_address_to_mac(address: str) -> str:
    """The MAC of a 59-character InfiniBand address."""
    guid = address.lower().split(":")[-8:]
    return ":".join(guid[:3] + guid[5:])


def generate_client_id(address: str) -> str:
    """The DHCP client-id of a 59-character InfiniBand address."""
    return INFINIBAND_CLIENT_ID_PREFIX + ":".join(address.lower().split(":")[-8:])


def infiniband_ids(address: str) -> tuple[str, str | None]:
    """(MAC, client-id) of an InfiniBand address; (address, None) if it is not one."""
    if len(address.split(":")) != 20:
        return address, None
    return infiniband_address_to_mac(address), generate_client_id(address)
