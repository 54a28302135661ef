# Over 500 lines: the partition-table plumbing every disk step shares, grouped by concern.
"""Disk plumbing shared by erasure, partitioning and image writing.

Every program runs through the context's runner (``parted``, ``sgdisk``, ``wipefs``,
``blkid``, ``partprobe``, ``udevadm``) and every device path is explicit: nothing here picks
a disk by itself. Reading or writing device contents happens in the reactor's thread pool.

Partition device nodes are normally made by the kernel (devtmpfs) or udev. Where neither
runs (a test sandbox whose /dev is a plain tmpfs, or ``dev_path`` pointing at a directory
of hand-made nodes), ``wait_for_partition`` makes the missing node itself from the
``major:minor`` the kernel publishes in ``{sys_path}/class/block/<name>/dev``; it only ever
does so under the configured ``dev_path``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel

from ipa_twisted.blockdev.udev import DISK_COMMAND_TIMEOUT as DISK_COMMAND_TIMEOUT
from ipa_twisted.blockdev.udev import command_timeout
from ipa_twisted.blockdev.udev import udev_settle as udev_settle  # disks.udev_settle
from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import CommandExecutionError, InstanceDeployFailure
from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError, failures_as
from ipa_twisted.retry import GaveUp, fixed, retry

log = Logger()

MiB = 1 << 20
PARTITION_WAIT_ATTEMPTS = 20
PARTITION_WAIT_DELAY = 0.5
PARTPROBE_RETRY_DELAY = 1.0
"""How long ``wait_for_partition`` waits for a partition node: attempts and seconds apart."""

Wiper = Callable[[str, Any], Awaitable[object]]
"""``wipe(device, reactor)``: zero the first and last MiB of a device."""


@dataclass(frozen=True)
class Partition:
    """One partition of a disk; offsets and sizes in bytes (``end`` inclusive)."""

    number: int
    start: int
    end: int
    size: int
    filesystem: str
    name: str
    flags: frozenset[str]
    path: str


@dataclass(frozen=True)
class FreeSpace:
    """A free region of a disk (bytes; ``end`` inclusive)."""

    start: int
    end: int
    size: int


@dataclass(frozen=True)
class DiskLayout:
    """A disk's partition table as parted reads it."""

    device: str
    size: int
    logical_sector_size: int
    table: str
    """``gpt``, ``msdos``, another parted label name, or ``unknown`` (no table)."""
    partitions: tuple[Partition, ...]
    free: tuple[FreeSpace, ...]


def partition_index_to_path(device: str, index: int) -> str:
    """The path of partition ``index`` of ``device``: sda → sda1, nvme0n1/loop0 → ...p1."""
    return f"{device}p{index}" if device[-1:].isdigit() else f"{device}{index}"


# -- reading partition tables -------------------------------------------------------------------

_BYTES = re.compile(r"^(\d+)B$")


def _bytes(text: str) -> int:
    match = _BYTES.match(text.strip())
    if match is None:
        raise ValueError(f"not a size in bytes: {text!r}")
    return int(match.group(1))


