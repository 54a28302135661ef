# Over 500 lines: the one place where an image's stages are put together and torn down, in order.
"""The image pipeline: HTTP body -> checksum -> (decompress | qcow2 convert | raw) -> device.

``write_image`` streams one image to a device with bounded memory and returns once the data is
on the device (fsynced) and its checksum verified:

- the body arrives on the reactor thread (``download.ImageDownload``), in batches of
  ``BATCH`` bytes handed to two dedicated worker threads: one hashes (hashlib releases the
  GIL), one decompresses/converts and writes (``writer.DeviceWriter``). A ``Valve`` pauses
  the HTTP transport while more than ``Valve.high`` bytes wait in either; while images
  stream, ``stages.streaming_heap`` keeps the freed batches' memory for the next reads;
- the checksum is settled first (an MD5-only image is refused unless ``md5_enabled``);
  the format is detected from the first bytes (a compressed image's from its first
  decompressed bytes) and refused (``formats.check_safe``; ``formats.check_permitted``
  against ``permitted_image_formats`` unless ``disable_deep_image_inspection``) before the
  caller's ``prepare`` (destroying the disk's metadata, partitioning) runs and the device is
  opened: a refused image leaves the disk untouched;
- raw and ISO bytes are written in order; gzip, bzip2 and xz raw images are decompressed in
  the writer thread; zstd through ``zstd -dc`` (``ProcessRunner.stream``, whose stdout is
  paused while the writer is behind); qcow2 is converted by ``qcow2.Qcow2Converter``, which
  may ask for a few ranges again (HTTP Range requests) when its metadata came after its data;
- a checksum mismatch wipes the partition tables (first and last MiB) and the image is
  downloaded once more (as the reference agent does); a second mismatch raises
  ImageChecksumError. Any failure after the first write wipes them too, so the node cannot
  boot a partial image. ``image_download_max_duration`` bounds the download, retries
  included.

``ImageProgress`` is what the API shows while the command runs; it is logged every
``ImageProgress.log_interval`` seconds.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from ipa_twisted import errors
from ipa_twisted.config import AgentConfig
from ipa_twisted.images import formats, qemu_source
from ipa_twisted.images.checksum import ExpectedChecksum, expected_checksum, new_hash
from ipa_twisted.images.decompress import DecompressingSink
from ipa_twisted.images.access import proxy_for
from ipa_twisted.images.download import ImageDownload, ImageDownloadTimeout, Valve, fetch_small
from ipa_twisted.images.progress import ImageProgress
from ipa_twisted.images.qcow2 import Qcow2Converter
from ipa_twisted.images.stages import (BATCH, Worker, ZstdSink, feed_all, hash_all,
                                      streaming_heap)
from ipa_twisted.blockdev.writer import (DeviceWriter, SequentialSink, device_size,
                                         wipe_partition_tables)
from ipa_twisted.http import make_pool
from ipa_twisted.proxy import make_proxy_http_client

log = Logger()


Prepare = Callable[[], Awaitable[str | None]]
"""``prepare()``: make the device ready once the image is accepted (its checksum and format
pass), before its first byte is written; it may return the device to write to instead."""


@dataclass(frozen=True)
class WrittenImage:
    """What ``write_image`` wrote."""

    format: str
    """The format detected from the bytes: raw, iso, qcow2, or gzip/xz/bzip2/zstd (raw)."""
    size: int
    """Bytes of the device the image covers (raw size, or qcow2 virtual size)."""
    virtual_size: int
    checksum_algo: str | None
    checksum: str | None
    """The verified hex digest (None when image_info had no checksum)."""
    url: str


class DigestMismatch(errors.ImageChecksumError):
    """The downloaded bytes did not hash to the expected checksum (retried once)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.type = "ImageChecksumError"   # what Ironic and the reference agent call it


