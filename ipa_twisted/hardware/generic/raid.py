# Over 500 lines: one story, Ironic's RAID configuration from validation to built arrays and back.
"""Software RAID with mdadm: the ``raid`` interface's steps, from Ironic's RAID configuration.

``SoftwareRaid`` gives the generic hardware manager ``validate_configuration``,
``create_configuration`` and ``delete_configuration`` (clean steps, priority 0) and
``apply_configuration`` (a deploy step taking the configuration as an argument). The
configuration is Ironic's ``target_raid_config``::

    {"logical_disks": [
        {"size_gb": 100, "raid_level": "1", "controller": "software",
         "volume_name": "root", "physical_disks": [{"serial": "S1"}, {"serial": "S2"}]},
        {"size_gb": "MAX", "raid_level": "0", "controller": "software"}]}

The holder disks of a logical disk are the ones its ``physical_disks`` device hints pick
(one disk per hint, none twice), else every suitable disk: not an md device, not read-only,
not named by the node's ``skip_block_devices``. Each holder gets a partition table (GPT for
UEFI, else the node's ``disk_label``), the partitions the boot mode needs in front, then one
partition per logical disk it holds, in order (the ``MAX`` one last); each logical disk is an
md device (``/dev/mdN``, named by its ``volume_name``) over its partitions. The boot layout:

- UEFI: an EFI system partition (``ESP_SIZE_MIB``, partition name ``uefi-holder-N``) on every
  holder, mirrored at bootloader time by ``prepare_boot_partitions_for_softraid``;
- BIOS on GPT: a BIOS boot partition (1-8 MiB, ``bios_grub``) on every holder for GRUB;
- BIOS on MBR: the RAID partitions start at 1 MiB (GRUB uses the gap before them).

The first logical disk must be RAID-1 (the boot loader reads the root file system from any
one of its members); at most two logical disks, at most one of size ``MAX``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ipa_twisted.blockdev import disks
from ipa_twisted.blockdev.md import (get_component_devices, get_holder_disks, has_md_superblock,
                                     is_md_name, list_md_devices, md_detail, md_path,
                                     md_scan_and_assemble, md_timeout, mdadm, parent_disk,
                                     zero_superblock)
from ipa_twisted.blockdev.disks import Wiper
from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import CommandExecutionError, SoftwareRAIDError
from ipa_twisted.hardware import root_device
from ipa_twisted.hardware.generic.disk_source import DiskSource
from ipa_twisted.hardware.generic.protection import Protection, protected_devices
from ipa_twisted.hardware.inventory import BlockDevice
from ipa_twisted.process import ProcessExecutionError, failures_as

log = Logger()

SUPPORTED_SOFTWARE_RAID_LEVELS = ("0", "1", "1+0", "5", "6")
MIN_HOLDERS = {"0": 2, "1": 2, "1+0": 2, "5": 3, "6": 4}
"""Fewest holder disks per RAID level (mdadm's RAID 10 works on two)."""
ESP_SIZE_MIB = 550
"""The EFI system partition on each holder (DIB's size, and the reference agent's)."""
BIOS_BOOT_END_MIB = 8
"""On GPT in BIOS mode, the BIOS boot partition spans 1 MiB to this."""
FIRST_PARTITION_MIB = 1
ESP_VOLUME_NAME = "esp"

RAID_APPLY_CONFIGURATION_ARGSINFO = {
    "raid_config": {"description": "The RAID configuration to apply.", "required": True},
    "delete_existing": {
        "description": ("Setting this to 'True' indicates to delete existing RAID "
                        "configuration prior to creating the new configuration. "
                        "Default value is 'True'."),
        "required": False},
}


def raid_clean_steps() -> list[dict[str, Any]]:
    """The ``raid`` interface's clean steps (run when Ironic's RAID feature asks)."""
    return [
        {"step": "delete_configuration", "priority": 0, "interface": "raid",
         "reboot_requested": False, "abortable": True},
        {"step": "create_configuration", "priority": 0, "interface": "raid",
         "reboot_requested": False, "abortable": True},
    ]


def raid_deploy_steps() -> list[dict[str, Any]]:
    """The ``raid`` interface's deploy steps: ``apply_configuration`` (from a template)."""
    return [
        {"step": "apply_configuration", "priority": 0, "interface": "raid",
         "reboot_requested": False, "argsinfo": RAID_APPLY_CONFIGURATION_ARGSINFO},
    ]


def mdadm_level(raid_level: str) -> str:
    """mdadm's ``--level`` for an Ironic RAID level (``1+0`` is mdadm's ``10``)."""
    return "10" if raid_level == "1+0" else raid_level



@dataclass
class LogicalDiskPlan:
    """A logical disk of the configuration and where it goes."""

    index: int
    """Its position in the configuration."""
    raid_level: str
    size_gb: int | None
    """None for ``MAX``."""
    volume_name: str | None
    holders: list[str]
    components: list[str] = field(default_factory=list)
    device: str | None = None


def select_holders(devices: Sequence[BlockDevice], logical_disks: Sequence[Mapping[str, Any]],
                   *, dev_path: str = "/dev",
                   excluded: Mapping[str, tuple[BlockDevice, str]] | None = None,
                   ) -> tuple[list[str], list[list[str]]]:
    """(every holder disk, in order; each logical disk's holders).

    A logical disk with ``physical_disks`` takes, for each hint, the first matching disk it
    has not taken yet; one without takes every disk. SoftwareRAIDError when a hint matches
    no disk (left); it says which ``excluded`` disks (``{name: (device, why)}``: protected,
    read-only) the hint would have matched.
    """
    everything: list[str] = []
    per_disk: list[list[str]] = []
    for logical_disk in logical_disks:
        hints_list = logical_disk.get("physical_disks")
        if hints_list:
            matching: list[str] = []
            for hints in hints_list:
                try:
                    found = root_device.find_devices_by_hints(devices, hints,
                                                              dev_path=dev_path)
                    candidates = [str(d["name"] if isinstance(d, Mapping) else d.name)
                                  for d in found]
                except root_device.RootDeviceHintError as e:
                    raise SoftwareRAIDError(f"Invalid physical disk hints {hints}: {e}") \
                        from e
                if not candidates:
                    others = root_device.find_devices_by_hints(
                        [device for device, _ in (excluded or {}).values()], hints,
                        dev_path=dev_path)
                    why = "".join(
                        f"; {name} matches but cannot be used: {(excluded or {})[name][1]}"
                        for name in (str(_name(d)) for d in others))
                    raise SoftwareRAIDError(
                        f"No candidates for physical disk {hints} from the list "
                        f"{[d.name for d in devices]}{why}")
                left = [name for name in candidates if name not in matching]
                if not left:
                    raise SoftwareRAIDError(
                        f"No candidates left for physical disk {hints} from the list "
                        f"{candidates} after picking {matching} for previous volumes")
                matching.append(left[0])
        else:
            matching = [str(d.name) for d in devices]
        per_disk.append(matching)
        everything.extend(name for name in matching if name not in everything)
    return everything, per_disk


def _name(device: Any) -> Any:
    return device["name"] if isinstance(device, Mapping) else device.name


def _size_gb(value: Any) -> int | None:
    """None for ``MAX``; ValueError unless a positive whole number of GiB."""
    if isinstance(value, str) and value.strip().upper() == "MAX":
        return None
    if isinstance(value, bool):
        raise ValueError(value)
    size = int(value)
    if size <= 0 or (isinstance(value, float) and value != size):
        raise ValueError(value)
    return size


async def prepare_boot_partitions_for_softraid(context: HardwareContext, raid_device: str,
                                               boot_mode: str) -> str | None:
    """Make the holders of ``raid_device`` bootable; the mirrored ESP's path for UEFI.

    UEFI: the EFI system partitions ``create_configuration`` left on the holders
    (``uefi-holder-N``) become one RAID-1 with metadata 1.0 (at the end, so firmware sees
    each member as a plain FAT partition), named ``esp`` and formatted FAT32; an existing
    ``esp`` array is reused. BIOS: nothing to do (the BIOS boot partitions or the MBR gap
    are there already); None. SoftwareRAIDError on failure.
    """
    if boot_mode != "uefi":
        return None
    for array in list_md_devices(context):
        path = md_path(context, array.name)
        detail = await md_detail(context, path)
        if detail is not None and detail.volume_name == ESP_VOLUME_NAME:
            log.info("Found the RAIDed ESP {device}; not creating it", device=path)
            return path
    partitions = []
    for holder in await get_holder_disks(context, raid_device):
        layout = await disks.read_layout(context, holder)
        esp = next((p for p in layout.partitions
                    if p.name.startswith("uefi-holder-") or "esp" in p.flags), None)
        if esp is None:
            raise SoftwareRAIDError(f"No EFI system partition on the holder disk {holder} of "
                                    f"{raid_device}: was the RAID created for UEFI?")
        partitions.append(esp.path)
    device = md_path(context, f"md{_free_md_numbers(context, 1)[0]}")
    log.info("Mirroring the EFI system partitions {partitions} as {device}",
             partitions=", ".join(partitions), device=device)
    with failures_as(SoftwareRAIDError, f"Could not create the RAIDed ESP on {partitions}"):
        await mdadm(context, "--create", device, "--force", "--run", "--metadata=1.0",
                     "--level", "1", "--name", ESP_VOLUME_NAME, "--raid-devices",
                     str(len(partitions)), *partitions)
        await context.runner.execute("mkfs.vfat", "-F", "32", "-n", "EFI-SYSTEM", device,
                                     timeout=md_timeout(context))
    return device


def _free_md_numbers(context: HardwareContext, count: int,
                     taken: Iterable[str] = ()) -> list[int]:
    """``count`` md numbers no array uses (``/proc/mdstat``) nor ``taken`` names."""
    used = {array.name for array in list_md_devices(context)} | set(taken)
    free: list[int] = []
    number = 0
    while len(free) < count:
        if f"md{number}" not in used:
            free.append(number)
        number += 1
    return free


# -- the steps ------------------------------------------------------------------------------

class SoftwareRaid:
    """The software RAID steps of the generic hardware manager, given its context and its
    disk listing; ``wipe`` replaces the zeroing of disk ends (tests)."""

    log = Logger()

    def __init__(self, context: HardwareContext, source: DiskSource,
                 wipe: Wiper | None = None) -> None:
        self.context = context
        self.source = source
        self._wipe = wipe

    async def validate_configuration(self, raid_config: Any, node: Any) -> None:
        """SoftwareRAIDError unless ``raid_config`` is a software RAID this agent can build.

        Checked: one or two logical disks, all ``controller: software``; the first RAID-1;
        levels among 0, 1, 1+0, 5, 6; sizes a positive number of GiB or ``MAX`` (once);
        ``physical_disks`` a list of at least two device-hint objects that match disks; and
        enough holder disks for each level.
        """
        uuid = (node or {}).get("uuid") if isinstance(node, Mapping) else None
        if not raid_config or not isinstance(raid_config, Mapping):
            raise SoftwareRAIDError(f"No RAID configuration was given for node {uuid}")
        logical_disks = raid_config.get("logical_disks")
        if not logical_disks or not isinstance(logical_disks, list):
            raise SoftwareRAIDError("RAID config contains no logical disks")
        problems: list[str] = []
        if len(logical_disks) not in (1, 2):
            problems.append("Software RAID configuration requires one or two logical disks")
        if not all(isinstance(disk, Mapping) for disk in logical_disks):
            raise SoftwareRAIDError("Each logical disk must be an object")
        sizes: list[int | None] = []
        for number, disk in enumerate(logical_disks, 1):
            if disk.get("controller") != "software":
                problems.append("Software RAID configuration requires all logical disks to "
                                "have 'controller'='software'")
            level = str(disk.get("raid_level"))
            if level not in SUPPORTED_SOFTWARE_RAID_LEVELS:
                problems.append(f"Software RAID configuration does not support RAID level "
                                f"{disk.get('raid_level')}")
            try:
                sizes.append(_size_gb(disk.get("size_gb")))
            except (TypeError, ValueError):
                problems.append(f"Logical disk {number}: size_gb must be a positive whole "
                                f"number of GiB or 'MAX', not {disk.get('size_gb')!r}")
            physical = disk.get("physical_disks")
            if physical is not None:
                if not isinstance(physical, list) or len(physical) < 2:
                    problems.append("The physical_disks parameter for software RAID must be a "
                                    "list with at least 2 items, each specifying a disk in "
                                    "the device hints format")
                elif not all(isinstance(item, Mapping) for item in physical):
                    problems.append("The physical_disks parameter for software RAID must be a "
                                    "list of device hints (dictionaries)")
            name = disk.get("volume_name")
            if name is not None and (not isinstance(name, str)
                                     or not re.match(r"^[\w.-]{1,32}$", name)):
                problems.append(f"Logical disk {number}: volume_name must be 1 to 32 letters, "
                                f"digits, '.', '_' or '-', not {name!r}")
        if str(logical_disks[0].get("raid_level")) != "1":
            problems.append("Software RAID Configuration requires RAID-1 for the first "
                            "logical disk")
        if sizes.count(None) > 1:
            problems.append("Software RAID can have only one RAID device with size 'MAX'")
        if not problems:
            candidates, excluded, protection = await self._raid_candidates(node)
            present = _present_volumes(protection)
            to_create = [d for d in logical_disks if d.get("volume_name") not in present]
            try:
                _, per_disk = select_holders(candidates, to_create,
                                             dev_path=self.context.config.dev_path,
                                             excluded=excluded)
            except SoftwareRAIDError as e:
                problems.append(e.details)
            else:
                for disk, holders in zip(to_create, per_disk):
                    level = str(disk["raid_level"])
                    if len(holders) < MIN_HOLDERS[level]:
                        problems.append(
                            f"Software RAID configuration is not possible for RAID level "
                            f"{level} with only {len(holders)} block devices found.")
        if problems:
            raise SoftwareRAIDError(f"Could not validate Software RAID config for {uuid}: "
                                    + "; ".join(problems))

    async def create_configuration(self, node: Any, ports: Any) -> dict[str, Any]:
        """Create the node's ``target_raid_config`` as software RAID; that configuration.

        Nothing ({}) when the node has no target RAID configuration, or none for software.
        The holder disks must have no partitions (run ``delete_configuration`` or
        ``erase_devices_metadata`` first). Disks the node's ``skip_block_devices`` protects
        are never holders; a logical disk whose volume is there already, kept because of
        ``skip_block_devices`` (see ``delete_configuration``), is not created again.
        SoftwareRAIDError on failure.
        """
        raid_config = (node or {}).get("target_raid_config") if isinstance(node, Mapping) \
            else None
        if not raid_config:
            self.log.debug("No target_raid_config found")
            return {}
        return await self._create_configuration(node, raid_config)

    async def apply_configuration(self, node: Any, ports: Any, raid_config: Any,
                                  delete_existing: bool = True) -> dict[str, Any]:
        """The ``raid.apply_configuration`` deploy step: validate, delete, create."""
        await self.validate_configuration(raid_config, node)
        if delete_existing:
            await self.delete_configuration(node, ports)
        return await self._create_configuration(node, raid_config)

    async def delete_configuration(self, node: Any, ports: Any) -> None:
        """Delete every software RAID device: stop it, zero its members' superblocks and
        wipe its holder disks. Up to two passes; SoftwareRAIDError if arrays remain.

        What the node's ``skip_block_devices`` protects stays: an array whose
        ``volume_name`` it lists, or whose md device or a member disk its device hints
        match, is kept with its holder disks and their partition tables; another array on
        those holders is kept too, its contents wiped (``wipefs``), as the reference agent
        does, so ``create_configuration`` can use it again by its volume name.
        """
        await md_scan_and_assemble(self.context)
        _, _, protection = await self._raid_candidates(node)
        await self._keep_protected_arrays(protection)
        for _ in range(2):
            arrays = self._arrays_to_delete(protection)
            if not arrays:
                break
            await self._delete_pass(arrays, protection)
        else:
            arrays = self._arrays_to_delete(protection)
            if arrays:
                raise SoftwareRAIDError("Unable to clean all softraid correctly. Remaining "
                                        f"{arrays}")
        self.log.info("Software RAID configuration deleted")

    async def get_holder_disks(self, raid_device: str) -> list[str]:
        """The disks under md device ``raid_device``."""
        return await get_holder_disks(self.context, raid_device)

    async def software_raid_install_device(self, node: Any) -> str | None:
        """The md device to install on, when the node's RAID configuration is software.

        The device of the first logical disk: the array with its ``volume_name``, else the
        lowest-numbered array. None without a software RAID configuration or arrays.
        """
        config = (node or {}).get("target_raid_config") if isinstance(node, Mapping) else None
        logical = (config or {}).get("logical_disks") if isinstance(config, Mapping) else None
        if not logical or not isinstance(logical[0], Mapping) \
                or logical[0].get("controller") != "software":
            return None
        arrays = sorted((a for a in list_md_devices(self.context) if a.active),
                        key=lambda a: _md_number(a.name))
        wanted = logical[0].get("volume_name")
        for array in arrays:
            path = md_path(self.context, array.name)
            if wanted is None:
                return path
            detail = await md_detail(self.context, path)
            if detail is not None and detail.volume_name == wanted:
                return path
        return None

    # -- creating --------------------------------------------------------------------------
    async def _create_configuration(self, node: Any, raid_config: Any) -> dict[str, Any]:
        logical_disks = (raid_config.get("logical_disks") or []) \
            if isinstance(raid_config, Mapping) else []
        if not any(isinstance(d, Mapping) and d.get("controller") == "software"
                   for d in logical_disks):
            self.log.debug("No Software RAID config found")
            return {}
        self.log.info("Creating Software RAID")
        await self.validate_configuration(raid_config, node)
        context = self.context
        candidates, excluded, protection = await self._raid_candidates(node, log_excluded=True)
        present = _present_volumes(protection)
        wanted = {d.get("volume_name") for d in logical_disks}
        stray = [f"{path} ({volume or 'no volume name'})"
                 for path, volume in protection.neighbours.items()
                 if volume not in wanted and volume != ESP_VOLUME_NAME]
        if stray:
            raise SoftwareRAIDError(
                f"Existing Software RAID device(s) {', '.join(stray)} share holder disks with "
                "a RAID device that skip_block_devices protects, and the target RAID "
                "configuration has no logical disk of that volume name to reuse them")
        indexed = []
        for index, disk in enumerate(logical_disks):
            name = disk.get("volume_name")
            if name in present:
                self.log.info("Software RAID volume {name} is already there ({device}), kept "
                              "because of skip_block_devices: not creating it", name=name,
                              device=present[name])
            else:
                indexed.append((index, disk))
        if not indexed:
            self.log.info("Every logical disk of the RAID configuration is already there")
            return dict(raid_config)
        holders, per_disk = select_holders(candidates, [d for _, d in indexed],
                                           dev_path=context.config.dev_path, excluded=excluded)
        with_partitions = []
        for holder in holders:
            try:
                if (await disks.read_layout(context, holder)).partitions:
                    with_partitions.append(holder)
            except CommandExecutionError:
                continue                           # no readable table: nothing on it
        if with_partitions:
            raise SoftwareRAIDError("Partitions detected on devices "
                                    f"{', '.join(with_partitions)} during RAID config")
        from ipa_twisted.deploy.partition import (get_node_boot_mode,  # on first use
                                                  get_partition_table_type_from_specs)
        boot_mode = get_node_boot_mode(node, sys_path=context.config.sys_path)
        table = get_partition_table_type_from_specs(node, sys_path=context.config.sys_path,
                                                    boot_mode=boot_mode)
        plans = [LogicalDiskPlan(index=i, raid_level=str(d["raid_level"]),
                                 size_gb=_size_gb(d["size_gb"]),
                                 volume_name=d.get("volume_name"), holders=list(h))
                 for (i, d), h in zip(indexed, per_disk)]
        # The MAX logical disk goes last on each holder: it takes what the others leave.
        ordered = sorted(plans, key=lambda p: p.size_gb is None)
        self.log.info("Software RAID on {holders}: {table} tables, boot mode {mode}",
                      holders=", ".join(holders), table=table, mode=boot_mode)
        with failures_as(SoftwareRAIDError, "Failed to create the software RAID"):
            layouts = [self._holder_layout(holder, number, table, boot_mode, ordered)
                       for number, holder in enumerate(holders)]
            # Each holder is its own disk: partition them all at once.
            await _all(Deferred.fromCoroutine(self._partition_holder(holder, commands, created))
                       for holder, (commands, created) in zip(holders, layouts))
            names = _free_md_numbers(context, len(ordered))
            for plan, md_number in zip(ordered, names):
                await self._create_md_device(plan, md_path(context, f"md{md_number}"))
        self.log.info("Successfully created Software RAID: {devices}", devices=", ".join(
            f"{p.device} (RAID-{p.raid_level} on {', '.join(p.components)})" for p in ordered))
        return dict(raid_config)

    def _holder_layout(self, holder: str, number: int, table: str, boot_mode: str,
                       plans: Sequence[LogicalDiskPlan]) -> tuple[list[str], list[str]]:
        """(parted's commands for one holder disk, the RAID partitions they make).

        Each plan the holder is in gets its partition appended to ``components``.
        """
        commands = ["mklabel", table]
        partitions = 0
        start = FIRST_PARTITION_MIB
        if boot_mode == "uefi":
            end = start + ESP_SIZE_MIB
            partitions += 1
            commands += ["mkpart", f"uefi-holder-{number}", "fat32", f"{start}MiB",
                         f"{end}MiB", "set", str(partitions), "esp", "on"]
            start = end
        elif table == "gpt":
            end = BIOS_BOOT_END_MIB
            partitions += 1
            commands += ["mkpart", f"bios-boot-part-{number}", f"{start}MiB", f"{end}MiB",
                         "set", str(partitions), "bios_grub", "on"]
            start = end
        created = []
        for plan in plans:
            if holder not in plan.holders:
                continue
            end_text = "100%" if plan.size_gb is None else f"{start + plan.size_gb * 1024}MiB"
            name = "primary" if table == "msdos" else f"raid-{plan.volume_name or plan.index}"
            partitions += 1
            commands += ["mkpart", name, f"{start}MiB", end_text,
                         "set", str(partitions), "raid", "on"]
            component = disks.partition_index_to_path(holder, partitions)
            plan.components.append(component)
            created.append(component)
            if plan.size_gb is not None:
                start += plan.size_gb * 1024
        return commands, created

    async def _partition_holder(self, holder: str, commands: Sequence[str],
                                created: Sequence[str]) -> None:
        """Write one holder's partition table (one parted run) and wait for its partitions."""
        context = self.context
        self.log.info("Partitioning {device}: {commands}", device=holder,
                      commands=" ".join(commands))
        with failures_as(SoftwareRAIDError, f"Failed to create partitions on {holder}"):
            await context.runner.execute("parted", "-s", "-a", "optimal", holder, "--",
                                         *commands, timeout=md_timeout(context))
        await disks.rescan_device(context, holder)
        for component in created:
            await disks.wait_for_partition(context, holder, component)

    async def _create_md_device(self, plan: LogicalDiskPlan, device: str) -> None:
        name = plan.volume_name or os.path.basename(device)
        components = plan.components
        self.log.info("Creating md device {device} ({name}): RAID-{raid_level} on {components}",
                      device=device, name=name, raid_level=plan.raid_level,
                      components=", ".join(components))
        with failures_as(SoftwareRAIDError,
                         f"Failed to create md device {device} on {' '.join(components)}"):
            await mdadm(self.context, "--create", device, "--force", "--run", "--metadata=1",
                         "--level", mdadm_level(plan.raid_level), "--name", name,
                         "--raid-devices", str(len(components)), *components)
        plan.device = device
        actual = await get_component_devices(self.context, device)
        for missing in [c for c in components if c not in actual]:
            self.log.warn("Found {component} to be missing from {device}; re-adding it",
                          component=missing, device=device)
            with failures_as(SoftwareRAIDError, f"Failed re-add {missing} to {device}"):
                await mdadm(self.context, "--add", device, missing)

    async def _raid_candidates(self, node: Any, *, log_excluded: bool = False
                               ) -> tuple[list[BlockDevice], dict[str, tuple[BlockDevice, str]],
                                          Protection]:
        """(disks that may hold RAID partitions, ``{disk: (device, why not)}`` for the
        others, what ``skip_block_devices`` protects). md devices are never candidates;
        read-only and protected disks are the excluded ones. SoftwareRAIDError if the
        node's ``skip_block_devices`` is invalid."""
        devices = await self.source.list_block_devices()
        try:
            protection = await protected_devices(self.context, node, devices)
        except root_device.RootDeviceHintError as e:
            raise SoftwareRAIDError(f"Invalid skip_block_devices in the node's properties: "
                                    f"{e}") from e
        candidates: list[BlockDevice] = []
        excluded: dict[str, tuple[BlockDevice, str]] = {}
        for device in devices:
            if is_md_name(device.name):
                continue
            reason = protection.reason(device.name)
            if reason is not None:
                excluded[device.name] = (device, f"protected by skip_block_devices: {reason}")
                if log_excluded:
                    self.log.info("Software RAID: not using {device}, protected by "
                                  "skip_block_devices: {reason}", device=device.name,
                                  reason=reason)
            elif self.source.is_read_only(os.path.basename(device.name)):
                excluded[device.name] = (device, "it is read-only")
            else:
                candidates.append(device)
        return candidates, excluded, protection

    # -- deleting --------------------------------------------------------------------------
    async def _keep_protected_arrays(self, protection: Protection) -> None:
        """Log the arrays kept; wipe the contents of those only kept for their holders."""
        for path, volume in protection.kept_arrays.items():
            self.log.warn("Software RAID device {device} ({name}) is not deleted, protected "
                          "by skip_block_devices: {reason}", device=path, name=volume,
                          reason=protection.reason(path))
        for path, volume in protection.neighbours.items():
            if volume == ESP_VOLUME_NAME:
                self.log.warn("EFI RAID device {device} is not deleted: it shares holder "
                              "disks with a protected RAID device", device=path)
                continue
            self.log.warn("Software RAID device {device} ({name}) is not deleted: it shares "
                          "holder disks with a protected RAID device; wiping its contents",
                          device=path, name=volume)
            try:
                await self.context.runner.execute("wipefs", "-af", path,
                                                  timeout=md_timeout(self.context))
            except ProcessExecutionError as e:
                self.log.warn("Failed to wipefs {device}: {error}", device=path, error=str(e))

    def _arrays_to_delete(self, protection: Protection) -> list[str]:
        return [path for path in (md_path(self.context, a.name)
                                  for a in list_md_devices(self.context))
                if path not in protection.kept_arrays and path not in protection.neighbours]

    async def _delete_pass(self, arrays: Sequence[str], protection: Protection) -> None:
        context = self.context
        all_holders: list[str] = []
        for device in arrays:
            components = await get_component_devices(context, device)
            holders = await get_holder_disks(context, device) if components else []
            self.log.info("Deleting Software RAID device {device} (members {components}, "
                          "holders {holders})", device=device,
                          components=", ".join(components) or "none",
                          holders=", ".join(holders) or "none")
            try:
                await context.runner.execute("wipefs", "-af", device, timeout=md_timeout(context))
            except ProcessExecutionError as e:
                self.log.warn("Failed to wipefs {device}: {error}", device=device,
                              error=str(e))
            try:
                await mdadm(context, "--stop", device)
            except ProcessExecutionError as e:
                self.log.warn("Failed to stop {device}: {error}", device=device, error=str(e))
            for component in components:
                found = await has_md_superblock(context, component)
                if found is None:
                    raise SoftwareRAIDError(f"Failed to examine device {component}")
                if found:
                    await zero_superblock(context, component)
            all_holders.extend(h for h in holders if h not in all_holders)
        # Superblocks left on any disk or partition (members of arrays that were never
        # assembled, or half-deleted ones): partitions first, then their disks.
        kept = set(protection.devices)
        for array in [*protection.kept_arrays, *protection.neighbours]:
            kept.update(await get_component_devices(context, array))
        devices = [d.name for d in await self.source.list_block_devices(include_partitions=True)
                   if not is_md_name(d.name) and d.name not in kept
                   and parent_disk(context, d.name) not in protection.devices]
        examined = [Deferred.fromCoroutine(has_md_superblock(context, name))
                    for name in devices]
        left = [name for name, probe in zip(devices, examined) if await probe]
        for name in reversed(left):            # partitions before their disks
            self.log.info("Removing the md superblock left on {device}", device=name)
            await zero_superblock(context, name)
        await _all(Deferred.fromCoroutine(self._wipe_holder(holder))
                   for holder in all_holders if protection.reason(holder) is None)

    async def _wipe_holder(self, holder: str) -> None:
        """Remove the partition table of a former holder disk (warnings, not errors)."""
        self.log.info("Removing partitions on holder disk {device}", device=holder)
        try:
            await disks.destroy_disk_metadata(self.context, holder,
                                              wipe=self._wipe)
        except (ProcessExecutionError, OSError) as e:
            self.log.warn("Failed to remove partitions on {device}: {error}", device=holder,
                          error=str(e))
        await disks.rescan_device(self.context, holder)


async def _all(jobs: Iterable[Deferred[Any]]) -> None:
    """Wait for every one of ``jobs`` (all started); then raise the first error, if any."""
    errors: list[Exception] = []
    for job in list(jobs):
        try:
            await job
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


def _md_number(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else 1 << 30


def _present_volumes(protection: Protection) -> dict[str, str]:
    """``{volume name: md device}`` of the arrays kept because of ``skip_block_devices``."""
    return {volume: path for path, volume in {**protection.kept_arrays,
                                              **protection.neighbours}.items() if volume}