def parse_parted_machine_output(device: str, output: str) -> DiskLayout:
    """A DiskLayout from ``parted -s -m DEVICE unit B print free``.

    ValueError if the output has no device line.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    try:
        start = lines.index("BYT;")
    except ValueError:
        raise ValueError(f"parted printed no device information for {device}") from None
    if len(lines) <= start + 1:
        raise ValueError(f"parted printed no device information for {device}")
    header = lines[start + 1].rstrip(";").split(":")
    if len(header) < 6:
        raise ValueError(f"unexpected parted device line for {device}: {lines[start + 1]!r}")
    size, sector, table = _bytes(header[1]), int(header[3]), header[5] or "unknown"
    partitions: list[Partition] = []
    free: list[FreeSpace] = []
    for line in lines[start + 2:]:
        fields = line.rstrip(";").split(":")
        if len(fields) == 5 and fields[4] == "free":
            free.append(FreeSpace(_bytes(fields[1]), _bytes(fields[2]), _bytes(fields[3])))
        elif len(fields) >= 7:
            number = int(fields[0])
            flags = frozenset(f.strip() for f in ":".join(fields[6:]).split(",") if f.strip())
            partitions.append(Partition(
                number=number, start=_bytes(fields[1]), end=_bytes(fields[2]),
                size=_bytes(fields[3]), filesystem=fields[4], name=fields[5], flags=flags,
                path=partition_index_to_path(device, number)))
        else:
            log.warn("Unexpected parted output line for {device}: {line}", device=device,
                     line=line)
    return DiskLayout(device, size, sector, table, tuple(partitions), tuple(free))


async def read_layout(context: HardwareContext, device: str) -> DiskLayout:
    """The partition table of ``device`` (``table`` is ``unknown`` if it has none)."""
    out, err = await context.runner.execute(
        "parted", "-s", "-m", device, "unit", "B", "print", "free",
        timeout=command_timeout(context), check_exit_code=False)
    try:
        return parse_parted_machine_output(device, out.decode("utf-8", "replace"))
    except ValueError as e:
        raise CommandExecutionError(f"Cannot read the partition table of {device}: {e}; "
                                    f"parted said: {err.decode('utf-8', 'replace')}") from e


async def list_partitions(context: HardwareContext, device: str) -> list[Partition]:
    """The partitions of ``device`` (none without a partition table)."""
    return list((await read_layout(context, device)).partitions)


async def scan_partition_table_type(context: HardwareContext, device: str) -> str:
    """``gpt``, ``msdos`` or ``unknown``."""
    table = (await read_layout(context, device)).table
    return table if table in ("gpt", "msdos") else "unknown"


async def get_efi_part_on_device(context: HardwareContext, device: str) -> int | None:
    """The number of the EFI system partition of ``device``, or None.

    A partition flagged ``esp``, or ``boot`` on a GPT disk, is the EFI partition.
    """
    layout = await read_layout(context, device)
    for partition in layout.partitions:
        if "esp" in partition.flags or ("boot" in partition.flags and layout.table == "gpt"):
            return partition.number
    return None


async def create_partition_table(context: HardwareContext, device: str,
                                 table_type: str) -> None:
    """Write an empty ``table_type`` (gpt, msdos) table; CommandExecutionError on failure."""
    log.info("Creating a {table} partition table on {device}", table=table_type,
             device=device)
    with failures_as(CommandExecutionError, f"Failed to create partition table on {device}"):
        await context.runner.execute("parted", device, "-s", "--", "mklabel", table_type,
                                     timeout=command_timeout(context))


# -- erasing ------------------------------------------------------------------------------------

async def destroy_disk_metadata(context: HardwareContext, device: str, *,
                                whole_disk: bool = True, wipe: Wiper | None = None) -> None:
    """Erase the signatures and partition tables of ``device``, not its data.

    ``wipefs --force --all``; then the first and last MiB are zeroed (the MBR, both GPT
    headers and tables, for 512-byte and 4 KiB sectors: what the reference's ``dd`` runs and
    ``sgdisk -Z`` erase); then, for a whole disk, the kernel re-reads its (now empty)
    partition table (``blockdev --rereadpt``; wipefs does not with ``--force``), so stale
    partitions go. ``sgdisk -Z`` is not run: it erases nothing more than that, and each
    sgdisk write sleeps a second before its own re-read. ProcessExecutionError or OSError
    on failure; a re-read the kernel refuses (partitions in use) is only logged.
    """
    runner = context.runner
    log.info("Destroying the metadata of {device}", device=device)
    try:
        await runner.execute("wipefs", "--force", "--all", device, timeout=command_timeout(context))
    except ProcessExecutionError as e:
        if isinstance(e, CommandNotFoundError) or "--force" not in e.stderr.decode(
                "utf-8", "replace"):
            raise
        await runner.execute("wipefs", "--all", device, timeout=command_timeout(context))
    if wipe is None:   # the writer (mmap, O_DIRECT) is loaded when first used
        from ipa_twisted.blockdev.writer import wipe_partition_tables
        wipe = wipe_partition_tables
    await wipe(device, context.reactor)
    if whole_disk:
        try:
            await runner.execute("blockdev", "--rereadpt", device, timeout=command_timeout(context))
        except ProcessExecutionError as e:
            log.info("The kernel did not re-read the partition table of {device}: {error}",
                     device=device, error=str(e))
    log.info("Metadata of {device} destroyed", device=device)


# -- shared cluster filesystems -------------------------------------------------------------

SHARED_PARTITION_TYPES = {
    "37affc90-ef7d-4e96-91c3-2d7ae055b174": "IBM GPFS Partition",
    "aa31e02a-400f-11db-9590-000c2911d1b8": "VMware VMFS Partition (GPT)",
    "0xfb": "VMware VMFS Partition (MBR)",
}
"""Partition types (GPT type GUIDs, MBR type bytes) of shared-disk cluster filesystems."""
SHARED_FILESYSTEMS = {
    "gfs2": "Red Hat Global File System 2",
    "gfs": "Red Hat Global File System",
    "ocfs2": "Oracle Cluster File System 2",
    "vmfs": "VMware VMFS",
    "vmfs_volume_member": "VMware VMFS volume member",
}
"""Filesystem types (as blkid and lsblk name them) of shared-disk cluster filesystems."""
GUARD_LSBLK_COLUMNS = "NAME,KNAME,PKNAME,FSTYPE,UUID,PTUUID,PARTTYPE,PARTUUID"


def shared_filesystem(row: Mapping[str, Any]) -> str | None:
    """What shared cluster filesystem one lsblk row shows (its FSTYPE or PARTTYPE), or None."""
    def field(name: str) -> str:
        value = row.get(name.lower(), row.get(name))
        return str(value).strip().lower() if value is not None else ""

    found = SHARED_FILESYSTEMS.get(field("FSTYPE"))
    if found is None:
        found = SHARED_PARTITION_TYPES.get(field("PARTTYPE"))
    return found


_ABSENT = (errno.ENOENT, errno.ENXIO, errno.ENODEV, errno.ENOMEDIUM)
"""Errors opening a device that mean it is not there (a stale node, no medium)."""


def partition_types(path: str) -> list[str]:
    """The partition types the table on ``path`` declares (blocking: run it in a thread).

    GPT type GUIDs (lower case; 512-byte or 4 KiB sectors) or, on an MBR disk, the type bytes
    of its primary partitions (``0xfb``). Read from the disk itself, so partitions the kernel
    does not know (the table not re-read since it was written) count too. Empty if there is
    no table or no such device; OSError if the device cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _ABSENT:
            return []                    # no such device: nothing on it to protect
        raise
    try:
        head = os.pread(fd, 8192, 0)
        for sector in (512, 4096):
            header = head[sector:sector + 92]
            if header[:8] != b"EFI PART":
                continue
            entries_lba, count, size = struct.unpack_from("<QII", header, 72)
            if not 0 < count <= 1024 or not 128 <= size <= 4096:
                return []
            table = os.pread(fd, count * size, entries_lba * sector)
            types = []
            for offset in range(0, len(table) - size + 1, size):
                raw = table[offset:offset + 16]
                if raw != bytes(16):
                    types.append(str(uuid.UUID(bytes_le=raw)))
            return types
        if head[510:512] != b"\x55\xaa":
            return []
        kinds = [head[446 + 16 * i + 4] for i in range(4)]
        if 0xEE in kinds:
            return []                    # a protective MBR without a GPT header: unreadable
        return [f"0x{kind:02x}" for kind in kinds if kind]
    finally:
        os.close(fd)