class _Discard:
    """The sink of an image qemu-img converts: the stream is hashed, its bytes dropped."""

    def feed(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass


async def awaited(awaitable: Awaitable[str | None]) -> str | None:
    return await awaitable


class _ImageJob:
    """One ``write_image`` call: the BodyConsumer of its download, and what follows."""

    def __init__(self, image_info: Mapping[str, Any], device: str, download: ImageDownload,
                 expected: ExpectedChecksum | None, reactor: Any, runner: Any,
                 progress: ImageProgress, writer: DeviceWriter | None = None, *,
                 config: AgentConfig, prepare: Prepare | None = None,
                 proxy_of: Callable[[str], str | None] = lambda url: None) -> None:
        self.image_id = str(image_info.get("id", ""))
        self.declared = formats.declared_format(image_info)
        self.device = device
        self.config = config
        self.prepare = prepare
        self.downloaded = False
        """True once every byte (qcow2 refetches too) has arrived."""
        self.download = download
        self.expected = expected
        self.reactor, self.runner, self.progress = reactor, runner, progress
        self.valve = Valve()
        self.writer = writer if writer is not None else DeviceWriter(device)
        progress.writer = self.writer
        self.hasher_thread = Worker(reactor, "ipa-image-hash")
        self.writer_thread = Worker(reactor, "ipa-image-write")
        self.failure: BaseException | None = None
        self.format = formats.RAW
        self.info: formats.Qcow2Info | None = None
        self.proxy_of = proxy_of
        self.converting: Deferred[None] | None = None
        """qemu-img reading the image's URL onto the device (``qemu_source``), if it does."""
        self.converted_size: int | None = None
        self._inflight: set[Deferred[Any]] = set()
        self._reset(None)

    # -- BodyConsumer ----------------------------------------------------------------------

    def _reset(self, total: int | None) -> None:
        self.total = total
        self.received = 0
        self.hash = new_hash(self.expected.algorithm) if self.expected else None
        self.head: list[bytes] = []
        self.head_size = 0
        self.sink: Any = None
        self.zstd: ZstdSink | None = None
        self.batch: list[bytes] = []
        self.batch_size = 0

    async def begin(self, total: int | None) -> None:
        if self.received or self.sink is not None:
            if self.zstd is not None:
                await self.zstd.kill()
            await self.drain()
        self._reset(total)
        self.progress.total = total
        self.progress.bytes_received = 0
        self.progress.phase = "downloading"

    def data(self, chunk: bytes) -> None:
        if self.failure is not None:
            return
        self.received += len(chunk)
        self.progress.bytes_received += len(chunk)
        if self.sink is None:
            self.head.append(chunk)
            self.head_size += len(chunk)
            if self.head_size >= formats.HEAD_SIZE:
                self._start()
            return
        self.batch.append(chunk)
        self.batch_size += len(chunk)
        if self.batch_size >= BATCH:
            self._flush()

    def fail(self, reason: BaseException) -> None:
        """Stop everything: the download ends with ``reason``."""
        if self.failure is None:
            self.failure = reason
        self.download.abort(reason)
        if self.converting is not None and not self.converting.called:
            self.converting.cancel()   # kills qemu-img

    def _track(self, d: Deferred[Any], size: int = 0) -> None:
        self._inflight.add(d)
        if size:
            self.valve.add(size)

        def done(result: object) -> None:
            self._inflight.discard(d)
            if size:
                self.valve.done(size)
            if isinstance(result, Failure) and result.value is not None:
                self.fail(result.value)

        d.addBoth(done)

    async def drain(self) -> None:
        """Wait until every job handed to the threads and zstd has finished."""
        while self._inflight:
            await DeferredList(list(self._inflight), consumeErrors=True)

    # -- format, sink ------------------------------------------------------------------------

    def _start(self) -> None:
        head = b"".join(self.head)
        self.head, self.head_size = [], 0
        try:
            self._choose_sink(head)
        except Exception as e:
            self.fail(e)
            return
        self.batch, self.batch_size = [head], len(head)
        if self.batch_size >= BATCH:
            self._flush()

    def _choose_sink(self, head: bytes) -> None:
        fmt = formats.detect_format(head, self.total)
        deep = not self.config.disable_deep_image_inspection
        if not deep and self.declared and self.declared.lower() in formats.DECLARED_RAW \
                and fmt not in formats.COMPRESSED and fmt != formats.RAW:
            # As the reference agent with deep inspection disabled: an image declared raw is
            # written as it is, whatever its bytes look like.
            log.warn("Image {image_id} looks like {image_format} but is declared "
                     "{declared}; disable_deep_image_inspection is set, so its bytes are "
                     "written as they are", image_id=self.image_id, image_format=fmt,
                     declared=self.declared)
            fmt = formats.RAW
        info = None
        if fmt == formats.QCOW2:
            try:
                info = formats.inspect_qcow2(head)
            except ValueError as e:
                raise formats.ImageFormatRefused(self.image_id, f"invalid qcow2 header: {e}")
        formats.check_safe(fmt, info, self.declared if deep else None, self.image_id,
                           head=head)
        if fmt not in formats.COMPRESSED:
            self._check_policy(fmt, head)
        if self.converting is not None:   # the download started over: only hash it again
            self.sink = _Discard()
            return
        self.format, self.info = fmt, info
        log.info("Image {image_id} is {image_format} ({declared} declared){virtual}",
                 image_id=self.image_id, image_format=fmt, declared=self.declared or "nothing",
                 virtual=f", virtual size {info.virtual_size}" if info else "")
        if fmt == formats.ZSTD and self.runner.which("zstd") is None:
            raise errors.ImageDownloadError(self.image_id, "zstd-compressed image but the "
                                            "zstd program is not installed")
        if fmt in formats.CONVERTED or (info is not None
                                        and not formats.qcow2_streamable(info)):
            url = self.download.current_url
            source = qemu_source.qemu_source(
                fmt, url, authorization=self.download.headers.get("Authorization"),
                proxy=self.proxy_of(url), config=self.config, image_id=self.image_id)
            self.sink = _Discard()   # the stream is only hashed: qemu-img reads the URL
            self.converting = Deferred.fromCoroutine(self._convert(source))
            self._track(self.converting)
            return
        needed = info.virtual_size if info else (
            self.total if fmt in (formats.RAW, formats.ISO) else None)
        if fmt not in formats.COMPRESSED:
            self._track(self.writer_thread.submit(self._open_writer, needed))

        def check_inner(inner_head: bytes) -> None:  # in the writer thread
            inner = formats.detect_format(inner_head)
            formats.check_safe(fmt, None, self.declared if deep else None, self.image_id,
                               inner=inner)
            self._check_policy(inner, inner_head)
            self._open_writer(None)

        if fmt == formats.QCOW2:
            assert info is not None
            self.sink = Qcow2Converter(self.writer, info, self.image_id)
        elif fmt in formats.COMPRESSED:
            inner_sink = SequentialSink(self.writer, check_inner)
            if fmt == formats.ZSTD:
                self.zstd = ZstdSink(self.runner, self.writer_thread, inner_sink,
                                      self.image_id, self.fail)
                self.sink = self.zstd
            else:
                self.sink = DecompressingSink(fmt, inner_sink, self.image_id)
        else:
            self.sink = SequentialSink(self.writer)

    def _check_policy(self, fmt: str, head: bytes) -> None:
        """ImageFormatRefused unless the config's permitted_image_formats allows ``fmt``."""
        config = self.config
        if config.disable_deep_image_inspection:
            return  # the reference skips the permitted list then too
        formats.check_permitted(formats.policy_name(fmt, head),
                                config.permitted_image_formats, self.image_id)

    def _open_writer(self, needed: int | None) -> None:
        """Open the device (in the writer thread), once the image was accepted.

        ``prepare`` (the caller's: destroy the disk's metadata, partition it) runs first, on
        the reactor; it may name the device to write to instead.
        """
        if self.prepare is not None:
            prepare, self.prepare = self.prepare, None
            def start() -> Deferred[str | None]:
                return Deferred.fromCoroutine(awaited(prepare()))
            runs: Any = start   # Twisted's stub cannot pick its Deferred-returning overload
            target: str | None = blockingCallFromThread(self.reactor, runs)
            if target:
                self.device = self.writer.device = target
        if not self.writer.opened:
            self.writer.open()
        if needed is not None and self.writer.size is not None and needed > self.writer.size:
            raise errors.ImageWriteError(
                self.device, None, "", f"the image needs {needed} bytes, the device has "
                f"{self.writer.size}")

    async def _convert(self, source: qemu_source.QemuSource) -> None:
        """qemu-img checks the image, ``prepare`` runs, then qemu-img writes the device."""
        virtual = await qemu_source.inspect(self.runner, source, self.image_id)
        if self.prepare is not None:
            prepare, self.prepare = self.prepare, None
            target = await prepare()
            if target:
                self.device = self.writer.device = target
        fd = os.open(self.device, os.O_RDONLY)
        try:
            size = device_size(fd) if stat.S_ISBLK(os.fstat(fd).st_mode) else None
            if size is None and os.fstat(fd).st_size < virtual:
                os.truncate(self.device, virtual)   # a regular file (tests) grows
        finally:
            os.close(fd)
        if size is not None and virtual > size:
            raise errors.ImageWriteError(
                self.device, None, "", f"the image needs {virtual} bytes, the device has "
                f"{size}")
        self.converted_size = virtual
        log.info("Image {image_id}: qemu-img converts the {image_format} image from {url} "
                 "onto {device}", image_id=self.image_id, image_format=source.fmt,
                 url=source.shown([source.url])[0], device=self.device)
        await qemu_source.convert(self.runner, source, self.device, self.image_id)

    def _flush(self) -> None:
        batch, size = self.batch, self.batch_size
        self.batch, self.batch_size = [], 0
        if not batch or self.failure is not None:
            return
        if self.hash is not None:
            self._track(self.hasher_thread.submit(hash_all, self.hash, batch), size)
        if self.zstd is not None:
            self._track(self.zstd.put(batch), size)
        elif not isinstance(self.sink, _Discard):
            self._track(self.writer_thread.submit(feed_all, self.sink, batch), size)

    # -- the whole job -----------------------------------------------------------------------

    async def run(self) -> WrittenImage:
        try:
            url = await self.download.stream(self)
            self.progress.url = url
            if self.received == 0:
                raise errors.ImageDownloadError(self.image_id, f"{url} served an empty image")
            if self.failure is None and self.sink is None:
                self._start()  # an image smaller than the head
            self._flush()
            await self.drain()
            self._raise_failure()
            if self.zstd is not None:
                self.downloaded = True
                await self.zstd.finish()
            elif isinstance(self.sink, Qcow2Converter):
                await self._qcow2_passes(self.sink, url)
            else:
                self.downloaded = True
                await self.writer_thread.submit(self.sink.finish)
            digest = None
            if self.hash is not None:
                digest = await self.hasher_thread.submit(self.hash.hexdigest)
            self.progress.phase = "syncing"
            if self.converted_size is not None:   # qemu-img wrote and flushed it
                virtual = end = self.converted_size
            else:
                virtual = self.info.virtual_size if self.info else self.writer.end
                await self.writer_thread.submit(self.writer.finish, virtual)
                end = self.writer.end
            if self.expected is not None and digest != self.expected.value:
                raise DigestMismatch(self.image_id, url, self.expected.value, str(digest))
            return WrittenImage(format=self.format, size=end,
                                virtual_size=virtual,
                                checksum_algo=self.expected.algorithm if self.expected else None,
                                checksum=digest, url=url)
        except BaseException as e:
            await self._clean_up_after(e)
            raise
        finally:
            self.hasher_thread.stop()
            self.writer_thread.stop()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def _qcow2_passes(self, converter: Qcow2Converter, url: str) -> None:
        while True:
            ranges = await self.writer_thread.submit(converter.end_pass)
            if not ranges:
                break
            self.progress.phase = f"refetching (pass {converter.passes + 1})"
            await self.writer_thread.submit(converter.begin_pass, ranges)
            for start, end in ranges:
                self._track(self.writer_thread.submit(converter.seek, start))

                def deliver(offset: int, data: bytes) -> None:
                    if self.failure is not None:
                        return
                    self.progress.bytes_received += len(data)
                    self.batch.append(data)
                    self.batch_size += len(data)
                    if self.batch_size >= BATCH:
                        self._flush_refetch()

                await self.download.fetch_range(url, start, end, deliver, self.valve)
                self._flush_refetch()
                await self.drain()
                self._raise_failure()
        self.downloaded = True
        await self.writer_thread.submit(converter.finish)

    def _flush_refetch(self) -> None:
        batch, size = self.batch, self.batch_size
        self.batch, self.batch_size = [], 0
        if batch and self.failure is None:
            self._track(self.writer_thread.submit(feed_all, self.sink, batch), size)

    async def _clean_up_after(self, error: BaseException) -> None:
        self.fail(self.failure or error)
        if self.zstd is not None:
            await self.zstd.kill()
        await self.drain()
        wrote = (self.writer.bytes_written or self.writer.bytes_zeroed
                 or self.converted_size is not None)
        await self.writer_thread.submit(self.writer.close)
        if wrote or isinstance(error, errors.ImageChecksumError):
            try:
                await wipe_partition_tables(self.device, self.reactor)
            except errors.ImageWriteError as e:
                log.error("Could not wipe {device} after a failed image write: {error}",
                          device=self.device, error=str(e))


async def write_image(image_info: Mapping[str, Any], device: str, *, http: Any, reactor: Any,
                      runner: Any, config: AgentConfig,
                      progress: ImageProgress | None = None,
                      writer: DeviceWriter | None = None,
                      prepare: Prepare | None = None) -> WrittenImage:
    """Stream the image ``image_info`` describes to ``device``; verify it; return what was
    written.

    ``http`` is the agent's treq client (``ipa_twisted.http.make_http_client``); URLs that
    ``proxies``/``no_proxy`` send through a proxy get a proxy client of their own. Raises
    ImageDownloadError (every URL failed, refused checksum or format, bad checksum source,
    ``image_download_max_duration`` exceeded), ImageChecksumError (mismatch twice: the
    device's partition tables are wiped first) or ImageWriteError. ``config`` is read for
    every policy (md5_enabled, permitted_image_formats, disable_deep_image_inspection, image
    server credentials). ``prepare`` runs once the image is accepted, before its first byte
    is written (see ``Prepare``): a refused image leaves the device untouched.
    ``progress`` is updated as the image streams; ``writer`` replaces the
    ``DeviceWriter(device)`` (tests give a slow one).
    """
    progress = progress if progress is not None else ImageProgress(reactor)
    image_id = str(image_info.get("id", ""))
    proxies = image_info.get("proxies") or {}
    no_proxy = image_info.get("no_proxy")
    proxy_clients: dict[str, Any] = {}
    pools: list[Any] = []

    def client_for(url: str) -> Any:
        proxy = proxy_for(url, proxies, no_proxy)
        if proxy is None:
            return http
        if proxy not in proxy_clients:
            pools.append(make_pool(reactor))
            proxy_clients[proxy] = make_proxy_http_client(
                reactor, config, proxy, pool=pools[-1],
                connect_timeout=config.image_download_connection_timeout)
        return proxy_clients[proxy]

    started = time.monotonic()
    progress.phase = "starting"
    progress.start()
    phase = "failed"
    limit = config.image_download_max_duration
    deadline: dict[str, Any] = {"expired": None, "job": None}

    def expire() -> None:
        error = ImageDownloadTimeout(
            image_id, f"the download took longer than image_download_max_duration "
            f"({limit:g} s, retries included)")
        log.error("Image {image_id}: {error}", image_id=image_id, error=str(error))
        deadline["expired"] = error
        job = deadline["job"]
        if job is not None and not job.downloaded:
            job.fail(error)

    timer = reactor.callLater(limit, expire) if limit and limit > 0 else None
    streaming_heap.hold()
    try:
        download = ImageDownload(image_info, http=http, clock=reactor, config=config,
                                 client_for=client_for)
        auth = dict(download.headers)

        async def fetch(url: str) -> bytes:
            return await fetch_small(url, client_for(url), headers=auth,
                                     timeout=config.image_download_connection_timeout,
                                     clock=reactor)

        progress.phase = "fetching checksum"
        expected = await expected_checksum(image_info, fetch, md5_enabled=config.md5_enabled)
        for attempt in (1, 2):
            if deadline["expired"] is not None:
                raise deadline["expired"]
            job = _ImageJob(image_info, device, download, expected, reactor, runner,
                            progress, writer if attempt == 1 else None, config=config,
                            prepare=prepare,
                            proxy_of=lambda url: proxy_for(url, proxies, no_proxy))
            deadline["job"] = job
            try:
                written = await job.run()
                break
            except DigestMismatch as e:
                if attempt == 2 or deadline["expired"] is not None:
                    raise
                # As the reference agent (since 9.8): a mismatch is taken for a download
                # failure and the image fetched once more; prepare has run already.
                log.warn("Image {image_id} did not match its checksum; downloading it once "
                         "more: {error}", image_id=image_id, error=str(e))
                prepare = None
                device = job.device
                download = ImageDownload(image_info, http=http, clock=reactor, config=config,
                                         client_for=client_for)
        phase = "done"
        elapsed = time.monotonic() - started
        log.info("Wrote image {image_id} ({image_format}, {size} bytes) to {device} in "
                 "{elapsed:.1f} s; {algo} {checksum} verified", image_id=image_id,
                 image_format=written.format, size=written.size, device=device, elapsed=elapsed,
                 algo=written.checksum_algo, checksum=written.checksum)
        return written
    except errors.RESTError:
        if deadline["expired"] is not None:
            raise deadline["expired"] from None
        raise
    finally:
        if timer is not None and timer.active():
            timer.cancel()
        streaming_heap.release()
        progress.stop(phase)
        for pool in pools:
            await pool.closeCachedConnections()
