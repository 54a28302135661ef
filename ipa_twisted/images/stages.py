"""The image pipeline's work off the reactor: its worker threads and the zstd child.

``Worker`` is one dedicated thread running jobs in order (hashing, decompressing, writing);
``ZstdSink`` feeds a zstd-compressed image to ``zstd -dc`` through a ``ChunkQueue`` and
hands its output to the writer thread, the child's pipe paused while the writer is behind.
``StreamingHeap`` keeps the freed chunks' memory for the next socket reads while images
stream.
"""

from __future__ import annotations

import collections
import ctypes
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ipa_twisted import errors
from ipa_twisted.blockdev.writer import SequentialSink
from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError

BATCH = 4 * 1024 * 1024
"""Bytes gathered on the reactor before a batch goes to the worker threads."""


class Worker:
    """One dedicated thread; jobs run one at a time, in the order submitted."""

    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
        self._pool.start()

    def submit(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        done: Deferred[Any] = deferToThreadPool(self._reactor, self._pool, f, *args)
        return done

    def stop(self) -> None:
        self._pool.stop()  # joins the idle thread: callers wait for their jobs first


def feed_all(sink: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        sink.feed(chunk)


def hash_all(hasher: Any, chunks: list[bytes]) -> None:
    # hashlib releases the GIL during an update, and taking it back costs when the reactor
    # and the writer are busy: many small chunks are joined into one update (a copy), large
    # ones (the socket is read 1 MiB at a time) are hashed as they are.
    if len(chunks) > 16:
        hasher.update(b"".join(chunks))
    else:
        for chunk in chunks:
            hasher.update(chunk)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT = 128 * 1024


class StreamingHeap:
    """While an image streams, freed chunks stay in the heap for the next socket reads.

    Each socket read allocates a new buffer (up to ``download.READ_SIZE``) that the hash
    and write threads free once done with it. glibc's default thresholds keep trimming the
    top of the heap and growing it again, and every page it grows by is faulted in and
    zeroed again (measured on a 1 GiB image: 70-87 thousand page faults, against 16-19
    thousand with these settings, and 15 % less of the reactor's CPU). ``hold`` makes
    allocations up to ``mmap_threshold`` come from the heap and keeps up to
    ``trim_threshold`` of free heap (the valve bounds what is in flight well under it);
    the last ``release`` restores glibc's default thresholds and gives the free memory back
    (``malloc_trim``). Does nothing where the C library has no ``mallopt``.
    """

    def __init__(self, libc: Any = None, *, mmap_threshold: int = 4 * 1024 * 1024,
                 trim_threshold: int = 32 * 1024 * 1024) -> None:
        self._libc = libc
        self._settings = ((_M_MMAP_THRESHOLD, mmap_threshold),
                          (_M_TRIM_THRESHOLD, trim_threshold))
        self._users = 0

    def _call(self, name: str, *args: int) -> None:
        if self._libc is None:
            try:
                self._libc = ctypes.CDLL(None)   # the C library Python runs on
            except OSError:
                self._libc = False
        function = getattr(self._libc, name, None) if self._libc else None
        if function is not None:
            function(*args)

    def hold(self) -> None:
        """An image starts streaming."""
        self._users += 1
        if self._users == 1:
            for option, value in self._settings:
                self._call("mallopt", option, value)

    def release(self) -> None:
        """An image is done (written or failed)."""
        self._users -= 1
        if self._users == 0:
            for option, _ in self._settings:
                self._call("mallopt", option, _GLIBC_DEFAULT)
            self._call("malloc_trim", 0)


streaming_heap = StreamingHeap()
"""The process's one ``StreamingHeap`` (``write_image`` holds it)."""


class ChunkQueue:
    """An async iterable of chunks for a child's stdin; ``put`` fires once they are taken."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[list[bytes], Deferred[None]]] = (
            collections.deque())
        self._index = 0
        self._waiter: Deferred[None] | None = None
        self._closed = False

    def put(self, chunks: list[bytes]) -> Deferred[None]:
        taken: Deferred[None] = Deferred()
        if self._closed:
            taken.callback(None)
        else:
            self._items.append((chunks, taken))
            self._wake()
        return taken

    def close(self) -> None:
        """No more chunks: iteration ends once the queued ones are taken."""
        self._closed = True
        self._wake()

    def abort(self) -> None:
        """The reader is gone: drop what is queued (its ``put`` Deferreds fire)."""
        self._closed = True
        items, self._items, self._index = self._items, collections.deque(), 0
        for _, taken in items:
            taken.callback(None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.callback(None)

    def __aiter__(self) -> ChunkQueue:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._items:
                chunks, taken = self._items[0]
                if self._index < len(chunks):
                    self._index += 1
                    return chunks[self._index - 1]
                self._items.popleft()
                self._index = 0
                taken.callback(None)
                continue
            if self._closed:
                raise StopAsyncIteration
            self._waiter = Deferred()
            await self._waiter


class ZstdSink:
    """zstd-compressed raw image: ``zstd -dc`` in a child, its output to the writer thread.

    The compressed chunks queue up for the child's stdin (``put`` fires when the child took
    them, which is what the Valve counts); its stdout is batched and written in the writer
    thread, the child's pipe paused meanwhile.
    """

    def __init__(self, runner: Any, worker: Worker, sink: SequentialSink, image_id: str,
                 on_error: Callable[[BaseException], None]) -> None:
        self._worker, self._sink, self._image_id = worker, sink, image_id
        self._on_error = on_error
        self._queue = ChunkQueue()
        self._out: list[bytes] = []
        self._out_size = 0
        self._killed = False
        self.error: BaseException | None = None
        self.ended: Deferred[None] = Deferred()
        running: Deferred[bytes] = runner.stream("zstd", "-dcq", stdin=self._queue,
                                                 on_stdout=self._stdout, timeout=None)
        running.addBoth(self._end)

    def _end(self, result: object) -> None:
        self._queue.abort()
        if isinstance(result, Failure) and not self._killed:
            e: BaseException = result.value  # type: ignore[assignment]
            if isinstance(e, CommandNotFoundError):
                self.error = errors.ImageDownloadError(
                    self._image_id, "zstd-compressed image but the zstd program is not "
                    "installed")
            elif isinstance(e, ProcessExecutionError):
                self.error = errors.ImageDownloadError(
                    self._image_id, f"zstd decompression failed: "
                    f"{e.stderr.decode('utf-8', 'replace').strip() or e.reason}")
            else:
                self.error = e
            self._on_error(self.error)
        self.ended.callback(None)

    def put(self, chunks: list[bytes]) -> Deferred[None]:
        return self._queue.put(chunks)

    def _stdout(self, data: bytes) -> Deferred[Any] | None:
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size < BATCH:
            return None
        batch, self._out, self._out_size = self._out, [], 0
        return self._worker.submit(feed_all, self._sink, batch)  # pauses zstd until written

    async def finish(self) -> None:
        self._queue.close()
        await self.ended
        if self.error is not None:
            raise self.error
        batch, self._out, self._out_size = self._out, [], 0
        await self._worker.submit(feed_all, self._sink, batch)
        await self._worker.submit(self._sink.finish)

    def kill(self) -> Deferred[None]:
        """Stop the child (a restart or a failure); fires once it is gone."""
        self._killed = True
        self._queue.abort()
        return self.ended
