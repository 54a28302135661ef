"""A real Ironic deploys, through our agent, an image from a server that demands HTTP basic auth.

Ironic is configured as an operator would (``[deploy] image_server_auth_strategy =
http_basic`` with ``image_server_user``/``image_server_password``, credentials sent to
127.0.0.1 only): it checks the image URL itself with them and hands them to the agent in
``image_info``; the agent must send them, or the server answers 401. The agent runs in the
disk sandbox; its disk is a loop device.
"""

from __future__ import annotations

import base64
import hashlib
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.sandbox import attach_loop_devices
from tests.image_server import ImageResource
from tests.images import mbr_disk_image
from tests.ironic.harness import skip_reason, start_agent, start_ironic
from tests.processes import physical_macs

MiB = 1024 * 1024
IMAGE_SIZE = 32 * MiB
DISK_SIZE = 2 * 1024 * MiB
USER, PASSWORD = "images", "only-for-ironic"


class RealIronicImageServerAuthTests(TestCase):
    timeout = 300

    async def setUp(self) -> None:
        reason = skip_reason(macs=True, loop_devices=True)
        if reason:
            raise self.skipTest(reason)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        runner = ProcessRunner(reactor, reactor)
        self.loop = (await attach_loop_devices(runner, self.dir, [DISK_SIZE],
                                               self.addCleanup))[0]
        self.image = mbr_disk_image(IMAGE_SIZE)
        self.resource = ImageResource(self.image, basic_auth=(USER, PASSWORD))
        root = Resource()
        root.putChild(b"disk.raw", self.resource)
        server = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        self.url = f"http://127.0.0.1:{server.getHost().port}/disk.raw"
        self.ironic = await start_ironic(self, self.dir, heartbeat_timeout=10,
                                         options={"deploy": {
                                             "image_server_auth_strategy": "http_basic",
                                             "image_server_user": USER,
                                             "image_server_password": PASSWORD,
                                             "image_server_auth_hosts": "127.0.0.1"}})

    async def test_deploy_from_a_basic_auth_image_server(self) -> None:
        uuid = await self.ironic.enroll_node(
            physical_macs(), properties={"root_device": {"name": self.loop.path},
                                         "local_gb": 1, "cpu_arch": "x86_64"})
        await self.ironic.deploy(uuid, {
            "image_source": self.url, "image_os_hash_algo": "sha256",
            "image_os_hash_value": hashlib.sha256(self.image).hexdigest(),
            "image_disk_format": "raw", "root_gb": 1})
        await self.ironic.wait_for_state(uuid, "wait call-back", timeout=60)
        agent = start_agent(self, self.ironic, self.dir, sandbox=[self.loop])
        node = await self.ironic.wait_for_state(uuid, "active", timeout=240)
        self.assertIsNone(node["last_error"])
        with open(self.loop.path, "rb") as f:
            self.assertEqual(f.read(IMAGE_SIZE), self.image)
        header = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        # Ironic's own check of the URL and the agent's download, all with the credentials
        self.assertEqual({(r["method"], r["authorization"]) for r in self.resource.requests},
                         {("HEAD", header), ("GET", header)})
        self.assertNotIn(PASSWORD.encode(), agent.output)   # never logged
