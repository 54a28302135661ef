"""Images qemu-img converts from their URL (vmdk, vhd, vhdx, vdi, qcow2 with extended L2
entries or zstd clusters): how its curl driver is told to fetch them, what is refused before
anything runs, and real writes onto a loop device checked byte for byte against the raw
image qemu-img made each one from."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted import errors
from ipa_twisted.config import AgentConfig
from ipa_twisted.images import formats
from ipa_twisted.images.qemu_source import SECRET_ID, qemu_source
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.sandbox import attach_loop_devices, loop_devices_unavailable
from tests.image_server import ImageResource
from tests.test_images import ImageServerMixin, junk

MiB = 1024 * 1024
IMAGE_SIZE = 16 * MiB
DISK_SIZE = 48 * MiB
ALL = ("raw", "gpt", "qcow2", "vmdk", "vhd", "vhdx", "vdi")


def source_raw(path: str) -> bytes:
    """A raw disk image: a protective MBR and GPT (sgdisk-like bytes are not needed: random
    and zero stretches, and a recognisable first sector), half allocated."""
    rng = random.Random(15)
    data = bytearray(IMAGE_SIZE)
    data[0:512] = b"MBR!" + bytes(rng.getrandbits(8) for _ in range(508))
    for start in (1 * MiB, 5 * MiB + 4096, IMAGE_SIZE - MiB):
        data[start:start + 700 * 1024] = rng.randbytes(700 * 1024)
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


class CurlOptionTests(SynchronousTestCase):
    """What qemu-img's curl driver is given for a URL, and what it cannot be given."""

    config = AgentConfig()

    def options(self, source: Any) -> dict[str, Any]:
        self.assertTrue(source.filename.startswith("json:"))
        return dict(json.loads(source.filename[len("json:"):]))

    def test_plain_http(self) -> None:
        source = qemu_source("vmdk", "http://images.example/a.vmdk", authorization=None,
                             proxy=None, config=self.config)
        options = self.options(source)
        self.assertEqual(options["driver"], "vmdk")
        self.assertIsNone(options["backing"])
        self.assertEqual(options["file"]["driver"], "http")
        self.assertEqual(options["file"]["url"], "http://images.example/a.vmdk")
        self.assertEqual(source.objects(), [])
        self.assertEqual(source.env, {"no_proxy": "*"})

    def test_vhd_is_qemus_vpc_without_backing_option(self) -> None:
        options = self.options(qemu_source("vhd", "http://h/a", authorization=None,
                                           proxy=None, config=self.config))
        self.assertEqual(options["driver"], "vpc")
        self.assertNotIn("backing", options)

    def test_basic_auth_password_on_stdin(self) -> None:
        header = "Basic " + base64.b64encode(b"glance:s3cret:pw").decode()
        source = qemu_source("vhdx", "https://h/a", authorization=header, proxy=None,
                             config=self.config)
        options = self.options(source)
        self.assertEqual(options["file"]["username"], "glance")
        self.assertEqual(options["file"]["password-secret"], SECRET_ID)
        self.assertEqual(source.secret, b"s3cret:pw")
        self.assertEqual(source.objects(),
                         ["--object", f"secret,id={SECRET_ID},file=/dev/stdin"])
        self.assertNotIn("s3cret", source.filename)

    def test_bearer_token_refused(self) -> None:
        error = self.assertRaises(formats.ImageFormatRefused, qemu_source, "vdi", "http://h/a",
                                  authorization="Bearer abc", proxy=None, config=self.config)
        self.assertIn("only HTTP basic", error.reason)
        self.assertIn("Bearer", error.reason)

    def test_https_with_cafile_refused_insecure_turns_sslverify_off(self) -> None:
        error = self.assertRaises(formats.ImageFormatRefused, qemu_source, "vmdk",
                                  "https://h/a", authorization=None, proxy=None,
                                  config=AgentConfig(cafile="/etc/ca.pem"))
        self.assertIn("cafile", error.reason)
        options = self.options(qemu_source("vmdk", "https://h/a", authorization=None,
                                           proxy=None, config=AgentConfig(insecure=True)))
        self.assertIs(options["file"]["sslverify"], False)
        # plain HTTP does not care about the CA
        qemu_source("vmdk", "http://h/a", authorization=None, proxy=None,
                    config=AgentConfig(cafile="/etc/ca.pem"))

    def test_proxy_in_environment(self) -> None:
        source = qemu_source("vmdk", "http://h/a", authorization=None,
                             proxy="http://proxy:3128", config=self.config)
        self.assertEqual(source.env["http_proxy"], "http://proxy:3128")
        self.assertEqual(source.env["https_proxy"], "http://proxy:3128")

    def test_non_http_url_refused(self) -> None:
        error = self.assertRaises(formats.ImageFormatRefused, qemu_source, "vmdk",
                                  "file:///etc/passwd", authorization=None, proxy=None,
                                  config=self.config)
        self.assertIn("http or https", error.reason)

    def test_query_hidden_in_logs(self) -> None:
        url = "http://h/a.vmdk?temp_url_sig=SECRET"
        source = qemu_source("vmdk", url, authorization=None, proxy=None, config=self.config)
        shown = " ".join(source.shown(["qemu-img", "info", source.filename]))
        self.assertNotIn("SECRET", shown)


