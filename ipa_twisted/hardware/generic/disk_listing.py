"""The generic manager's disk listing: ``lsblk`` (JSON, else KEY="value" output), enriched
from udev and sysfs, and what sysfs says of each disk (read-only, removable, the BMC's
virtual media). The install device, erasing and software RAID share it (``DiskSource``)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from ipa_twisted.context import HardwareContext
from ipa_twisted.fileutils import read_text as _read
from ipa_twisted.hardware.generic.inventory import MachineReader, clean_text, int_or_none
from ipa_twisted.hardware.inventory import BlockDevice
from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError, ProcessTimeoutError

LSBLK_COLUMNS = "KNAME,MODEL,SIZE,ROTA,TYPE,UUID,PARTUUID,SERIAL,WWN,VENDOR,LOG-SEC,PHY-SEC,TRAN"

_SKIPPED_DISK_PREFIXES = ("fd", "ram", "zram")

UdevLookup = Callable[[str], Mapping[str, str]]
"""Block device name (``sda``) → its udev properties (``ID_WWN``, ``ID_SERIAL_SHORT`` ...)."""


class DiskListing(MachineReader):
    """The machine's block devices, given the context (``udev`` replaces the pyudev lookup
    of block device properties: tests)."""

    log = Logger()

    def __init__(self, context: HardwareContext, udev: UdevLookup | None = None) -> None:
        super().__init__(context)
        self._udev = udev
        self._udev_context: Any = None

    async def list_block_devices(self, include_partitions: bool = False
                                 ) -> list[BlockDevice]:
        """Disks (and partitions if asked) from ``lsblk``, enriched from udev and sysfs.

        Empty devices, floppies, RAM disks, ROMs and LVM volumes are left out; md RAID
        devices count as disks (their partitions are not listed); loop devices are left
        out unless ``include_loop_devices`` is set (tests on loop devices).
        """
        return [listed.device for listed in await self.list_devices(include_partitions)]

    async def list_devices(self, include_partitions: bool) -> list[Listed]:
        """As ``list_block_devices``, each with its kernel name and parent disk."""
        rows = await self._lsblk()
        include_loop = self.context.config.include_loop_devices
        by_path = self._by_path_links()
        listed = []
        for row in rows:
            name = row.get("KNAME")
            size = int_or_none(row.get("SIZE"))
            kind = _device_kind(row.get("TYPE"), include_loop)
            if (not name or kind is None or (kind == "part" and not include_partitions)
                    or not size or name.startswith(_SKIPPED_DISK_PREFIXES)):
                continue
            parent = (row.get("PKNAME") or self._parent_disk(name)) if kind == "part" \
                else None
            if parent is not None and parent.startswith("md"):
                continue                    # partitions of RAID devices: the RAID's business
            udev = self._udev_properties(name)
            path = self._dev(name)
            listed.append(Listed(BlockDevice(
                name=path,
                model=row.get("MODEL") or clean_text(udev.get("ID_MODEL")),
                size=size,
                rotational=(row.get("ROTA") or "").lower() in ("1", "true"),
                wwn=row.get("WWN") or clean_text(udev.get("ID_WWN")),
                serial=row.get("SERIAL") or clean_text(udev.get("ID_SERIAL_SHORT")),
                vendor=row.get("VENDOR") or clean_text(udev.get("ID_VENDOR")),
                wwn_with_extension=clean_text(udev.get("ID_WWN_WITH_EXTENSION")),
                wwn_vendor_extension=clean_text(udev.get("ID_WWN_VENDOR_EXTENSION")),
                hctl=self._hctl(name),
                by_path=by_path.get(os.path.realpath(path)),
                uuid=row.get("UUID"),
                partuuid=row.get("PARTUUID"),
                logical_sectors=int_or_none(row.get("LOG-SEC")),
                physical_sectors=int_or_none(row.get("PHY-SEC")),
                tran=row.get("TRAN"),
            ), name, kind, parent))
        return listed

    def _sysfs_flag(self, name: str, flag: str) -> bool:
        """Whether ``{sys}/class/block/<name>/<flag>`` (ro, removable) reads 1.

        A partition without the file takes its disk's.
        """
        value = _read(self._sys("class", "block", name, flag))
        if value is None:
            parent = self._parent_disk(name)
            if parent is not None and parent != name:
                value = _read(self._sys("class", "block", parent, flag))
        return value == "1"

    def _parent_disk(self, name: str) -> str | None:
        """The disk a partition belongs to, from sysfs (None if sysfs does not say)."""
        link = self._sys("class", "block", name)
        if not os.path.exists(os.path.join(link, "partition")):
            return None
        return os.path.basename(os.path.dirname(os.path.realpath(link))) or None

    def is_read_only(self, name: str) -> bool:
        """Whether the kernel flags ``name`` read-only (sysfs ``ro``)."""
        return self._sysfs_flag(name, "ro")

    def is_removable(self, name: str) -> bool:
        return self._sysfs_flag(name, "removable")

    def is_virtual_media(self, device: BlockDevice) -> bool:
        """Whether ``device`` is the BMC's virtual media (``by-label/ir-vfd-dev``)."""
        label = self._dev("disk", "by-label", "ir-vfd-dev")
        return (os.path.lexists(label)
                and os.path.realpath(label) == os.path.realpath(device.name))

    async def _lsblk(self) -> list[dict[str, str | None]]:
        """lsblk's rows, flat: JSON output, else the older KEY="value" output."""
        runner = self.context.runner
        try:
            out, _ = await runner.execute("lsblk", "-bia", "--json", "-o", LSBLK_COLUMNS,
                                          timeout=self._timeout)
            return _lsblk_json_rows(out)
        except (CommandNotFoundError, ProcessTimeoutError):
            raise
        except (ProcessExecutionError, ValueError) as e:
            self.log.info("lsblk --json failed, trying KEY=value output: {error}",
                          error=str(e))
        out, _ = await runner.execute("lsblk", "-Pbia", "-o", LSBLK_COLUMNS,
                                      timeout=self._timeout)
        return _lsblk_pair_rows(out)

    def _hctl(self, name: str) -> str | None:
        try:
            entries = sorted(os.listdir(self._sys("block", name, "device", "scsi_device")))
        except OSError:
            return None
        return entries[0] if entries else None

    def _by_path_links(self) -> dict[str, str]:
        """Resolved device path → its first ``/dev/disk/by-path`` link."""
        directory = self._dev("disk", "by-path")
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            return {}
        links: dict[str, str] = {}
        for entry in entries:
            link = os.path.join(directory, entry)
            links.setdefault(os.path.realpath(link), link)
        return links

    def _udev_properties(self, name: str) -> Mapping[str, str]:
        if self._udev is not None:
            return self._udev(name)
        if os.path.realpath(self.context.config.sys_path) != "/sys":
            return {}                      # a fake tree: the real udev database is unrelated
        try:
            import pyudev
            if self._udev_context is None:
                self._udev_context = pyudev.Context()
            device = pyudev.Devices.from_name(self._udev_context, "block", name)
            return dict(device.properties)
        except Exception as e:
            self.log.debug("No udev properties for {name}: {error}", name=name, error=str(e))
            return {}


