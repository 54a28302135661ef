"""Writing image bytes to the target device, off the reactor thread.

``DeviceWriter`` is synchronous: the pipeline calls it only from its one writer thread, so its
methods may block. It opens the device ``O_WRONLY`` (a regular file is created when missing,
which tests use as the "device"; a block device is never truncated). Contiguous writes are
staged in page-aligned buffers and written with ``O_DIRECT`` where the device takes it
(block devices; measured on a loop device: 2 GiB in 0.6 s direct against 1-6 s through the
page cache, whose dirty pages also count against the ramdisk's memory); the unaligned ends go
through a second, buffered descriptor. Two stages: while one is written (by a helper thread,
``os.pwrite`` releases the GIL) the writer fills the other. The direct descriptor is also
``O_DSYNC`` (as the reference agent's ``qemu-img convert -t directsync``): each stage is on
stable storage when its write returns, so a device with a write-back cache writes it back
while the image streams, not all in the final fsync (a loop device's backing file: 0.7 s of
a 2 GiB write was that fsync). Ranges the image leaves as zeros are zeroed with
``BLKZEROOUT`` on a block device (the kernel uses the device's write-zeroes, or writes zeros)
or punched out of a regular file, else written as zeros. ``finish`` fsyncs and closes.

Every error is an ``ImageWriteError``.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ipa_twisted import errors

log = Logger()

ALIGN = 4096
"""Alignment of O_DIRECT offsets, lengths and buffers (covers 512 and 4K sector disks)."""
STAGE_SIZE = 8 * 1024 * 1024
STAGES = 2
"""Stages of ``STAGE_SIZE``: one is filled while the other is written."""
WIPE_SIZE = 1024 * 1024
ZERO_PIECE = 1024 * 1024 * 1024
_ZEROS = bytes(1024 * 1024)

_BLKGETSIZE64 = 0x80081272
_BLKZEROOUT = 0x127F
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                    ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def device_size(fd: int) -> int:
    """Size in bytes of the open block device or file ``fd``."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISBLK(mode):
        buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("Q", buf)[0])
    return os.fstat(fd).st_size


