"""``standby.prepare_image`` on a real agent in the sandbox, onto a loop device.

The agent (standalone, its API on 127.0.0.1) sees only the test's loop device; images come
from the test's web server: compressed images, a server that cuts the connection mid-body,
and one that serves the wrong bytes.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import shutil
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.sandbox import attach_loop_devices, loop_devices_unavailable
from tests.image_server import ImageResource
from tests.images import mbr_disk_image
from tests.processes import poll, start_agent

MiB = 1024 * 1024
IMAGE_SIZE = 24 * MiB
DISK_SIZE = 5 * 1024 * MiB     # standalone: no hints, the smallest disk of >= 4 GiB


class SandboxedDeployTests(TestCase):
    timeout = 300

    async def setUp(self) -> None:
        reason = loop_devices_unavailable()
        if reason:
            raise self.skipTest(reason)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        runner = ProcessRunner(reactor, reactor)
        self.loop = (await attach_loop_devices(runner, self.dir, [DISK_SIZE],
                                               self.addCleanup))[0]
        self.image = mbr_disk_image(IMAGE_SIZE, hashlib.sha512)
        self.root = Resource()
        server = reactor.listenTCP(0, Site(self.root), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        self.base = f"http://127.0.0.1:{server.getHost().port}"
        self.agent = start_agent(self, self.dir, sandbox=[self.loop], debug=False)
        self.port = self.agent.port

        async def up() -> bool:
            response = await treq.get(f"http://127.0.0.1:{self.port}/v1/status", timeout=2,
                                      persistent=False)
            return response.code == 200

        await poll(up, timeout=30)

    def serve(self, name: str, resource: Resource) -> str:
        self.root.putChild(name.encode(), resource)
        return f"{self.base}/{name}"

    async def prepare(self, url: str, data: bytes) -> dict[str, Any]:
        body = {"name": "standby.prepare_image", "params": {"image_info": {
            "id": "img", "urls": [url], "os_hash_algo": "sha256",
            "os_hash_value": hashlib.sha256(data).hexdigest()}}}
        response = await treq.post(f"http://127.0.0.1:{self.port}/v1/commands/?wait=true",
                                   json=body, timeout=240, persistent=False)
        result: dict[str, Any] = await response.json()
        return result

    def disk(self, length: int) -> bytes:
        with open(self.loop.path, "rb") as f:
            return f.read(length)

    async def test_compressed_images(self) -> None:
        for name, compress in (("img.gz", gzip.compress), ("img.xz", lzma.compress),
                               ("img.bz2", bz2.compress)):
            data = compress(self.image)
            with open(self.loop.path, "r+b") as f:
                f.write(bytes(IMAGE_SIZE))
            result = await self.prepare(self.serve(name, ImageResource(data)), data)
            self.assertEqual(result["command_status"], "SUCCEEDED", (name, result))
            self.assertEqual(self.disk(IMAGE_SIZE), self.image, name)

    async def test_zstd_image(self) -> None:
        if shutil.which("zstd") is None:
            raise self.skipTest("zstd is not installed")
        runner = ProcessRunner(reactor, reactor)
        data, _ = await runner.execute("zstd", "-q", "-c", stdin=self.image, timeout=60)
        result = await self.prepare(self.serve("img.zst", ImageResource(data)), data)
        self.assertEqual(result["command_status"], "SUCCEEDED", result)
        self.assertEqual(self.disk(IMAGE_SIZE), self.image)

    async def test_dropped_connections_resume(self) -> None:
        resource = ImageResource(self.image, cuts=[3 * MiB, 9 * MiB, 20 * MiB])
        result = await self.prepare(self.serve("cut.raw", resource), self.image)
        self.assertEqual(result["command_status"], "SUCCEEDED", result)
        self.assertEqual(self.disk(IMAGE_SIZE), self.image)
        ranges = [r["range"] for r in resource.requests]
        self.assertEqual(ranges[0], None)
        self.assertEqual(len(ranges), 4, ranges)
        self.assertTrue(all(r and r.startswith("bytes=") for r in ranges[1:]), ranges)

    async def test_wrong_bytes_fail_and_wipe(self) -> None:
        wrong = bytearray(self.image)
        wrong[5 * MiB] ^= 0xFF
        result = await self.prepare(self.serve("wrong.raw", ImageResource(bytes(wrong))),
                                    self.image)
        self.assertEqual(result["command_status"], "FAILED", result)
        self.assertEqual(result["command_error"]["type"], "ImageChecksumError")
        self.assertEqual(self.disk(MiB), bytes(MiB), "partition table left behind")
