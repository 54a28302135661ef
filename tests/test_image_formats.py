"""Format detection, qcow2 header checks, refusals, checksums, decompression, the writer."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ipa_twisted import errors
from ipa_twisted.images import formats
from ipa_twisted.images.checksum import (ExpectedChecksum, expected_checksum, hash_algorithm,
                                         image_filename, parse_checksum_file)
from ipa_twisted.images.decompress import Decompressor
from ipa_twisted.images.formats import (ImageFormatRefused, check_safe, detect_format,
                                        inspect_qcow2)
from ipa_twisted.blockdev.writer import DeviceWriter, SequentialSink

MiB = 1024 * 1024


def qcow2_header(*, version: int = 3, backing: int = 0, cluster_bits: int = 16,
                 size: int = MiB, crypt: int = 0, l1_size: int = 1, l1_offset: int = 0x30000,
                 incompatible: int = 0, compression: int | None = None) -> bytes:
    header = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", version, backing, 10 if backing else 0,
                         cluster_bits, size, crypt, l1_size, l1_offset, 0x10000, 1, 0, 0)
    if version == 3:
        length = 104 if compression is None else 112
        header += struct.pack(">QQQII", incompatible, 0, 0, 4, length)
        if compression is not None:
            header += bytes([compression]) + bytes(7)
    return header + bytes(512)


class DetectFormatTests(SynchronousTestCase):
    def test_magics(self) -> None:
        vdi = bytearray(512)
        vdi[0x40:0x44] = struct.pack("<I", 0xBEDA107F)
        iso = bytearray(0x9010)
        iso[0x8001:0x8006] = b"CD001"
        cases = {
            qcow2_header(): "qcow2", b"KDMV" + bytes(100): "vmdk",
            b"# Disk DescriptorFile\n": "vmdk", b"vhdxfile" + bytes(8): "vhdx",
            b"conectix" + bytes(8): "vhd", bytes(vdi): "vdi", bytes(iso): "iso",
            gzip.compress(b"x"): "gzip", lzma.compress(b"x"): "xz",
            b"\x28\xb5\x2f\xfd" + bytes(8): "zstd", bz2.compress(b"x"): "bzip2",
            b"\xeb\x63\x90" + bytes(600): "raw", b"": "raw", b"BZ" + bytes(5): "raw",
        }
        for head, expected in cases.items():
            self.assertEqual(detect_format(head), expected, head[:16])
        self.assertEqual(detect_format(bytes(iso), size=0x8003), "raw")

    def test_qcow2_header(self) -> None:
        info = inspect_qcow2(qcow2_header(size=5 * MiB, l1_size=1, compression=0))
        self.assertEqual((info.version, info.virtual_size, info.cluster_size, info.l1_size,
                          info.l1_table_offset, info.header_length),
                         (3, 5 * MiB, 65536, 1, 0x30000, 112))
        self.assertIsNone(formats.qcow2_refusal(info))
        v2 = inspect_qcow2(qcow2_header(version=2))
        self.assertEqual((v2.version, v2.incompatible_features), (2, 0))
        for bad in (b"QFI\xfb", qcow2_header(version=4), qcow2_header(cluster_bits=8),
                    b"not qcow2" + bytes(200)):
            self.assertRaises(ValueError, inspect_qcow2, bad)

    def test_qcow2_refusals(self) -> None:
        cases = [
            (qcow2_header(backing=0x1000), "backing file"),
            (qcow2_header(incompatible=1 << 2), "external data file"),
            (qcow2_header(crypt=2), "encrypted"),
            (qcow2_header(incompatible=1 << 1), "corrupt"),
            (qcow2_header(incompatible=1 << 7), "unknown incompatible features 0x80"),
            (qcow2_header(incompatible=1 << 3, compression=2), "unknown compression type 2"),
            (qcow2_header(size=10**12, l1_size=1), "L1 table size"),
            (qcow2_header(l1_offset=0x200), "L1 table offset"),
        ]
        for header, reason in cases:
            info = inspect_qcow2(header)
            with self.assertRaises(ImageFormatRefused) as caught:
                check_safe("qcow2", info, "qcow2", "img")
            self.assertIn(reason, caught.exception.reason)
            self.assertIn("img", str(caught.exception))
        self.assertIsNone(formats.qcow2_refusal(inspect_qcow2(qcow2_header(incompatible=1))))
        # safe, but qemu-img converts them (images/qemu_source.py)
        for header in (qcow2_header(incompatible=1 << 4),
                       qcow2_header(incompatible=1 << 3, compression=1)):
            info = inspect_qcow2(header)
            check_safe("qcow2", info, "qcow2", "img")
            self.assertFalse(formats.qcow2_streamable(info))

    def test_declared_against_detected(self) -> None:
        ok = inspect_qcow2(qcow2_header())
        allowed = [("raw", None, "raw"), ("raw", None, None), ("iso", None, "raw"),
                   ("raw", None, "iso"), ("iso", None, "iso"), ("qcow2", ok, "qcow2"),
                   ("qcow2", ok, None), ("qcow2", ok, "QCOW2"), ("raw", None, "ami"),
                   ("gzip", None, "raw"), ("zstd", None, None)]
        for detected, info, declared in allowed:
            check_safe(detected, info, declared)
        refused = [("raw", None, "qcow2", "bytes are raw"),
                   ("qcow2", ok, "raw", "bytes are qcow2"),
                   ("vmdk", None, "raw", "bytes are vmdk"),
                   ("vmdk", None, "vmdk", "vmdk descriptor file"),
                   ("vhd", None, None, "vhd footer truncated"),
                   ("gzip", None, "qcow2", "gzip-compressed"),
                   ("raw", None, "ploop", "not supported")]
        for detected, info, declared, reason in refused:
            with self.assertRaises(ImageFormatRefused, msg=(detected, declared)) as caught:
                check_safe(detected, info, declared)
            self.assertIn(reason, caught.exception.reason)

    def test_compressed_content(self) -> None:
        check_safe("xz", None, "raw", inner="raw")
        check_safe("xz", None, None, inner="iso")
        for inner in ("qcow2", "vmdk", "gzip"):
            with self.assertRaises(ImageFormatRefused):
                check_safe("xz", None, "raw", inner=inner)


class ChecksumTests(SynchronousTestCase):
    def expected(self, info: dict[str, Any], files: dict[str, bytes] | None = None
                 ) -> ExpectedChecksum | None:
        async def fetch(url: str) -> bytes:
            if files is None or url not in files:
                raise ValueError(f"{url} answered HTTP 404")
            return files[url]
        return self.successResultOf(Deferred.fromCoroutine(expected_checksum(
            {"id": "img", "urls": ["http://server/images/cirros.img?sig=1"], **info}, fetch,
            md5_enabled=True)))

    def test_os_hash_is_preferred(self) -> None:
        got = self.expected({"os_hash_algo": "sha512", "os_hash_value": "AB" * 64,
                             "checksum": "0" * 32})
        self.assertEqual(got, ExpectedChecksum("sha512", "ab" * 64, "os_hash_value"))
        got = self.expected({"os_hash_algo": "SHA3-256", "os_hash_value": "1" * 64})
        self.assertEqual(got and got.algorithm, "sha3_256")

    def test_checksum_by_length_and_prefix(self) -> None:
        for value, algorithm in (("a" * 32, "md5"), ("b" * 40, "sha1"), ("c" * 64, "sha256"),
                                 ("d" * 96, "sha384"), ("e" * 128, "sha512")):
            self.assertEqual(self.expected({"checksum": value}),
                             ExpectedChecksum(algorithm, value, "checksum"))
        self.assertEqual(self.expected({"checksum": "sha256:" + "F" * 64}),
                         ExpectedChecksum("sha256", "f" * 64, "checksum"))
        for bad in ("abc", "z" * 32, "sha999:" + "0" * 64):
            self.failureResultOf(Deferred.fromCoroutine(expected_checksum(
                {"id": "i", "urls": ["http://x/y"], "checksum": bad}, lambda u: None,  # type: ignore[arg-type, return-value]
                md5_enabled=True)),
                errors.ImageDownloadError)

    def test_unknown_os_hash_algo_falls_back_to_checksum(self) -> None:
        with capturedLogs():
            got = self.expected({"os_hash_algo": "whirlpool9", "os_hash_value": "00",
                                 "checksum": "a" * 32})
        self.assertEqual(got and got.algorithm, "md5")

    def test_no_checksum(self) -> None:
        with capturedLogs() as events:
            self.assertIsNone(self.expected({}))
        self.assertIn("WITHOUT verification", events[0]["log_format"])

    def test_checksum_file_url(self) -> None:
        url = "http://server/SHA256SUMS"
        listing = (b"0000000000000000000000000000000000000000000000000000000000000000  x\n"
                   + b"1" * 64 + b" *cirros.img\n")
        got = self.expected({"checksum": url}, {url: listing})
        self.assertEqual(got, ExpectedChecksum("sha256", "1" * 64, url))
        bsd = b"SHA512 (cirros.img) = " + b"2" * 128 + b"\n"
        self.assertEqual(self.expected({"checksum": url}, {url: bsd}),
                         ExpectedChecksum("sha512", "2" * 128, url))
        self.assertEqual(self.expected({"checksum": url}, {url: b"3" * 32 + b"\n"}),
                         ExpectedChecksum("md5", "3" * 32, url))

    def test_checksum_file_failures(self) -> None:
        async def fetch(url: str) -> bytes:
            raise ValueError("HTTP 404")
        for info in ({"checksum": "http://server/missing"},
                     {"checksum": "file:///etc/sums"}):
            failure = self.failureResultOf(Deferred.fromCoroutine(expected_checksum(
                {"id": "img", "urls": ["http://s/a.img"], **info}, fetch, md5_enabled=True)),
                errors.ImageDownloadError)
            self.assertIn("img", str(failure.value))

    def test_parse_checksum_file(self) -> None:
        text = ("# SHA256 sums\n"
                "aaaa  ./dir/a.img\n"
                "bbbb *b.img\n"
                "SHA2-256(c.img)= cccc\n"
                "SHA256 (d.img) = dddd\n")
        self.assertEqual(parse_checksum_file(text, ["a.img"]), (None, "aaaa"))
        self.assertEqual(parse_checksum_file(text, ["b.img"]), (None, "bbbb"))
        self.assertEqual(parse_checksum_file(text, ["c.img"]), ("sha256", "cccc"))
        self.assertEqual(parse_checksum_file(text, ["zz", "d.img"]), ("sha256", "dddd"))
        self.assertRaises(ValueError, parse_checksum_file, text, ["e.img"])
        self.assertRaises(ValueError, parse_checksum_file, "\n# nothing\n", ["a"])
        self.assertEqual(parse_checksum_file("ABCD\n", ["x"]), (None, "abcd"))

    def test_names(self) -> None:
        self.assertEqual(image_filename("https://h/v1/AUTH_x/c/my%20image.qcow2?temp=1"),
                         "my image.qcow2")
        self.assertEqual(hash_algorithm("SHA-256"), "sha256")
        self.assertIsNone(hash_algorithm("crc32"))


class DecompressorTests(SynchronousTestCase):
    data = os.urandom(300_000) + bytes(9 * MiB)

    def roundtrip(self, kind: str, compressed: bytes, step: int = 50_000) -> bytes:
        decompressor = Decompressor(kind)
        out = []
        for offset in range(0, len(compressed), step):
            for piece in decompressor.feed(compressed[offset:offset + step]):
                self.assertLessEqual(len(piece), 4 * MiB)  # bounded output per step
                out.append(piece)
        decompressor.finish()
        return b"".join(out)

    def test_formats_and_concatenation(self) -> None:
        half = len(self.data) // 2
        self.assertEqual(self.roundtrip("gzip", gzip.compress(self.data)), self.data)
        self.assertEqual(self.roundtrip("gzip", gzip.compress(self.data[:half]) +
                                        gzip.compress(self.data[half:]) + bytes(10)),
                         self.data)
        self.assertEqual(self.roundtrip("xz", lzma.compress(self.data[:half]) +
                                        lzma.compress(self.data[half:])), self.data)
        self.assertEqual(self.roundtrip("bzip2", bz2.compress(self.data[:half]) +
                                        bz2.compress(self.data[half:])), self.data)

    def test_errors(self) -> None:
        with self.assertRaises(errors.ImageDownloadError) as caught:
            self.roundtrip("gzip", gzip.compress(self.data)[:-20])
        self.assertIn("truncated", str(caught.exception))
        corrupt = bytearray(lzma.compress(self.data))
        corrupt[200:260] = bytes(60)
        with self.assertRaises(errors.ImageDownloadError):
            self.roundtrip("xz", bytes(corrupt))
        with self.assertRaises(errors.ImageDownloadError):
            self.roundtrip("gzip", gzip.compress(b"x") + b"garbage after")


class DeviceWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        with open(self.path, "wb") as f:
            f.write(b"\xaa" * (3 * MiB))

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_direct_and_buffered_writes_agree(self) -> None:
        expected = bytearray(b"\xaa" * (3 * MiB))
        writer = DeviceWriter(self.path, direct=True, stage_size=64 * 1024)
        writer.open()
        pieces = [(100, os.urandom(5000)), (5100, os.urandom(300_000)),
                  (2 * MiB + 1, os.urandom(70_000)), (MiB, os.urandom(4096))]
        for offset, data in pieces:
            writer.write(offset, data)
            expected[offset:offset + len(data)] = data
        writer.zero(600_000, 200_001)
        expected[600_000:800_001] = bytes(200_001)
        writer.finish(min_size=4 * MiB)
        expected += bytes(MiB)
        self.assertEqual(self.read(), bytes(expected))
        self.assertEqual((writer.bytes_written, writer.bytes_zeroed),
                         (sum(len(d) for _, d in pieces), 200_001))

    def test_a_failed_background_write_fails_the_next_wait(self) -> None:
        failing = {"at": 2 * 64 * 1024}

        class Failing(DeviceWriter):
            def _pwrite(self, fd: int, data: memoryview, offset: int) -> None:
                if fd == self._direct_fd and offset == failing["at"]:
                    raise errors.ImageWriteError(self.device, None, "", "injected")
                super()._pwrite(fd, data, offset)

        writer = Failing(self.path, direct=True, stage_size=64 * 1024)
        writer.open()
        if writer._direct_fd < 0:
            raise SkipTest("the temporary directory's file system refuses O_DIRECT")
        data = os.urandom(6 * 64 * 1024)
        with self.assertRaises(errors.ImageWriteError) as caught:
            writer.write(0, data)   # the third stage fails while the writer fills others
            writer.flush()
        self.assertIn("injected", str(caught.exception))
        writer.close()
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(2 * 64 * 1024), data[:2 * 64 * 1024])

    def test_sequential_sink_checks_the_head_first(self) -> None:
        writer = DeviceWriter(self.path)
        writer.open()
        heads: list[bytes] = []

        def check(head: bytes) -> None:
            heads.append(head)
            raise ImageFormatRefused("img", "no")

        sink = SequentialSink(writer, check, head_size=1000)
        sink.feed(b"a" * 600)
        with self.assertRaises(ImageFormatRefused):
            sink.feed(b"b" * 600)
        writer.close()
        self.assertEqual(heads, [b"a" * 600 + b"b" * 600])
        self.assertEqual(self.read(), b"\xaa" * (3 * MiB))

    def test_errors_are_image_write_errors(self) -> None:
        writer = DeviceWriter(os.path.join(self.path, "not-a-dir", "x"))
        self.assertRaises(errors.ImageWriteError, writer.open)
