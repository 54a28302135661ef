"""What the node protects from the disk steps, and what the agent refuses to erase.

``skip_block_devices`` (a node property: device hints and RAID volume names) protects disks,
md devices and their holder disks (``protected_devices``); a shared cluster filesystem on a
disk stops any erase (``guard_special_filesystems``). Erasing, software RAID and the install
device all ask here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from ipa_twisted.blockdev import disks
from ipa_twisted.blockdev.md import list_md_devices, md_detail, md_path, parent_disk
from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import BlockDeviceEraseError, ProtectedDeviceError
from ipa_twisted.hardware import root_device
from ipa_twisted.hardware.inventory import BlockDevice
from ipa_twisted.process import ProcessExecutionError

log = Logger()


@dataclass
class Protection:
    """What the node's ``skip_block_devices`` protects among the devices present.

    ``devices`` maps each protected device (disk or md device) to why: a device hint
    matches it; its RAID volume name is listed; it is a holder disk of a protected md
    device; or it is an md device with a member on a disk a hint protects. Nothing may be
    written to a protected device (nor to its partitions).
    """

    devices: dict[str, str] = field(default_factory=dict)
    kept_arrays: dict[str, str | None] = field(default_factory=dict)
    """Protected md devices: path → volume name."""
    neighbours: dict[str, str | None] = field(default_factory=dict)
    """Unprotected md devices on a holder disk of a protected one: path → volume name.
    Their partitions stay (the holder's table is protected); their contents may go."""

    def reason(self, device: str) -> str | None:
        """Why ``device`` is protected, or None if it is not."""
        return self.devices.get(device)

    def __bool__(self) -> bool:
        return bool(self.devices)


async def protected_devices(context: HardwareContext, node: Any,
                            devices: Sequence[BlockDevice]) -> Protection:
    """The devices among ``devices`` and the md arrays that ``skip_block_devices`` protects.

    RootDeviceHintError if the node's ``skip_block_devices`` is invalid. Runs no program
    when the node protects nothing.
    """
    skip = root_device.skip_list_from_node(node if isinstance(node, Mapping) else None)
    protection = Protection()
    if not skip:
        return protection
    reasons = skip.match(devices, dev_path=context.config.dev_path)
    arrays: dict[str, tuple[str | None, list[str]]] = {}
    for array in list_md_devices(context):
        path = md_path(context, array.name)
        detail = await md_detail(context, path)
        holders: list[str] = []
        for component in (detail.components if detail is not None else ()):
            disk = parent_disk(context, component)
            if disk not in holders:
                holders.append(disk)
        if not holders:                       # mdstat knows the members when mdadm does not
            holders = list(dict.fromkeys(
                parent_disk(context, md_path(context, member)) for member in array.members))
        arrays[path] = (detail.volume_name if detail is not None else None, holders)
    for path, (volume, _) in arrays.items():
        if volume is not None and volume in skip.volume_names:
            reasons.setdefault(path, f"skip_block_devices entry {{'volume_name': "
                                     f"'{volume}'}} names its RAID volume")
    for volume in skip.volume_names:
        if not any(found == volume for found, _ in arrays.values()):
            log.info("skip_block_devices names RAID volume {volume}, which is not here",
                     volume=volume)
    direct = dict(reasons)
    for path, (_, holders) in arrays.items():
        if path not in reasons:
            on = next((h for h in holders if h in direct), None)
            if on is not None:
                reasons[path] = f"it has a member on the protected disk {on} ({direct[on]})"
    for path, (volume, holders) in arrays.items():
        if path in reasons:
            protection.kept_arrays[path] = volume
            for holder in holders:
                reasons.setdefault(holder, f"it holds the protected RAID device {path} "
                                           f"({reasons[path]})")
    for path, (volume, holders) in arrays.items():
        if path not in reasons and any(h in reasons for h in holders):
            protection.neighbours[path] = volume
    protection.devices = reasons
    return protection


async def protected_from_erasing(context: HardwareContext, node: Any,
                                 devices: Sequence[BlockDevice]) -> Protection:
    """``protected_devices``, for the erase steps: BlockDeviceEraseError, naming the
    problem, if the node's ``skip_block_devices`` is invalid."""
    try:
        return await protected_devices(context, node, devices)
    except root_device.RootDeviceHintError as e:
        raise BlockDeviceEraseError(
            f"Invalid skip_block_devices in the node's properties, nothing was erased: {e}"
        ) from e


async def guard_special_filesystems(context: HardwareContext, devices: Sequence[str]) -> None:
    """ProtectedDeviceError if one of ``devices`` (or its partitions) holds a shared cluster
    filesystem (VMFS, GFS2, OCFS2, GPFS), unless ``guard_special_filesystems`` is off.

    Called before anything is erased, for every device the step would erase.
    BlockDeviceEraseError if the devices cannot be checked.
    """
    if not context.config.guard_special_filesystems or not devices:
        return
    try:
        found = await disks.find_shared_filesystems(context, devices)
    except (ProcessExecutionError, OSError) as e:
        raise BlockDeviceEraseError(
            f"Cannot check {', '.join(devices)} for shared cluster filesystems before "
            f"erasing (guard_special_filesystems): {e}") from e
    for device, what in found:
        log.error("Not erasing {device}: it holds a {what}, a shared cluster filesystem "
                  "(guard_special_filesystems)", device=device, what=what)
    if found:
        device, what = found[0]
        raise ProtectedDeviceError(device, what)


def log_protected(step: str, device: str, reason: str) -> None:
    """The one log line for a device a step leaves alone because the node protects it."""
    log.info("{step}: not erasing {device}, protected by skip_block_devices: {reason}",
             step=step, device=device, reason=reason)
