"""Config drives: decoding what Ironic sends, and the config drive partition of a whole disk.

Ironic sends a config drive either as a URL or inline as base64 of a gzipped image (ISO 9660
or vfat, labelled ``config-2``). A URL is fetched with the image pipeline's bounded
``fetch_small``; content that is not base64 is taken as the image itself when it was
downloaded (the reference agent does the same) and refused when it came inline. Everything
is bounded by ``MAX_CONFIG_DRIVE_SIZE``.

For whole-disk images the config drive gets a partition of its own at the end of the disk
(``create_config_drive_partition``), like the reference agent: an existing partition whose
file system is labelled ``config-2`` is reused; otherwise a new 64 MiB partition is made in
the free space at the end of the disk (GPT: ``sgdisk``, named ``config-2``; msdos: a primary
partition with ``parted``, below the 2 TiB msdos limit). For partition images the config
drive partition is part of the layout (``ipa_twisted.deploy.partition``).

On a disk with 4096-byte logical sectors the guest cannot read an ISO 9660 config drive (nor
a FAT made for 512-byte sectors): ``fit_sector_size`` rebuilds it as a FAT for the disk's
sector size with the same files, as the reference agent does (``configdrive_fs``); the
``config_drive_rebuild`` option rebuilds it whatever the sector size.
"""

from __future__ import annotations

import base64
import binascii
import math
import uuid as uuidlib
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ipa_twisted.blockdev import disks
from ipa_twisted.context import HardwareContext
from ipa_twisted.deploy import configdrive_fs
from ipa_twisted.errors import CommandExecutionError, InstanceDeployFailure
from ipa_twisted.images.download import fetch_small
from ipa_twisted.process import ProcessExecutionError

log = Logger()

MiB = disks.MiB
MAX_CONFIG_DRIVE_SIZE = 64 * MiB
"""Largest config drive image accepted (and the size of its whole-disk partition)."""
CONFIGDRIVE_LABEL = "config-2"
MSDOS_LIMIT_SECTORS = 1 << 32
"""msdos tables address at most 2^32 sectors: partitions must end below."""
ALIGNMENT = MiB

Fetcher = Callable[[str], Awaitable[bytes]]
"""``fetch(url)``: the body of ``url``, bounded (see ``images.download.fetch_small``)."""


def is_url(configdrive: str | bytes) -> bool:
    """Whether the config drive parameter is an http(s) URL rather than content."""
    if isinstance(configdrive, bytes):
        return False
    head = configdrive.strip()[:8].lower()
    return head.startswith("http://") or head.startswith("https://")


def decode_configdrive(data: bytes, *, downloaded: bool,
                       limit: int = MAX_CONFIG_DRIVE_SIZE) -> bytes:
    """The config drive image from base64 (of gzip, usually) ``data``.

    Decoded content that is not gzip is taken as the image. Content that is not base64 is
    the image itself when ``downloaded``, else an error. InstanceDeployFailure when it is
    malformed or larger than ``limit`` (blocking and CPU-bound: run it in a thread).
    """
    compact = b"".join(data.split())
    try:
        decoded = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        if not downloaded:
            raise InstanceDeployFailure(
                "Config drive is not base64 encoded or the content is malformed. "
                f"{type(e).__name__}: {e}.") from None
        log.debug("Downloaded config drive is not base64 encoded ({error}); assuming "
                  "binary", error=str(e))
        decoded = data
    else:
        if decoded[:2] == b"\x1f\x8b":
            decoded = _gunzip(decoded, limit)
    if len(decoded) > limit:
        raise InstanceDeployFailure(
            f"Config drive size exceeds maximum limit of {limit // MiB}MiB. Size of the "
            f"given config drive is {math.ceil(len(decoded) / MiB)} MiB.")
    if not decoded:
        raise InstanceDeployFailure("Config drive is empty")
    return decoded


