"""Linux software RAID (md) devices as the kernel and mdadm show them: parsing of
``/proc/mdstat``, ``mdadm --detail`` and ``--examine --scan``, and the md operations the
RAID steps, erasing and the install device need (component and holder disks, stop and
re-assemble, superblocks). Building arrays from Ironic's RAID configuration is
``ipa_twisted.hardware.generic.raid``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import CommandExecutionError
from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError, failures_as

log = Logger()

MD_COMMAND_TIMEOUT = 300.0
"""Longest wait for one mdadm command."""


# -- mdadm's and the kernel's views (pure parsing) -------------------------------------------

@dataclass(frozen=True)
class MdDetail:
    """What ``mdadm --detail /dev/mdX`` says."""

    device: str
    level: str | None
    state: str | None
    uuid: str | None
    name: str | None
    """The array name as stored: ``host:volume`` (or just the volume)."""
    components: tuple[str, ...]

    @property
    def volume_name(self) -> str | None:
        """The name given at creation (``--name``), without the host part."""
        if not self.name:
            return None
        return self.name.split()[0].rpartition(":")[2] or None


def parse_mdadm_detail(device: str, output: str) -> MdDetail:
    """MdDetail from ``mdadm --detail`` output (components in RaidDevice order)."""
    fields: dict[str, str] = {}
    components: list[str] = []
    in_table = False
    for line in output.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("Number") and "RaidDevice" in stripped:
            in_table = True
            continue
        if in_table:
            components.extend(re.findall(r"(?<!\S)/\S+", stripped))
            continue
        key, sep, value = stripped.partition(" : ")
        if sep:
            fields[key.strip()] = value.strip()
    return MdDetail(device=device, level=fields.get("Raid Level"), state=fields.get("State"),
                    uuid=fields.get("UUID"), name=fields.get("Name"),
                    components=tuple(components))


@dataclass(frozen=True)
class MdStat:
    """One array of ``/proc/mdstat``."""

    name: str
    active: bool
    level: str | None
    members: tuple[str, ...]
    """Kernel names of the member devices (``vda1``), spares and failed ones included."""


_MDSTAT_LINE = re.compile(r"^(md[\w/-]*)\s*:\s*(\S+)\s*(.*)$")


def parse_mdstat(text: str) -> list[MdStat]:
    """The arrays in ``/proc/mdstat``."""
    arrays = []
    for line in text.splitlines():
        match = _MDSTAT_LINE.match(line.strip())
        if match is None:
            continue
        name, state, rest = match.groups()
        words = rest.split()
        level = None
        if words and not re.match(r"^\w+\[\d+\]", words[0]):
            words = [w for w in words if w not in ("(auto-read-only)", "(read-only)")]
            if words and not re.match(r"^\w+\[\d+\]", words[0]):
                level = words.pop(0)
        members = tuple(re.sub(r"\[\d+\].*$", "", word) for word in words
                        if re.match(r"^[\w.-]+\[\d+\]", word))
        arrays.append(MdStat(name=name, active=state == "active", level=level,
                             members=members))
    return arrays


def parse_examine_scan(output: str) -> dict[str, dict[str, str]]:
    """``{array: {key: value}}`` from ``mdadm --examine --scan`` (ARRAY lines)."""
    result: dict[str, dict[str, str]] = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "ARRAY":
            continue
        result[words[1]] = dict(word.split("=", 1) for word in words[2:] if "=" in word)
    return result


def is_md_name(device: str) -> bool:
    """Whether ``device`` (a path or kernel name) names an md device (``md0``, ``md/root``)."""
    return re.match(r"^md\d+(p\d+)?$", os.path.basename(device)) is not None \
        or "/md/" in device


# -- one logical disk's plan ---------------------------------------------------------------


# -- md helpers on a context ----------------------------------------------------------------

def md_timeout(context: HardwareContext) -> float:
    """How long one mdadm (or RAID partitioning) command may take."""
    return min(context.config.command_timeout, MD_COMMAND_TIMEOUT)


async def mdadm(context: HardwareContext, *args: str, **kwargs: Any) -> tuple[bytes, bytes]:
    """Run ``mdadm`` with ``args`` through the context's runner; its output."""
    return await context.runner.execute("mdadm", *args, timeout=md_timeout(context), **kwargs)


def list_md_devices(context: HardwareContext) -> list[MdStat]:
    """The arrays the kernel has (``{proc}/mdstat``); none without md support."""
    try:
        with open(os.path.join(context.config.proc_path, "mdstat"), encoding="utf-8") as f:
            return parse_mdstat(f.read())
    except OSError:
        return []


def md_path(context: HardwareContext, name: str) -> str:
    """The device path of array ``name`` (``md0``) under the configured ``dev_path``."""
    return os.path.join(context.config.dev_path, name)


async def md_detail(context: HardwareContext, raid_device: str) -> MdDetail | None:
    """``mdadm --detail`` of ``raid_device``; None (logged) if mdadm cannot tell."""
    try:
        out, _ = await mdadm(context, "--detail", raid_device)
    except ProcessExecutionError as e:
        log.warn("Could not get the details of {device}: {error}", device=raid_device,
                 error=str(e))
        return None
    return parse_mdadm_detail(raid_device, out.decode("utf-8", "replace"))


