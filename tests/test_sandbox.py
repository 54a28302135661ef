"""Tests for the loop device sandbox (ipa_twisted.testing.sandbox)."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.fake_process import FakeRunner
from ipa_twisted.testing.sandbox import (LoopDevice, LoopOnlyRunner, attach_loop_devices,
                                         loop_devices_of, loop_devices_unavailable,
                                         sandbox_argv, spawn_in_sandbox, run_in_sandbox)

MiB = 1 << 20
BASIC = {"null", "zero", "full", "random", "urandom", "tty", "fd", "stdin", "stdout",
         "stderr", "shm"}
PROBE = """
import os, stat, sys
for name, path in (("sysrq", "/proc/sysrq-trigger"),
                   ("drop_caches", "/proc/sys/vm/drop_caches")):
    if os.path.exists(path):
        st = os.stat(path)
        print(name, stat.S_ISCHR(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev))
    else:
        print(name, "absent")
print("dev", " ".join(sorted(os.listdir("/dev"))))
"""


MAKE_PARTITION = """
import os, sys
from twisted.internet import task
from twisted.internet.defer import Deferred
from ipa_twisted.config import AgentConfig
from ipa_twisted.blockdev import disks
from ipa_twisted.context import HardwareContext
from ipa_twisted.process import ProcessRunner

async def main(reactor, disk):
    context = HardwareContext(AgentConfig(), ProcessRunner(reactor, reactor), reactor, reactor)
    print("before:" + ",".join(n for n in sorted(os.listdir("/dev")) if n.startswith("loop")))
    await context.runner.execute("parted", "-s", disk, "--", "mklabel", "gpt", "mkpart", "p",
                                 "fat32", "1MiB", "8MiB")
    await disks.rescan_device(context, disk)
    part = disks.partition_index_to_path(disk, 1)
    await disks.wait_for_partition(context, disk, part)
    print("after:" + ",".join(n for n in sorted(os.listdir("/dev")) if n.startswith("loop")))
    await context.runner.execute("mkfs.vfat", part)
    print("TYPE=" + (await disks.probe(context, part))["TYPE"])