def _gunzip(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
        if len(out) <= limit and not inflater.eof:
            out += inflater.flush()
    except zlib.error as e:
        raise InstanceDeployFailure(
            f"Encountered error while decompressing the config drive: {e}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise InstanceDeployFailure(
            f"Config drive size exceeds maximum limit of {limit // MiB}MiB.")
    if not inflater.eof:
        raise InstanceDeployFailure(
            "Encountered error while decompressing the config drive: it is truncated")
    return out


async def get_configdrive(context: HardwareContext, configdrive: str | bytes, *,
                          fetch: Fetcher | None = None,
                          limit: int = MAX_CONFIG_DRIVE_SIZE) -> bytes:
    """The config drive image Ironic means by ``configdrive`` (a URL or the content).

    ``fetch`` downloads a URL (default: the pipeline's ``fetch_small`` with the agent's
    HTTP client). InstanceDeployFailure if it cannot be had.
    """
    downloaded = is_url(configdrive)
    if downloaded:
        url = str(configdrive).strip()
        if fetch is None:
            async def fetch(address: str) -> bytes:
                # base64 of gzip may be a little larger than the image it holds
                body: bytes = await fetch_small(
                    address, context.http(), 2 * limit, clock=context.reactor,
                    timeout=context.config.image_download_connection_timeout)
                return body
        try:
            data = await fetch(url)
        except InstanceDeployFailure:
            raise
        except Exception as e:
            raise InstanceDeployFailure(
                f"Can't download the configdrive content from '{url}'. Reason: {e}") from e
    else:
        data = configdrive.encode("ascii", "replace") if isinstance(configdrive, str) \
            else configdrive
        if len(data) > 2 * limit:
            raise InstanceDeployFailure(
                f"Config drive size exceeds maximum limit of {limit // MiB}MiB.")
    decoded: bytes = await deferToThreadPool(
        context.reactor, context.reactor.getThreadPool(),
        lambda: decode_configdrive(data, downloaded=downloaded, limit=limit))
    return decoded


async def fit_sector_size(context: HardwareContext, device: str, configdrive: bytes,
                          sector_size: int | None = None) -> bytes:
    """The config drive as a guest can read it from ``device``.

    Unchanged unless ``device``'s logical sector size (read with parted unless given) is
    one its file system cannot live on, or ``config_drive_rebuild`` is set: then rebuilt as
    a FAT for that sector size. InstanceDeployFailure when it cannot be rebuilt.
    """
    if sector_size is None:
        sector_size = (await disks.read_layout(context, device)).logical_sector_size
    problem = configdrive_fs.sector_size_problem(configdrive, sector_size)
    if problem is None and context.config.config_drive_rebuild:
        problem = "config_drive_rebuild is set"
    if problem is None:
        return configdrive
    log.info("Rebuilding the config drive as a FAT with {sector_size}-byte sectors for "
             "{device}: {reason}", sector_size=sector_size, device=device, reason=problem)
    try:
        rebuilt: bytes = await deferToThreadPool(
            context.reactor, context.reactor.getThreadPool(),
            configdrive_fs.rebuild_for_sector_size, configdrive, sector_size)
    except ValueError as e:
        raise InstanceDeployFailure(
            f"The config drive must be rebuilt for {device} ({problem}) but cannot be: "
            f"{e}") from None
    return rebuilt


# -- the whole-disk partition -------------------------------------------------------------------

async def find_labelled_partition(context: HardwareContext, device: str,
                                  label: str = CONFIGDRIVE_LABEL) -> str | None:
    """The partition of ``device`` whose file system is labelled ``label`` (any case).

    InstanceDeployFailure if several are.
    """
    found: list[str] = []
    for partition in await disks.list_partitions(context, device):
        await disks.wait_for_partition(context, device, partition.path)
        probed = await disks.probe(context, partition.path)
        if probed.get("LABEL", "").upper() == label.upper():
            found.append(partition.path)
    if len(found) > 1:
        raise InstanceDeployFailure(
            f'More than one partition with label "{label}" exists on device {device}: '
            f"{' and '.join(found)}.")
    return found[0] if found else None


def _end_region(layout: disks.DiskLayout, limit: int | None) -> tuple[int, int] | None:
    """(first, last) byte of the free region that ends the disk (or its first ``limit``).

    None when a partition comes after the last free region.
    """
    top = layout.size if limit is None else min(layout.size, limit)
    regions = [(r.start, min(r.end, top - 1)) for r in layout.free if r.start < top]
    if not regions:
        return None
    first, last = max(regions, key=lambda r: r[1])
    if any(p.end > last and p.start < top for p in layout.partitions):
        return None
    return first, last


def _placement(layout: disks.DiskLayout, size: int) -> tuple[int, int]:
    """(first, last) sector of a ``size``-byte partition at the end of the free space."""
    sector = layout.logical_sector_size
    limit = MSDOS_LIMIT_SECTORS * sector if layout.table == "msdos" else None
    region = _end_region(layout, limit)
    if region is not None:
        first_free, last_free = region
        end = (last_free + 1) // sector * sector          # one past the last usable byte
        start = (end - size) // ALIGNMENT * ALIGNMENT
        if start >= first_free and start >= ALIGNMENT:
            return start // sector, end // sector - 1
    free = region[1] - region[0] + 1 if region else 0
    raise InstanceDeployFailure(
        f"Not enough space on {layout.device} for a {size // MiB} MiB config drive "
        f"partition at the end of the disk ({free // MiB} MiB free there)")


async def create_config_drive_partition(context: HardwareContext, device: str,
                                        configdrive: bytes) -> str:
    """Write the ``configdrive`` image to its partition on ``device``; its path.

    See the module docstring for where the partition goes (and ``fit_sector_size`` for
    what is written). InstanceDeployFailure when it is too large, there is no room, the
    msdos table is full or a tool fails.
    """
    if len(configdrive) > MAX_CONFIG_DRIVE_SIZE:
        raise InstanceDeployFailure(
            f"Config drive size exceeds maximum limit of {MAX_CONFIG_DRIVE_SIZE // MiB}MiB.")
    try:
        configdrive = await fit_sector_size(context, device, configdrive)
        if len(configdrive) > MAX_CONFIG_DRIVE_SIZE:
            raise InstanceDeployFailure(
                f"The config drive rebuilt for {device} exceeds the maximum of "
                f"{MAX_CONFIG_DRIVE_SIZE // MiB}MiB.")
        await disks.fix_gpt_partition(context, device)     # this re-reads the table:
        await disks.rescan_device(context, device)         # let the partitions come back
        existing = await find_labelled_partition(context, device)
        if existing is not None:
            log.info("Config drive partition {path} exists; reusing it", path=existing)
            path = existing
        else:
            path = await _new_partition(context, device)
        await disks.wait_for_partition(context, device, path)
        size = await _partition_size(context, device, path)
        if size < len(configdrive):
            raise InstanceDeployFailure(
                f"Config drive partition {path} ({size} bytes) is smaller than the config "
                f"drive ({len(configdrive)} bytes)")
        await deferToThreadPool(context.reactor, context.reactor.getThreadPool(),
                                disks.write_at, path, configdrive)
        await disks.rescan_device(context, device)
    except (ProcessExecutionError, CommandExecutionError, OSError) as e:
        raise InstanceDeployFailure(
            f"Failed to create config drive on disk {device}. Error: {e}") from e
    log.info("Config drive written to {path}", path=path)
    return path


async def _partition_size(context: HardwareContext, device: str, path: str) -> int:
    for partition in await disks.list_partitions(context, device):
        if partition.path == path:
            return partition.size
    raise InstanceDeployFailure(f"Partition {path} is not on {device}")


async def _new_partition(context: HardwareContext, device: str) -> str:
    layout = await disks.read_layout(context, device)
    if layout.table not in ("gpt", "msdos"):
        raise InstanceDeployFailure(
            f"Cannot add a config drive partition to {device}: it has no GPT or msdos "
            f"partition table ({layout.table})")
    first, last = _placement(layout, MAX_CONFIG_DRIVE_SIZE)
    numbers = {p.number for p in layout.partitions}
    log.info("Adding a {size} MiB config drive partition to {device} (sectors {first}-"
             "{last})", size=MAX_CONFIG_DRIVE_SIZE // MiB, device=device, first=first,
             last=last)
    runner = context.runner
    if layout.table == "gpt":
        number = next(n for n in range(1, 129) if n not in numbers)
        await runner.execute("sgdisk", "-n", f"{number}:{first}:{last}",
                             "-c", f"{number}:{CONFIGDRIVE_LABEL}",
                             "-u", f"{number}:{uuidlib.uuid4()}", device,
                             timeout=disks.DISK_COMMAND_TIMEOUT)
    else:
        primaries = [n for n in numbers if n <= 4]
        if len(primaries) >= 4:
            raise InstanceDeployFailure(
                f"Config drive cannot be created: disk {device} uses MBR partitioning and "
                f"already has {len(primaries)} primary partitions.")
        await runner.execute("parted", "-s", "-a", "none", "--", device, "unit", "s",
                             "mkpart", "primary", "fat32", f"{first}s", f"{last}s",
                             timeout=disks.DISK_COMMAND_TIMEOUT)
    await disks.rescan_device(context, device)
    after = await disks.read_layout(context, device)
    new = [p for p in after.partitions if p.number not in numbers]
    if len(new) != 1:
        raise InstanceDeployFailure(
            f"Disk partitioning failed on device {device}. Unable to retrieve config "
            "drive partition information.")
    await disks.wait_for_partition(context, device, new[0].path)
    return new[0].path


def describe(configdrive: Any) -> str:
    """A short, secret-free description of a config drive parameter for logs."""
    if configdrive is None:
        return "none"
    if isinstance(configdrive, str) and is_url(configdrive):
        return f"URL {configdrive.split('?')[0]}"
    return f"{len(configdrive)} characters inline"
