"""Streaming qcow2 to raw conversion with bounded memory, whatever the image size.

``Qcow2Converter`` is fed the qcow2 file's bytes in file order (as they come off the network)
and writes the guest's raw bytes at their guest offsets through a ``Target`` (the
``DeviceWriter``). It is synchronous and runs in the pipeline's writer thread.

How it works:

- the header (first cluster) gives the L1 table's place; the L1 table, when it passes, gives
  the L2 tables' places; each L2 table, when it passes, maps guest clusters to the file. Only
  what is still ahead is remembered (a heap of extents by file offset: contiguous clusters are
  merged, so an image written by ``qemu-img convert`` needs a handful per L2 table);
- data clusters are written as they pass; compressed clusters (raw deflate) are gathered and
  inflated; zero and unallocated clusters (and L1 entries without an L2 table) are zeroed at
  once (``Target.zero``: BLKZEROOUT / punched holes), so the device's first ``virtual_size``
  bytes end up equal to ``qemu-img convert -O raw`` whatever they held before;
- bytes that pass before anything maps them (an L1 table written after its data, an L2
  table after its clusters, refcount blocks, snapshots) are not kept: the converter records
  them in stretches of at most ``STRETCH_MAX`` bytes, each with a BLAKE2b digest. Compressed
  clusters' bytes are recorded too: their sector-rounded ends overlap the next compressed
  cluster, which may be mapped late (qemu packs small compressed clusters before the L2
  table that maps them). ``end_pass`` then names the stretches holding clusters learned too
  late; the pipeline fetches them again with HTTP Range requests and feeds them back
  (``begin_pass``, ``seek``); each refetched stretch must match its digest, so the later
  passes write only bytes covered by the image checksum (else ImageChecksumError). Layouts
  where a pass teaches the converter new mappings again need at most a few passes
  (``MAX_PASSES``); a cluster mapped late onto bytes another mapping consumed is refused.

Memory: one L1 table (at most 32 MiB, 16 KiB for a 1 TiB image with 64 KiB clusters), the
L2 tables and compressed clusters being read (a cluster each), the extents still ahead
and the late stretches' digests.

Refused earlier (``formats.check_safe``): backing files, external data files, encryption.
Extended L2 entries and zstd-compressed clusters are not read here: the pipeline hands those
images to qemu-img (``images/qemu_source.py``).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import struct
import zlib
from collections.abc import Iterable
from typing import Any, Protocol

from twisted.logger import Logger

from ipa_twisted import errors
from ipa_twisted.images.formats import (ImageFormatRefused, Qcow2Info, qcow2_refusal,
                                        qcow2_streamable)

log = Logger()

MAX_PASSES = 6
STRETCH_MAX = 1024 * 1024
"""Late bytes are digested in stretches of at most this much (aligned): the refetch unit."""
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1

_SKIP, _L1, _L2, _DATA, _COMPRESSED = range(5)
_KIND_NAMES = {_SKIP: "header", _L1: "L1 table", _L2: "L2 table", _DATA: "data",
               _COMPRESSED: "compressed cluster"}


class Target(Protocol):
    """Where the guest's bytes go (``DeviceWriter``)."""

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...


class _Active:
    """An item whose file bytes are passing now."""

    __slots__ = ("start", "end", "kind", "arg", "buf")

    def __init__(self, start: int, end: int, kind: int, arg: int) -> None:
        self.start, self.end, self.kind, self.arg = start, end, kind, arg
        self.buf: bytearray | None = bytearray() if kind in (_L1, _L2, _COMPRESSED) else None