@dataclass(frozen=True)
class Listed:
    """A listed device with what the inventory does not show: kernel name, kind, parent."""

    device: BlockDevice
    kname: str
    kind: str
    """``disk`` (disks, md RAID devices, loop devices when included) or ``part``."""
    parent: str | None


def _device_kind(lsblk_type: str | None, include_loop: bool) -> str | None:
    """``disk``, ``part`` or None (not listed) for an lsblk TYPE."""
    if lsblk_type in ("disk", "part"):
        return lsblk_type
    if lsblk_type is not None and (lsblk_type.startswith("raid") or lsblk_type == "md"):
        return "disk"
    if lsblk_type == "loop" and include_loop:
        return "disk"
    return None


def _lsblk_json_rows(output: bytes) -> list[dict[str, str | None]]:
    """Flat rows from ``lsblk --json`` (children flattened, each device once)."""
    document = json.loads(output)
    rows: list[dict[str, str | None]] = []
    seen: set[str] = set()

    def walk(devices: Iterable[Mapping[str, Any]], parent: str | None) -> None:
        for device in devices:
            row = {key.upper().replace("_", "-"): clean_text(value)
                   for key, value in device.items() if key != "children"}
            if parent is not None:
                row.setdefault("PKNAME", parent)
            if row.get("KNAME") not in seen:
                seen.add(str(row.get("KNAME")))
                rows.append(row)
            walk(device.get("children") or (), row.get("KNAME"))

    walk(document["blockdevices"], None)
    return rows


_LSBLK_PAIR = re.compile(r'([A-Z0-9_:-]+)="((?:[^"\\]|\\.)*)"')


def _lsblk_pair_rows(output: bytes) -> list[dict[str, str | None]]:
    """Rows from ``lsblk -P`` (KEY="value" ..., with \\xNN escapes)."""
    rows = []
    for line in output.decode("utf-8", "replace").splitlines():
        row = {key.replace("_", "-"): clean_text(_unescape(value))
               for key, value in _LSBLK_PAIR.findall(line)}
        if row:
            rows.append(row)
    return rows


def _unescape(value: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
