"""The image pipeline end to end: a local HTTP server, a regular file as the device.

Real reactor, real threads and (for zstd) real children. qcow2 has its own tests in
test_qcow2.py; formats and checksums in test_image_formats.py.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import random
import shutil
import struct
import threading
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import KeyPair
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ipa_twisted import errors
from ipa_twisted.config import AgentConfig
from ipa_twisted.http import make_http_client, make_pool
from ipa_twisted.images.access import proxy_for
from ipa_twisted.images.download import ImageDownload, Valve, fetch_small
from ipa_twisted.images.formats import ImageFormatRefused
from ipa_twisted.images.pipeline import WrittenImage, write_image
from ipa_twisted.images.progress import ImageProgress
from ipa_twisted.images.stages import StreamingHeap, streaming_heap
from ipa_twisted.blockdev.writer import DeviceWriter, wipe_partition_tables
from ipa_twisted.process import ProcessRunner
from tests.image_server import ImageResource, RepeatedData

MiB = 1024 * 1024
JUNK = b"old disk contents" * 10


def junk(size: int) -> bytes:
    return (JUNK * (size // len(JUNK) + 1))[:size]


def image_bytes(size: int, seed: int = 1) -> bytes:
    """Half random, half compressible: realistic for the compressed formats."""
    rng = random.Random(seed)
    half = size // 2
    text = b"\0" * 4096 + b"text " * 100
    return rng.randbytes(half) + (text * ((size - half) // len(text) + 1))[:size - half]


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class ImageServerMixin:
    """A local image server on the real reactor, an HTTP client and a device file."""

    config = AgentConfig(image_download_connection_retries=2,
                         image_download_connection_retry_interval=0.01,
                         image_download_connection_timeout=5.0)

    def set_up_server(self: Any) -> None:
        self.root = Resource()
        self.port = reactor.listenTCP(0, Site(self.root), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        pool = make_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        self.http = make_http_client(reactor, self.config, pool=pool)
        self.runner = ProcessRunner(reactor, reactor)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.device = os.path.join(self.dir, "disk")

    def serve(self: Any, name: str, resource: Resource) -> str:
        self.root.putChild(name.encode(), resource)
        return f"http://127.0.0.1:{self.port.getHost().port}/{name}"

    def old_disk(self: Any, size: int = 8 * MiB) -> bytes:
        content = junk(size)
        with open(self.device, "wb") as f:
            f.write(content)
        return content

    def device_bytes(self: Any) -> bytes:
        with open(self.device, "rb") as f:
            return f.read()

    async def write(self: Any, image_info: dict[str, Any], **kwargs: Any) -> WrittenImage:
        info = {"id": "image-1", **image_info}
        return await write_image(info, self.device, http=self.http, reactor=reactor,
                                 runner=self.runner, config=self.config, **kwargs)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RawImageTests(ImageServerMixin, TestCase):
    def setUp(self) -> None:
        self.set_up_server()

    async def test_raw_image_is_written_and_verified(self) -> None:
        data = image_bytes(3 * MiB + 123)
        old = self.old_disk()
        url = self.serve("disk.raw", ImageResource(data))
        progress = ImageProgress(reactor)
        written = await self.write({"urls": [url], "disk_format": "raw",
                                    "os_hash_algo": "sha256", "os_hash_value": sha256(data)},
                                   progress=progress)
        self.assertEqual(written, WrittenImage(
            format="raw", size=len(data), virtual_size=len(data), checksum_algo="sha256",
            checksum=sha256(data), url=url))
        disk = self.device_bytes()
        self.assertEqual(disk[:len(data)], data)
        self.assertEqual(disk[len(data):], old[len(data):])  # the rest is left alone
        state = progress.serialize()
        self.assertEqual((state["phase"], state["bytes_received"], state["total"],
                          state["bytes_written"]), ("done", len(data), len(data), len(data)))

    async def test_missing_device_file_is_created(self) -> None:
        data = image_bytes(100_000)
        url = self.serve("small", ImageResource(data))
        written = await self.write({"urls": [url], "checksum": hashlib.sha512(data).hexdigest()})
        self.assertEqual(self.device_bytes(), data)
        self.assertEqual(written.checksum_algo, "sha512")

    async def test_no_checksum_warns_and_writes(self) -> None:
        data = image_bytes(70_000)
        url = self.serve("nosum", ImageResource(data))
        with capturedLogs() as events:
            written = await self.write({"urls": [url]})
        self.assertIsNone(written.checksum)
        self.assertEqual(self.device_bytes(), data)
        self.assertTrue(any("WITHOUT verification" in e.get("log_format", "") for e in events))

    async def test_authorization_header_is_sent(self) -> None:
        data = image_bytes(10_000)
        resource = ImageResource(data)
        url = self.serve("auth", resource)
        sums = ImageResource(f"{sha256(data)}  auth\n".encode())
        sums_url = self.serve("SHA256SUMS", sums)
        # Ironic sends the header value base64-encoded
        await self.write({"urls": [url], "checksum": sums_url,
                          "image_request_authorization": "QmVhcmVyIHMzY3JldA=="})
        self.assertEqual(resource.requests[0]["authorization"], "Bearer s3cret")
        self.assertEqual(sums.requests[0]["authorization"], "Bearer s3cret")

    async def test_checksum_file_entry_for_the_image_name(self) -> None:
        data = image_bytes(200_000)
        url = self.serve("ubuntu.img", ImageResource(data))
        listing = (f"# comment\n{'0' * 64}  other.img\n{sha256(data)} *ubuntu.img\n"
                   f"SHA256 (third.img) = {'1' * 64}\n").encode()
        sums_url = self.serve("SHA256SUMS", ImageResource(listing))
        written = await self.write({"urls": [url], "checksum": sums_url})
        self.assertEqual((written.checksum_algo, written.checksum), ("sha256", sha256(data)))

    async def test_checksum_file_without_the_image_fails_before_writing(self) -> None:
        old = self.old_disk()
        url = self.serve("mine.img", ImageResource(b"x" * 5000))
        sums_url = self.serve("SUMS", ImageResource(f"{'0' * 64}  other.img\n".encode()))
        with self.assertRaises(errors.ImageDownloadError) as caught:
            await self.write({"urls": [url], "checksum": sums_url})
        self.assertIn("no checksum for mine.img", str(caught.exception))
        self.assertEqual(self.device_bytes(), old)

    async def test_resume_after_dropped_connections(self) -> None:
        data = image_bytes(4 * MiB + 5)
        resource = ImageResource(data, cuts=[MiB, MiB + 1000, 3 * MiB])
        url = self.serve("flaky", resource)
        with capturedLogs():
            written = await self.write({"urls": [url], "os_hash_algo": "sha512",
                                        "os_hash_value": hashlib.sha512(data).hexdigest()})
        self.assertEqual(written.checksum, hashlib.sha512(data).hexdigest())
        self.assertEqual(self.device_bytes(), data)
        ranges = [r["range"] for r in resource.requests]
        self.assertEqual(ranges[0], None)
        self.assertEqual(len(ranges), 4)
        # each resumption asks from the last byte received (at or before the cut)
        starts = [int(r.split("=")[1].rstrip("-")) for r in ranges[1:]]  # type: ignore[union-attr]
        self.assertEqual(starts, sorted(starts))
        self.assertTrue(all(s <= c for s, c in zip(starts, [MiB, MiB + 1000, 3 * MiB])))

    async def test_stalled_transfer_is_resumed(self) -> None:
        self.config = self.config.override(image_download_connection_timeout=0.3)
        data = image_bytes(2 * MiB)
        resource = ImageResource(data, stalls=[MiB])
        url = self.serve("stall", resource)
        with capturedLogs() as events:
            await self.write({"urls": [url], "checksum": sha256(data)})
        self.assertEqual(self.device_bytes(), data)
        self.assertEqual(len(resource.requests), 2)
        self.assertTrue(any("no data for" in str(e.get("error")) for e in events))

    async def test_server_ignoring_range_restarts_from_zero(self) -> None:
        data = image_bytes(3 * MiB)
        resource = ImageResource(data, cuts=[2 * MiB], ranges=False)
        url = self.serve("norange", resource)
        with capturedLogs():
            written = await self.write({"urls": [url], "checksum": sha256(data)})
        self.assertEqual(written.checksum, sha256(data))  # the hash was reset, not doubled
        self.assertEqual(self.device_bytes(), data)
        self.assertEqual(len(resource.requests), 2)

    async def test_next_url_after_failures(self) -> None:
        data = image_bytes(MiB)
        gone = ImageResource(data, fail=[404])
        broken = ImageResource(data, fail=[503, 503, 503])
        good = ImageResource(data)
        urls = [self.serve("gone", gone), self.serve("broken", broken), self.serve("ok", good)]
        with capturedLogs():
            written = await self.write({"urls": urls, "checksum": sha256(data)})
        self.assertEqual(written.url, urls[2])
        self.assertEqual(len(gone.requests), 1)  # a 404 is not retried
        self.assertEqual(len(broken.requests), 3)  # 1 + image_download_connection_retries
        self.assertEqual(self.device_bytes(), data)

    async def test_every_url_failing_is_an_image_download_error(self) -> None:
        old = self.old_disk()
        urls = [self.serve("a", ImageResource(b"", fail=[404])),
                self.serve("b", ImageResource(b"", fail=[500, 500, 500]))]
        with capturedLogs(), self.assertRaises(errors.ImageDownloadError) as caught:
            await self.write({"urls": urls, "checksum": "0" * 64})
        message = str(caught.exception)
        self.assertIn(f"{urls[0]}: HTTP 404", message)
        self.assertIn(f"{urls[1]}: HTTP 500", message)
        self.assertEqual(self.device_bytes(), old)

    async def test_checksum_mismatch_wipes_partition_tables(self) -> None:
        data = image_bytes(3 * MiB)
        self.old_disk(8 * MiB)
        url = self.serve("bad", ImageResource(data))
        with capturedLogs(), self.assertRaises(errors.ImageChecksumError) as caught:
            await self.write({"urls": [url], "checksum": "0" * 64})
        self.assertIn(sha256(data), str(caught.exception))
        disk = self.device_bytes()
        self.assertEqual(len(disk), 8 * MiB)
        self.assertEqual(disk[:MiB], bytes(MiB))
        self.assertEqual(disk[-MiB:], bytes(MiB))
        self.assertEqual(disk[MiB:2 * MiB], data[MiB:2 * MiB])

    async def test_refused_formats_leave_the_device_untouched(self) -> None:
        old = self.old_disk()
        before = os.stat(self.device).st_mtime_ns
        qcow2_head = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, 16, MiB, 0, 1,
                                 0x30000, 0x10000, 1, 0, 0, 0, 0, 0, 4, 104)
        cases = [
            ("raw bytes declared qcow2", image_bytes(100_000), "qcow2", "bytes are raw"),
            ("qcow2 bytes declared raw", qcow2_head + bytes(70_000), "raw", "bytes are qcow2"),
            ("vmdk", b"KDMV" + bytes(70_000), None, "unsupported vmdk version 0"),
            ("gzip of qcow2", gzip.compress(qcow2_head + bytes(70_000)), "raw",
             "gzip-compressed qcow2"),
            ("declared iso, bytes qcow2", qcow2_head + bytes(70_000), "iso", "bytes are qcow2"),
        ]
        for name, data, declared, reason in cases:
            url = self.serve(name.replace(" ", "-"), ImageResource(data))
            info = {"urls": [url], "checksum": sha256(data)}
            if declared:
                info["disk_format"] = declared
            with self.assertRaises(ImageFormatRefused, msg=name) as caught:
                await self.write(info)
            self.assertIn(reason, str(caught.exception), name)
            self.assertEqual(self.device_bytes(), old, name)
        self.assertEqual(os.stat(self.device).st_mtime_ns, before)


class CompressedImageTests(ImageServerMixin, TestCase):
    def setUp(self) -> None:
        self.set_up_server()
        self.data = image_bytes(5 * MiB + 77, seed=3)

    async def check(self, name: str, compressed: bytes, declared: str | None = "raw") -> None:
        old = self.old_disk(16 * MiB)
        url = self.serve(name, ImageResource(compressed))
        info: dict[str, Any] = {"urls": [url], "checksum": sha256(compressed)}
        if declared:
            info["disk_format"] = declared
        written = await self.write(info)
        self.assertEqual(written.size, len(self.data))
        disk = self.device_bytes()
        self.assertEqual(disk[:len(self.data)], self.data)
        self.assertEqual(disk[len(self.data):], old[len(self.data):])
        self.assertEqual(written.checksum, sha256(compressed))

    async def test_gzip(self) -> None:
        await self.check("img.gz", gzip.compress(self.data))

    async def test_gzip_with_several_members(self) -> None:
        half = len(self.data) // 2
        await self.check("multi.gz", gzip.compress(self.data[:half]) +
                         gzip.compress(self.data[half:]), declared=None)

    async def test_xz(self) -> None:
        await self.check("img.xz", lzma.compress(self.data, preset=1))

    async def test_bzip2(self) -> None:
        await self.check("img.bz2", bz2.compress(self.data, 1))

    async def test_zstd(self) -> None:
        if shutil.which("zstd") is None:
            self.skipTest("zstd is not installed (Debian package zstd)")
        out, _ = await self.runner.execute("zstd", "-q", "-c", "-1", stdin=self.data)
        await self.check("img.zst", out)

    async def test_truncated_gzip_fails_and_wipes(self) -> None:
        compressed = gzip.compress(self.data)[:-1000]
        self.old_disk(16 * MiB)
        url = self.serve("cut.gz", ImageResource(compressed))
        with capturedLogs(), self.assertRaises(errors.ImageDownloadError) as caught:
            await self.write({"urls": [url], "checksum": sha256(compressed)})
        self.assertIn("truncated", str(caught.exception))
        self.assertEqual(self.device_bytes()[:MiB], bytes(MiB))

    async def test_corrupt_zstd_fails(self) -> None:
        if shutil.which("zstd") is None:
            self.skipTest("zstd is not installed (Debian package zstd)")
        out, _ = await self.runner.execute("zstd", "-q", "-c", "-1", stdin=self.data)
        corrupt = out[:100_000] + bytes(5000) + out[105_000:]
        url = self.serve("bad.zst", ImageResource(corrupt))
        with capturedLogs(), self.assertRaises(errors.ImageDownloadError) as caught:
            await self.write({"urls": [url], "checksum": sha256(corrupt)})
        self.assertIn("zstd decompression failed", str(caught.exception))


class _SlowWriter(DeviceWriter):
    """Drops the bytes after a delay: a disk at ``rate`` bytes/s (for memory tests)."""

    def __init__(self, device: str, rate: float) -> None:
        super().__init__(device)
        self.rate = rate

    def write(self, offset: int, data: Any) -> None:
        time.sleep(len(data) / self.rate)
        self.bytes_written += len(data)
        self.end = max(self.end, offset + len(data))


class BoundedMemoryTests(ImageServerMixin, TestCase):
    def setUp(self) -> None:
        self.set_up_server()

    async def test_memory_stays_bounded_with_a_slow_writer(self) -> None:
        size = 512 * MiB
        data = RepeatedData(random.Random(5).randbytes(MiB - 4096 + 7), size)
        digest = hashlib.sha256()
        for offset in range(0, size, 16 * MiB):
            digest.update(data[offset:offset + 16 * MiB])
        url = self.serve("big", ImageResource(data))
        progress = ImageProgress(reactor)
        samples: list[int] = []
        moving: list[dict[str, Any]] = []

        def sample() -> None:
            samples.append(rss())
            moving.append(progress.serialize())

        baseline = rss()
        sampler = LoopingCall(sample)
        sampler.start(0.05)
        try:
            written = await self.write({"urls": [url], "checksum": digest.hexdigest()},
                                       progress=progress,
                                       writer=_SlowWriter(self.device, rate=300 * MiB))
        finally:
            sampler.stop()
        self.assertEqual(written.size, size)
        growth = max(samples) - baseline
        self.assertLess(growth, 64 * MiB, f"RSS grew by {growth / MiB:.1f} MiB")
        received = [m["bytes_received"] for m in moving]
        self.assertEqual(received, sorted(received))
        self.assertTrue(any(0 < r < size for r in received))  # seen moving
        self.assertTrue(any(m["rate"] for m in moving))


class _GatedWriter(DeviceWriter):
    """A device whose writes wait until ``gate`` is set; ``fail_at``: the write (1-based)
    that raises ImageWriteError, as a disk failing in the middle of the image does."""

    def __init__(self, device: str, fail_at: int | None = None) -> None:
        super().__init__(device)
        self.gate = threading.Event()
        self.fail_at = fail_at
        self.writes = 0
        self.threads: set[str] = set()

    def write(self, offset: int, data: Any) -> None:
        self.threads.add(threading.current_thread().name)
        self.writes += 1
        if self.fail_at is not None and self.writes >= self.fail_at:
            raise errors.ImageWriteError(self.device, None, "",
                                         f"write at offset {offset} failed: [Errno 5] EIO")
        if not self.gate.wait(60):
            raise AssertionError("the test never opened the gate")
        super().write(offset, data)


class _Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")


class ValveTests(SynchronousTestCase):
    def test_paused_above_high_resumed_at_low(self) -> None:
        valve = Valve(high=16, low=8)
        producer = _Producer()
        valve.attach(producer)
        valve.add(10)
        valve.add(6)
        self.assertEqual(producer.calls, [])       # 16 is not above high
        valve.add(4)
        valve.add(4)
        self.assertEqual(producer.calls, ["pause"])  # once, however full
        valve.done(10)
        self.assertEqual(producer.calls, ["pause"])  # 14 left: still above low
        valve.done(6)
        self.assertEqual(producer.calls, ["pause", "resume"])
        self.assertEqual((valve.pending, valve.paused), (8, False))

    def test_a_producer_attached_while_full_starts_paused(self) -> None:
        valve = Valve(high=16, low=8)
        valve.add(20)
        first, second = _Producer(), _Producer()
        valve.attach(first)
        self.assertEqual(first.calls, ["pause"])
        valve.detach(first)
        valve.attach(second)   # the next connection (a resumed download)
        valve.done(20)
        self.assertEqual((first.calls, second.calls), (["pause"], ["pause", "resume"]))


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append(("mallopt", option, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


class StreamingHeapTests(SynchronousTestCase):
    def test_thresholds_while_images_stream_then_defaults_and_trim(self) -> None:
        libc = _Libc()
        heap = StreamingHeap(libc, mmap_threshold=4 * MiB, trim_threshold=32 * MiB)
        heap.hold()
        self.assertEqual(libc.calls, [("mallopt", -3, 4 * MiB), ("mallopt", -1, 32 * MiB)])
        heap.hold()      # a second image at once: nothing more
        heap.release()
        self.assertEqual(len(libc.calls), 2)
        heap.release()   # the last one: glibc's defaults back, free memory returned
        self.assertEqual(libc.calls[2:], [("mallopt", -3, 128 * 1024),
                                          ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)])

    def test_a_c_library_without_mallopt(self) -> None:
        heap = StreamingHeap(object())
        heap.hold()
        heap.release()   # nothing to call, nothing raised


def pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "ipa-image-" in t.name]


class OverlapTests(ImageServerMixin, TestCase):
    """The stages run at once: the download on the reactor, hashing and writing in their
    threads; a stage that falls behind pauses the download, one that fails stops it."""

    def setUp(self) -> None:
        self.set_up_server()

    async def wait_until_still(self, progress: ImageProgress, seconds: float = 0.5) -> int:
        """``bytes_received`` once it stopped growing for ``seconds``."""
        last = -1
        while progress.bytes_received != last:
            last = progress.bytes_received
            await deferLater(reactor, seconds, lambda: None)
        return last

    async def test_download_pauses_while_the_writer_is_behind(self) -> None:
        size = 128 * MiB
        data = RepeatedData(random.Random(7).randbytes(MiB + 4093), size)
        digest = hashlib.sha256()
        for offset in range(0, size, 16 * MiB):
            digest.update(data[offset:offset + 16 * MiB])
        url = self.serve("big", ImageResource(data))
        writer = _GatedWriter(self.device)
        self.addCleanup(writer.gate.set)
        progress = ImageProgress(reactor)
        ticks: list[float] = []
        ticker = LoopingCall(lambda: ticks.append(time.monotonic()))
        ticker.start(0.01)

        def stop_ticking() -> None:
            if ticker.running:
                ticker.stop()

        self.addCleanup(stop_ticking)
        writing = Deferred.fromCoroutine(self.write(
            {"urls": [url], "checksum": digest.hexdigest()}, progress=progress, writer=writer))
        held = await self.wait_until_still(progress)
        # Paused: what the valve lets in (16 MiB and a batch), the head and the sockets'
        # buffers, far from the whole image; the reactor kept running meanwhile.
        self.assertGreater(held, 0)
        self.assertLess(held, 48 * MiB)
        self.assertEqual(writer.bytes_written, 0)
        self.assertEqual(streaming_heap._users, 1)   # held while the image streams
        still = [t for t in ticks if t > ticks[-1] - 0.5]
        self.assertGreater(len(still), 10)
        writer.gate.set()
        written = await writing
        stop_ticking()
        self.assertEqual((written.size, written.checksum), (size, digest.hexdigest()))
        self.assertEqual(progress.bytes_received, size)
        self.assertNotIn(threading.main_thread().name, writer.threads)
        self.assertLess(max(b - a for a, b in zip(ticks, ticks[1:])), 1.0)
        self.assertEqual(pipeline_threads(), [])
        self.assertEqual(streaming_heap._users, 0)

    async def test_write_error_fails_the_pipeline_and_stops_the_download(self) -> None:
        size = 256 * MiB
        data = RepeatedData(random.Random(8).randbytes(MiB + 17), size)
        self.old_disk(8 * MiB)
        url = self.serve("failing", ImageResource(data))
        writer = _GatedWriter(self.device, fail_at=3)
        writer.gate.set()
        progress = ImageProgress(reactor)
        with capturedLogs(), self.assertRaises(errors.ImageWriteError) as caught:
            await self.write({"urls": [url], "checksum": "0" * 64}, progress=progress,
                             writer=writer)
        self.assertIn("[Errno 5] EIO", str(caught.exception))
        self.assertLess(progress.bytes_received, 64 * MiB)   # the download stopped
        self.assertFalse(writer.opened)                      # the device was closed
        self.assertEqual(self.device_bytes()[:MiB], bytes(MiB))  # its tables wiped
        self.assertEqual(pipeline_threads(), [])

    async def test_cancelling_stops_the_threads_and_closes_the_device(self) -> None:
        size = 128 * MiB
        data = RepeatedData(random.Random(9).randbytes(MiB + 5), size)
        url = self.serve("cancelled", ImageResource(data))
        writer = _GatedWriter(self.device)
        progress = ImageProgress(reactor)
        writing = Deferred.fromCoroutine(self.write(
            {"urls": [url], "checksum": "0" * 64}, progress=progress, writer=writer))
        await self.wait_until_still(progress)
        writing.cancel()
        writer.gate.set()
        with capturedLogs(), self.assertRaises(CancelledError):
            await writing
        self.assertLess(progress.bytes_received, size)
        self.assertFalse(writer.opened)
        self.assertEqual(pipeline_threads(), [])


class DownloadTests(ImageServerMixin, TestCase):
    def setUp(self) -> None:
        self.set_up_server()

    async def test_fetch_range_with_resumption(self) -> None:
        data = image_bytes(2 * MiB)
        resource = ImageResource(data, cuts=[MiB])
        url = self.serve("ranges", resource)
        download = ImageDownload({"id": "i", "urls": [url]}, http=self.http, clock=reactor,
                                 config=self.config)
        got: list[tuple[int, bytes]] = []
        with capturedLogs():
            await download.fetch_range(url, 1000, 1_500_000,
                                       lambda o, d: got.append((o, d)), Valve())
        self.assertEqual(b"".join(d for _, d in got), data[1000:1_500_000])
        self.assertEqual(got[0][0], 1000)
        self.assertEqual(resource.requests[0]["range"], "bytes=1000-1499999")

    async def test_fetch_range_from_a_server_without_ranges(self) -> None:
        data = image_bytes(MiB)
        url = self.serve("plain", ImageResource(data, ranges=False))
        download = ImageDownload({"id": "i", "urls": [url]}, http=self.http, clock=reactor,
                                 config=self.config)
        got: list[bytes] = []
        await download.fetch_range(url, 300_000, 600_000, lambda o, d: got.append(d), Valve())
        self.assertEqual(b"".join(got), data[300_000:600_000])

    async def test_fetch_small_limit(self) -> None:
        url = self.serve("sums", ImageResource(b"x" * 5000))
        self.assertEqual(await fetch_small(url, self.http, 5000), b"x" * 5000)
        with self.assertRaises(ValueError):
            await fetch_small(url, self.http, 4999)
        missing = self.serve("missing", ImageResource(b"", fail=[404]))
        with self.assertRaises(ValueError):
            await fetch_small(missing, self.http)

    async def test_wipe_partition_tables(self) -> None:
        self.old_disk(3 * MiB + 512)
        await wipe_partition_tables(self.device, reactor)
        disk = self.device_bytes()
        self.assertEqual(disk[:MiB], bytes(MiB))
        self.assertEqual(disk[-MiB:], bytes(MiB))
        self.assertEqual(disk[MiB:2 * MiB], junk(3 * MiB + 512)[MiB:2 * MiB])


class ProxyForTests(SynchronousTestCase):
    def test_proxy_selection(self) -> None:
        proxies = {"http": "http://proxy:3128", "https": "http://sproxy:3128"}
        self.assertEqual(proxy_for("http://images/x", proxies, None), "http://proxy:3128")
        self.assertEqual(proxy_for("https://images/x", proxies, ""), "http://sproxy:3128")
        self.assertIsNone(proxy_for("http://images/x", {}, None))
        self.assertIsNone(proxy_for("http://a.example.com/x", proxies, "example.com"))
        self.assertIsNone(proxy_for("http://a.example.com/x", proxies, ".example.com"))
        self.assertIsNone(proxy_for("http://example.com/x", proxies, "other, example.com"))
        self.assertEqual(proxy_for("http://badexample.com/x", proxies, "example.com"),
                         "http://proxy:3128")
        self.assertIsNone(proxy_for("http://x:8080/", proxies, "x:8080"))
        self.assertEqual(proxy_for("http://x:8081/", proxies, "x:8080"), "http://proxy:3128")
        self.assertIsNone(proxy_for("http://x/", proxies, "*"))


class ImageProgressTests(SynchronousTestCase):
    def test_rate_eta_and_log(self) -> None:
        from twisted.internet.task import Clock
        clock = Clock()
        progress = ImageProgress(clock, window=10.0)
        progress.total = 1000 * MiB
        progress.phase = "downloading"
        with capturedLogs() as events:
            progress.start()
            for _ in range(20):
                progress.bytes_received += 10 * MiB
                clock.advance(1)
        state = progress.serialize()
        self.assertEqual(state["rate"], 10 * MiB)
        self.assertEqual(state["eta_seconds"], 80.0)
        self.assertEqual(state["elapsed"], 20.0)
        logged = [e for e in events if "received" in e.get("log_format", "")]
        self.assertEqual(len(logged), 4)  # every 5 s
        self.assertEqual(logged[-1]["received"], 200 * MiB)
        progress.stop("done")
        self.assertEqual(progress.serialize()["phase"], "done")
        clock.advance(10)
        self.assertEqual(len(clock.getDelayedCalls()), 0)



class _Pipe(Protocol):
    def __init__(self, other: Protocol) -> None:
        self.other = other

    def dataReceived(self, data: bytes) -> None:
        assert self.other.transport is not None
        self.other.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.other.transport is not None:
            self.other.transport.loseConnection()


class _ConnectProxy(Protocol):
    """A minimal HTTP CONNECT proxy (tunnels only)."""

    def __init__(self, tunnels: list[str]) -> None:
        self.tunnels, self.buffer, self.peer = tunnels, b"", None

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            assert self.peer.transport is not None
            self.peer.transport.write(data)
            return
        self.buffer += data
        head, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        target = head.split()[1].decode()
        self.tunnels.append(target)
        host, port = target.rsplit(":", 1)

        def connected(peer: _Pipe) -> None:
            self.peer = peer
            assert self.transport is not None and peer.transport is not None
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                peer.transport.write(rest)

        TCP4ClientEndpoint(reactor, host, int(port)).connect(
            Factory.forProtocol(lambda: _Pipe(self))).addCallback(connected)

    def connectionLost(self, reason: Any = None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class ProxyTests(ImageServerMixin, TestCase):
    def setUp(self) -> None:
        self.set_up_server()

    def listen_proxy(self, factory: Factory) -> str:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def test_http_image_through_a_forwarding_proxy(self) -> None:
        from twisted.web.http import HTTPFactory
        from twisted.web.proxy import Proxy, ProxyRequest
        seen: list[bytes] = []

        class Recording(ProxyRequest):
            def process(self) -> None:
                seen.append(self.uri)
                super().process()

        class RecordingProxy(Proxy):
            requestFactory = Recording

        factory = HTTPFactory()
        factory.protocol = RecordingProxy  # type: ignore[assignment]
        proxy = self.listen_proxy(factory)
        data = image_bytes(MiB)
        url = self.serve("proxied", ImageResource(data))
        await self.write({"urls": [url], "checksum": sha256(data),
                          "proxies": {"http": proxy}, "no_proxy": "example.com"})
        self.assertEqual(self.device_bytes(), data)
        self.assertEqual(seen, [url.encode()])

    async def test_https_image_through_a_connect_tunnel(self) -> None:
        certificate = KeyPair.generate(size=2048).selfSignedCert(1, CN="127.0.0.1")
        tls_port = reactor.listenSSL(0, Site(self.root), certificate.options(),
                                     interface="127.0.0.1")
        self.addCleanup(tls_port.stopListening)
        tunnels: list[str] = []
        proxy = self.listen_proxy(Factory.forProtocol(lambda: _ConnectProxy(tunnels)))
        data = image_bytes(MiB + 3)
        self.serve("secret.img", ImageResource(data))
        url = f"https://127.0.0.1:{tls_port.getHost().port}/secret.img"
        self.config = self.config.override(insecure=True)
        await self.write({"urls": [url], "checksum": sha256(data),
                          "proxies": {"https": proxy}})
        self.assertEqual(self.device_bytes(), data)
        self.assertEqual(tunnels, [f"127.0.0.1:{tls_port.getHost().port}"])

    async def test_refused_tunnel_is_a_download_error(self) -> None:
        class Refusing(Protocol):
            def dataReceived(self, data: bytes) -> None:
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")

        proxy = self.listen_proxy(Factory.forProtocol(Refusing))
        with capturedLogs(), self.assertRaises(errors.ImageDownloadError) as caught:
            await self.write({"urls": ["https://127.0.0.1:1/x.img"], "checksum": "0" * 64,
                              "proxies": {"https": proxy}})
        self.assertIn("403 Forbidden", str(caught.exception))
