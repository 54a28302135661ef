"""A GPT's backup moved to the end of its disk, as ``sgdisk -e`` does, without its sleep.

A whole-disk image smaller than its disk leaves its backup GPT (partition entries and
header) where the image ended. ``relocate_backup`` reads the primary header (at 512 or 4096
bytes), checks it (signature, size, its own CRC32 and the entries' CRC32, ``MyLBA`` 1) and,
when its backup is not on the disk's last sector, writes the entries and the backup header
at the end, then the primary header pointing at them with the last usable sector moved up
to just before them, then the protective MBR's size (and end CHS): the whole disk. The
result is byte for byte what ``sgdisk -e`` leaves.
Each part is flushed before the next is written, so an interruption leaves the primary
header naming either the old backup (still intact) or the new one. Partitions are not
touched, so the kernel's view of them stays right.

Blocking (``os.pread``/``os.pwrite``): run it in a thread. ``sgdisk -e`` does the same but
sleeps a second before re-reading the table (about a second of every deploy of an image
smaller than its disk); anything unusual (no GPT, a damaged one, a disk smaller than the
image, a hybrid MBR) is left to it.
"""

from __future__ import annotations

import enum
import os
import struct
import zlib

_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_SIGNATURE = b"EFI PART"
_CRC_OFFSET = 16
_ENTRY_LAST_LBA = struct.Struct("<Q")
_ENTRY_LAST_LBA_OFFSET = 40
_MBR_ENTRIES = 446
_MBR_PROTECTIVE = 0xEE


class Relocation(enum.Enum):
    """What ``relocate_backup`` found and did."""

    MOVED = "moved"
    """The backup was elsewhere; it is at the end of the disk now."""
    IN_PLACE = "in place"
    """The backup was at the end already: nothing written."""
    UNHANDLED = "unhandled"
    """No GPT, or one this module does not change (damaged, larger than the disk, hybrid
    MBR): nothing written; ``sgdisk`` decides."""


def _crc(header: bytes | bytearray, size: int) -> int:
    data = bytearray(header[:size])
    data[_CRC_OFFSET:_CRC_OFFSET + 4] = bytes(4)
    return zlib.crc32(data)


def _with_crc(header: bytearray, size: int) -> bytearray:
    header[_CRC_OFFSET:_CRC_OFFSET + 4] = struct.pack("<I", _crc(header, size))
    return header


def _chs(lba: int) -> bytes:
    """The MBR's cylinder/head/sector bytes for ``lba`` (255 heads, 63 sectors a track;
    past cylinder 1023 all ones), as sgdisk writes them."""
    cylinder, rest = divmod(lba, 255 * 63)
    if cylinder > 1023:
        return b"\xff\xff\xff"
    head, sector = divmod(rest, 63)
    return bytes([head, (sector + 1) | ((cylinder >> 2) & 0xC0), cylinder & 0xFF])


def _write(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _primary(fd: int) -> tuple[int, bytes] | None:
    """``(sector size, primary header sector)`` of a valid primary GPT header, or None."""
    head = os.pread(fd, 8192, 0)
    for sector in (512, 4096):
        raw = head[sector:2 * sector]
        if len(raw) < sector or raw[:8] != _SIGNATURE:
            continue
        size = _HEADER.unpack_from(raw)[2]
        if not _HEADER.size <= size <= sector:
            return None
        if _HEADER.unpack_from(raw)[3] != _crc(raw, size) or _HEADER.unpack_from(raw)[5] != 1:
            return None
        return sector, raw
    return None


def relocate_backup(path: str) -> Relocation:
    """Move the backup GPT of ``path`` (a disk or a disk image file) to its end, if it is
    not there; see the module docstring. OSError if ``path`` cannot be read or written."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        found = _primary(fd)
        if found is None:
            return Relocation.UNHANDLED
        sector, raw = found
        (_, _, size, _, _, _, alternate, first_usable, last_usable, _, entries_lba, count,
         entry_size, entries_crc) = _HEADER.unpack_from(raw)
        last = os.lseek(fd, 0, os.SEEK_END) // sector - 1
        if alternate == last:
            return Relocation.IN_PLACE
        if not (0 < count <= 4096 and 128 <= entry_size <= 4096 and entry_size % 8 == 0):
            return Relocation.UNHANDLED
        entries = os.pread(fd, count * entry_size, entries_lba * sector)
        if len(entries) != count * entry_size or zlib.crc32(entries) != entries_crc:
            return Relocation.UNHANDLED
        entry_sectors = -(-len(entries) // sector)
        backup_entries = last - entry_sectors
        new_last_usable = backup_entries - 1
        used = [_ENTRY_LAST_LBA.unpack_from(entries, offset + _ENTRY_LAST_LBA_OFFSET)[0]
                for offset in range(0, len(entries), entry_size)
                if entries[offset:offset + 16] != bytes(16)]
        if (alternate > last or last_usable > new_last_usable
                or max(used, default=first_usable) > new_last_usable):
            return Relocation.UNHANDLED            # the disk is smaller than the image
        mbr = bytearray(os.pread(fd, 512, 0))
        kinds = [mbr[_MBR_ENTRIES + 16 * i + 4] for i in range(4)]
        if mbr[510:512] != b"\x55\xaa" or [k for k in kinds if k] != [_MBR_PROTECTIVE]:
            return Relocation.UNHANDLED            # hybrid MBR (or none): sgdisk decides
        primary = bytearray(raw)
        struct.pack_into("<QQQQ", primary, 24, 1, last, first_usable, new_last_usable)
        _with_crc(primary, size)
        backup = bytearray(sector)
        backup[:size] = primary[:size]
        struct.pack_into("<QQ", backup, 24, last, 1)
        struct.pack_into("<Q", backup, 72, backup_entries)
        _with_crc(backup, size)
        _write(fd, entries + bytes(entry_sectors * sector - len(entries)),
               backup_entries * sector)
        _write(fd, bytes(backup), last * sector)
        os.fsync(fd)
        _write(fd, bytes(primary), sector)
        os.fsync(fd)
        entry = _MBR_ENTRIES + 16 * kinds.index(_MBR_PROTECTIVE)
        mbr[entry + 5:entry + 8] = _chs(last)
        struct.pack_into("<I", mbr, entry + 12, min(last, 0xFFFFFFFF))
        _write(fd, bytes(mbr), 0)
        os.fsync(fd)
        return Relocation.MOVED
    finally:
        os.close(fd)
