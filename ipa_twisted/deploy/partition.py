"""Partition images: lay out the install disk, then write the image into its root partition.

The layout is the reference agent's (ironic-lib's ``work_on_disk``/``make_partitions``), in
this order from the start of the disk, after a 1 MiB lead-in:

- UEFI: an EFI system partition (``EFI_SYSTEM_PARTITION_MB``, vfat labelled ``efi-part``);
- BIOS on GPT (not ppc64): a ``bios_grub`` partition (``BIOS_BOOT_PARTITION_MB``);
- BIOS on ppc64: a PReP boot partition (8 MiB);
- ephemeral (``ephemeral_mb``, formatted ``ephemeral_format`` labelled ``ephemeral0``);
- swap (``swap_mb``, ``mkswap`` labelled ``swap1``);
- config drive (its size rounded up to MiB, holding the config drive image);
- root, last so cloud-init can grow it: ``root_mb``, or the rest of the disk if 0.

UEFI always means GPT; otherwise the disk label is the node's ``disk_label`` capability
(msdos by default). The result is what ``standby.get_partition_uuids`` returns::

    {"partitions": {"root": "/dev/sda3", "swap": "/dev/sda2", ...},
     "root uuid": <file system UUID of root, else its partition UUID>,
     "efi system partition uuid": <vfat UUID of the ESP, or None>}

plus ``"PReP Boot partition uuid"`` on ppc64, as the reference agent returns.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ipa_twisted.errors import InstanceDeployFailure
from ipa_twisted.blockdev import disks
from ipa_twisted.context import HardwareContext
from ipa_twisted.process import ProcessExecutionError

log = Logger()

EFI_SYSTEM_PARTITION_MB = 550
"""Size of the EFI system partition, in MiB: the default of ``[disk_utils]
efi_system_partition_size`` (the reference's current default), which sets it."""
BIOS_BOOT_PARTITION_MB = 1
"""Size of the BIOS Boot partition, in MiB: ``[disk_utils] bios_boot_partition_size``."""
PREP_BOOT_PARTITION_MB = 8
LEAD_IN_MB = 1
GPT_TAIL_MB = 1
"""Room left at the end of a GPT disk for the backup table."""
DEFAULT_EPHEMERAL_FORMAT = "ext4"
MKFS_TIMEOUT = 1800.0

RootWriter = Callable[[str], Awaitable[object]]
"""``write(root_partition_path)``: put the image into the root partition."""


# -- node specifications ------------------------------------------------------------------------

def _parse_capabilities_str(text: str) -> dict[str, str]:
    capabilities: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition(":")
        if sep and key.strip():
            capabilities[key.strip()] = value.strip()
        elif item.strip():
            log.warn("Ignoring the malformed capability {item!r}", item=item)
    return capabilities


def parse_capabilities(root: Mapping[str, Any] | None) -> dict[str, Any]:
    """``root["capabilities"]`` as a dict: given as a dict, JSON, or ``"k1:v1,k2:v2"``.

    Anything else gives ``{}`` (logged).
    """
    capabilities: Any = (root or {}).get("capabilities") or {}
    if isinstance(capabilities, str):
        try:
            capabilities = json.loads(capabilities)
        except ValueError:
            capabilities = _parse_capabilities_str(capabilities)
    if not isinstance(capabilities, dict):
        log.warn("Invalid capabilities {capabilities!r}", capabilities=capabilities)
        return {}
    return capabilities


def get_node_boot_mode(node: Mapping[str, Any] | None, *, sys_path: str = "/sys",
                       fallback: str | None = None) -> str:
    """``uefi`` or ``bios``, as Ironic decides it for the node.

    Secure boot (instance_info or properties capability) means UEFI. Otherwise, first
    found: ``instance_info.deploy_boot_mode``, the ``boot_mode`` capability,
    ``driver_internal_info.deploy_boot_mode``, ``fallback``, and last the mode this
    ramdisk booted in (``{sys_path}/firmware/efi`` exists: UEFI).
    """
    node = node or {}
    instance_info = node.get("instance_info") or {}
    instance_caps = parse_capabilities(instance_info)
    node_caps = parse_capabilities(node.get("properties") or {})
    secure = instance_caps.get("secure_boot", node_caps.get("secure_boot", "false"))
    if str(secure).lower() == "true":
        return "uefi"
    ramdisk = "uefi" if os.path.isdir(os.path.join(sys_path, "firmware", "efi")) else "bios"
    for candidate in (instance_info.get("deploy_boot_mode"), node_caps.get("boot_mode"),
                      (node.get("driver_internal_info") or {}).get("deploy_boot_mode"),
                      fallback):
        if candidate is not None:
            mode = str(candidate).lower()
            return mode if mode in ("uefi", "bios") else ramdisk
    return ramdisk


def get_partition_table_type_from_specs(node: Mapping[str, Any] | None, *,
                                        sys_path: str = "/sys",
                                        boot_mode: str | None = None,
                                        fallback: str | None = None) -> str:
    """``gpt`` or ``msdos``: GPT for UEFI, else the ``disk_label`` capability.

    instance_info's capability wins over the node's; then ``fallback``; msdos by default.
    """
    node = node or {}
    mode = boot_mode or get_node_boot_mode(node, sys_path=sys_path)
    if mode == "uefi":
        return "gpt"
    label = parse_capabilities(node.get("instance_info") or {}).get(
        "disk_label", parse_capabilities(node.get("properties") or {}).get(
            "disk_label", fallback or "msdos"))
    return "gpt" if label == "gpt" else "msdos"


# -- the layout ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PartitionLayout:
    """What to create; sizes in MiB (``root_mb`` 0: the rest of the disk)."""

    root_mb: int
    swap_mb: int = 0
    ephemeral_mb: int = 0
    ephemeral_format: str | None = None
    configdrive_mb: int = 0
    boot_mode: str = "bios"
    disk_label: str | None = None
    cpu_arch: str = ""
    preserve_ephemeral: bool = False
    efi_system_partition_mb: int = EFI_SYSTEM_PARTITION_MB
    bios_boot_partition_mb: int = BIOS_BOOT_PARTITION_MB

    @property
    def label(self) -> str:
        """The partition table type: UEFI forces gpt; else disk_label, msdos by default."""
        if self.boot_mode == "uefi":
            return "gpt"
        return self.disk_label or "msdos"


@dataclass(frozen=True)
class PlannedPartition:
    """One partition to create: its role (a ``partitions`` key), size and flags."""

    role: str
    size_mb: int
    fs_type: str = ""
    flags: tuple[str, ...] = ()


def plan_partitions(layout: PartitionLayout) -> list[PlannedPartition]:
    """The partitions of ``layout`` in disk order (numbered from 1)."""
    ppc = layout.cpu_arch.startswith("ppc64")
    planned: list[PlannedPartition] = []
    if layout.boot_mode == "uefi":
        planned.append(PlannedPartition("efi system partition",
                                        layout.efi_system_partition_mb, "fat32", ("boot",)))
    if layout.boot_mode == "bios" and layout.label == "gpt" and not ppc:
        planned.append(PlannedPartition("BIOS Boot partition", layout.bios_boot_partition_mb,
                                        "", ("bios_grub",)))
    if ppc and layout.boot_mode == "bios":
        flags = ("boot", "prep") if layout.label == "msdos" else ("prep",)
        planned.append(PlannedPartition("PReP Boot partition", PREP_BOOT_PARTITION_MB, "",
                                        flags))
    if layout.ephemeral_mb:
        planned.append(PlannedPartition("ephemeral", layout.ephemeral_mb))
    if layout.swap_mb:
        planned.append(PlannedPartition("swap", layout.swap_mb, "linux-swap"))
    if layout.configdrive_mb:
        planned.append(PlannedPartition("configdrive", layout.configdrive_mb))
    boot = layout.boot_mode == "bios" and not ppc and layout.label == "msdos"
    planned.append(PlannedPartition("root", layout.root_mb, "", ("boot",) if boot else ()))
    if layout.label == "msdos" and len(planned) > 4:
        raise InstanceDeployFailure(
            f"{len(planned)} partitions do not fit in an msdos partition table (4 primary "
            "partitions at most); use a GPT disk label")
    return planned


def parted_argv(device: str, label: str, planned: list[PlannedPartition]) -> list[str]:
    """The one ``parted`` command creating ``label`` and the ``planned`` partitions."""
    argv = ["parted", "-a", "optimal", "-s", device, "--", "unit", "MiB", "mklabel", label]
    start = LEAD_IN_MB
    for number, part in enumerate(planned, 1):
        last = part.role == "root" and part.size_mb == 0
        end = "100%" if last else str(start + part.size_mb)
        argv += ["mkpart", "primary"] + ([part.fs_type] if part.fs_type else []) + [
            str(start), end]
        for flag in part.flags:
            argv += ["set", str(number), flag, "on"]
        start += part.size_mb
    return argv


def required_mb(layout: PartitionLayout, planned: list[PlannedPartition]) -> int:
    """MiB the layout needs on the disk (a root of 0 counts as 1 MiB)."""
    tail = GPT_TAIL_MB if layout.label == "gpt" else 0
    return LEAD_IN_MB + sum(max(p.size_mb, 1) for p in planned) + tail


def mkfs_argv(fs: str, path: str, label: str | None = None) -> list[str]:
    """The reference agent's ``mkfs``: ``mkswap`` for swap, ``mkfs -t FS`` otherwise."""
    argv = ["mkswap"] if fs == "swap" else ["mkfs", "-t", fs]
    if fs in ("ext3", "ext4"):
        argv.append("-F")
    if label:
        argv += ["-n" if fs in ("msdos", "vfat") else "-L", label]
    return argv + [path]


async def mkfs(context: HardwareContext, fs: str, path: str, label: str | None = None) -> None:
    """Make a file system (or swap) on ``path``."""
    await context.runner.execute(*mkfs_argv(fs, path, label),
                                 timeout=min(context.config.command_timeout, MKFS_TIMEOUT))


# -- doing it -----------------------------------------------------------------------------------

async def work_on_disk(context: HardwareContext, device: str, layout: PartitionLayout, *,
                       write_root: RootWriter | None = None,
                       configdrive: bytes | None = None,
                       wipe: disks.Wiper | None = None) -> dict[str, Any]:
    """Partition ``device``, fill the partitions, and say where everything went.

    Unless ``layout.preserve_ephemeral`` (then the existing table is kept and the
    ephemeral partition is not formatted), the disk's metadata is destroyed first and the
    table written anew. ``configdrive`` (the config drive image) goes into its partition;
    ``write_root(path)`` writes the image into the root partition (None: leave it empty).
    InstanceDeployFailure if the disk is too small or a partition never appears;
    ProcessExecutionError from the tools.
    """
    if configdrive is not None and layout.configdrive_mb * disks.MiB < len(configdrive):
        layout = _with_configdrive_size(layout, len(configdrive))
    planned = plan_partitions(layout)
    paths = {part.role: disks.partition_index_to_path(device, number)
             for number, part in enumerate(planned, 1)}
    commit = not layout.preserve_ephemeral
    if commit:
        current = await disks.read_layout(context, device)
        needed = required_mb(layout, planned)
        if needed * disks.MiB > current.size:
            raise InstanceDeployFailure(
                f"Not enough space on {device} for the partitions: {needed} MiB needed, "
                f"the disk has {current.size // disks.MiB} MiB")
        await disks.destroy_disk_metadata(context, device, wipe=wipe)
        log.info("Partitioning {device} ({label}): {roles}", device=device,
                 label=layout.label, roles=", ".join(p.role for p in planned))
        await context.runner.execute(*parted_argv(device, layout.label, planned),
                                     timeout=disks.DISK_COMMAND_TIMEOUT)
    await disks.rescan_device(context, device)
    for role, path in paths.items():
        try:
            await disks.wait_for_partition(context, device, path)
        except InstanceDeployFailure:
            what = "Root device" if role == "root" else f"'{role}' device"
            raise InstanceDeployFailure(f"{what} '{path}' not found") from None

    if "efi system partition" in paths:
        await mkfs(context, "vfat", paths["efi system partition"], "efi-part")
    if configdrive is not None and "configdrive" in paths:
        await deferToThreadPool(context.reactor, context.reactor.getThreadPool(),
                                disks.write_at, paths["configdrive"], configdrive)
        log.info("Config drive written to {path}", path=paths["configdrive"])
    if write_root is not None:
        await write_root(paths["root"])
        log.info("Image written to the root partition {path}", path=paths["root"])
    else:
        log.info("Root partition {path} created but not populated", path=paths["root"])
    if "swap" in paths:
        await mkfs(context, "swap", paths["swap"], "swap1")
    if "ephemeral" in paths and not layout.preserve_ephemeral:
        await mkfs(context, layout.ephemeral_format or DEFAULT_EPHEMERAL_FORMAT,
                   paths["ephemeral"], "ephemeral0")
    await disks.rescan_device(context, device)
    for path in paths.values():
        await disks.wait_for_partition(context, device, path)

    uuids: dict[str, Any] = {"root uuid": paths["root"],
                             "efi system partition uuid": paths.get("efi system partition")}
    if layout.cpu_arch.startswith("ppc"):
        uuids["PReP Boot partition uuid"] = paths.get("PReP Boot partition")
    for key, path in list(uuids.items()):
        if path:
            try:
                uuids[key] = await disks.block_uuid(context, path)
            except ProcessExecutionError:
                log.error("Failed to detect the {key} of {path}", key=key, path=path)
                raise
    return {"partitions": paths, **uuids}


def _with_configdrive_size(layout: PartitionLayout, size: int) -> PartitionLayout:
    from dataclasses import replace
    return replace(layout, configdrive_mb=math.ceil(size / disks.MiB))
