"""``skip_block_devices`` and the shared filesystem guard, on loop devices in the sandbox.

Each clean step runs in a fresh ``tests/sandboxed_agent.py`` (a private mount namespace whose
/dev holds only the test's loop devices) with the generic hardware manager, as the ramdisk
runs it, seeing only those loop devices. Three disks carry a partition table, an ext4 file
system and data; the node protects one of them by name. That disk's bytes stay identical
through ``erase_devices_metadata``, ``erase_devices`` and ``raid.create_configuration``
while the others are erased, then made RAID holders.

This machine's kernel may have no md driver, and md arrays are the whole host's (not the
sandbox's), so ``mdadm`` is a recording fake first on the sandboxed agent's PATH: the RAID
partitioning is real (parted on the loop devices), the array creation is recorded. The QEMU
ramdisk test (tests/test_qemu_ramdisk.py) covers real md arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from ipa_twisted.blockdev import disks
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.sandbox import (LoopDevice, attach_loop_devices,
                                         loop_devices_unavailable, run_in_sandbox)

MiB = 1 << 20
DISK_SIZE = 64 * MiB
TOOLS = ("parted", "sgdisk", "wipefs", "mkfs.ext4", "shred", "lsblk", "partprobe", "blkid")
VMFS_GPT = "AA31E02A-400F-11DB-9590-000C2911D1B8"

FAKE_MDADM = """\
#!{python}
# A recording mdadm: --create is logged (nothing is written), --detail answers from the log.
import json, os, sys
log = {log!r}
args = sys.argv[1:]
arrays = {{}}
if os.path.exists(log):
    with open(log) as f:
        for line in f:
            entry = json.loads(line)
            arrays[entry["device"]] = entry
if args[:1] == ["--create"]:
    count = int(args[args.index("--raid-devices") + 1])
    entry = {{"device": args[1], "name": args[args.index("--name") + 1],
              "level": args[args.index("--level") + 1], "members": args[-count:],
              "argv": args}}
    with open(log, "a") as f:
        f.write(json.dumps(entry) + "\\n")
    print(f"mdadm: array {{args[1]}} started.", file=sys.stderr)
elif args[:1] == ["--detail"] and args[1] in arrays:
    entry = arrays[args[1]]
    print(f"{{args[1]}}:\\n           Version : 1.2\\n        Raid Level : raid{{entry['level']}}")
    print(f"              Name : sandbox:{{entry['name']}}")
    print("    Number   Major   Minor   RaidDevice State")
    for number, member in enumerate(entry["members"]):
        print(f"       {{number}}     259       {{number}}        {{number}}      active sync   "
              f"{{member}}")
elif args[:1] == ["--examine"] and len(args) == 2:
    print(f"mdadm: No md superblock detected on {{args[1]}}.", file=sys.stderr)
    sys.exit(1)
elif args[:1] == ["--assemble"]:
    sys.exit(1)
else:
    print(f"fake mdadm: unexpected {{args}}", file=sys.stderr)
    sys.exit(1)
