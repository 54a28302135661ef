"""The policies Ironic sends for images, each decision on its own and through the pipeline.

md5 (``md5_enabled``), formats (``permitted_image_formats``, ``disable_deep_image_inspection``,
``disk_format: unknown``), download authorisation (``image_request_authorization``,
``image_server_auth_strategy``), ``image_download_max_duration`` and the one retry after a
checksum mismatch. Pipeline tests: a local image server, a regular file as the device, and a
``prepare`` that records whether the pipeline got as far as touching the disk.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted import errors
from ipa_twisted.config import AgentConfig
from ipa_twisted.images import formats
from ipa_twisted.images.checksum import ExpectedChecksum, Md5Refused, expected_checksum
from ipa_twisted.images.access import authorization_header
from ipa_twisted.images.download import ImageDownloadTimeout
from ipa_twisted.images.formats import ImageFormatRefused
from tests.image_server import ImageResource
from tests.test_images import ImageServerMixin, MiB, image_bytes, sha256

HAVE_QEMU_IMG = any(os.access(os.path.join(d, "qemu-img"), os.X_OK)
                    for d in os.environ.get("PATH", "/usr/bin").split(os.pathsep))


def gpt_image(size: int = 2 * MiB, sector: int = 512) -> bytes:
    """Raw bytes with a protective MBR and a GPT header signature at LBA 1."""
    data = bytearray(image_bytes(size, seed=5))
    data[:sector * 2] = bytes(sector * 2)
    data[446 + 4] = 0xEE
    data[510:512] = b"\x55\xaa"
    data[sector:sector + 8] = b"EFI PART"
    return bytes(data)


def qcow2_header(virtual_size: int = 4 * MiB) -> bytes:
    """A valid, empty qcow2 v3 (64 KiB clusters): header, then padding."""
    cluster = 1 << 16
    head = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 3, 0, 0, 16, virtual_size, 0, 1,
                       3 * cluster, cluster, 1, 0, 0)
    head += struct.pack(">QQQII", 0, 0, 0, 4, 104)
    return head + bytes(4 * cluster - len(head))


class Md5PolicyTests(SynchronousTestCase):
    def expected(self, info: dict[str, Any], md5_enabled: bool,
                 files: dict[str, bytes] | None = None) -> Any:
        async def fetch(url: str) -> bytes:
            return (files or {})[url]
        d = Deferred.fromCoroutine(expected_checksum(
            {"id": "img", "urls": ["http://s/cirros.img"], **info}, fetch,
            md5_enabled=md5_enabled))
        return d

    def refused(self, info: dict[str, Any], files: dict[str, bytes] | None = None) -> str:
        failure = self.failureResultOf(self.expected(info, False, files), Md5Refused)
        message = str(failure.value)
        self.assertIn("md5_enabled", message)
        self.assertIn("agent_md5_checksum_enable", message)
        return message

    def test_md5_only_checksums_are_refused_when_disabled(self) -> None:
        self.assertIn("os_hash_algo md5", self.refused(
            {"os_hash_algo": "md5", "os_hash_value": "a" * 32}))
        self.assertIn("32-digit", self.refused({"checksum": "b" * 32}))
        self.refused({"checksum": "md5:" + "c" * 32})
        url = "http://s/MD5SUMS"
        self.assertIn(url, self.refused({"checksum": url},
                                        {url: b"d" * 32 + b"  cirros.img\n"}))

    def test_md5_is_accepted_when_enabled(self) -> None:
        got = self.successResultOf(self.expected({"checksum": "b" * 32}, True))
        self.assertEqual(got, ExpectedChecksum("md5", "b" * 32, "checksum"))
        got = self.successResultOf(self.expected(
            {"os_hash_algo": "md5", "os_hash_value": "a" * 32}, True))
        self.assertEqual(got.algorithm, "md5")

    def test_a_stronger_checksum_beside_md5_is_used(self) -> None:
        with capturedLogs():
            got = self.successResultOf(self.expected(
                {"os_hash_algo": "md5", "os_hash_value": "a" * 32, "checksum": "e" * 64},
                False))
        self.assertEqual(got, ExpectedChecksum("sha256", "e" * 64, "checksum"))
        got = self.successResultOf(self.expected({"checksum": "f" * 128}, False))
        self.assertEqual(got.algorithm, "sha512")


class FormatPolicyTests(SynchronousTestCase):
    def test_policy_names(self) -> None:
        self.assertEqual(formats.policy_name("raw", gpt_image()), "gpt")
        self.assertEqual(formats.policy_name("raw", gpt_image(sector=4096)), "gpt")
        self.assertEqual(formats.policy_name("raw", image_bytes(8192)), "raw")
        self.assertEqual(formats.policy_name("qcow2", qcow2_header()), "qcow2")
        self.assertEqual(formats.gpt_sector_size(gpt_image(sector=4096)), 4096)
        self.assertIsNone(formats.gpt_sector_size(image_bytes(8192)))

    def test_permitted(self) -> None:
        formats.check_permitted("qcow2", ("raw", "gpt", "qcow2"))
        formats.check_permitted("gpt", ("raw",))        # raw with a GPT is raw
        formats.check_permitted("iso", ("raw", "ISO"))
        for name, permitted in (("qcow2", ("raw",)), ("raw", ("gpt", "qcow2")),
                                ("iso", ("raw", "gpt", "qcow2")), ("vmdk", ("raw",))):
            with self.assertRaises(ImageFormatRefused) as caught:
                formats.check_permitted(name, permitted, "img")
            message = str(caught.exception)
            self.assertIn(repr(name), message)
            self.assertIn("permitted_image_formats (" + ", ".join(permitted), message)

    def test_unknown_disk_format_means_from_the_bytes(self) -> None:
        self.assertIsNone(formats.declared_format({"disk_format": "unknown"}))
        self.assertEqual(formats.declared_format({"disk_format": "qcow2"}), "qcow2")
        formats.check_safe("raw", None, formats.declared_format({"disk_format": "unknown"}))
        formats.check_safe("raw", None, "gpt")


class AuthorizationTests(SynchronousTestCase):
    def test_image_request_authorization_is_decoded(self) -> None:
        encoded = base64.standard_b64encode(b"Bearer abc.def").decode()
        self.assertEqual(authorization_header(
            {"image_request_authorization": encoded}, AgentConfig()), "Bearer abc.def")
        # as Ironic 39 builds it: bytes from base64.standard_b64encode, before JSON
        self.assertEqual(authorization_header(
            {"image_request_authorization": encoded.encode()}, AgentConfig()),
            "Bearer abc.def")
        for bad in ("Bearer abc", base64.b64encode(b"x\r\nHost: evil").decode()):
            with self.assertRaises(errors.ImageDownloadError):
                authorization_header({"id": "i", "image_request_authorization": bad},
                                     AgentConfig())

    def test_http_basic(self) -> None:
        config = AgentConfig(image_server_auth_strategy="http_basic",
                             image_server_user="agent", image_server_password="pw")
        basic = "Basic " + base64.b64encode(b"agent:pw").decode()
        self.assertEqual(authorization_header({}, config), basic)
        self.assertIsNone(authorization_header({}, AgentConfig()))
        # image_info's credentials win over the agent's, as in the reference agent
        mine = {"image_server_auth_strategy": "http_basic", "image_server_user": "u",
                "image_server_password": "p:w"}
        self.assertEqual(authorization_header(mine, config),
                         "Basic " + base64.b64encode(b"u:p:w").decode())
        self.assertEqual(authorization_header(mine, AgentConfig()),
                         "Basic " + base64.b64encode(b"u:p:w").decode())
        with self.assertRaises(errors.ImageDownloadError) as caught:
            authorization_header({"id": "i", "image_server_auth_strategy": "http_basic",
                                  "image_server_user": "u"}, config)
        self.assertIn("image_server_password", str(caught.exception))
        with self.assertRaises(errors.ImageDownloadError) as caught:
            authorization_header({"id": "i"}, AgentConfig(
                image_server_auth_strategy="http_basic"))
        self.assertIn("image_server_user or image_server_password", str(caught.exception))


class PipelinePolicyTests(ImageServerMixin, TestCase):
    """Each refusal comes before ``prepare`` and before any byte reaches the device."""

    def setUp(self) -> None:
        self.set_up_server()
        self.prepared: list[str] = []

    async def prepare(self) -> None:
        self.prepared.append(self.device)

    async def refused(self, info: dict[str, Any], data: bytes,
                      error: type[Exception] = ImageFormatRefused) -> str:
        old = self.old_disk()
        resource = ImageResource(data)
        url = self.serve("image", resource)
        with capturedLogs(), self.assertRaises(error) as caught:
            await self.write({"urls": [url], **info}, prepare=self.prepare)
        self.assertEqual(self.prepared, [])
        self.assertEqual(self.device_bytes(), old)
        return str(caught.exception)

    async def test_md5_only_image_is_refused_before_the_download(self) -> None:
        data = gpt_image()
        message = await self.refused({"checksum": hashlib.md5(data).hexdigest()}, data,
                                     Md5Refused)
        self.assertIn("md5_enabled", message)

    async def test_md5_image_is_written_when_enabled(self) -> None:
        self.config = self.config.override(md5_enabled=True)
        data = gpt_image()
        url = self.serve("md5", ImageResource(data))
        written = await self.write({"urls": [url], "os_hash_algo": "md5",
                                    "os_hash_value": hashlib.md5(data).hexdigest()},
                                   prepare=self.prepare)
        self.assertEqual((written.checksum_algo, self.prepared), ("md5", [self.device]))
        self.assertEqual(self.device_bytes()[:len(data)], data)

    async def test_qcow2_is_refused_when_only_raw_is_permitted(self) -> None:
        self.config = self.config.override(permitted_image_formats=("raw",))
        data = qcow2_header()
        message = await self.refused({"disk_format": "qcow2", "checksum": sha256(data)}, data)
        self.assertIn("'qcow2'", message)
        self.assertIn("permitted_image_formats (raw)", message)

    async def test_compressed_raw_is_judged_by_its_content(self) -> None:
        self.config = self.config.override(permitted_image_formats=("qcow2",))
        data = gzip.compress(image_bytes(MiB), 1)
        message = await self.refused({"disk_format": "raw", "checksum": sha256(data)}, data)
        self.assertIn("'raw'", message)

    async def test_iso_needs_iso_permitted(self) -> None:
        iso = bytearray(image_bytes(MiB))
        iso[0x8001:0x8006] = b"CD001"
        data = bytes(iso)
        message = await self.refused({"disk_format": "iso", "checksum": sha256(data)}, data)
        self.assertIn("'iso'", message)
        self.config = self.config.override(permitted_image_formats=("raw", "iso"))
        url = self.serve("iso", ImageResource(data))
        written = await self.write({"urls": [url], "disk_format": "iso",
                                    "checksum": sha256(data)})
        self.assertEqual(written.format, "iso")

    async def test_unknown_disk_format_is_resolved_from_the_bytes(self) -> None:
        data = gpt_image()
        url = self.serve("oci", ImageResource(data))
        self.config = self.config.override(permitted_image_formats=("raw",))
        written = await self.write({"urls": [url], "disk_format": "unknown",
                                    "checksum": sha256(data)}, prepare=self.prepare)
        self.assertEqual((written.format, self.prepared), ("raw", [self.device]))
        self.prepared.clear()
        qcow2 = qcow2_header()
        message = await self.refused({"disk_format": "unknown", "checksum": sha256(qcow2)},
                                     qcow2)
        self.assertIn("'qcow2'", message)

    async def test_without_deep_inspection_a_declared_raw_image_is_written_as_is(
            self) -> None:
        self.config = self.config.override(disable_deep_image_inspection=True,
                                            permitted_image_formats=("raw",))
        data = qcow2_header()
        url = self.serve("trusted", ImageResource(data))
        with capturedLogs() as events:
            written = await self.write({"urls": [url], "disk_format": "raw",
                                        "checksum": sha256(data)}, prepare=self.prepare)
        self.assertEqual(written.format, "raw")
        self.assertEqual(self.device_bytes(), data)
        self.assertTrue(any("disable_deep_image_inspection" in e.get("log_format", "")
                            for e in events))

    async def test_without_deep_inspection_the_permitted_list_is_not_applied(self) -> None:
        if not HAVE_QEMU_IMG:
            self.skipTest("qemu-img is not installed (Debian package qemu-utils)")
        self.config = self.config.override(disable_deep_image_inspection=True,
                                           permitted_image_formats=("raw",))
        raw = os.path.join(self.dir, "r.raw")
        with open(raw, "wb") as f:
            f.write(gpt_image(MiB))
        qcow2 = raw + ".qcow2"
        await self.runner.execute("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw,
                                  qcow2, timeout=60)
        with open(qcow2, "rb") as f:
            data = f.read()
        url = self.serve("q", ImageResource(data))
        written = await self.write({"urls": [url], "disk_format": "qcow2",
                                    "checksum": sha256(data)})
        self.assertEqual(written.format, "qcow2")
        self.assertEqual(self.device_bytes()[:MiB], gpt_image(MiB))

    async def test_max_duration_covers_the_whole_download(self) -> None:
        self.config = self.config.override(image_download_max_duration=0.5,
                                           image_download_connection_timeout=0.2,
                                           image_download_connection_retries=50,
                                           image_download_connection_retry_interval=0.1)
        data = image_bytes(2 * MiB)
        resource = ImageResource(data, stalls=[MiB, MiB + 10, MiB + 20, MiB + 30,
                                               MiB + 40, MiB + 50])
        url = self.serve("slow", resource)
        old = self.old_disk()
        with capturedLogs(), self.assertRaises(ImageDownloadTimeout) as caught:
            await self.write({"urls": [url], "checksum": sha256(data)})
        self.assertIn("image_download_max_duration (0.5 s", str(caught.exception))
        self.assertGreater(len(resource.requests), 1)   # it had retried meanwhile
        # the first MiB was still gathering into a batch: nothing reached the device
        self.assertEqual(self.device_bytes(), old)

    async def test_checksum_mismatch_is_retried_once(self) -> None:
        good = image_bytes(MiB, seed=2)
        bad = image_bytes(MiB, seed=3)
        resource = ImageResource(bad, after_first=good)
        url = self.serve("flaky", resource)
        with capturedLogs() as events:
            written = await self.write({"urls": [url], "checksum": sha256(good)},
                                       prepare=self.prepare)
        self.assertEqual(written.checksum, sha256(good))
        self.assertEqual(self.device_bytes()[:MiB], good)
        self.assertEqual(len(resource.requests), 2)
        self.assertEqual(len(self.prepared), 1)
        self.assertTrue(any("once more" in e.get("log_format", "") for e in events))
        # twice wrong: the mismatch is reported
        always_bad = self.serve("bad", ImageResource(bad))
        with capturedLogs(), self.assertRaises(errors.ImageChecksumError):
            await self.write({"urls": [always_bad], "checksum": sha256(good)})

    async def test_basic_auth_from_the_config_reaches_the_server(self) -> None:
        self.config = self.config.override(image_server_auth_strategy="http_basic",
                                           image_server_user="agent",
                                           image_server_password="secret")
        data = gpt_image()
        resource = ImageResource(data)
        url = self.serve("basic", resource)
        await self.write({"urls": [url], "checksum": sha256(data)})
        self.assertEqual(resource.requests[0]["authorization"],
                         "Basic " + base64.b64encode(b"agent:secret").decode())