async def find_shared_filesystems(context: HardwareContext, devices: Sequence[str]
                                  ) -> list[tuple[str, str]]:
    """``(device, what)`` for each of ``devices`` (or a partition or holder of one of
    theirs) that holds a shared cluster filesystem: VMFS, GFS2, OCFS2, GPFS.

    ``lsblk`` gives the devices' trees (and the types, where udev recorded them); each
    device in them is also probed with ``blkid -p``, which reads the disk itself, so the
    check holds where udev does not run; and each asked device's partition table is read
    (``partition_types``), so a partition the kernel has not scanned counts too. (The
    reference agent asks lsblk only, about each device alone, for the partition type only.)
    ProcessExecutionError if a tool fails, OSError if a device cannot be read: the caller
    decides (an erase must not go ahead unchecked).
    """
    if not devices:
        return []
    out, _ = await context.runner.execute("lsblk", "-bia", "--json", "-o",
                                          GUARD_LSBLK_COLUMNS, *devices,
                                          timeout=command_timeout(context))
    try:
        tops = json.loads(out)["blockdevices"]
    except (ValueError, KeyError, TypeError) as e:
        raise ProcessExecutionError(["lsblk", *devices], 0, out,
                                    f"unreadable lsblk output: {e}".encode()) from e

    def path(row: Mapping[str, Any]) -> str:
        return os.path.join(context.config.dev_path, os.path.basename(str(row.get("kname"))))

    found: list[tuple[str, str]] = []
    tops_of: dict[str, str] = {}          # kname → the asked device it is under

    async def walk(rows: Sequence[Mapping[str, Any]], top: str | None) -> None:
        for row in rows:
            if top is None:               # a flat listing (no NAME tree): follow PKNAME
                top = tops_of.get(str(row.get("pkname")), path(row))
            tops_of[str(row.get("kname"))] = top
            what = shared_filesystem(row)
            if what is None:
                probed = await probe(context, path(row))
                what = shared_filesystem({"fstype": probed.get("TYPE"),
                                          "parttype": probed.get("PART_ENTRY_TYPE")})
            if what is not None:
                found.append((top, what if path(row) == top else f"{what} (on {path(row)})"))
            await walk(row.get("children") or (), top)

    for row in tops:
        await walk([row], None)
    pool = context.reactor.getThreadPool() if context.reactor is not None else None
    for device in devices:
        if pool is None:
            types = partition_types(device)
        else:
            types = await deferToThreadPool(context.reactor, pool, partition_types, device)
        for kind in dict.fromkeys(types):
            what = SHARED_PARTITION_TYPES.get(kind)
            if what is not None and not any(d == device and w.startswith(what)
                                            for d, w in found):
                found.append((device, f"{what} (in its partition table)"))
    return found


