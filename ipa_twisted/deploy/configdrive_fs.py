# Over 500 lines: two file system formats (ISO 9660, FAT) read and written without a library.
"""Config drive file systems: read ISO 9660 and FAT, build FAT for a given sector size.

A config drive is an ISO 9660 (2048-byte blocks) or a FAT file system labelled ``config-2``.
On a disk whose logical sectors are 4096 bytes, Linux cannot mount an ISO 9660 (its blocks
are smaller than the device's) nor a FAT made for 512-byte sectors, so the guest would not
find its config drive. The reference agent then mounts the image, makes a FAT on the
partition and copies the files over; ``rebuild_for_sector_size`` does the same without
mounting anything: it reads the files from the image (``read_iso9660``: Joliet names, else
Rock Ridge, else plain ISO names; ``read_fat``: FAT12/16/32 with long names) and builds a
FAT12/16 with the device's sector size (``build_fat``) holding the same tree, labelled
``CONFIG-2`` as the reference's ``mkfs.vfat -n CONFIG-2`` does.

All functions are pure and CPU-bound on at most ``MAX_CONFIG_DRIVE_SIZE`` bytes: run them in
a thread. Malformed images raise ValueError.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

ISO_BLOCK = 2048
LABEL = "CONFIG-2"
_FAT12_MAX_CLUSTERS = 4084      # Linux and the FAT specification: more is FAT16
_FAT16_MAX_CLUSTERS = 65524
_ATTR_DIRECTORY, _ATTR_VOLUME, _ATTR_LFN = 0x10, 0x08, 0x0F
_SHORT_CHARS = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'()-@^_`{}~")


@dataclass(frozen=True)
class Entry:
    """One file or directory of a config drive; ``path`` is relative, ``/``-separated."""

    path: str
    is_dir: bool
    data: bytes = b""


def sniff(data: bytes) -> str | None:
    """``iso9660``, ``vfat`` or None for the config drive image ``data``."""
    if data[16 * ISO_BLOCK + 1:16 * ISO_BLOCK + 6] == b"CD001":
        return "iso9660"
    if len(data) >= 512 and data[510:512] == b"\x55\xaa" and (
            data[54:59] == b"FAT12" or data[54:59] == b"FAT16" or data[82:87] == b"FAT32"):
        return "vfat"
    return None


def sector_size_problem(data: bytes, logical_sector_size: int) -> str | None:
    """Why the config drive ``data`` cannot be read on a device with that sector size."""
    kind = sniff(data)
    if kind == "iso9660" and logical_sector_size > ISO_BLOCK:
        return (f"an ISO 9660 config drive cannot be read from a device with "
                f"{logical_sector_size}-byte logical sectors")
    if kind == "vfat":
        made_for = struct.unpack_from("<H", data, 11)[0]
        if made_for < logical_sector_size:
            return (f"the FAT config drive was made for {made_for}-byte sectors, the device "
                    f"has {logical_sector_size}-byte logical sectors")
    return None


def rebuild_for_sector_size(data: bytes, sector_size: int) -> bytes:
    """The config drive ``data`` rebuilt as a FAT for ``sector_size``-byte sectors."""
    kind = sniff(data)
    if kind == "iso9660":
        entries = read_iso9660(data)
    elif kind == "vfat":
        entries = read_fat(data)
    else:
        raise ValueError("the config drive is neither ISO 9660 nor FAT")
    return build_fat(entries, sector_size)


# -- ISO 9660 -----------------------------------------------------------------------------------

def _iso_records(data: bytes, extent: int, length: int, block: int
                 ) -> list[tuple[bytes, int, int, bool, bytes]]:
    """(name, extent, size, is_dir, system use) of a directory's records, . and .. left out."""
    out = []
    start = extent * block
    end = start + length
    pos = start
    while pos < end:
        size = data[pos] if pos < len(data) else 0
        if size == 0:   # records never cross a block: the rest of this block is padding
            pos = (pos // block + 1) * block
            continue
        record = data[pos:pos + size]
        if len(record) < 34:
            raise ValueError("truncated ISO 9660 directory record")
        name_len = record[32]
        name = record[33:33 + name_len]
        su_start = 33 + name_len + (1 - name_len % 2)
        if name not in (b"\x00", b"\x01"):
            out.append((name, struct.unpack_from("<I", record, 2)[0],
                        struct.unpack_from("<I", record, 10)[0], bool(record[25] & 2),
                        record[su_start:]))
        pos += size
    return out


def _rock_ridge_name(system_use: bytes) -> str | None:
    pos, parts = 0, []
    while pos + 4 <= len(system_use):
        signature, length = system_use[pos:pos + 2], system_use[pos + 2]
        if length < 4:
            break
        if signature == b"NM":
            parts.append(system_use[pos + 5:pos + length])
        pos += length
    return b"".join(parts).decode("utf-8", "replace") if parts else None


def _plain_name(name: bytes, joliet: bool) -> str:
    text = name.decode("utf-16-be", "replace") if joliet else name.decode("ascii", "replace")
    text = text.split(";", 1)[0]
    return text[:-1] if text.endswith(".") else text


def read_iso9660(data: bytes) -> list[Entry]:
    """Every directory and file of an ISO 9660 image, parents first."""
    primary = joliet = None
    for index in range(16, 64):
        descriptor = data[index * ISO_BLOCK:(index + 1) * ISO_BLOCK]
        if len(descriptor) < ISO_BLOCK or descriptor[1:6] != b"CD001":
            raise ValueError("no ISO 9660 volume descriptor set")
        kind = descriptor[0]
        if kind == 255:
            break
        if kind == 1 and primary is None:
            primary = descriptor
        elif kind == 2 and descriptor[88:91] in (b"%/@", b"%/C", b"%/E"):
            joliet = descriptor
    if primary is None:
        raise ValueError("no ISO 9660 primary volume descriptor")
    chosen = joliet or primary
    block = struct.unpack_from("<H", chosen, 128)[0] or ISO_BLOCK
    root = chosen[156:190]
    entries: list[Entry] = []
    pending = [("", struct.unpack_from("<I", root, 2)[0], struct.unpack_from("<I", root, 10)[0])]
    seen: set[int] = set()
    while pending:
        prefix, extent, length = pending.pop(0)
        if extent in seen:
            raise ValueError("ISO 9660 directory loop")
        seen.add(extent)
        for name, child_extent, size, is_dir, system_use in _iso_records(data, extent, length,
                                                                         block):
            text = (None if joliet else _rock_ridge_name(system_use)) or _plain_name(
                name, joliet is not None)
            if not text or "/" in text or text in (".", ".."):
                raise ValueError(f"bad ISO 9660 file name {text!r}")
            path = f"{prefix}{text}"
            if is_dir:
                entries.append(Entry(path, True))
                pending.append((path + "/", child_extent, size))
            else:
                content = data[child_extent * block:child_extent * block + size]
                if len(content) != size:
                    raise ValueError(f"ISO 9660 file {path} runs past the image")
                entries.append(Entry(path, False, content))
    return entries


# -- FAT ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Geometry:
    sector: int
    per_cluster: int
    reserved: int
    fats: int
    root_entries: int
    fat_sectors: int
    total: int
    root_cluster: int
    bits: int

    @property
    def cluster(self) -> int:
        return self.sector * self.per_cluster

    @property
    def root_start(self) -> int:
        return (self.reserved + self.fats * self.fat_sectors) * self.sector

    @property
    def data_start(self) -> int:
        return self.root_start + -(-self.root_entries * 32 // self.sector) * self.sector

    def cluster_offset(self, number: int) -> int:
        return self.data_start + (number - 2) * self.cluster


def _geometry(data: bytes) -> _Geometry:
    if len(data) < 512 or data[510:512] != b"\x55\xaa":
        raise ValueError("not a FAT boot sector")
    sector, per_cluster, reserved, fats, root_entries, total16 = struct.unpack_from(
        "<HBHBHH", data, 11)
    fat16, total32 = struct.unpack_from("<H", data, 22)[0], struct.unpack_from("<I", data, 32)[0]
    if sector not in (512, 1024, 2048, 4096) or per_cluster == 0 or fats == 0:
        raise ValueError("invalid FAT boot sector")
    fat_sectors = fat16 or struct.unpack_from("<I", data, 36)[0]
    total = total16 or total32
    root_cluster = struct.unpack_from("<I", data, 44)[0] if fat16 == 0 else 0
    root_sectors = -(-root_entries * 32 // sector)
    clusters = (total - reserved - fats * fat_sectors - root_sectors) // per_cluster
    bits = 12 if clusters <= _FAT12_MAX_CLUSTERS else 16 if fat16 else 32
    return _Geometry(sector, per_cluster, reserved, fats, root_entries, fat_sectors, total,
                     root_cluster, bits)


def _fat_next(data: bytes, geometry: _Geometry, number: int) -> int:
    base = geometry.reserved * geometry.sector
    if geometry.bits == 12:
        value = struct.unpack_from("<H", data, base + number * 3 // 2)[0]
        value = value >> 4 if number & 1 else value & 0xFFF
        return value if value < 0xFF8 else -1
    if geometry.bits == 16:
        value = struct.unpack_from("<H", data, base + number * 2)[0]
        return value if value < 0xFFF8 else -1
    value = struct.unpack_from("<I", data, base + number * 4)[0] & 0x0FFFFFFF
    return value if value < 0x0FFFFFF8 else -1


def _chain(data: bytes, geometry: _Geometry, first: int) -> bytes:
    parts, number, seen = [], first, set()
    while number >= 2:
        if number in seen:
            raise ValueError("FAT cluster chain loops")
        seen.add(number)
        offset = geometry.cluster_offset(number)
        parts.append(data[offset:offset + geometry.cluster])
        number = _fat_next(data, geometry, number)
    return b"".join(parts)


def _short_name_text(raw: bytes, flags: int) -> str:
    base = raw[:8].rstrip(b" ").decode("cp437")
    ext = raw[8:11].rstrip(b" ").decode("cp437")
    if flags & 0x08:
        base = base.lower()
    if flags & 0x10:
        ext = ext.lower()
    return f"{base}.{ext}" if ext else base


def _dir_entries(raw: bytes) -> list[tuple[str, int, int, int]]:
    """(name, attributes, first cluster, size) of a directory's entries, . and .. left out."""
    out: list[tuple[str, int, int, int]] = []
    long_parts: list[bytes] = []
    for pos in range(0, len(raw) - 31, 32):
        entry = raw[pos:pos + 32]
        if entry[0] == 0:
            break
        if entry[0] == 0xE5:
            long_parts = []
            continue
        attributes = entry[11]
        if attributes == _ATTR_LFN:
            chars = entry[1:11] + entry[14:26] + entry[28:32]
            long_parts.insert(0, chars)
            continue
        if attributes & _ATTR_VOLUME or entry[:2] in (b". ", b".."):
            long_parts = []
            continue
        name = _short_name_text(entry[:11], entry[12])
        if long_parts:
            text = b"".join(long_parts).decode("utf-16-le", "replace")
            name = text.split("\x00", 1)[0]
            long_parts = []
        first = struct.unpack_from("<H", entry, 26)[0] | (
            struct.unpack_from("<H", entry, 20)[0] << 16)
        out.append((name, attributes, first, struct.unpack_from("<I", entry, 28)[0]))
    return out


def read_fat(data: bytes) -> list[Entry]:
    """Every directory and file of a FAT image, parents first."""
    geometry = _geometry(data)
    if geometry.bits == 32:
        root = _chain(data, geometry, geometry.root_cluster)
    else:
        root = data[geometry.root_start:geometry.data_start]
    entries: list[Entry] = []
    pending = [("", root)]
    depth = 0
    while pending:
        depth += 1
        if depth > 10_000:
            raise ValueError("FAT directory tree too deep")
        prefix, raw = pending.pop(0)
        for name, attributes, first, size in _dir_entries(raw):
            path = prefix + name
            if attributes & _ATTR_DIRECTORY:
                entries.append(Entry(path, True))
                pending.append((path + "/", _chain(data, geometry, first)))
            else:
                content = _chain(data, geometry, first)[:size] if size else b""
                if len(content) != size:
                    raise ValueError(f"FAT file {path} is shorter than its size")
                entries.append(Entry(path, False, content))
    return entries


def _is_short(name: str) -> bool:
    base, dot, ext = name.partition(".")
    return (bool(base) and len(base) <= 8 and len(ext) <= 3 and "." not in ext
            and name == name.upper() and all(ord(c) in _SHORT_CHARS for c in base + ext))


def _short_name(name: str, taken: set[bytes]) -> bytes:
    if _is_short(name):
        base, _, ext = name.partition(".")
        short = base.encode().ljust(8) + ext.encode().ljust(3)
        taken.add(short)
        return short
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")

    def clean(text: str) -> bytes:
        return bytes(c for c in text.upper().encode("ascii", "replace") if c in _SHORT_CHARS)

    basis, extension = clean(stem) or b"FILE", clean(ext)[:3]
    for n in range(1, 1_000_000):
        tail = b"~%d" % n
        candidate = (basis[:8 - len(tail)] + tail).ljust(8) + extension.ljust(3)
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    raise ValueError("too many similar file names")


def _checksum(short: bytes) -> int:
    total = 0
    for byte in short:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def _dos_time(moment: float) -> tuple[int, int]:
    t = time.gmtime(moment)
    year = min(max(t.tm_year, 1980), 2107)
    return (t.tm_hour << 11 | t.tm_min << 5 | t.tm_sec // 2,
            (year - 1980) << 9 | t.tm_mon << 5 | t.tm_mday)


def _entry(short: bytes, attributes: int, first: int, size: int, stamp: tuple[int, int]
           ) -> bytes:
    clock, date = stamp
    return struct.pack("<11sBBBHHHHHHHI", short, attributes, 0, 0, clock, date, date,
                       first >> 16, clock, date, first & 0xFFFF, size)


def _long_entries(name: str, short: bytes) -> list[bytes]:
    units = name.encode("utf-16-le")
    if len(units) > 255 * 2:
        raise ValueError(f"file name too long for FAT: {name!r}")
    units += b"\x00\x00" if len(units) % 26 else b""
    units += b"\xff" * (-len(units) % 26)
    pieces = [units[i:i + 26] for i in range(0, len(units), 26)]
    checksum = _checksum(short)
    out = []
    for index, piece in enumerate(pieces, 1):
        order = index | (0x40 if index == len(pieces) else 0)
        out.append(struct.pack("<B10sBBB12sH4s", order, piece[:10], _ATTR_LFN, 0, checksum,
                               piece[10:22], 0, piece[22:26]))
    return out[::-1]


class _Dir:
    def __init__(self) -> None:
        self.children: list[tuple[str, _Dir | bytes]] = []


def build_fat(entries: list[Entry], sector_size: int, label: str = LABEL,
              moment: float | None = None) -> bytes:
    """A FAT12/16 image with ``sector_size``-byte sectors holding ``entries``.

    One sector per cluster; the image is as small as it can be, rounded up to a MiB.
    """
    if sector_size not in (512, 1024, 2048, 4096):
        raise ValueError(f"unsupported sector size {sector_size}")
    stamp = _dos_time(time.time() if moment is None else moment)
    root = _Dir()
    dirs = {"": root}
    for entry in entries:
        parent, _, name = entry.path.rpartition("/")
        if parent not in dirs or not name:
            raise ValueError(f"{entry.path}: its directory is not listed before it")
        if entry.is_dir:
            dirs[entry.path] = _Dir()
            dirs[parent].children.append((name, dirs[entry.path]))
        else:
            dirs[parent].children.append((name, entry.data))

    # directory tables (without cluster numbers yet) decide how many clusters each takes
    cluster = sector_size
    shorts: dict[int, list[bytes]] = {}
    for directory in dirs.values():
        taken: set[bytes] = {b".          ", b"..         "}
        shorts[id(directory)] = [_short_name(name, taken) for name, _ in directory.children]

    def table_size(directory: _Dir, is_root: bool) -> int:
        count = 0 if is_root else 2
        for (name, _), short in zip(directory.children, shorts[id(directory)]):
            count += 1 + (0 if _is_short(name) else len(_long_entries(name, short)))
        return count * 32 + (32 if is_root else 0)   # the root holds the volume label

    root_bytes = table_size(root, True)
    root_entries = -(-root_bytes // sector_size) * sector_size // 32
    needed = 0
    for path, directory in dirs.items():
        if path:
            needed += max(1, -(-table_size(directory, False) // cluster))
        for _, child in directory.children:
            if isinstance(child, bytes):
                needed += -(-len(child) // cluster)
    reserved = 1
    mib = 1 << 20
    total_bytes = mib
    while True:
        total = total_bytes // sector_size
        root_sectors = root_entries * 32 // sector_size
        fat_sectors, bits = 1, 12
        for _ in range(8):
            clusters = (total - reserved - 2 * fat_sectors - root_sectors)
            bits = 12 if clusters <= _FAT12_MAX_CLUSTERS else 16
            fat_sectors = -(-((clusters + 2) * bits // 8 + 1) // sector_size)
        clusters = total - reserved - 2 * fat_sectors - root_sectors
        if clusters > _FAT16_MAX_CLUSTERS:
            raise ValueError("the config drive is too large for FAT16")
        if clusters >= needed:
            break
        total_bytes += mib
    geometry = _Geometry(sector_size, 1, reserved, 2, root_entries, fat_sectors, total, 0,
                         bits)
    image = bytearray(total * sector_size)
    fat = [0] * (clusters + 2)
    fat[0], fat[1] = (0xFF8, 0xFFF) if bits == 12 else (0xFFF8, 0xFFFF)
    next_free = [2]

    def allocate(size: int) -> int:
        count = max(1, -(-size // cluster))
        first = next_free[0]
        for number in range(first, first + count):
            fat[number] = number + 1
        fat[first + count - 1] = 0xFFF if bits == 12 else 0xFFFF
        next_free[0] += count
        return first

    def store(first: int, content: bytes) -> None:
        offset = geometry.cluster_offset(first)
        image[offset:offset + len(content)] = content

    def write_dir(directory: _Dir, own: int, parent: int) -> bytes:
        table = []
        if own:
            table.append(_entry(b".          ", _ATTR_DIRECTORY, own, 0, stamp))
            table.append(_entry(b"..         ", _ATTR_DIRECTORY, parent, 0, stamp))
        else:
            table.append(_entry(label.upper().encode("ascii")[:11].ljust(11), _ATTR_VOLUME,
                                0, 0, stamp))
        for (name, child), short in zip(directory.children, shorts[id(directory)]):
            if not _is_short(name):
                table.extend(_long_entries(name, short))
            if isinstance(child, bytes):
                first = allocate(len(child)) if child else 0
                if child:
                    store(first, child)
                table.append(_entry(short, 0x20, first, len(child), stamp))
            else:
                size = table_size(child, False)
                first = allocate(size)
                store(first, write_dir(child, first, own))
                table.append(_entry(short, _ATTR_DIRECTORY, first, 0, stamp))
        return b"".join(table)

    root_table = write_dir(root, 0, 0)
    image[geometry.root_start:geometry.root_start + len(root_table)] = root_table

    # boot sector
    boot = struct.pack("<3s8sHBHBHHBHHHII", b"\xeb\x3c\x90", b"mkfs.fat", sector_size, 1,
                       reserved, 2, root_entries, total if total < 0x10000 else 0, 0xF8,
                       fat_sectors, 32, 64, 0, 0 if total < 0x10000 else total)
    volume_id = int(stamp[1] << 16 | stamp[0])
    boot += struct.pack("<BBBI11s8s", 0x80, 0, 0x29, volume_id,
                        label.upper().encode("ascii")[:11].ljust(11),
                        b"FAT12   " if bits == 12 else b"FAT16   ")
    image[:len(boot)] = boot
    image[510:512] = b"\x55\xaa"

    # the two FATs
    if bits == 12:
        table = bytearray(-(-len(fat) * 3 // 2))
        for number, value in enumerate(fat):
            at = number * 3 // 2
            if number & 1:
                table[at] |= (value << 4) & 0xF0
                table[at + 1] = (value >> 4) & 0xFF
            else:
                table[at] = value & 0xFF
                table[at + 1] |= (value >> 8) & 0x0F
    else:
        table = bytearray(struct.pack(f"<{len(fat)}H", *fat))
    for copy in range(2):
        start = (reserved + copy * fat_sectors) * sector_size
        image[start:start + len(table)] = table
    return bytes(image)
