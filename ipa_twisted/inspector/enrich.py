"""What the inspection data adds to, or corrects in, the hardware managers' inventory.

- ``guess_root_disk``: the spec's default root device (the ``root_disk`` key).
- ``permanent_macs`` / ``multipath_devices``: facts the generic manager does not yet use.
  A bonded NIC reports the bond's MAC in ``address``; Ironic needs each port's own
  (``bonding_slave/perm_hwaddr``), or every bond member looks like the same port. A
  multipathed LUN appears once per path (``sda``, ``sdb``); the device to deploy on is the
  ``dm-N`` map over them. ``complete_inventory`` applies both, and changes nothing when the
  inventory already has them right, so it stays correct once the generic manager does this
  itself.

Inventory items may be the value types of ``ipa_twisted.hardware.inventory`` or plain
dicts (a third-party manager's); both are handled, and neither is modified in place.
"""

from __future__ import annotations

from ipa_twisted.fileutils import read_text as _read

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

from twisted.logger import Logger

from ipa_twisted.errors import DeviceNotFound

log = Logger()

MIN_ROOT_DISK_SIZE = 4 * 1024 ** 3
"""The smallest disk the spec's root-disk guess accepts: 4 GiB."""

_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def field(item: Any, name: str, default: Any = None) -> Any:
    """``item[name]`` for a dict, ``item.name`` otherwise."""
    if isinstance(item, Mapping):
        return item.get(name, default)
    return getattr(item, name, default)


def _replace(item: Any, **changes: Any) -> Any:
    if isinstance(item, Mapping):
        return {**item, **changes}
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.replace(item, **changes)
    raise TypeError(f"cannot update an inventory item of type {type(item).__name__}")


class _Sized:
    """A disk as ``root_device.guess_root_disk`` reads it, whatever the item's type."""

    def __init__(self, item: Any) -> None:
        self.item, self.size, self.name = item, field(item, "size"), str(field(item, "name"))


def guess_root_disk(disks: Sequence[Any] | None,
                    min_size: int = MIN_ROOT_DISK_SIZE) -> Any | None:
    """The spec's guess (smallest disk of at least 4 GiB, by size then name), or None."""
    from ipa_twisted.hardware.root_device import guess_root_disk as guess
    sized = [_Sized(disk) for disk in disks or () if isinstance(field(disk, "size"), int)]
    try:
        chosen = guess(sized, min_size)  # type: ignore[arg-type]
    except DeviceNotFound:
        return None
    return cast(_Sized, chosen).item


# -- facts from sysfs ----------------------------------------------------------------------


def permanent_macs(sys_path: str) -> dict[str, str]:
    """``{interface: its own MAC}`` for bond members (``bonding_slave/perm_hwaddr``)."""
    directory = os.path.join(sys_path, "class", "net")
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return {}
    found = {}
    for name in names:
        mac = (_read(os.path.join(directory, name, "bonding_slave", "perm_hwaddr"))
               or "").lower()
        if _MAC.match(mac) and mac != "00:00:00:00:00:00":
            found[name] = mac
    return found


def multipath_devices(sys_path: str) -> dict[str, list[str]]:
    """``{"dm-N": [path devices]}`` for device-mapper multipath maps (``dm/uuid`` mpath-*)."""
    directory = os.path.join(sys_path, "block")
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return {}
    maps = {}
    for name in names:
        if not name.startswith("dm-"):
            continue
        uuid = _read(os.path.join(directory, name, "dm", "uuid")) or ""
        if not uuid.startswith("mpath-"):
            continue
        try:
            members = sorted(os.listdir(os.path.join(directory, name, "slaves")))
        except OSError:
            members = []
        if members:
            maps[name] = members
    return maps


def _sectors_bytes(sys_path: str, name: str) -> int | None:
    text = _read(os.path.join(sys_path, "block", name, "size"))
    try:
        return int(text) * 512 if text is not None else None
    except ValueError:
        return None


# -- applying them -------------------------------------------------------------------------
def complete_inventory(inventory: Mapping[str, Any], sys_path: str) -> dict[str, Any]:
    """A copy of ``inventory`` with bond members' own MACs and multipath maps as disks.

    Interfaces without a MAC address are left out (with a warning): Ironic rejects the
    whole inspection data for one of them.
    """
    result = dict(inventory)
    interfaces = inventory.get("interfaces")
    if isinstance(interfaces, list):
        named = []
        for interface in interfaces:
            if field(interface, "mac_address"):
                named.append(interface)
            else:
                log.warn("Leaving interface {name} out of the inspection data: it has no "
                         "MAC address", name=field(interface, "name"))
        result["interfaces"] = use_permanent_macs(named, permanent_macs(sys_path))
    disks = inventory.get("disks")
    if isinstance(disks, list):
        result["disks"] = merge_multipath(disks, multipath_devices(sys_path), sys_path)
    return result


def use_permanent_macs(interfaces: list[Any], macs: Mapping[str, str]) -> list[Any]:
    """``interfaces`` with each bond member's MAC replaced by its permanent one."""
    fixed = []
    for interface in interfaces:
        name = field(interface, "name")
        mac = macs.get(name) if isinstance(name, str) else None
        if mac is not None and field(interface, "mac_address") != mac:
            log.info("Interface {name} is bonded: reporting its own MAC {mac} instead of "
                     "the bond's {bond_mac}", name=name, mac=mac,
                     bond_mac=field(interface, "mac_address"))
            interface = _replace(interface, mac_address=mac)
        fixed.append(interface)
    return fixed


def merge_multipath(disks: list[Any], maps: Mapping[str, Sequence[str]],
                    sys_path: str) -> list[Any]:
    """``disks`` with the paths of each multipath map replaced by the map itself.

    The map takes the place of its first listed path and its identity (model, serial,
    WWN, vendor: the same LUN); ``hctl``, ``by_path`` and ``tran`` belong to a path and
    are dropped. Disks already listed as the map are kept as they are.
    """
    if not maps:
        return list(disks)
    by_kernel_name = {os.path.basename(str(field(disk, "name"))): disk for disk in disks}
    replacement: dict[str, str] = {}
    for dm, members in maps.items():
        if dm in by_kernel_name:          # the manager already reports the map
            replacement.update({member: "" for member in members})
            continue
        for member in members:
            replacement[member] = dm
    result: list[Any] = []
    placed: set[str] = set()
    for disk in disks:
        kernel_name = os.path.basename(str(field(disk, "name")))
        mapped = replacement.get(kernel_name)
        if mapped is None:
            result.append(disk)
            continue
        dm = mapped
        if not dm or dm in placed:        # another path of a map already listed
            continue
        placed.add(dm)
        size = _sectors_bytes(sys_path, dm) or field(disk, "size")
        name = os.path.join(os.path.dirname(str(field(disk, "name"))), dm)
        log.info("Disks {members} are paths of multipath device {name}",
                 members=", ".join(maps[dm]), name=name)
        result.append(_replace(disk, name=name, size=size, hctl=None, by_path=None,
                               tran=None, uuid=None, partuuid=None))
    return result