# -- the kernel's view --------------------------------------------------------------------------

async def partprobe(context: HardwareContext, device: str) -> bool:
    """Have the kernel re-read the partition table of ``device``; False (logged) if not.

    partprobe is tried ``partprobe_attempts`` times, ``PARTPROBE_RETRY_DELAY`` apart (a
    disk just written may still be busy).
    """
    try:
        await retry(lambda: context.runner.execute("partprobe", device,
                                                   timeout=command_timeout(context)),
                    context.clock, "partprobe {device}", backoff=fixed(PARTPROBE_RETRY_DELAY),
                    attempts=max(context.config.partprobe_attempts, 1),
                    retry_on=lambda e: (isinstance(e, ProcessExecutionError)
                                        and not isinstance(e, CommandNotFoundError)),
                    log=log, level=LogLevel.debug, fields={"device": device})
    except (ProcessExecutionError, GaveUp) as e:
        error = e.last if isinstance(e, GaveUp) else e
        log.warn("Unable to probe for partitions on {device}; the partition table may "
                 "be broken: {error}", device=device, error=str(error))
        return False
    return True


async def rescan_device(context: HardwareContext, device: str) -> bool:
    """Flush buffers, settle udev, re-read the partition table, settle again."""
    try:
        await context.runner.execute("sync", timeout=command_timeout(context))
    except ProcessExecutionError as e:
        log.warn("sync failed: {error}", error=str(e))
    await udev_settle(context)
    probed = await partprobe(context, device)
    await udev_settle(context)
    return probed