class Qcow2Converter:
    """Feed it the qcow2 file in order (``feed``), then run the passes ``end_pass`` asks for."""

    def __init__(self, target: Target, info: Qcow2Info, image_id: str = "") -> None:
        reason = qcow2_refusal(info) or (
            None if qcow2_streamable(info) else
            "extended L2 entries and zstd-compressed clusters are converted by qemu-img")
        if reason is not None:
            raise ImageFormatRefused(image_id, reason)
        self.info = info
        self.image_id = image_id
        self._target = target
        self._cs = info.cluster_size
        self._cluster_bits = info.cluster_bits
        self._vsize = info.virtual_size
        self._l2_entries = self._cs // 8
        self._l2_span = self._l2_entries * self._cs
        self._csize_shift = 62 - (info.cluster_bits - 8)
        self._csize_mask = (1 << (info.cluster_bits - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        self._zero_flag = info.version >= 3
        self.pos = 0
        self.passes = 1
        self.file_size: int | None = None
        self._seq = itertools.count()
        self._heap: list[tuple[int, int, int, int, int]] = []
        self._active: list[_Active] = []
        self._missed: list[tuple[int, int, int, int]] = []
        self._stretches: list[tuple[int, int, bytes]] = []
        self._stretch_start = -1
        self._stretch_hash: Any = None
        self._verify: list[tuple[int, int, bytes]] = []
        self._verify_hash: Any = None
        self._zero_start = self._zero_end = -1
        self.bytes_refetched = 0
        self._push(0, self._cs, _SKIP, 0)
        if info.l1_size:
            self._push(info.l1_table_offset, info.l1_table_offset + 8 * info.l1_size, _L1, 0)
        elif self._vsize:
            self._zero(0, self._vsize)

    # -- bookkeeping -------------------------------------------------------------------------

    def _invalid(self, why: str) -> ImageFormatRefused:
        return ImageFormatRefused(self.image_id, f"invalid qcow2 image: {why}")

    def _push(self, start: int, end: int, kind: int, arg: int) -> None:
        if start < self.pos:
            self._missed.append((start, end, kind, arg))
        else:
            heapq.heappush(self._heap, (start, next(self._seq), end, kind, arg))

    def _zero(self, guest: int, length: int) -> None:
        """Zero a guest range, merging neighbours into one call."""
        length = min(length, self._vsize - guest)
        if length <= 0:
            return
        if guest == self._zero_end:
            self._zero_end += length
            return
        self._flush_zero()
        self._zero_start, self._zero_end = guest, guest + length

    def _flush_zero(self) -> None:
        if self._zero_end > self._zero_start >= 0:
            self._target.zero(self._zero_start, self._zero_end - self._zero_start)
        self._zero_start = self._zero_end = -1

    def _write(self, guest: int, data: memoryview | bytes) -> None:
        if guest >= self._vsize:
            return
        if guest + len(data) > self._vsize:
            data = data[:self._vsize - guest]
        self._target.write(guest, data)

    # -- the stream --------------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        """The next bytes of the file (or of the current pass's range), in order."""
        view = memoryview(data).cast("B")
        i, n = 0, len(view)
        if self._verify:
            self._verify_update(self.pos, view)
        while i < n:
            pos = self.pos
            heap = self._heap
            while heap and heap[0][0] <= pos:
                start, _, end, kind, arg = heapq.heappop(heap)
                if start < pos:
                    self._missed.append((start, end, kind, arg))
                else:
                    self._active.append(_Active(start, end, kind, arg))
            limit = pos + (n - i)
            if heap and heap[0][0] < limit:
                limit = heap[0][0]
            for item in self._active:
                if item.end < limit:
                    limit = item.end
            segment = view[i:i + (limit - pos)]
            hard = False
            for item in self._active:
                self._consume(item, pos, segment)
                hard = hard or item.kind != _COMPRESSED
            if hard:
                self._close_stretch()
            else:  # unknown bytes, or compressed ones (their sector-rounded ends overlap)
                self._unknown(pos, segment)
            i += limit - pos
            self.pos = limit
            if self._active:
                finished = [item for item in self._active if item.end <= limit]
                if finished:
                    self._active = [item for item in self._active if item.end > limit]
                    for item in finished:
                        self._complete(item)

    def _unknown(self, pos: int, segment: memoryview) -> None:
        while segment:
            if self._stretch_start < 0:
                self._stretch_start = pos
                self._stretch_hash = hashlib.blake2b(digest_size=16)
            n = min(len(segment), STRETCH_MAX - pos % STRETCH_MAX)
            self._stretch_hash.update(segment[:n])
            segment, pos = segment[n:], pos + n
            if pos % STRETCH_MAX == 0:
                self._close_stretch(pos)

    def _close_stretch(self, end: int | None = None) -> None:
        if self._stretch_start >= 0:
            self._stretches.append((self._stretch_start, self.pos if end is None else end,
                                    self._stretch_hash.digest()))
            self._stretch_start, self._stretch_hash = -1, None

    def _consume(self, item: _Active, pos: int, segment: memoryview) -> None:
        if item.kind == _DATA:
            self._write(item.arg + (pos - item.start), segment)
        elif item.buf is not None:
            item.buf += segment

    def _complete(self, item: _Active, truncated: bool = False) -> None:
        if item.kind == _L1:
            if truncated:
                raise self._invalid("the file ends inside the L1 table")
            self._parse_l1(item.buf or b"")
        elif item.kind == _L2:
            if truncated:
                raise self._invalid("the file ends inside an L2 table")
            self._parse_l2(item.buf or b"", item.arg)
        elif item.kind == _COMPRESSED:
            self._inflate(item)
        elif item.kind == _DATA and truncated:
            # qemu reads past the end of the file as zeros
            written = self.pos - item.start
            self._zero(item.arg + written, (item.end - item.start) - written)

    def _parse_l1(self, table: bytes | bytearray) -> None:
        entries = struct.unpack(f">{len(table) // 8}Q", table)
        for index, entry in enumerate(entries):
            guest = index * self._l2_span
            if guest >= self._vsize:
                break
            offset = entry & L1E_OFFSET_MASK
            if not offset:
                self._zero(guest, self._l2_span)
            elif offset % self._cs:
                raise self._invalid(f"L1 entry {index} is not cluster aligned ({offset:#x})")
            else:
                self._push(offset, offset + self._cs, _L2, guest)
        self._flush_zero()

    def _parse_l2(self, table: bytes | bytearray, base: int) -> None:
        cs = self._cs
        count = min(self._l2_entries, -(-(self._vsize - base) // cs))
        entries = struct.unpack_from(f">{count}Q", table)
        run_host = run_guest = run_len = 0
        for index, entry in enumerate(entries):
            guest = base + index * cs
            if entry & QCOW_OFLAG_COMPRESSED:
                coffset = entry & self._coffset_mask
                sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
                csize = sectors * 512 - (coffset & 511)
                self._push(coffset, coffset + csize, _COMPRESSED, guest)
                continue
            offset = entry & L2E_OFFSET_MASK
            if (self._zero_flag and entry & QCOW_OFLAG_ZERO) or not offset:
                self._zero(guest, cs)
                continue
            if offset % cs:
                raise self._invalid(f"L2 entry for guest offset {guest:#x} is not cluster "
                                    f"aligned ({offset:#x})")
            if run_len and offset == run_host + run_len and guest == run_guest + run_len:
                run_len += cs
                continue
            if run_len:
                self._push(run_host, run_host + run_len, _DATA, run_guest)
            run_host, run_guest, run_len = offset, guest, cs
        if run_len:
            self._push(run_host, run_host + run_len, _DATA, run_guest)
        self._flush_zero()

    def _inflate(self, item: _Active) -> None:
        buf = item.buf or bytearray()
        try:
            out = zlib.decompressobj(-15).decompress(buf, self._cs)
        except zlib.error as e:
            raise self._invalid(f"compressed cluster at {item.start:#x}: {e}") from e
        if len(out) != self._cs:
            raise self._invalid(f"compressed cluster at {item.start:#x} inflates to "
                                f"{len(out)} bytes, not {self._cs}")
        self._write(item.arg, out)

    # -- passes ------------------------------------------------------------------------------

    def end_pass(self) -> list[tuple[int, int]]:
        """The current pass is over: the file ranges to fetch next (empty: all done)."""
        self._close_stretch()
        if self._verify:
            raise self._invalid(f"refetched stretch at {self._verify[0][0]} was cut short")
        if self.passes == 1:
            self.file_size = self.pos
        for item in self._active:  # the file ended inside them
            self._complete(item, truncated=True)
        self._active = []
        if self._heap:
            start, _, end, kind, _ = self._heap[0]
            if self.file_size is not None and start >= self.file_size:
                raise self._invalid(f"{_KIND_NAMES[kind]} at {start:#x} is past the end of "
                                    f"the file ({self.file_size} bytes)")
            self._missed.extend((s, e, k, a) for s, _, e, k, a in self._heap)
            self._heap = []
        self._flush_zero()
        if not self._missed:
            return []
        if self.passes >= MAX_PASSES:
            raise self._invalid(f"its metadata still refers backwards after {self.passes} "
                                f"passes")
        self._stretches.sort()
        starts = [start for start, _, _ in self._stretches]
        needed: set[int] = set()
        for start, end, kind, _ in self._missed:
            stop = min(end, self.file_size) if self.file_size is not None else end
            index = bisect.bisect_right(starts, start) - 1
            covered = start
            while covered < stop:
                if not 0 <= index < len(self._stretches) or not (
                        self._stretches[index][0] <= covered < self._stretches[index][1]):
                    raise self._invalid(
                        f"{_KIND_NAMES[kind]} at {start:#x} overlaps other data of the file "
                        f"(a cluster used twice, or mapped late into mapped bytes): not "
                        f"supported")
                needed.add(index)
                covered = self._stretches[index][1]
                index += 1
        self._verify = [self._stretches[i] for i in sorted(needed)]
        self._stretches = [s for i, s in enumerate(self._stretches) if i not in needed]
        ranges: list[tuple[int, int]] = []
        for start, end, _ in self._verify:
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        return ranges

    def begin_pass(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Start the next pass: ``ranges`` (from ``end_pass``) will be fed in order."""
        ranges = list(ranges)
        self.passes += 1
        self.pos = ranges[0][0] if ranges else 0
        self._heap = [(s, next(self._seq), e, k, a) for s, e, k, a in self._missed]
        heapq.heapify(self._heap)
        self._missed = []
        log.info("Image {image_id}: qcow2 pass {n} refetches {size} bytes in {count} ranges",
                 image_id=self.image_id, n=self.passes,
                 size=sum(e - s for s, e in ranges), count=len(ranges))

    def seek(self, offset: int) -> None:
        """The next bytes fed are at ``offset`` (the next range of a pass), not ``pos``."""
        if offset == self.pos:
            return
        if offset < self.pos:
            raise ValueError(f"cannot seek back from {self.pos} to {offset}")
        self._close_stretch()
        for item in self._active:  # cut by the jump: learn it again next pass
            self._missed.append((item.start, item.end, item.kind, item.arg))
        self._active = []
        self.pos = offset

    def _verify_update(self, pos: int, view: memoryview) -> None:
        i = 0
        while i < len(view) and self._verify:
            start, end, digest = self._verify[0]
            at = pos + i
            if at < start:
                raise self._invalid(f"refetched bytes at {at} were not asked for")
            if self._verify_hash is None:
                if at != start:
                    raise self._invalid(f"refetch of {start}-{end} began at {at}")
                self._verify_hash = hashlib.blake2b(digest_size=16)
            n = min(len(view) - i, end - at)
            self._verify_hash.update(view[i:i + n])
            i += n
            self.bytes_refetched += n
            if at + n == end:
                got = self._verify_hash.digest()
                self._verify_hash = None
                self._verify.pop(0)
                if got != digest:
                    raise errors.ImageChecksumError(
                        self.image_id, f"bytes {start}-{end - 1} (refetched)", digest.hex(),
                        got.hex())

    def finish(self) -> None:
        """Every pass is done: flush the last zeroed range."""
        self._flush_zero()