class DeviceWriter:
    """Positional writes of one image to ``device``; call from one thread at a time.

    ``direct``: None (the default) uses O_DIRECT on block devices only; True also tries it on
    regular files; False never. ``bytes_written``/``bytes_zeroed`` count progress.
    """

    def __init__(self, device: str, *, direct: bool | None = None,
                 stage_size: int = STAGE_SIZE, stages: int = STAGES) -> None:
        self.device = device
        self.bytes_written = 0
        self.bytes_zeroed = 0
        self.end = 0
        """The highest offset written or zeroed so far."""
        self.is_block = False
        self.size: int | None = None
        """The block device's size (None for a regular file, which grows)."""
        self._direct_wanted = direct
        self._stage_size = stage_size
        self._fd = -1
        self._direct_fd = -1
        self._stage: mmap.mmap | None = None
        self._stage_start = 0
        self._stage_len = 0
        self._stage_count = max(1, stages)
        self._free: collections.deque[mmap.mmap] = collections.deque()
        self._writing: collections.deque[tuple[Future[None], mmap.mmap, memoryview]] = (
            collections.deque())
        self._io: ThreadPoolExecutor | None = None
        self._punch = True

    def _error(self, what: str, e: OSError) -> errors.ImageWriteError:
        return errors.ImageWriteError(self.device, None, "", f"{what}: {e}")

    @property
    def opened(self) -> bool:
        return self._fd >= 0

    def open(self) -> None:
        """Open the device (create a missing regular file). Nothing is written."""
        try:
            try:
                self.is_block = stat.S_ISBLK(os.stat(self.device).st_mode)
            except FileNotFoundError:
                self.is_block = False
            flags = os.O_WRONLY | os.O_CLOEXEC
            self._fd = os.open(self.device, flags if self.is_block else flags | os.O_CREAT,
                               0o600)
            self.size = device_size(self._fd) if self.is_block else None
        except OSError as e:
            raise self._error("cannot open the device", e) from e
        direct = self.is_block if self._direct_wanted is None else self._direct_wanted
        if direct:
            try:
                self._direct_fd = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC
                                          | os.O_DIRECT | os.O_DSYNC)
            except OSError as e:  # tmpfs and some file systems refuse O_DIRECT
                log.debug("O_DIRECT unavailable on {device}: {error}", device=self.device,
                          error=str(e))
                self._direct_fd = -1
        if self._direct_fd >= 0:
            self._stage = mmap.mmap(-1, self._stage_size)
            self._free.extend(mmap.mmap(-1, self._stage_size)
                              for _ in range(self._stage_count - 1))
            if self._free:
                self._io = ThreadPoolExecutor(1, thread_name_prefix="ipa-image-write-io")
        log.debug("Opened {device} (block device: {block}, size {size}, O_DIRECT: {direct})",
                  device=self.device, block=self.is_block, size=self.size,
                  direct=self._direct_fd >= 0)

    def _check_range(self, offset: int, length: int) -> None:
        if self.size is not None and offset + length > self.size:
            raise errors.ImageWriteError(
                self.device, None, "", f"the image does not fit: {offset + length} bytes "
                f"needed, the device has {self.size}")

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> None:
        while data:
            try:
                n = os.pwrite(fd, data, offset)
            except OSError as e:
                raise self._error(f"write of {len(data)} bytes at offset {offset} failed",
                                  e) from e
            if n <= 0:
                raise errors.ImageWriteError(self.device, None, "",
                                             f"short write at offset {offset}")
            data, offset = data[n:], offset + n

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (staged: visible on the device after ``flush``)."""
        view = memoryview(data).cast("B")
        if not view:
            return
        self._check_range(offset, len(view))
        self.bytes_written += len(view)
        self.end = max(self.end, offset + len(view))
        if self._stage is None:
            self._pwrite(self._fd, view, offset)
            return
        if self._stage_len and offset != self._stage_start + self._stage_len:
            self._flush_stage(final=True)
        if not self._stage_len:
            head = min(-offset % ALIGN, len(view))
            if head:  # reach an aligned offset through the buffered descriptor
                self._pwrite(self._fd, view[:head], offset)
                view, offset = view[head:], offset + head
            self._stage_start = offset
        while view:
            n = min(len(view), self._stage_size - self._stage_len)
            self._stage[self._stage_len:self._stage_len + n] = view[:n]  # the stage changes
            self._stage_len += n
            view = view[n:]
            if self._stage_len == self._stage_size:
                self._flush_stage(final=False)

    def _flush_stage(self, final: bool) -> None:
        assert self._stage is not None
        start, length = self._stage_start, self._stage_len
        aligned = length - length % ALIGN
        rest = length - aligned
        tail = bytes(self._stage[aligned:length]) if rest else b""
        if aligned:
            self._write_stage(aligned, start)
        if rest and not final:  # keep the unaligned tail staged: the next write may continue it
            self._stage[0:rest] = tail
            self._stage_start, self._stage_len = start + aligned, rest
            return
        if rest:
            self._pwrite(self._fd, memoryview(tail), start + aligned)
        self._stage_start, self._stage_len = start + length, 0
        if final:
            self._wait_writes()

    def _write_stage(self, length: int, offset: int) -> None:
        """Write the first ``length`` bytes of the stage at ``offset``; a free stage (the
        oldest one written, once it is) becomes the stage."""
        assert self._stage is not None
        view = memoryview(self._stage)[:length]
        if self._io is None:
            try:
                self._pwrite(self._direct_fd, view, offset)
            finally:
                view.release()
            return
        self._writing.append((self._io.submit(self._pwrite, self._direct_fd, view, offset),
                              self._stage, view))
        self._stage = self._free.popleft() if self._free else self._wait_oldest()

    def _wait_oldest(self) -> mmap.mmap:
        """Wait for the oldest stage being written (its error is raised) and return it."""
        written, stage, view = self._writing.popleft()
        try:
            written.result()
        finally:
            view.release()
            self._free.append(stage)
        return self._free.pop()

    def _wait_writes(self) -> None:
        while self._writing:
            self._free.append(self._wait_oldest())

    def flush(self) -> None:
        """Write out what is staged."""
        if self._stage is not None and self._stage_len:
            self._flush_stage(final=True)
        self._wait_writes()

    def zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros, the cheapest way the device has."""
        if length <= 0:
            return
        self._check_range(offset, length)
        self._wait_writes()   # in order with the writes before it
        self.bytes_zeroed += length
        self.end = max(self.end, offset + length)
        start = offset + (-offset % ALIGN)
        stop = (offset + length) - (offset + length) % ALIGN
        if stop - start >= ALIGN and self._zero_fast(start, stop - start):
            self._write_zeros(offset, start - offset)
            self._write_zeros(stop, offset + length - stop)
        else:
            self._write_zeros(offset, length)

    def _zero_fast(self, offset: int, length: int) -> bool:
        try:
            if self.is_block:
                # In pieces: one ioctl cannot be interrupted, and a disk without a write-zeroes
                # command has the kernel write the zeros itself.
                for start in range(offset, offset + length, ZERO_PIECE):
                    piece = min(ZERO_PIECE, offset + length - start)
                    fcntl.ioctl(self._fd, _BLKZEROOUT, struct.pack("QQ", start, piece))
                return True
            if self._punch:
                _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset,
                           length)
                return True
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                raise self._error(f"zeroing {length} bytes at offset {offset} failed",
                                  e) from e
            log.debug("No fast zeroing on {device}: {error}", device=self.device, error=str(e))
            self._punch = False
        return False

    def _write_zeros(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, len(_ZEROS))
            self._pwrite(self._fd, memoryview(_ZEROS)[:n], offset)
            offset, length = offset + n, length - n

    def finish(self, min_size: int | None = None) -> None:
        """Flush, grow a regular file to ``min_size``, fsync and close."""
        try:
            self.flush()
            if not self.is_block and min_size is not None:
                if os.fstat(self._fd).st_size < min_size:
                    os.ftruncate(self._fd, min_size)
            for fd in (self._direct_fd, self._fd):
                if fd >= 0:
                    os.fsync(fd)
        except OSError as e:
            raise self._error("flushing the device failed", e) from e
        finally:
            self.close()

    def close(self) -> None:
        """Close without flushing what is staged (after a failure)."""
        while self._writing:
            try:
                self._free.append(self._wait_oldest())
            except errors.ImageWriteError:
                pass   # a write failed: the caller is failing already
        if self._io is not None:
            self._io.shutdown()
            self._io = None
        for fd in (self._direct_fd, self._fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = self._direct_fd = -1
        for stage in [self._stage, *self._free]:
            if stage is not None:
                stage.close()
        self._stage = None
        self._free.clear()
        self._stage_len = 0


def wipe_partition_tables_sync(device: str) -> None:
    """Zero the first and the last MiB of ``device`` (MBR, GPT primary and backup), fsync."""
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.ImageWriteError(device, None, "", f"cannot open to wipe: {e}") from e
    try:
        size = device_size(fd)
        for offset in sorted({0, max(0, size - WIPE_SIZE)}):
            length = min(WIPE_SIZE, size - offset)
            if length > 0:
                os.pwrite(fd, _ZEROS[:length], offset)
        os.fsync(fd)
    except OSError as e:
        raise errors.ImageWriteError(device, None, "", f"wiping partition tables: {e}") from e
    finally:
        os.close(fd)


async def wipe_partition_tables(device: str, reactor: Any) -> None:
    """Zero the first and last MiB of ``device`` in the reactor's thread pool (GPT primary and
    backup, MBR), so a partly written or corrupt image cannot boot."""
    await deferToThreadPool(reactor, reactor.getThreadPool(), wipe_partition_tables_sync,
                            device)
    log.info("Wiped the partition tables of {device}", device=device)


class SequentialSink:
    """Raw image bytes in order, written from offset 0 (call from the writer thread).

    With ``check_head``, the first ``head_size`` bytes are held and passed to it before
    anything is written (a decompressed image's own format is checked that way).
    """

    def __init__(self, writer: DeviceWriter,
                 check_head: Callable[[bytes], None] | None = None,
                 head_size: int = 64 * 1024) -> None:
        self.writer = writer
        self.position = 0
        self._check = check_head
        self._head_size = head_size
        self._head: list[bytes] = []
        self._held = 0

    def feed(self, data: bytes) -> None:
        if self._check is not None:
            self._head.append(data)
            self._held += len(data)
            if self._held < self._head_size:
                return
            self._release()
            return
        self.writer.write(self.position, data)
        self.position += len(data)

    def _release(self) -> None:
        check, self._check = self._check, None
        head, self._head = b"".join(self._head), []
        assert check is not None
        check(head)
        self.feed(head)

    def finish(self) -> None:
        """The end of the image: check a short image's head, then flush."""
        if self._check is not None:
            self._release()
        self.writer.flush()