task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1])))
"""


class ArgvTests(SynchronousTestCase):
    def test_argv(self) -> None:
        argv = sandbox_argv([LoopDevice("/dev/loop7", "/tmp/a", 1), "/dev/loop8"],
                            ["twistd", "-n", "ipa"])
        self.assertEqual(argv[:5], ["unshare", "--mount", "--propagation", "private", "--"])
        self.assertEqual(argv[5:8], [sys.executable, "-m", "ipa_twisted.testing.sandbox_init"])
        self.assertEqual(argv[8:12], ["--outer-ns", os.readlink("/proc/self/ns/mnt"),
                                      "--outer-net", os.readlink("/proc/self/ns/net")])
        self.assertEqual(argv[12:], ["--loop", "/dev/loop7", "--loop", "/dev/loop8", "--",
                                     "twistd", "-n", "ipa"])
        self.assertIn("--no-shadow", sandbox_argv([], ["true"], shadow=[]))
        self.assertIn("--shadow=/sbin/kexec", sandbox_argv([], ["true"],
                                                            shadow=["/sbin/kexec"]))

    def test_loop_only_runner(self) -> None:
        fake = FakeRunner({("lsblk",): b"", ("wipefs",): b""})
        runner = LoopOnlyRunner(fake, ["/dev/loop7"])
        self.successResultOf(runner.execute("lsblk", "-bia", "--json"))
        self.successResultOf(runner.execute("wipefs", "--all", "/dev/loop7p2"))
        self.successResultOf(runner.execute("wipefs", "if=/dev/zero", "/dev/loop7"))
        self.failureResultOf(runner.execute("wipefs", "--all", "/dev/sda"))
        self.failureResultOf(runner.execute("wipefs", "of=/dev/loop70"))
        self.assertEqual(fake.argvs[0], ("lsblk", "-bia", "--json", "/dev/loop7"))
        self.assertEqual(len(fake.argvs), 3)
        self.assertEqual(len(runner.refused), 2)


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[tuple[bytes, Failure]] = Deferred()
        self.out: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback((b"".join(self.out), reason))


class SandboxTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        reason = loop_devices_unavailable()
        if reason is not None:
            raise SkipTest(reason)
        self.runner = ProcessRunner(reactor, reactor)

    async def test_private_dev_and_shadows(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        trigger_exists = os.path.exists("/proc/sysrq-trigger")
        loops = await attach_loop_devices(self.runner, workdir, [16 * MiB, 16 * MiB],
                                          self.addCleanup)
        await self.runner.execute("parted", "-s", loops[0].path, "--", "mklabel", "gpt",
                                  "mkpart", "p", "1MiB", "8MiB")
        await self.runner.execute("partprobe", loops[0].path)
        outside_dev = sorted(n for n in os.listdir("/dev") if not n.startswith("loop"))
        out, _ = await run_in_sandbox(self.runner, loops, [sys.executable, "-c", PROBE])
        lines = dict(line.split(" ", 1) for line in out.decode().splitlines())
        names = {os.path.basename(loop.path) for loop in loops}
        names.add(os.path.basename(loops[0].path) + "p1")
        self.assertEqual(set(lines["dev"].split()), BASIC | names)
        if trigger_exists:
            self.assertEqual(lines["sysrq"], "True 1 3")
        else:
            self.assertEqual(lines["sysrq"], "absent")
        # standby.sync in there drops no cache of the host's
        self.assertEqual(lines["drop_caches"],
                         "True 1 3" if os.path.exists("/proc/sys/vm/drop_caches")
                         else "absent")

        # reboot and poweroff do nothing in there
        out, _ = await run_in_sandbox(self.runner, loops, [
            "sh", "-c", "reboot -f && poweroff -f && echo survived"])
        self.assertEqual(out, b"survived\n")

        # outside, nothing changed
        self.assertEqual(sorted(n for n in os.listdir("/dev") if not n.startswith("loop")),
                         outside_dev)
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            self.assertNotIn(" /dev tmpfs ", f.read().replace(" - tmpfs", " tmpfs"))
        if trigger_exists:
            self.assertFalse(stat.S_ISCHR(os.stat("/proc/sysrq-trigger").st_mode))
        self.assertTrue(stat.S_ISBLK(os.stat(loops[0].path).st_mode))

    async def test_no_interface_of_this_machine_goes_down(self) -> None:
        # A name no interface has: were the guard missing, the real ip would fail on it
        # (and nothing of this machine could be touched either way).
        loops = await attach_loop_devices(self.runner, os.path.abspath(self.mktemp()),
                                          [8 * MiB], self.addCleanup)
        out, _ = await run_in_sandbox(self.runner, loops, [
            "sh", "-c", "ip link set ipa-no-such-if down && echo refused-quietly && "
            "cat /dev/shm/ipa-sandbox-guard/refused.log && ip -o link show lo"])
        lines = out.decode().splitlines()
        self.assertEqual(lines[:2], ["refused-quietly", "ip link set ipa-no-such-if down"])
        self.assertIn("lo:", lines[2])     # other uses reach the real ip

    async def test_partition_nodes_appear_without_udev(self) -> None:
        loops = await attach_loop_devices(self.runner, os.path.abspath(self.mktemp()),
                                          [16 * MiB], self.addCleanup)
        out, _ = await run_in_sandbox(self.runner, loops, [
            sys.executable, "-c", MAKE_PARTITION, loops[0].path], timeout=60)
        name = os.path.basename(loops[0].path)
        self.assertEqual(out.decode().split(), [f"before:{name}", f"after:{name},{name}p1",
                                                "TYPE=vfat"])

    async def test_long_running_command(self) -> None:
        loops = await attach_loop_devices(self.runner, os.path.abspath(self.mktemp()),
                                          [8 * MiB], self.addCleanup)
        protocol = _Collect()
        spawn_in_sandbox(reactor, protocol, loops, ["sh", "-c", "ls /dev | grep loop"])
        out, reason = await protocol.ended
        self.assertIsInstance(reason.value, ProcessDone)
        self.assertEqual(out.decode().split(), [os.path.basename(loops[0].path)])

    async def test_refuses_outside_a_private_namespace(self) -> None:
        argv = [sys.executable, "-m", "ipa_twisted.testing.sandbox_init", "--outer-ns",
                os.readlink("/proc/self/ns/mnt"), "--", "true"]
        from ipa_twisted.testing.sandbox import sandbox_env
        out, err = await self.runner.execute(*argv, env=sandbox_env(),
                                             check_exit_code=[125])
        self.assertIn(b"not in a private mount namespace", err)

    async def test_cleanup_detaches(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        cleanups: list[tuple[Callable[..., object], tuple[object, ...]]] = []

        def add_cleanup(f: Callable[..., object], *args: object) -> None:
            cleanups.append((f, args))
        loops = await attach_loop_devices(self.runner, workdir, [8 * MiB], add_cleanup)
        self.assertEqual(await loop_devices_of(self.runner, loops[0].backing_file),
                         [loops[0].path])
        for f, args in reversed(cleanups):        # what trial does, last first
            result = f(*args)
            if isinstance(result, Deferred):
                await result
        self.assertFalse(os.path.exists(loops[0].backing_file))
        out, _ = await self.runner.execute("losetup", "--list", "--noheadings", "--output",
                                           "NAME,BACK-FILE")
        self.assertNotIn(loops[0].backing_file.encode(), out)