"""


class SandboxedProtectedDiskTests(TestCase):
    timeout = 300

    async def setUp(self) -> None:
        reason = loop_devices_unavailable(TOOLS)
        if reason:
            raise self.skipTest(reason)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.runner = ProcessRunner(reactor, reactor)
        self.loops = await attach_loop_devices(self.runner, self.dir, [DISK_SIZE] * 3,
                                               self.addCleanup)
        self.protected, self.first, self.second = self.loops
        fakes = os.path.join(self.dir, "fakes")
        os.makedirs(fakes)
        self.mdadm_log = os.path.join(self.dir, "mdadm.jsonl")
        with open(os.path.join(fakes, "mdadm"), "w") as f:
            f.write(FAKE_MDADM.format(python=sys.executable, log=self.mdadm_log))
        os.chmod(os.path.join(fakes, "mdadm"), 0o755)
        self.env = {"PATH": fakes + os.pathsep + os.environ.get("PATH", "")}
        for index, loop in enumerate(self.loops):
            await self.fill(loop, index)

    async def sh(self, *argv: str) -> str:
        out, _ = await self.runner.execute(*argv, timeout=60)
        return out.decode()

    async def fill(self, loop: LoopDevice, index: int) -> None:
        """A GPT, an ext4 file system in partition 1 and data throughout partition 2."""
        await self.sh("parted", "-s", "-a", "optimal", loop.path, "--", "unit", "MiB",
                      "mklabel", "gpt", "mkpart", "fs", "ext4", "1", "24",
                      "mkpart", "data", "24", "63")
        await self.sh("partprobe", loop.path)
        await self.sh("mkfs.ext4", "-q", "-F", "-L", f"disk{index}", loop.path + "p1")
        data = b"".join(hashlib.sha256(f"{index}:{i}".encode()).digest() * 128
                        for i in range(39 * MiB // 4096))
        with open(loop.path, "r+b") as f:
            f.seek(24 * MiB)
            f.write(data)

    def digest(self, loop: LoopDevice) -> str:
        """The hash of what is on the disk: its backing file (no block device cache)."""
        with open(loop.backing_file, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def node(self, **extra: Any) -> dict[str, Any]:
        return {"uuid": "protected-disks", "properties": {
            "skip_block_devices": [{"name": self.protected.path}]}, **extra}

    async def clean_step(self, step: str, node: dict[str, Any], interface: str = "deploy"
                         ) -> dict[str, Any]:
        spec = {"manager": "generic", "devices": [loop.path for loop in self.loops],
                "clean_step": step, "interface": interface, "node": node,
                "config": {"include_loop_devices": True}, "log": True}
        out, err = await run_in_sandbox(
            self.runner, self.loops, [sys.executable, "-m", "tests.sandboxed_agent",
                                      json.dumps(spec)], timeout=240, env=self.env)
        lines = out.decode().strip().splitlines()
        self.assertTrue(lines, err.decode(errors="replace")[-3000:])
        result: dict[str, Any] = json.loads(lines[-1])
        result["log"] = err.decode(errors="replace")
        return result

    def succeeded(self, result: dict[str, Any]) -> Any:
        self.assertEqual(result["status"], "SUCCEEDED",
                         f"{result['error']}\n{result['log'][-3000:]}")
        return result["result"]["clean_result"]

    async def signatures(self, loop: LoopDevice) -> str:
        return (await self.sh("wipefs", "--noheadings", loop.path)).strip()

    async def test_protected_disk_survives_erase_and_raid(self) -> None:
        before = self.digest(self.protected)
        protected_log = f"not erasing {self.protected.path}, protected by skip_block_devices"

        # -- erase_devices_metadata (the automated clean's priority-99 step) ----------------
        result = await self.clean_step("erase_devices_metadata", self.node())
        self.succeeded(result)
        self.assertEqual(self.digest(self.protected), before)
        self.assertIn("erase_devices_metadata: " + protected_log, result["log"])
        self.assertIn("skip_block_devices entry {'name': '%s'} matches it"
                      % self.protected.path, result["log"])
        for loop in (self.first, self.second):
            self.assertEqual(await self.signatures(loop), "", loop.path)
            with open(loop.path, "rb") as f:
                self.assertEqual(f.read(MiB), bytes(MiB))
        self.assertIn("gpt", await self.signatures(self.protected))

        # -- erase_devices: the others shredded to zeros -----------------------------------
        result = await self.clean_step("erase_devices", self.node())
        erased = self.succeeded(result)
        self.assertEqual(self.digest(self.protected), before)
        self.assertEqual(erased[self.protected.path],
                         "skipped: protected by skip_block_devices: skip_block_devices entry "
                         f"{{'name': '{self.protected.path}'}} matches it")
        zeros = hashlib.sha256(bytes(DISK_SIZE)).hexdigest()
        for loop in (self.first, self.second):
            self.assertEqual(erased[loop.path], "shred: 1 random pass(es) and a pass of zeros")
            self.assertEqual(self.digest(loop), zeros, loop.path)

        # -- create_configuration: RAID-1 over every disk it may use -----------------------
        raid_node = self.node(target_raid_config={"logical_disks": [
            {"size_gb": "MAX", "raid_level": "1", "controller": "software",
             "volume_name": "data"}]})
        result = await self.clean_step("create_configuration", raid_node, interface="raid")
        self.succeeded(result)
        self.assertEqual(self.digest(self.protected), before)
        self.assertIn(f"Software RAID: not using {self.protected.path}, protected by "
                      "skip_block_devices", result["log"])
        with open(self.mdadm_log) as f:
            [created] = [json.loads(line) for line in f]
        holders = [disks.partition_index_to_path(loop.path, 1)
                   for loop in (self.first, self.second)]
        self.assertEqual((created["name"], created["level"], created["members"]),
                         ("data", "1", holders))
        for loop in (self.first, self.second):
            table = await self.sh("parted", "-s", "-m", loop.path, "print")
            self.assertIn("raid", table.splitlines()[-1], table)

    async def test_shared_filesystem_stops_cleaning(self) -> None:
        await self.sh("sgdisk", "--typecode", f"2:{VMFS_GPT}", self.second.path)
        await self.sh("partprobe", self.second.path)
        digests = [self.digest(loop) for loop in self.loops]
        for step in ("erase_devices_metadata", "erase_devices"):
            result = await self.clean_step(step, {"uuid": "guarded"})
            self.assertEqual(result["status"], "FAILED", result)
            self.assertEqual(result["error"]["type"], "ProtectedDeviceError")
            self.assertIn(f"Protected VMware VMFS Partition (GPT) (on {self.second.path}p2) "
                          f"located on device {self.second.path}", result["error"]["details"])
            self.assertEqual([self.digest(loop) for loop in self.loops], digests, step)
        # protecting that disk by name lets cleaning go on with the others
        node = {"uuid": "guarded", "properties": {
            "skip_block_devices": [{"name": self.second.path}]}}
        result = await self.clean_step("erase_devices_metadata", node)
        self.succeeded(result)
        self.assertEqual(self.digest(self.second), digests[2], result["log"][-3000:])
        self.assertIn(f"erase_devices_metadata: not erasing {self.second.path}, protected by "
                      "skip_block_devices", result["log"])
        self.assertEqual(await self.signatures(self.first), "")
