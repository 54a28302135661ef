"""Putting an instance image on the install disk: the body of the ``write_image`` step.

``write_image_to_disk`` is given the device (the caller chose it, usually with
``get_os_install_device``) and does what the reference agent's ``prepare_image`` does:

- whole-disk image: once the pipeline accepted the image (checksum policy, format policy:
  the disk is untouched when it is refused), destroy the disk's metadata, write the image,
  re-read the table, move the backup GPT to the end, check the image left a partition
  table (naming a sector size mismatch when its GPT shows one), then add the config drive
  partition at the end of the disk. The result is
  ``{"root uuid": <MBR disk identifier, 0x%08x>}``.
- partition image (``image_type == "partition"``): once the image is accepted, lay the disk
  out and write the image into the root partition (``ipa_twisted.deploy.partition``); the
  config drive gets a partition in the layout. The result is the
  ``partitions``/``root uuid``/... dictionary.

Boot mode and disk label come from the node as Ironic sends it (``instance_info``,
``properties.capabilities``), with ``image_info``'s older ``deploy_boot_mode`` and
``disk_label`` keys as fallbacks. The config drive is decoded before the disk is touched, so
a bad one fails the deployment without destroying anything.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ipa_twisted.blockdev import disks
from ipa_twisted.context import HardwareContext
from ipa_twisted.deploy import configdrive as configdrives
from ipa_twisted.deploy import partition
from ipa_twisted.deploy.image_info import is_partition_image
from ipa_twisted.errors import ImageWriteError, InstanceDeployFailure
from ipa_twisted.images.formats import gpt_sector_size
from ipa_twisted.images.pipeline import write_image
from ipa_twisted.images.progress import ImageProgress
from ipa_twisted.process import failures_as

log = Logger()

ImageWriter = Callable[..., Awaitable[object]]
"""``write(image_info, device, prepare=None)``: download the image and write it to
``device``. ``prepare()`` (see ``images.pipeline.Prepare``) must be awaited once the image
is accepted and before its first byte is written; it may return the device to write to."""


def pipeline_writer(context: HardwareContext,
                    report_progress: Callable[[Any], None] | None = None) -> ImageWriter:
    """The image pipeline's ``write_image`` with the agent's HTTP client and settings.

    Each write's ImageProgress is handed to ``report_progress`` (default: the context's,
    which shows it on the running command).
    """
    async def write(image_info: Mapping[str, Any], device: str,
                    prepare: Callable[[], Awaitable[str | None]] | None = None) -> object:
        progress = ImageProgress(context.reactor)
        (report_progress or context.report_progress)(progress)
        return await write_image(dict(image_info), device, http=context.http(),
                                 reactor=context.reactor, runner=context.runner,
                                 config=context.config, progress=progress, prepare=prepare)
    return write


def partition_layout(image_info: Mapping[str, Any], node: Mapping[str, Any] | None, *,
                     sys_path: str = "/sys", configdrive_size: int = 0,
                     cpu_arch: str | None = None,
                     efi_system_partition_mb: int = partition.EFI_SYSTEM_PARTITION_MB,
                     bios_boot_partition_mb: int = partition.BIOS_BOOT_PARTITION_MB,
                     ) -> partition.PartitionLayout:
    """The PartitionLayout Ironic asks for with ``image_info`` on ``node``; the boot
    partitions' sizes are the ``[disk_utils]`` options'."""
    boot_mode = partition.get_node_boot_mode(node, sys_path=sys_path,
                                             fallback=image_info.get("deploy_boot_mode"))
    label = partition.get_partition_table_type_from_specs(
        node, boot_mode=boot_mode, fallback=image_info.get("disk_label"))
    try:
        root_mb = int(image_info.get("root_mb") or 0)
        swap_mb = int(image_info.get("swap_mb") or 0)
        ephemeral_mb = int(image_info.get("ephemeral_mb") or 0)
    except (TypeError, ValueError) as e:
        raise InstanceDeployFailure(f"Invalid partition sizes in image_info: {e}") from None
    return partition.PartitionLayout(
        root_mb=root_mb, swap_mb=swap_mb, ephemeral_mb=ephemeral_mb,
        ephemeral_format=image_info.get("ephemeral_format"),
        configdrive_mb=-(-configdrive_size // disks.MiB),
        boot_mode=boot_mode, disk_label=label,
        cpu_arch=os.uname().machine if cpu_arch is None else cpu_arch,
        preserve_ephemeral=bool(image_info.get("preserve_ephemeral", False)),
        efi_system_partition_mb=efi_system_partition_mb,
        bios_boot_partition_mb=bios_boot_partition_mb)


async def write_image_to_disk(context: HardwareContext, device: str,
                              image_info: Mapping[str, Any],
                              configdrive: str | bytes | None = None, *,
                              node: Mapping[str, Any] | None = None,
                              report_progress: Callable[[Any], None] | None = None,
                              write: ImageWriter | None = None,
                              fetch: configdrives.Fetcher | None = None,
                              wipe: disks.Wiper | None = None) -> dict[str, Any]:
    """Write ``image_info``'s image (and ``configdrive``) to ``device``; the partition UUIDs.

    ``write`` writes the image (default: the image pipeline, its progress shown through
    ``report_progress``, by default the context's);
    ``fetch`` downloads a config drive URL; ``wipe`` zeroes a device's first and last MiB.
    Raises the pipeline's errors, InstanceDeployFailure, or ImageWriteError when a disk
    tool fails.
    """
    writer = write or pipeline_writer(context, report_progress)
    data = None
    if configdrive:
        log.info("Fetching the config drive ({what})",
                 what=configdrives.describe(configdrive))
        data = await configdrives.get_configdrive(context, configdrive, fetch=fetch)
    with failures_as(make=lambda e: ImageWriteError(
            device, e.exit_code, e.stdout.decode("utf-8", "replace"),
            e.stderr.decode("utf-8", "replace"))):
        if is_partition_image(image_info):
            if data is not None:
                data = await configdrives.fit_sector_size(context, device, data)
            config = context.config
            layout = partition_layout(
                image_info, node, sys_path=config.sys_path,
                configdrive_size=len(data) if data else 0,
                efi_system_partition_mb=config.efi_system_partition_size,
                bios_boot_partition_mb=config.bios_boot_partition_size)
            return await _write_partition_image(context, device, image_info, layout, writer,
                                                data, wipe)
        return await _write_whole_disk(context, device, image_info, writer, data, wipe)


async def _write_partition_image(context: HardwareContext, device: str,
                                 image_info: Mapping[str, Any],
                                 layout: partition.PartitionLayout, writer: ImageWriter,
                                 configdrive: bytes | None,
                                 wipe: disks.Wiper | None) -> dict[str, Any]:
    """Partition ``device`` only once the image is accepted, then write it into its root.

    ``work_on_disk`` runs from the writer's ``prepare`` until it reaches the root partition,
    waits there for the image, then finishes (swap, ephemeral, UUIDs).
    """
    root_ready: Deferred[str] = Deferred()
    image_done: Deferred[None] = Deferred()
    working: Deferred[dict[str, Any]] | None = None
    reached = []

    async def write_root(root: str) -> None:
        reached.append(root)
        root_ready.callback(root)
        await image_done

    def fail_early(failure: Any) -> Any:
        if not root_ready.called:
            root_ready.errback(failure)
            return None
        return failure

    async def prepare() -> str:
        nonlocal working
        working = Deferred.fromCoroutine(partition.work_on_disk(
            context, device, layout, write_root=write_root, configdrive=configdrive,
            wipe=wipe))
        working.addErrback(fail_early)
        return await root_ready

    try:
        await writer(image_info, device, prepare=prepare)
    except BaseException as e:
        if working is not None:
            if reached:
                image_done.errback(e)           # work_on_disk stops at the root partition
            working.addErrback(lambda _: None)  # the writer's error is the one reported
        raise
    if working is None:
        raise InstanceDeployFailure("The image writer never prepared the disk")
    image_done.callback(None)
    result: dict[str, Any] = await working
    return result


async def _write_whole_disk(context: HardwareContext, device: str,
                            image_info: Mapping[str, Any], writer: ImageWriter,
                            configdrive: bytes | None,
                            wipe: disks.Wiper | None) -> dict[str, Any]:
    async def prepare() -> None:
        # Only once the image passed its checksum and format policy: a refused image
        # leaves the disk as it was.
        await disks.destroy_disk_metadata(context, device, wipe=wipe)
        await disks.udev_settle(context)
        log.info("Writing image {image} to {device}", image=image_info.get("id"),
                 device=device)

    await writer(image_info, device, prepare=prepare)
    await disks.rescan_device(context, device)
    try:
        await disks.fix_gpt_partition(context, device)
    except InstanceDeployFailure as e:
        log.warn("{error}", error=str(e))
    await validate_partitioning(context, device)
    if configdrive is not None:
        await configdrives.create_config_drive_partition(context, device, configdrive)
    uuids: dict[str, Any] = {}
    try:
        uuids["root uuid"] = await disks.get_disk_identifier(context, device)
    except (OSError, InstanceDeployFailure) as e:
        log.warn("Unable to obtain the root uuid (disk identifier) of {device}: {error}",
                 device=device, error=str(e))
    return uuids


async def validate_partitioning(context: HardwareContext, device: str) -> None:
    """InstanceDeployFailure unless ``device`` has a readable table with a partition."""
    try:
        partitions = await disks.list_partitions(context, device)
    except Exception as e:
        raise InstanceDeployFailure(
            "Unable to find a valid partition table on the disk after writing the image. "
            "The image may be corrupted or it uses a different sector size than the device"
            f"{await _sector_size_hint(context, device)}. Error: {e}") from e
    if not partitions:
        raise InstanceDeployFailure(
            f"No partitions found on the device {device} after writing the image"
            + await _sector_size_hint(context, device) + ".")


async def _sector_size_hint(context: HardwareContext, device: str) -> str:
    """Why a written whole-disk image shows no partition, when its GPT header says so."""
    try:
        layout = await disks.read_layout(context, device)
        head: bytes = await deferToThreadPool(context.reactor, context.reactor.getThreadPool(),
                                              _read_head, device)
    except Exception:
        return ""
    found = gpt_sector_size(head)
    if found is not None and found != layout.logical_sector_size:
        return (f": the image's GPT is laid out for {found}-byte sectors but {device} has "
                f"{layout.logical_sector_size}-byte logical sectors (the image uses a "
                "different sector size than the device)")
    return ""


def _read_head(device: str) -> bytes:
    with open(device, "rb") as f:
        return f.read(8192)
