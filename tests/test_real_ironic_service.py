"""A real Ironic services a deployed node through our agent (``baremetal node service``).

The node is deployed (``custom-agent``: nothing written; its disk already holds an ext4
root file system made by the test), then serviced with the in-band ``deploy.inject_files``
step: Ironic boots the (fake) machine into the ramdisk, our agent looks up and heartbeats,
Ironic fetches the agent's service steps, checks the requested step and its arguments
against them and runs it; the node goes back to ``active`` and the file is in the file
system on the disk. The agent runs in the disk sandbox on a loop device, as in
``test_real_ironic_deploy``.
"""

from __future__ import annotations

import base64
import os

from twisted.trial.unittest import TestCase

from tests.ironic.harness import set_up_one_disk_node, start_agent
from tests.processes import Child, physical_macs

SERVICE_VERSION = "1.87"
DISK_SIZE = 256 * 1024 * 1024
CONTENT = b"serviced by ipa-twisted\n"
TOOLS = ("parted", "partprobe", "mkfs.ext4", "debugfs")


class RealIronicServiceTests(TestCase):
    timeout = 300

    async def setUp(self) -> None:
        await set_up_one_disk_node(self, DISK_SIZE, TOOLS)

    async def make_instance_disk(self) -> str:
        """A GPT disk with one ext4 partition holding /etc/hostname; the partition."""
        await self.runner.execute("parted", "-s", self.loop.path, "--", "mklabel", "gpt",
                                  "mkpart", "root", "ext4", "1MiB", "100%")
        await self.runner.execute("partprobe", self.loop.path)
        tree = os.path.join(self.dir, "tree")
        os.makedirs(os.path.join(tree, "etc"))
        with open(os.path.join(tree, "etc", "hostname"), "w") as f:
            f.write("instance\n")
        root = self.loop.path + "p1"
        await self.runner.execute("mkfs.ext4", "-q", "-L", "root", "-d", tree, root)
        return root

    async def debugfs(self, partition: str, request: str) -> str:
        """debugfs's answer (its errors go to stderr, which is then returned)."""
        out, err = await self.runner.execute("debugfs", "-R", request, partition)
        return out.decode(errors="replace") or err.decode(errors="replace")

    def start_agent(self, name: str) -> Child:
        return start_agent(self, self.ironic, self.dir, name=name, sandbox=[self.loop])

    async def test_service_injects_a_file_into_the_instance_disk(self) -> None:
        root = await self.make_instance_disk()
        uuid = await self.ironic.enroll_node(
            physical_macs(), deploy_interface="custom-agent",
            properties={"root_device": {"name": self.loop.path}})
        await self.ironic.deploy(uuid)
        await self.ironic.wait_for_state(uuid, "wait call-back", timeout=60)
        deploying = self.start_agent("deploy")
        await self.ironic.wait_for_state(uuid, "active", timeout=90)
        await deploying.stop("TERM")   # the machine reboots into its instance
        self.assertIn("File not found", await self.debugfs(root, "stat /etc/serviced"))

        step = {"interface": "deploy", "step": "inject_files", "args": {"files": [
            {"path": "/etc/serviced", "content": base64.b64encode(CONTENT).decode(),
             "mode": 0o640}]}}
        await self.ironic.request("PUT", f"/v1/nodes/{uuid}/states/provision",
                                  {"target": "service", "service_steps": [step]},
                                  microversion=SERVICE_VERSION, expect=[202])
        await self.ironic.wait_for_state(uuid, "service wait", timeout=60)
        servicing = self.start_agent("service")
        node = await self.ironic.wait_for_state(uuid, "active", timeout=120)
        self.assertIsNone(node["last_error"])
        self.assertIn(b"Executing command service.get_service_steps", servicing.output)
        self.assertIn(b"Executing command service.execute_service_step", servicing.output)
        await servicing.stop("TERM")
        self.assertEqual(await self.debugfs(root, "cat /etc/serviced"), CONTENT.decode())
        self.assertIn("Mode:  0640", await self.debugfs(root, "stat /etc/serviced"))
        self.assertEqual(await self.debugfs(root, "cat /etc/hostname"), "instance\n")
