"""Tests for iscsi.start_iscsi_target and the iSCSI clean-up (ipa_twisted.extensions.iscsi).

Unit tests run on a FakeRunner. The real test (root, tgt installed) exports a loop device
with tgtd inside the disk sandbox and a private network namespace
(``tests/sandboxed_iscsi.py``), checks the LUN's backing store with ``tgtadm``, reads the
whole disk back over iSCSI with qemu's user-space initiator (libiscsi, ``iscsi://`` URLs)
and compares it with the loop device's file, then cleans up and kills tgtd.

The kernel initiator (open-iscsi's ``iscsiadm``) is not used: a login attaches a SCSI disk
to this machine's kernel, visible to all, and iscsid does not work per network namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipa_twisted import errors
from ipa_twisted.agent import Agent
from ipa_twisted.commands import CommandResult
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions import default_extensions
from ipa_twisted.extensions import iscsi
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_tgtd import SHOW, TARGETS, FakeTgtd, show_shape
from ipa_twisted.testing.sandbox import (attach_loop_devices, loop_devices_unavailable,
                                         sandbox_argv, sandbox_env)
from tests.test_bootloader import Disk

MiB = 1 << 20
IQN = "iqn.2008-10.org.openstack:node-1"
class ISCSITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.tgtd = FakeTgtd()
        self.runner = FakeRunner({("tgtd",): self.tgtd.start, SHOW: self.tgtd.show,
                                  ("tgtadm",): b""})
        self.clock = Clock()
        self.agent = Agent(AgentConfig(), self.clock, self.runner,  # type: ignore[arg-type]
                           managers=HardwareManagers([(Disk("/dev/sda"), 3)]),
                           extensions=default_extensions())

    def start(self, **params: Any) -> CommandResult:
        result: CommandResult = self.successResultOf(Deferred.fromCoroutine(
            self.agent.execute_command("iscsi.start_iscsi_target", params)))
        return result

    def tgt_calls(self) -> list[tuple[str, ...]]:
        return [argv for argv in self.runner.argvs if argv[0] in ("tgtd", "tgtadm")]


class StartTests(ISCSITestCase):
    def test_start(self) -> None:
        result = self.start(iqn=IQN, portal_port=3261)
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        self.assertEqual(result.command_result, {"iscsi_target_iqn": IQN})
        self.assertEqual(self.tgt_calls(), [
            SHOW, ("tgtd",), SHOW,
            ("tgtadm", "--lld", "iscsi", "--mode", "portal", "--op", "new", "--param",
             "portal=0.0.0.0:3261"),
            ("tgtadm", "--lld", "iscsi", "--mode", "target", "--op", "new", "--tid", "1",
             "--targetname", IQN),
            ("tgtadm", "--lld", "iscsi", "--mode", "logicalunit", "--op", "new", "--tid",
             "1", "--lun", "1", "--backing-store", "/dev/sda"),
            ("tgtadm", "--lld", "iscsi", "--mode", "target", "--op", "bind", "--tid", "1",
             "--initiator-address", "ALL")])
        self.assertEqual(self.agent.extensions["iscsi"].exported_device,  # type: ignore
                         "/dev/sda")

    def test_generated_iqn_default_port_running_tgtd(self) -> None:
        self.tgtd.running = True
        result = self.start()
        iqn = result.command_result["iscsi_target_iqn"]
        self.assertTrue(iqn.startswith("iqn.2008-10.org.openstack:"))
        self.assertEqual(len(iqn.split(":", 1)[1]), 36)
        self.assertNotIn(("tgtd",), self.runner.argvs)
        self.assertFalse(any("portal" in argv for argv in self.runner.argvs))

    def running(self, **params: Any) -> Deferred[CommandResult]:
        return Deferred.fromCoroutine(
            self.agent.execute_command("iscsi.start_iscsi_target", params))

    def test_waits_for_tgtd(self) -> None:
        self.tgtd.ready_after = 3
        running = self.running(iqn=IQN)
        self.assertNoResult(running)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertNoResult(running)
        self.clock.advance(1)
        result = self.successResultOf(running)
        self.assertEqual(result.command_status.value, "SUCCEEDED")
        self.assertEqual(self.runner.argvs.count(SHOW), 5)

    def test_tgtd_never_answers(self) -> None:
        self.runner.answers[("tgtd",)] = b""
        running = self.running(iqn=IQN)
        self.clock.pump([1] * 20)
        result = self.successResultOf(running)
        self.assertIsInstance(result.command_error, errors.ISCSICommandError)
        self.assertIn("ISCSI daemon didn't initialize", str(result.command_error))
        self.assertIn("107", str(result.command_error))
        self.assertEqual(self.runner.argvs.count(SHOW), 1 + iscsi.TGTD_WAIT_ATTEMPTS)

    def test_target_creation_fails(self) -> None:
        self.runner.answers[("tgtadm", "--lld", "iscsi", "--mode", "target", "--op",
                             "new")] = Exit(22, b"", b"tgtadm: this target already exists")
        result = self.start(iqn=IQN)
        self.assertIsInstance(result.command_error, errors.ISCSICommandError)
        self.assertIn("Error when adding a new target for iqn", str(result.command_error))
        self.assertIn("already exists", str(result.command_error))
        self.assertIsNone(self.agent.extensions["iscsi"].exported_device)  # type: ignore
        self.flushLoggedErrors()

    def test_tgtd_missing(self) -> None:
        self.runner.missing.add("tgtd")
        result = self.start(iqn=IQN)
        self.assertIn("Unable to start the ISCSI daemon", str(result.command_error))
        self.flushLoggedErrors()

    def test_port_out_of_range(self) -> None:
        result = self.start(portal_port=70000)
        self.assertIsInstance(result.command_error, errors.InvalidCommandParamsError)
        self.assertEqual(self.tgt_calls(), [])

    def test_parse_targets(self) -> None:
        self.assertEqual(iscsi.parse_targets(TARGETS), {
            1: (IQN, ["/dev/sda"]), 2: ("iqn.2008-10.org.openstack:other", ["/dev/sdb"])})


class BadParamsRefused(ISCSITestCase):
    def start(self, **params: Any) -> CommandResult:    # refused up front: 400
        failure = self.failureResultOf(Deferred.fromCoroutine(
            self.agent.execute_command("iscsi.start_iscsi_target", params)))
        result = CommandResult("start_iscsi_target", params, False)
        result.fail(failure.value)
        return result

    def test_types(self) -> None:
        for params in ({"portal_port": "3260"}, {"iqn": 5}, {"wipe_disk_metadata": "yes"}):
            self.assertIsInstance(self.start(**params).command_error,
                                  errors.InvalidCommandParamsError)


class CleanUpTests(ISCSITestCase):
    def test_clean_up_deletes_the_target_and_keeps_tgtd_for_others(self) -> None:
        self.tgtd.running, self.tgtd.targets = True, TARGETS
        context = self.agent.hardware_context()
        self.successResultOf(Deferred.fromCoroutine(iscsi.clean_up(context, "/dev/sda")))
        self.assertEqual(self.tgt_calls()[-1], (
            "tgtadm", "--lld", "iscsi", "--mode", "target", "--op", "delete", "--force",
            "--tid", "1"))

    def test_clean_up_stops_tgtd_when_nothing_is_left(self) -> None:
        self.tgtd.running, self.tgtd.targets = True, TARGETS.split("Target 2")[0]
        context = self.agent.hardware_context()
        self.successResultOf(Deferred.fromCoroutine(iscsi.clean_up(context, "/dev/sda")))
        self.assertEqual(self.tgt_calls()[-2:], [
            ("tgtadm", "--lld", "iscsi", "--mode", "target", "--op", "delete", "--force",
             "--tid", "1"),
            ("tgtadm", "--lld", "iscsi", "--mode", "system", "--op", "delete")])

    def test_nothing_to_clean_without_tgtd(self) -> None:
        context = self.agent.hardware_context()
        self.successResultOf(Deferred.fromCoroutine(iscsi.clean_up(context, "/dev/sda")))
        self.assertEqual(self.tgt_calls(), [SHOW])

    def test_install_bootloader_cleans_up_first(self) -> None:
        self.start(iqn=IQN)
        self.tgtd.targets = TARGETS.split("Target 2")[0]
        self.runner.calls.clear()
        result: CommandResult = self.successResultOf(Deferred.fromCoroutine(
            self.agent.execute_command("image.install_bootloader", {"root_uuid": None})))
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        self.assertIn(("tgtadm", "--lld", "iscsi", "--mode", "system", "--op", "delete"),
                      self.runner.argvs)
        self.assertIsNone(self.agent.extensions["iscsi"].exported_device)  # type: ignore


class WipeTests(TestCase):
    async def test_wipe_disk_metadata_first(self) -> None:
        disk = os.path.abspath(self.mktemp())
        with open(disk, "wb") as f:
            f.write(b"\xff" * (4 * MiB))
        tgtd = FakeTgtd()
        runner = FakeRunner({("tgtd",): tgtd.start, SHOW: tgtd.show, ("tgtadm",): b"",
                             ("wipefs",): b"", ("blockdev",): b""})
        agent = Agent(AgentConfig(), reactor, runner,  # type: ignore[arg-type]
                      managers=HardwareManagers([(Disk(disk), 3)]), reactor=reactor,
                      extensions=default_extensions())
        result = await agent.execute_command("iscsi.start_iscsi_target",
                                             {"iqn": IQN, "wipe_disk_metadata": True})
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        self.assertEqual(runner.argvs[:2], [("wipefs", "--force", "--all", disk),
                                            ("blockdev", "--rereadpt", disk)])
        with open(disk, "rb") as f:
            self.assertEqual(f.read(512), bytes(512))


class RealTgtdTests(TestCase):
    """tgtd exporting a loop device, read back over iSCSI, in private namespaces."""

    timeout = 300

    def setUp(self) -> None:
        reason = loop_devices_unavailable()
        for tool in ("tgtd", "tgtadm", "ip", "qemu-img"):
            if reason is None and shutil.which(tool) is None:
                reason = f"{tool} is not installed"
        if reason is not None:
            raise SkipTest(reason)
        self.runner = ProcessRunner(reactor, reactor)

    async def _libiscsi(self) -> bool:
        out, err = await self.runner.execute("qemu-img", "info", "iscsi://127.0.0.1:1/x/1",
                                             check_exit_code=False)
        return b"Unknown protocol" not in out + err

    async def test_export_and_read_back(self) -> None:
        loop, = await attach_loop_devices(self.runner, os.path.abspath(self.mktemp()),
                                          [8 * MiB], self.addCleanup)
        pattern = os.urandom(64 * 1024)
        with open(loop.backing_file, "r+b") as f:
            f.seek(MiB)
            f.write(pattern)
        copy = os.path.abspath(self.mktemp())
        readable = await self._libiscsi()
        spec = {"device": loop.path, "params": {"iqn": IQN, "portal_port": 3261},
                "copy_to": copy if readable else None}
        argv = ["unshare", "--net", "--", *sandbox_argv(
            [loop], [sys.executable, "-m", "tests.sandboxed_iscsi", json.dumps(spec)])]
        out, err = await self.runner.execute(*argv, env=sandbox_env(), timeout=240)
        lines = out.decode().strip().splitlines()
        self.assertTrue(lines, err.decode(errors="replace")[-3000:])
        report = json.loads(lines[-1])
        self.assertEqual(report.get("status"), "SUCCEEDED",
                         f"{report}\n{err.decode(errors='replace')[-3000:]}")
        self.assertEqual(report["result"], {"iscsi_target_iqn": IQN})
        # The listing the fake answers from has the real tgtadm's shape (target 1 of it).
        self.assertEqual(show_shape(report["show"]),
                         show_shape(TARGETS.split("Target 2")[0]), report["show"])
        targets = iscsi.parse_targets(report["show"])
        self.assertEqual(targets, {1: (IQN, [loop.path])})
        self.assertIn("Type: disk", report["show"])
        self.assertTrue(report["tgtd_stopped"], report)
        self.assertEqual(report["killed"], [])
        if not readable:
            raise SkipTest("qemu-img has no iscsi:// support (Debian package "
                           "qemu-block-extra): the LUN was not read back")
        self.assertTrue(report["copied"], report.get("copy_error"))
        with open(copy, "rb") as f, open(loop.backing_file, "rb") as g:
            self.assertEqual(f.read(), g.read())
