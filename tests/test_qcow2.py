"""qcow2 to raw, streamed: compared byte for byte with ``qemu-img convert -O raw``.

Images are made by qemu-img in each test (Debian package qemu-utils; the tests skip without
it). Loop device tests need root and losetup.
"""

from __future__ import annotations

import hashlib
import glob
import os
import random
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from ipa_twisted import errors
from ipa_twisted.images.formats import ImageFormatRefused, inspect_qcow2
from ipa_twisted.images.qcow2 import Qcow2Converter
from ipa_twisted.process import ProcessExecutionError
from tests.image_server import ImageResource
from tests.test_images import MiB, ImageServerMixin, junk

HAVE_QEMU_IMG = shutil.which("qemu-img") is not None


class MemoryTarget:
    """A Target in memory (the converter's unit tests)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(junk(size))
        self.zeroed = 0

    def write(self, offset: int, data: Any) -> None:
        self.data[offset:offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)
        self.zeroed += length


class Qcow2TestBase(ImageServerMixin, TestCase):
    def setUp(self) -> None:
        if not HAVE_QEMU_IMG:
            self.skipTest("qemu-img is not installed (Debian package qemu-utils)")
        self.set_up_server()

    async def qemu_img(self, *args: str) -> bytes:
        out, _ = await self.runner.execute("qemu-img", *args, timeout=120)
        return out

    def sparse_raw(self, name: str, size: int, seed: int = 7, pieces: int = 24) -> str:
        """A sparse raw image with random data spread through it."""
        path = os.path.join(self.dir, name)
        rng = random.Random(seed)
        with open(path, "wb") as f:
            f.truncate(size)
            for _ in range(pieces):
                f.seek(rng.randrange(0, size - 300_000))
                f.write(rng.randbytes(rng.randrange(1, 300_000)))
            f.seek(0)
            f.write(rng.randbytes(4096))  # a "partition table"
        return path

    async def make_qcow2(self, raw: str, name: str, *options: str) -> str:
        path = os.path.join(self.dir, name)
        await self.qemu_img("convert", "-f", "raw", "-O", "qcow2", *options, raw, path)
        return path

    async def expected_raw(self, qcow2: str) -> bytes:
        path = qcow2 + ".expected"
        await self.qemu_img("convert", "-f", "qcow2", "-O", "raw", qcow2, path)
        with open(path, "rb") as f:
            return f.read()

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    async def deploy(self, qcow2: str, device_size: int, **resource_args: Any) -> tuple[
            Any, ImageResource]:
        data = self.read(qcow2)
        resource = ImageResource(data, **resource_args)
        url = self.serve(os.path.basename(qcow2), resource)
        self.old_disk(device_size)
        written = await self.write({"urls": [url], "disk_format": "qcow2",
                                    "os_hash_algo": "sha256",
                                    "os_hash_value": hashlib.sha256(data).hexdigest()})
        return written, resource

    async def check_deploy(self, qcow2: str, device_size: int,
                           **resource_args: Any) -> ImageResource:
        expected = await self.expected_raw(qcow2)
        written, resource = await self.deploy(qcow2, device_size, **resource_args)
        self.assertEqual((written.format, written.virtual_size), ("qcow2", len(expected)))
        disk = self.device_bytes()
        self.assertEqual(disk[:len(expected)], expected)
        return resource


class Qcow2DeployTests(Qcow2TestBase):
    async def test_sparse_qcow2_over_old_data(self) -> None:
        raw = self.sparse_raw("a.raw", 48 * MiB)
        qcow2 = await self.make_qcow2(raw, "a.qcow2")
        resource = await self.check_deploy(qcow2, 64 * MiB)
        self.assertEqual(len(resource.requests), 1)  # one pass

    async def test_compressed_clusters(self) -> None:
        raw = self.sparse_raw("c.raw", 40 * MiB, seed=8)
        with open(raw, "r+b") as f:  # compressible data too
            f.seek(20 * MiB)
            f.write(b"compress me " * 200_000)
        qcow2 = await self.make_qcow2(raw, "c.qcow2", "-c")
        await self.check_deploy(qcow2, 48 * MiB)

    async def test_small_clusters_v2_and_unaligned_size(self) -> None:
        raw = self.sparse_raw("s.raw", 10 * MiB + 512, seed=9, pieces=8)
        qcow2 = await self.make_qcow2(raw, "s.qcow2", "-o", "cluster_size=4096,compat=0.10")
        await self.check_deploy(qcow2, 12 * MiB)

    async def test_compressed_tiny_clusters_need_a_second_pass(self) -> None:
        # With 512-byte clusters qemu packs compressed clusters before the L2 table that
        # maps them: those come again with Range requests, checked against pass 1 digests.
        raw = self.sparse_raw("t.raw", 4 * MiB, seed=10, pieces=6)
        with open(raw, "r+b") as f:
            f.seek(MiB)
            f.write(b"abc" * 300_000)
        qcow2 = await self.make_qcow2(raw, "t.qcow2", "-c", "-o", "cluster_size=512")
        with capturedLogs():
            resource = await self.check_deploy(qcow2, 5 * MiB)
        ranged = [r["range"] for r in resource.requests[1:]]
        self.assertTrue(ranged and all(r and r.startswith("bytes=") for r in ranged), ranged)

    async def test_l1_table_after_the_data(self) -> None:
        # Growing an image moves its L1 table to the end of the file: nothing maps the data
        # as it passes, so it comes again (Range requests) once the tables are known.
        if shutil.which("qemu-io") is None:
            self.skipTest("qemu-io is not installed (Debian package qemu-utils)")
        path = os.path.join(self.dir, "grown.qcow2")
        await self.qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", path, "8M")
        await self.runner.execute("qemu-io", "-c", "write -P 0x55 1M 100k", "-c",
                                  "write -P 0x66 5M 50k", path)
        await self.qemu_img("resize", path, "40M")
        await self.runner.execute("qemu-io", "-c", "write -P 0x77 30M 64k", "-c",
                                  "write -P 0x11 0 4k", path)
        info = inspect_qcow2(self.read(path)[:1024])
        self.assertGreater(info.l1_table_offset, 150 * 1024)  # really after the data
        with capturedLogs():
            resource = await self.check_deploy(path, 48 * MiB)
        self.assertGreater(len(resource.requests), 1)

    async def test_refetched_bytes_that_changed_are_refused(self) -> None:
        raw = self.sparse_raw("r.raw", 4 * MiB, seed=11, pieces=6)
        qcow2 = await self.make_qcow2(raw, "r.qcow2", "-c", "-o", "cluster_size=512")
        data = self.read(qcow2)
        changed = bytearray(data)
        for offset in range(0x10000, len(changed), 512):
            changed[offset] ^= 0xFF
        with capturedLogs(), self.assertRaises(errors.ImageChecksumError) as caught:
            await self.deploy(qcow2, 5 * MiB, after_first=bytes(changed))
        self.assertIn("refetched", str(caught.exception))
        self.assertEqual(self.device_bytes()[:MiB], bytes(MiB))  # wiped

    async def test_too_small_device_is_refused_before_writing(self) -> None:
        if os.getuid() != 0 or shutil.which("losetup") is None:
            self.skipTest("needs root and losetup for a block device")
        path = os.path.join(self.dir, "big.qcow2")
        await self.qemu_img("create", "-f", "qcow2", path, "64M")
        self.device = await self.loop_device(32 * MiB)
        url = self.serve("big.qcow2", ImageResource(self.read(path)))
        with self.assertRaises(errors.ImageWriteError) as caught:
            await self.write({"urls": [url], "disk_format": "qcow2"})
        self.assertIn("the image needs 67108864 bytes", str(caught.exception))
        self.assertEqual(self.read(self.backing)[:MiB], junk(MiB))

    async def loop_device(self, size: int) -> str:
        self.backing = os.path.join(self.dir, "loop-backing")
        with open(self.backing, "wb") as f:
            f.write(junk(size))
        out, _ = await self.runner.execute("losetup", "--find", "--show", self.backing)
        device = out.decode().strip()

        async def detach() -> None:
            await self.runner.execute("losetup", "-d", device)
        self.addCleanup(detach)
        return device

    async def test_qcow2_to_a_loop_device(self) -> None:
        if os.getuid() != 0 or shutil.which("losetup") is None:
            self.skipTest("needs root and losetup for a block device")
        raw = self.sparse_raw("l.raw", 24 * MiB, seed=12)
        qcow2 = await self.make_qcow2(raw, "l.qcow2")
        expected = await self.expected_raw(qcow2)
        data = self.read(qcow2)
        self.device = await self.loop_device(32 * MiB)
        url = self.serve("l.qcow2", ImageResource(data))
        written = await self.write({"urls": [url], "checksum": hashlib.sha256(data).hexdigest()})
        self.assertEqual(written.virtual_size, 24 * MiB)
        disk = self.read(self.device)
        self.assertEqual(disk[:len(expected)], expected)
        self.assertEqual(disk[len(expected):], junk(32 * MiB)[len(expected):])


class Qcow2RefusalTests(Qcow2TestBase):
    async def refused(self, path: str, reason: str) -> None:
        old = self.old_disk(4 * MiB)
        url = self.serve(os.path.basename(path), ImageResource(self.read(path)))
        with self.assertRaises(ImageFormatRefused) as caught:
            await self.write({"urls": [url], "disk_format": "qcow2"})
        self.assertIn(reason, str(caught.exception))
        self.assertEqual(self.device_bytes(), old)

    async def test_backing_file(self) -> None:
        base = os.path.join(self.dir, "base.qcow2")
        await self.qemu_img("create", "-f", "qcow2", base, "16M")
        top = os.path.join(self.dir, "top.qcow2")
        await self.qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        await self.refused(top, "backing file")

    async def test_external_data_file(self) -> None:
        path = os.path.join(self.dir, "ext.qcow2")
        await self.qemu_img("create", "-f", "qcow2", "-o",
                            f"data_file={os.path.join(self.dir, 'ext.data')}", path, "16M")
        await self.refused(path, "external data file")

    async def test_encryption(self) -> None:
        path = os.path.join(self.dir, "enc.qcow2")
        # qemu 7.2 times LUKS's PBKDF2 before choosing its iterations, and fails when its
        # first round takes under 1 ms of CPU ("Unable to get accurate CPU usage"): about
        # one try in two on a CPU with SHA extensions. Another try times it afresh.
        for attempt in range(10):
            try:
                await self.qemu_img("create", "--object", "secret,id=sec0,data=password",
                                    "-f", "qcow2", "-o",
                                    "encrypt.format=luks,encrypt.key-secret=sec0", path, "16M")
                break
            except ProcessExecutionError as e:
                if b"accurate CPU usage" not in e.stderr or attempt == 9:
                    raise
        await self.refused(path, "encrypted")

    async def test_zstd_clusters(self) -> None:
        """zstd-compressed clusters are not read by the streaming converter: qemu-img
        converts the image from its URL (tests/test_qemu_formats.py), byte for byte."""
        if not glob.glob("/usr/lib/*/qemu/block-curl.so"):
            raise self.skipTest("qemu-img has no curl block driver (qemu-block-extra)")
        raw = self.sparse_raw("z.raw", 8 * MiB, pieces=4)
        path = os.path.join(self.dir, "z.qcow2")
        try:
            await self.qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o",
                                "compression_type=zstd", raw, path)
        except Exception as e:
            self.skipTest(f"this qemu-img has no zstd: {e}")
        self.old_disk(4 * MiB)
        url = self.serve("z.qcow2", ImageResource(self.read(path)))
        written = await self.write({"urls": [url], "disk_format": "qcow2"})
        self.assertEqual(written.format, "qcow2")
        self.assertEqual(self.device_bytes()[:8 * MiB], self.read(raw))


class Qcow2ConverterTests(Qcow2TestBase):
    """The converter alone, fed in odd chunk sizes, with the passes played by hand."""

    def convert(self, data: bytes, chunk: int) -> tuple[MemoryTarget, int]:
        info = inspect_qcow2(data[:1024])
        target = MemoryTarget(info.virtual_size + MiB)
        converter = Qcow2Converter(target, info)
        for offset in range(0, len(data), chunk):
            converter.feed(data[offset:offset + chunk])
        passes = 1
        while True:
            ranges = converter.end_pass()
            if not ranges:
                break
            passes += 1
            converter.begin_pass(ranges)
            for start, end in ranges:
                converter.seek(start)
                for offset in range(start, end, chunk):
                    converter.feed(data[offset:min(end, offset + chunk)])
        converter.finish()
        return target, passes

    async def test_chunk_boundaries_do_not_matter(self) -> None:
        raw = self.sparse_raw("u.raw", 6 * MiB, seed=13, pieces=10)
        for options in ([], ["-c"], ["-c", "-o", "cluster_size=512"]):
            qcow2 = await self.make_qcow2(raw, "u.qcow2", *options)
            expected = await self.expected_raw(qcow2)
            data = self.read(qcow2)
            for chunk in (1, 997, 65536 + 3) if options == ["-c"] else (997, 300_000):
                if chunk == 1 and len(data) > 400_000:
                    chunk = 511
                target, _ = self.convert(data, chunk)
                self.assertEqual(bytes(target.data[:len(expected)]), expected,
                                 f"{options} in chunks of {chunk}")
                self.assertEqual(bytes(target.data[len(expected):]),
                                 junk(len(target.data))[len(expected):])

    async def test_truncated_file_is_invalid(self) -> None:
        raw = self.sparse_raw("v.raw", 4 * MiB, seed=14, pieces=6)
        data = self.read(await self.make_qcow2(raw, "v.qcow2"))
        with self.assertRaises(ImageFormatRefused) as caught:
            self.convert(data[:len(data) // 2], 65536)
        self.assertIn("past the end of the file", str(caught.exception))
