"""Value types of the hardware inventory, serialised with the reference agent's field names.

``serialize()`` gives the JSON object Ironic and Inspector read (see "Hardware Inventory" in
the spec); ``ipa_twisted.encoding`` calls it, so inventories may hold these objects directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class _Value:
    """Serialises a dataclass as a dict of its fields, in declaration order."""

    def serialize(self) -> dict[str, Any]:
        assert dataclasses.is_dataclass(self)
        return dataclasses.asdict(self)

    @classmethod
    def serializable_fields(cls) -> tuple[str, ...]:
        """The JSON field names, in order."""
        assert dataclasses.is_dataclass(cls)
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass
class BlockDevice(_Value):
    """A disk (or partition): ``name`` is its device path, ``size`` in bytes."""

    name: str
    model: str | None
    size: int
    rotational: bool
    wwn: str | None = None
    serial: str | None = None
    vendor: str | None = None
    wwn_with_extension: str | None = None
    wwn_vendor_extension: str | None = None
    hctl: str | None = None
    by_path: str | None = None
    uuid: str | None = None
    partuuid: str | None = None
    logical_sectors: int | None = None
    physical_sectors: int | None = None
    tran: str | None = None


@dataclass
class NetworkInterface(_Value):
    """A network interface; ``lldp`` is a list of ``[type, hex value]`` TLVs when collected."""

    name: str
    mac_address: str | None
    ipv4_address: str | None = None
    ipv6_address: str | None = None
    has_carrier: bool = True
    lldp: list[Any] | None = None
    vendor: str | None = None
    product: str | None = None
    client_id: str | None = None
    biosdevname: str | None = None
    speed_mbps: int | None = None
    pci_address: str | None = None
    driver: str | None = None


@dataclass
class CPU(_Value):
    """CPU information; ``frequency`` in MHz as the kernel reports it (a string)."""

    model_name: str | None
    frequency: str | None
    count: int | None
    architecture: str | None
    flags: list[str] = field(default_factory=list)
    socket_count: int | None = None


@dataclass
class Memory(_Value):
    """``total`` usable bytes; ``physical_mb`` installed MiB (from SMBIOS), optional."""

    total: int | None
    physical_mb: int | None = None


@dataclass
class SystemFirmware(_Value):
    """BIOS/UEFI firmware identification."""

    vendor: str | None = None
    version: str | None = None
    build_date: str | None = None


@dataclass
class SystemVendorInfo(_Value):
    """System identification from SMBIOS."""

    product_name: str | None
    serial_number: str | None
    manufacturer: str | None
    firmware: SystemFirmware = field(default_factory=SystemFirmware)


@dataclass
class BootInfo(_Value):
    """``current_boot_mode`` is "uefi" or "bios"; ``pxe_interface`` a MAC address or None."""

    current_boot_mode: str
    pxe_interface: str | None = None