class HeaderTests(TestCase):
    """``formats`` on headers qemu-img writes (and a byte changed to make them unsafe)."""

    def setUp(self) -> None:
        if shutil.which("qemu-img") is None:
            raise self.skipTest("qemu-img is not installed")
        self.runner = ProcessRunner(reactor, reactor)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    async def make(self, fmt: str, *options: str, name: str = "") -> bytes:
        path = os.path.join(self.dir, name or f"image.{fmt}")
        await self.runner.execute("qemu-img", "create", "-f", fmt, *options, path, "16M")
        with open(path, "rb") as f:
            return f.read(formats.HEAD_SIZE)

    async def test_detected_and_safe(self) -> None:
        for qemu_fmt, ours, options in (("vmdk", "vmdk", ()),
                                        ("vmdk", "vmdk", ("-o", "subformat=streamOptimized")),
                                        ("vpc", "vhd", ()), ("vhdx", "vhdx", ()),
                                        ("vdi", "vdi", ())):
            head = await self.make(qemu_fmt, *options)
            self.assertEqual(formats.detect_format(head), ours)
            self.assertIsNone(formats.converted_refusal(ours, head), (qemu_fmt, options))
            formats.check_safe(ours, None, ours, head=head)

    async def test_vmdk_with_parent_refused(self) -> None:
        await self.make("vmdk", name="base.vmdk")
        head = await self.make("vmdk", "-b", os.path.join(self.dir, "base.vmdk"),
                               "-F", "vmdk", name="child.vmdk")
        reason = formats.converted_refusal("vmdk", head)
        self.assertIsNotNone(reason)
        self.assertIn("parent", str(reason))

    async def test_vmdk_descriptor_file_refused(self) -> None:
        await self.make("vmdk", "-o", "subformat=monolithicFlat")
        with open(os.path.join(self.dir, "image.vmdk"), "rb") as f:
            head = f.read(formats.HEAD_SIZE)
        self.assertEqual(formats.detect_format(head), "vmdk")
        self.assertIn("descriptor file", str(formats.converted_refusal("vmdk", head)))

    async def test_differencing_vhd_and_vdi_refused(self) -> None:
        vhd = bytearray(await self.make("vpc"))
        vhd[60:64] = (4).to_bytes(4, "big")
        self.assertIn("differencing", str(formats.converted_refusal("vhd", bytes(vhd))))
        vdi = bytearray(await self.make("vdi"))
        vdi[0x4C:0x50] = (4).to_bytes(4, "little")
        self.assertIn("vdi image type 4", str(formats.converted_refusal("vdi", bytes(vdi))))

    async def test_qcow2_zstd_and_extended_l2_go_to_qemu_img(self) -> None:
        for options in ("compression_type=zstd", "extended_l2=on"):
            head = await self.make("qcow2", "-o", options)
            info = formats.inspect_qcow2(head)
            self.assertIsNone(formats.qcow2_refusal(info))
            self.assertFalse(formats.qcow2_streamable(info))
        self.assertTrue(formats.qcow2_streamable(formats.inspect_qcow2(await self.make("qcow2"))))


