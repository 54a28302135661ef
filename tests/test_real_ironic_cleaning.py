"""A real Ironic cleans a node automatically through our agent; ``skip_block_devices`` holds.

Ironic 39 runs with automated cleaning on and the erase steps at the priorities the agent
gives them (Ironic's defaults): ``provide`` takes the node through ``cleaning`` and ``clean
wait``, the agent (started then, as a booting ramdisk would be) runs
``erase_devices_metadata`` (99) and ``erase_devices`` (10) on two loop devices, and the node
becomes ``available``. The node's ``properties.skip_block_devices`` names one of them: its
bytes stay identical while the other is erased to zeros. A disk holding a VMFS partition
fails cleaning (``clean failed``, Ironic's ``last_error`` naming it) with every disk
untouched.

The agent runs in the disk sandbox (a private mount namespace whose /dev holds only the
loop devices). ``lsblk`` there still reads this machine's sysfs, so an ``lsblk`` first on
the agent's PATH hands the real one the two loop devices whenever it is asked about every
device (what ``LoopOnlyRunner`` does for the in-process tests): the agent lists, and could
only ever erase, those two.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.sandbox import LoopDevice, attach_loop_devices
from tests.ironic.harness import skip_reason, start_agent, start_ironic
from tests.processes import Child, child_env, physical_macs

MiB = 1 << 20
DISK_SIZE = 64 * MiB
HEARTBEAT_TIMEOUT = 10
VMFS_GPT = "AA31E02A-400F-11DB-9590-000C2911D1B8"
TOOLS = ("parted", "mkfs.ext4", "wipefs", "sgdisk", "shred", "blkid", "lsblk", "partprobe")

LSBLK_WRAPPER = """\
#!/bin/sh
# lsblk, told about the test's loop devices only whenever it is asked about every device.
for arg in "$@"; do
    case "$arg" in /*) exec {lsblk} "$@" ;; esac
done
exec {lsblk} "$@" {devices}
"""


class RealIronicCleaningTests(TestCase):
    timeout = 300

    async def setUp(self) -> None:
        reason = skip_reason(macs=True, tools=TOOLS, loop_devices=True)
        if reason:
            raise self.skipTest(reason)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.runner = ProcessRunner(reactor, reactor)
        self.loops = await attach_loop_devices(self.runner, self.dir, [DISK_SIZE] * 2,
                                               self.addCleanup)
        self.ironic = await start_ironic(self, self.dir, automated_clean=True,
                                         heartbeat_timeout=HEARTBEAT_TIMEOUT)

    async def fill(self, loop: LoopDevice, label: str) -> None:
        """A GPT with an ext4 file system, then data to the end of the disk."""
        await self.runner.execute("parted", "-s", loop.path, "--", "mklabel", "gpt",
                                  "mkpart", "fs", "ext4", "1MiB", "32MiB", timeout=60)
        await self.runner.execute("partprobe", loop.path, timeout=60)
        await self.runner.execute("mkfs.ext4", "-q", "-F", "-L", label, loop.path + "p1",
                                  timeout=60)
        with open(loop.path, "r+b") as f:
            f.seek(32 * MiB)
            f.write(hashlib.sha512(label.encode()).digest() * (31 * MiB // 64))

    def digest(self, loop: LoopDevice) -> str:
        with open(loop.backing_file, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def agent_env(self) -> dict[str, str]:
        fakes = os.path.join(self.dir, "fakes")
        os.makedirs(fakes, exist_ok=True)
        lsblk = shutil.which("lsblk")
        assert lsblk is not None
        with open(os.path.join(fakes, "lsblk"), "w") as f:
            f.write(LSBLK_WRAPPER.format(lsblk=lsblk, devices=" ".join(
                loop.path for loop in self.loops)))
        os.chmod(os.path.join(fakes, "lsblk"), 0o755)
        env = child_env()
        env["PATH"] = fakes + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        return env

    async def clean(self, properties: dict[str, Any], state: str) -> tuple[dict[str, Any],
                                                                         Child, float]:
        """Enroll a node, ``provide`` it, start the agent once Ironic waits for it; the node
        once it is in ``state``, the agent, and how long it took."""
        uuid = await self.ironic.enroll_node(
            physical_macs(), properties={"local_gb": 1, "cpu_arch": "x86_64", **properties},
            state="manageable")
        started = reactor.seconds()
        await self.ironic.set_provision_state(uuid, "provide")
        await self.ironic.wait_for_state(uuid, "clean wait", timeout=60)
        agent = start_agent(self, self.ironic, self.dir, sandbox=self.loops,
                            env=self.agent_env())
        node = await self.ironic.wait_for_state(uuid, state, timeout=240)
        return node, agent, reactor.seconds() - started

    async def test_automated_cleaning_keeps_the_protected_disk(self) -> None:
        protected, erased = self.loops
        await self.fill(protected, "keep")
        await self.fill(erased, "erase")
        before = self.digest(protected)
        node, agent, took = await self.clean(
            {"skip_block_devices": [{"name": protected.path}]}, "available")
        print(f"\n  automated cleaning: provide to available in {took:.1f}s")
        self.assertIsNone(node["last_error"])
        output = agent.output.decode(errors="replace")
        # Ironic ran both erase steps, at the agent's priorities, through the agent
        metadata = output.find("erase_devices_metadata: not erasing")
        shred = output.find("erase_devices: not erasing")
        self.assertGreater(metadata, -1, output[-4000:])
        self.assertGreater(shred, metadata, output[-4000:])
        self.assertIn(f"not erasing {protected.path}, protected by skip_block_devices: "
                      f"skip_block_devices entry {{'name': '{protected.path}'}} matches it",
                      output)
        self.assertEqual(self.digest(protected), before)
        self.assertEqual(self.digest(erased), hashlib.sha256(bytes(DISK_SIZE)).hexdigest())

    async def test_a_shared_filesystem_fails_cleaning_untouched(self) -> None:
        for index, loop in enumerate(self.loops):
            await self.fill(loop, f"disk{index}")
        vmfs = self.loops[1]
        await self.runner.execute("sgdisk", "--typecode", f"1:{VMFS_GPT}", vmfs.path,
                                  timeout=60)
        before = [self.digest(loop) for loop in self.loops]
        node, agent, _ = await self.clean({}, "clean failed")
        # found on the partition, or (when the kernel has not re-read the table sgdisk
        # changed, as here usually) in the disk's partition table itself
        self.assertIn("Clean step deploy.erase_devices_metadata failed", node["last_error"])
        self.assertRegex(node["last_error"], re.escape("Protected VMware VMFS Partition (GPT) (")
                         + f"(on {re.escape(vmfs.path)}p1|in its partition table)"
                         + re.escape(f") located on device {vmfs.path}"))
        self.assertIn("guard_special_filesystems", node["last_error"])
        self.assertEqual([self.digest(loop) for loop in self.loops], before)