async def is_md_device(context: HardwareContext, raid_device: str) -> bool:
    """Whether ``raid_device`` is a software RAID (md) device."""
    try:
        await mdadm(context, "--detail", raid_device)
    except CommandNotFoundError:
        log.debug("mdadm is not installed: {device} is not an md device", device=raid_device)
        return False
    except ProcessExecutionError:
        return False
    return True


async def get_component_devices(context: HardwareContext, raid_device: str) -> list[str]:
    """The member devices (partitions or disks) of ``raid_device``."""
    detail = await md_detail(context, raid_device)
    return list(detail.components) if detail is not None else []


_WHOLE_DISK = r"(?:nvme\d+n\d+|mmcblk\d+|md\d+|loop\d+|nbd\d+)"


def parent_disk(context: HardwareContext, device: str) -> str:
    """The disk holding partition ``device``; ``device`` itself if it is a whole disk.

    Asks sysfs (``{sys}/class/block/<name>/partition``), else goes by the name: ``sda1`` →
    ``sda``, ``nvme0n1p2`` → ``nvme0n1``; ``sda`` and ``nvme0n1`` are whole disks.
    """
    name = os.path.basename(os.path.realpath(device)) if os.path.exists(device) \
        else os.path.basename(device)
    directory = os.path.dirname(device)
    link = os.path.join(context.config.sys_path, "class", "block", name)
    if os.path.exists(link):
        if not os.path.exists(os.path.join(link, "partition")):
            return os.path.join(directory, name)
        parent = os.path.basename(os.path.dirname(os.path.realpath(link)))
        if parent:
            return os.path.join(directory, parent)
    if re.match(f"^{_WHOLE_DISK}$", name):
        return os.path.join(directory, name)
    match = re.match(f"^({_WHOLE_DISK})p\\d+$", name) or re.match(r"^(.*\D)\d+$", name)
    return os.path.join(directory, match.group(1) if match else name)


async def get_holder_disks(context: HardwareContext, raid_device: str) -> list[str]:
    """The disks under ``raid_device`` (members' disks, each once, in member order)."""
    holders: list[str] = []
    for component in await get_component_devices(context, raid_device):
        disk = parent_disk(context, component)
        if disk not in holders:
            holders.append(disk)
    return holders


async def md_restart(context: HardwareContext, raid_device: str) -> None:
    """Stop and re-assemble ``raid_device``; CommandExecutionError on failure."""
    components = await get_component_devices(context, raid_device)
    with failures_as(CommandExecutionError, f"Could not restart md device {raid_device}"):
        await mdadm(context, "--stop", raid_device)
        await mdadm(context, "--assemble", raid_device, *components)


async def md_get_raid_devices(context: HardwareContext) -> dict[str, dict[str, str]]:
    """Every array found on the disks' superblocks (``mdadm --examine --scan``)."""
    out, _ = await mdadm(context, "--examine", "--scan")
    return parse_examine_scan(out.decode("utf-8", "replace"))


async def md_scan_and_assemble(context: HardwareContext) -> None:
    """Assemble whatever arrays the disks hold (``mdadm --assemble --scan``); never fails."""
    try:
        await mdadm(context, "--assemble", "--scan", "--verbose", check_exit_code=False)
    except CommandNotFoundError:
        log.warn("mdadm is not installed: software RAID is not supported")
    except ProcessExecutionError as e:
        log.info("Assembling RAID devices failed: {error}", error=str(e))


async def has_md_superblock(context: HardwareContext, device: str) -> bool | None:
    """Whether ``device`` holds an md superblock; None (logged) if mdadm cannot tell."""
    try:
        await mdadm(context, "--examine", device)
    except CommandNotFoundError:
        return False
    except ProcessExecutionError as e:
        if b"No md superblock" in e.stderr or b"No md superblock" in e.stdout:
            return False
        log.warn("Failed to examine device {device}: {error}", device=device, error=str(e))
        return None
    return True


async def is_raid_member(context: HardwareContext, device: str) -> bool:
    """Whether ``device`` or one of its partitions is an md RAID member, as the reference's
    erase steps check before erasing: a member of an array the kernel runs (``{proc}/
    mdstat``), or a device ``lsblk --fs`` shows as ``linux_raid_member`` (an array not
    assembled); True also when lsblk cannot tell (erasing a member breaks its array).

    The kernel is asked first: lsblk reads file system types from udev's database, which
    may not have seen a superblock mdadm has just written (a real Ironic's automated
    cleaning, right after the manual cleaning that built the array, wiped one of the two
    members that way).
    """
    name = os.path.basename(os.path.realpath(device)) if os.path.exists(device) \
        else os.path.basename(device)
    for array in list_md_devices(context):
        for member in array.members:
            if member == name or os.path.basename(parent_disk(context, member)) == name:
                return True
    try:
        out, _ = await context.runner.execute("lsblk", "--fs", "--noheadings", device,
                                              timeout=MD_COMMAND_TIMEOUT)
    except CommandNotFoundError:
        return False
    except ProcessExecutionError as e:
        log.warn("Cannot tell whether {device} is a RAID member: {error}", device=device,
                 error=str(e))
        return True
    return b"linux_raid_member" in out


async def zero_superblock(context: HardwareContext, device: str) -> None:
    """Remove the md superblock of ``device`` (a warning, not an error, if it fails)."""
    try:
        await mdadm(context, "--zero-superblock", device)
    except ProcessExecutionError as e:
        log.warn("Failed to remove the md superblock from {device}: {error}", device=device,
                 error=str(e))