def _sysfs_dev(context: HardwareContext, name: str) -> int | None:
    """The device number the kernel gives block device ``name``, or None."""
    try:
        with open(os.path.join(context.config.sys_path, "class", "block", name, "dev"),
                  encoding="ascii") as f:
            major, _, minor = f.read().strip().partition(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


def _node_state(path: str) -> int | None:
    """The device number of block node ``path``; -1 if it is not a block node; None if absent."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return -1
    return status.st_rdev if stat.S_ISBLK(status.st_mode) else -1


def _make_node(context: HardwareContext, path: str, number: int) -> bool:
    """Make (or correct) block node ``path`` as device ``number``; only under ``dev_path``."""
    directory = os.path.realpath(os.path.dirname(path))
    if directory != os.path.realpath(context.config.dev_path):
        return False
    current = _node_state(path)
    if current == number:
        return True
    if current == -1:
        log.warn("{path} exists but is not a block device; not replacing it", path=path)
        return False
    if current is not None:
        os.unlink(path)           # a stale node: the kernel renumbered the partition
    os.mknod(path, 0o600 | stat.S_IFBLK, number)
    log.info("Created the missing device node {path} ({major}:{minor}) from sysfs",
             path=path, major=os.major(number), minor=os.minor(number))
    return True


async def wait_for_partition(context: HardwareContext, disk: str, path: str, *,
                             attempts: int | None = None,
                             delay: float = PARTITION_WAIT_DELAY) -> None:
    """Wait until ``path``, a partition of ``disk``, is a block device node.

    When sysfs knows ``disk``, the node must also be the device the kernel has for that
    partition now (a stale node left by an earlier table is replaced); the node is made
    from sysfs when nothing else makes it (see the module docstring). Without sysfs any
    block node at ``path`` is accepted. InstanceDeployFailure if it never appears.
    ``attempts`` (``delay`` apart) defaults to PARTITION_WAIT_ATTEMPTS, or more when
    ``partition_detection_attempts`` (the reference's checks, 1 s apart) asks for a longer
    wait.
    """
    if attempts is None:
        wanted = math.ceil(context.config.partition_detection_attempts / delay) \
            if delay > 0 else context.config.partition_detection_attempts
        attempts = max(PARTITION_WAIT_ATTEMPTS, wanted)
    kernel_knows_disk = _sysfs_dev(context, os.path.basename(os.path.realpath(disk))) \
        is not None
    name = os.path.basename(path)

    async def present() -> None:
        number = _sysfs_dev(context, name)
        current = _node_state(path)
        if number is None:
            if not kernel_knows_disk and current is not None and current >= 0:
                return
        elif current == number:
            return
        else:
            try:
                if _make_node(context, path, number):
                    return
            except OSError as e:
                log.warn("Cannot create the device node {path}: {error}", path=path,
                         error=str(e))
        raise _NotYet(f"{path} is not the partition's block device yet")

    try:
        await retry(present, context.clock, "Waiting for partition {path}",
                    backoff=fixed(delay), attempts=attempts, retry_on=_NotYet, log=log,
                    level=LogLevel.debug, fields={"path": path})
    except GaveUp:
        raise InstanceDeployFailure(f"Partition device {path} did not appear") from None


class _NotYet(Exception):
    """What is waited for is not there yet."""


# -- identifiers --------------------------------------------------------------------------------

async def probe(context: HardwareContext, path: str) -> dict[str, str]:
    """What ``blkid -p`` finds on ``path`` (TYPE, UUID, LABEL, PART_ENTRY_UUID ...)."""
    out, _ = await context.runner.execute("blkid", "-p", "-o", "export", path,
                                          timeout=command_timeout(context), check_exit_code=[0, 2])
    values: dict[str, str] = {}
    for line in out.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


async def block_uuid(context: HardwareContext, path: str) -> str:
    """The file system UUID on ``path``, else its partition UUID, else ``""``."""
    found = await probe(context, path)
    return found.get("UUID") or found.get("PART_ENTRY_UUID") or ""


def _read_at(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


async def get_disk_identifier(context: HardwareContext, device: str) -> str:
    """The MBR disk signature (bytes 440-443) as ``0x%08x``, like ``hexdump`` gives it."""
    data = await deferToThreadPool(context.reactor, context.reactor.getThreadPool(),
                                   _read_at, device, 440, 4)
    if len(data) != 4:
        raise InstanceDeployFailure(f"Cannot read the disk identifier of {device}")
    return "0x%08x" % struct.unpack("<I", data)[0]


async def fix_gpt_partition(context: HardwareContext, device: str) -> None:
    """Move the backup GPT to the end of the disk (after a smaller image was written).

    The GPT is read and, when its backup is elsewhere, rewritten in a thread
    (``gpt.relocate_backup``: what ``sgdisk -e`` writes, without its second-long sleep);
    one it leaves alone (none, damaged, hybrid MBR, larger than the disk) goes to
    ``sgdisk -v`` and, when that finds the backup misplaced, ``sgdisk -e``. Nothing to do on
    a disk without GPT. InstanceDeployFailure on failure.
    """
    from ipa_twisted.blockdev.gpt import Relocation, relocate_backup   # when first used
    try:
        found = await deferToThreadPool(context.reactor, context.reactor.getThreadPool(),
                                        relocate_backup, device)
    except OSError as e:
        raise InstanceDeployFailure(
            f"Failed to fix GPT data structures on disk {device}. Error: {e}") from e
    if found is Relocation.MOVED:
        log.info("Moved the backup GPT of {device} to the end of the disk", device=device)
    if found is not Relocation.UNHANDLED:
        return
    try:
        if (await read_layout(context, device)).table != "gpt":
            return
        out, _ = await context.runner.execute("sgdisk", "-v", device,
                                              timeout=command_timeout(context))
        if _MISPLACED_BACKUP_GPT not in " ".join(out.decode("utf-8", "replace").split()):
            return
        log.info("Moving the backup GPT of {device} to the end of the disk", device=device)
        await context.runner.execute("sgdisk", "-e", device, timeout=command_timeout(context))
    except (ProcessExecutionError, CommandExecutionError) as e:
        raise InstanceDeployFailure(
            f"Failed to fix GPT data structures on disk {device}. Error: {e}") from e


_MISPLACED_BACKUP_GPT = "doesn't reside at the end of the disk"


def write_at(path: str, data: bytes | Sequence[bytes], offset: int = 0) -> None:
    """Write ``data`` to ``path`` at ``offset`` and flush it (blocking: run in a thread)."""
    chunks = [data] if isinstance(data, bytes) else list(data)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        position = offset
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
        os.fsync(fd)
    finally:
        os.close(fd)