class ConvertedWriteTests(ImageServerMixin, TestCase):
    """Real qemu-img over HTTP Range requests onto a loop device."""

    timeout = 300

    async def setUp(self) -> None:
        reason = loop_devices_unavailable(("qemu-img",))
        if reason:
            raise self.skipTest(reason)
        if not any(os.path.exists(f"/usr/lib/{arch}/qemu/block-curl.so")
                   for arch in os.listdir("/usr/lib") if arch.endswith("-linux-gnu")):
            raise self.skipTest("qemu-img has no curl block driver (qemu-block-extra)")
        self.set_up_server()
        self.config = AgentConfig(image_download_connection_retries=2,
                                  image_download_connection_retry_interval=0.01,
                                  image_download_connection_timeout=5.0,
                                  permitted_image_formats=ALL)
        self.loop = (await attach_loop_devices(self.runner, os.path.join(self.dir, "disks"),
                                               [DISK_SIZE], self.addCleanup))[0]
        self.device = self.loop.path
        self.raw_path = os.path.join(self.dir, "source.raw")
        self.raw = source_raw(self.raw_path)
        self.old = junk(DISK_SIZE)
        with open(self.device, "r+b") as f:
            f.write(self.old)

    async def convert(self, qemu_fmt: str, *options: str) -> tuple[str, bytes]:
        path = os.path.join(self.dir, f"image.{qemu_fmt}")
        await self.runner.execute("qemu-img", "convert", "-f", "raw", "-O", qemu_fmt,
                                  *options, self.raw_path, path)
        with open(path, "rb") as f:
            return path, f.read()

    def attempt(self, image_info: dict[str, Any]) -> Deferred[Any]:
        return Deferred.fromCoroutine(self.write(image_info))

    def disk(self) -> bytes:
        with open(self.device, "rb") as f:
            return f.read()

    def methods(self, resource: ImageResource) -> list[str]:
        return [str(r["method"]) for r in resource.requests]

    async def test_each_format_byte_for_byte(self) -> None:
        for qemu_fmt, ours, options in (
                ("vmdk", "vmdk", ()),
                ("vmdk", "vmdk", ("-o", "subformat=streamOptimized")),
                ("vpc", "vhd", ("-o", "force_size=on")),
                ("vhdx", "vhdx", ()),
                ("vdi", "vdi", ()),
                ("qcow2", "qcow2", ("-o", "compression_type=zstd", "-c")),
                ("qcow2", "qcow2", ("-o", "extended_l2=on"))):
            _, data = await self.convert(qemu_fmt, *options)
            resource = ImageResource(data)
            url = self.serve(f"{qemu_fmt}-{len(resource.requests)}-{options}".replace(" ", ""),
                             resource)
            written = await self.write({"urls": [url], "disk_format": ours,
                                        "os_hash_algo": "sha256",
                                        "os_hash_value": hashlib.sha256(data).hexdigest()})
            disk = self.disk()
            self.assertEqual(written.format, ours)
            self.assertEqual(written.size, IMAGE_SIZE)
            self.assertEqual(disk[:IMAGE_SIZE], self.raw, (qemu_fmt, options))
            self.assertEqual(disk[IMAGE_SIZE:], self.old[IMAGE_SIZE:], "past the image")
            # qemu-img read with Range requests; the checksum stream read it all once more
            self.assertTrue(any(r["range"] for r in resource.requests), resource.requests)
            with open(self.device, "r+b") as f:
                f.write(self.old[:IMAGE_SIZE])

    async def test_not_permitted_refused_before_anything_runs(self) -> None:
        _, data = await self.convert("vmdk")
        resource = ImageResource(data)
        self.config = AgentConfig(permitted_image_formats=("raw", "qcow2"))
        error = await self.assertFailure(self.attempt({"urls": [self.serve("v", resource)]}),
                                         formats.ImageFormatRefused)
        self.assertIn("'vmdk', which is not in permitted_image_formats", str(error))
        self.assertEqual(self.methods(resource), ["GET"])   # qemu-img never ran
        self.assertEqual(self.disk(), self.old)

    async def test_backing_and_data_files_refused_before_anything_runs(self) -> None:
        base = os.path.join(self.dir, "base.vmdk")
        await self.runner.execute("qemu-img", "create", "-f", "vmdk", base, "16M")
        child = os.path.join(self.dir, "child.vmdk")
        await self.runner.execute("qemu-img", "create", "-f", "vmdk", "-b", base, "-F", "vmdk",
                                  child)
        external = os.path.join(self.dir, "data.raw")
        zstd_data_file = os.path.join(self.dir, "data-file.qcow2")
        await self.runner.execute("qemu-img", "create", "-f", "qcow2", "-o",
                                  f"data_file={external},compression_type=zstd",
                                  zstd_data_file, "16M")
        for path, words in ((child, "parent"), (zstd_data_file, "external data file")):
            with open(path, "rb") as f:
                resource = ImageResource(f.read())
            error = await self.assertFailure(
                self.attempt({"urls": [self.serve(os.path.basename(path), resource)]}),
                formats.ImageFormatRefused)
            self.assertIn(words, str(error))
            self.assertEqual(self.methods(resource), ["GET"])
            self.assertEqual(self.disk(), self.old)

    async def test_checksum_mismatch_wipes_the_partition_table(self) -> None:
        _, data = await self.convert("vhdx")
        resource = ImageResource(data)
        error = await self.assertFailure(
            self.attempt({"urls": [self.serve("bad", resource)], "os_hash_algo": "sha256",
                        "os_hash_value": hashlib.sha256(b"other").hexdigest()}),
            errors.ImageChecksumError)
        self.assertEqual(error.type, "ImageChecksumError")
        disk = self.disk()
        self.assertEqual(disk[:MiB], bytes(MiB))                # the table: wiped
        self.assertEqual(disk[MiB:IMAGE_SIZE - MiB], self.raw[MiB:IMAGE_SIZE - MiB])
        self.assertEqual(disk[-MiB:], bytes(MiB))

    async def test_basic_auth_carried_to_qemu_img(self) -> None:
        _, data = await self.convert("vdi")
        resource = ImageResource(data, basic_auth=("glance", "s3cret:pw"))
        url = self.serve("auth", resource)
        await self.write({"urls": [url], "image_server_auth_strategy": "http_basic",
                          "image_server_user": "glance", "image_server_password": "s3cret:pw"})
        self.assertEqual(self.disk()[:IMAGE_SIZE], self.raw)
        self.assertIn("HEAD", self.methods(resource))      # qemu-img's curl driver
        expected = "Basic " + base64.b64encode(b"glance:s3cret:pw").decode()
        self.assertEqual({r["authorization"] for r in resource.requests}, {expected})

    async def test_bearer_token_refused_before_anything_runs(self) -> None:
        _, data = await self.convert("vdi")
        resource = ImageResource(data)
        token = base64.b64encode(b"Bearer abc").decode()
        error = await self.assertFailure(
            self.attempt({"urls": [self.serve("bearer", resource)],
                        "image_request_authorization": token}),
            formats.ImageFormatRefused)
        self.assertIn("only HTTP basic credentials", str(error))
        self.assertEqual(self.methods(resource), ["GET"])
        self.assertEqual(self.disk(), self.old)
