"""The image policy Ironic sends at lookup, on a real agent in the disk sandbox.

A recording fake Ironic answers lookup with Ironic 39's policy keys, MD5 forbidden and only
raw images permitted; the agent (its disk: a loop device) is asked for
``standby.prepare_image`` as Ironic would: an MD5-only image and a qcow2 image are refused
with the disk byte for byte as it was, a sha256 raw image is written. Then an image server
that demands HTTP basic auth: refused without credentials, served with image_info's
``image_server_*`` credentials (what Ironic sends for ``[deploy]
image_server_auth_strategy = http_basic``) and with ``image_request_authorization``
(base64-encoded by Ironic).
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.fake_ironic import IRONIC_39_POLICY
from ipa_twisted.testing.sandbox import attach_loop_devices, loop_devices_unavailable
from tests.image_server import ImageResource
from tests.processes import (FakeIronicProcess, http_client, physical_macs_or_skip, poll,
                             request_json, start_agent)

MiB = 1024 * 1024
IMAGE_SIZE = 24 * MiB
DISK_SIZE = 5 * 1024 * MiB     # the smallest disk of >= 4 GiB: the install disk
NODE = "9a5a0d7e-1c1b-4d55-9f5e-6f7b8f2c1d01"
TOKEN = "policy-images-token-0123456789abcdef0123"
POLICY = {**IRONIC_39_POLICY, "agent_md5_checksum_enable": False,
          "permitted_image_formats": ["raw"]}
USER, PASSWORD = "glance", "s3cret:pw"
EDGES = (0, 64 * MiB, DISK_SIZE - 4 * MiB, 4 * MiB)
"""(offset, length) pairs compared before and after: what wiping and partitioning touch."""


class SandboxedImagePolicyTests(TestCase):
    timeout = 400

    async def setUp(self) -> None:
        reason = loop_devices_unavailable(("sgdisk", "qemu-img"))
        if reason:
            raise self.skipTest(reason)
        macs = physical_macs_or_skip()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.runner = ProcessRunner(reactor, reactor)
        self.loop = (await attach_loop_devices(self.runner, os.path.join(self.dir, "disks"),
                                               [DISK_SIZE], self.addCleanup))[0]
        await self.old_disk()
        self.root = Resource()
        server = reactor.listenTCP(0, Site(self.root), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        self.base = f"http://127.0.0.1:{server.getHost().port}"
        self.ironic = FakeIronicProcess(self, self.dir, macs=macs, node_uuid=NODE, token=TOKEN,
                                        heartbeat_timeout=300, lookup_config=POLICY)
        await self.ironic.start()
        agent = start_agent(self, self.dir, api_url=f"http://127.0.0.1:{self.ironic.port}",
                            sandbox=[self.loop], debug=False)
        beats = await poll(lambda: self.ironic.records("heartbeat"), timeout=60)
        self.client = http_client(beats[0]["body"]["agent_verify_ca"])
        self.agent_url = f"https://127.0.0.1:{agent.port}"

    async def old_disk(self) -> None:
        """A GPT and recognisable data at both ends of the disk."""
        with open(self.loop.path, "r+b") as f:
            for offset in (0, DISK_SIZE - 4 * MiB):
                f.seek(offset)
                f.write(hashlib.sha512(str(offset).encode()).digest() * (4 * MiB // 64))
        await self.runner.execute("sgdisk", "-o", "-n", "1:2048:+64M", "-c", "1:precious",
                                  self.loop.path, timeout=60)
        self.before = self.edges()

    def edges(self) -> bytes:
        with open(self.loop.path, "rb") as f:
            parts = []
            for offset, length in ((EDGES[0], EDGES[1]), (EDGES[2], EDGES[3])):
                f.seek(offset)
                parts.append(f.read(length))
        return b"".join(parts)

    async def image_file(self) -> str:
        """A 24 MiB whole-disk image with a GPT and one partition."""
        path = os.path.join(self.dir, "image.raw")
        with open(path, "wb") as f:
            for i in range(IMAGE_SIZE // MiB):
                f.write(hashlib.sha256(str(i).encode()).digest() * (MiB // 32))
        await self.runner.execute("sgdisk", "-o", "-n", "1:2048:0", "-c", "1:root", path,
                                  timeout=60)
        return path

    def serve(self, name: str, resource: Resource) -> str:
        self.root.putChild(name.encode(), resource)
        return f"{self.base}/{name}"

    async def prepare(self, image_info: dict[str, Any]) -> dict[str, Any]:
        body = {"name": "standby.prepare_image",
                "params": {"image_info": {"id": "img", **image_info}}}
        code, result = await request_json("POST", f"{self.agent_url}/v1/commands/", body,
                                          client=self.client, timeout=300, wait="true",
                                          agent_token=TOKEN)
        self.assertEqual(code, 200, result)
        return dict(result)

    def assert_refused(self, result: dict[str, Any], *words: str) -> None:
        self.assertEqual(result["command_status"], "FAILED", result)
        message = str(result["command_error"])
        for word in words:
            self.assertIn(word, message)
        self.assertEqual(self.edges(), self.before, "the refused image touched the disk")

    async def test_md5_and_qcow2_refused_sha256_raw_written(self) -> None:
        path = await self.image_file()
        with open(path, "rb") as f:
            raw = f.read()
        raw_url = self.serve("image.raw", ImageResource(raw))

        # MD5 only: Ironic said agent_md5_checksum_enable false
        result = await self.prepare({"urls": [raw_url], "disk_format": "raw",
                                     "checksum": hashlib.md5(raw).hexdigest()})
        self.assert_refused(result, "md5_enabled", "agent_md5_checksum_enable")

        # qcow2: Ironic said permitted_image_formats ['raw']
        qcow2_path = path + ".qcow2"
        await self.runner.execute("qemu-img", "convert", "-f", "raw", "-O", "qcow2", path,
                                  qcow2_path, timeout=120)
        with open(qcow2_path, "rb") as f:
            qcow2 = f.read()
        result = await self.prepare({"urls": [self.serve("image.qcow2", ImageResource(qcow2))],
                                     "disk_format": "qcow2", "os_hash_algo": "sha256",
                                     "os_hash_value": hashlib.sha256(qcow2).hexdigest()})
        self.assert_refused(result, "'qcow2'", "permitted_image_formats (raw)")

        # sha256, raw (with a GPT): written
        result = await self.prepare({"urls": [raw_url], "disk_format": "raw",
                                     "os_hash_algo": "sha256",
                                     "os_hash_value": hashlib.sha256(raw).hexdigest()})
        self.assertEqual(result["command_status"], "SUCCEEDED", result)
        with open(self.loop.path, "rb") as f:
            written = f.read(IMAGE_SIZE)
        # the GPT's backup was moved to the disk's end: the protective MBR's size and the
        # header at LBA 1 changed; the boot code and the partition's data did not
        self.assertEqual(written[:440], raw[:440])
        self.assertEqual(written[MiB:], raw[MiB:])

    async def test_image_server_with_basic_auth(self) -> None:
        path = await self.image_file()
        with open(path, "rb") as f:
            raw = f.read()
        resource = ImageResource(raw, basic_auth=(USER, PASSWORD))
        url = self.serve("private.raw", resource)
        checksum = {"os_hash_algo": "sha256", "os_hash_value": hashlib.sha256(raw).hexdigest()}

        result = await self.prepare({"urls": [url], "disk_format": "raw", **checksum})
        self.assert_refused(result, "HTTP 401")

        result = await self.prepare({"urls": [url], "disk_format": "raw", **checksum,
                                     "image_server_auth_strategy": "http_basic",
                                     "image_server_user": USER,
                                     "image_server_password": PASSWORD})
        self.assertEqual(result["command_status"], "SUCCEEDED", result)

        header = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        await self.old_disk()
        result = await self.prepare({
            "urls": [url], "disk_format": "raw", **checksum,
            "image_request_authorization": base64.standard_b64encode(header.encode()).decode()})
        self.assertEqual(result["command_status"], "SUCCEEDED", result)
        self.assertEqual(resource.requests[-1]["authorization"], header)
        with open(self.loop.path, "rb") as f:
            f.seek(MiB)
            self.assertEqual(f.read(MiB), raw[MiB:2 * MiB])
