"""Tests for ipa_twisted.system_logs: fake programs, real files, the real reactor's threads."""

from __future__ import annotations

import base64
import io
import os
import tarfile
from collections.abc import Mapping
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from ipa_twisted.errors import CommandExecutionError
from ipa_twisted.process import ProcessExecutionError, ProcessRunner
from ipa_twisted.system_logs import (
    COMMAND_TIMEOUT, COMMANDS, ERRORS, JOURNAL, MANIFEST, collect_system_logs,
    gzip_and_base64encode)
from ipa_twisted.testing.fake_process import FakeRunner

Output = bytes | Exception


def fake_runner(outputs: Mapping[str, Any], hold: bool = False) -> FakeRunner:
    """The shared FakeRunner answering ``outputs``, keyed by whole command line or by
    program name; programs named nowhere are not installed."""
    return FakeRunner({tuple(line.split()): output for line, output in outputs.items()},
                      unknown_missing=True, hold=hold)


def calls(runner: FakeRunner) -> dict[tuple[str, ...], dict[str, Any]]:
    return {call.argv: call.kwargs for call in runner.calls}


def all_tools(journal: bytes = b"-- journal --\nboot ok\n") -> dict[str, Output]:
    outputs: dict[str, Output] = {" ".join(argv): f"output of {' '.join(argv)}\n".encode()
                                  for _, argv, _ in COMMANDS}
    outputs["journalctl"] = journal
    return outputs


def unpack(encoded: str) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(encoded)), mode="r:gz") as tar:
        members = {}
        for member in tar.getmembers():
            content = tar.extractfile(member)
            assert content is not None, member.name
            members[member.name] = content.read()
        return members


class SystemLogsTests(TestCase):
    def make_tree(self, files: Mapping[str, bytes]) -> str:
        top = self.mktemp()
        os.makedirs(top)
        for name, content in files.items():
            path = os.path.join(top, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
        return top

    async def collect(self, runner: FakeRunner, **kw: Any) -> dict[str, bytes]:
        kw.setdefault("proc_path", self.make_tree({"mdstat": b"Personalities : [raid1]\n"}))
        kw.setdefault("var_log", self.make_tree({"should-not-be-read.log": b"no\n"}))
        return unpack(await collect_system_logs(runner, reactor, **kw))  # type: ignore[arg-type]

    async def test_archive_holds_journal_and_command_outputs(self) -> None:
        runner = fake_runner(all_tools())
        members = await self.collect(runner, journald_max_lines=500)
        expected = {MANIFEST, JOURNAL, "mdstat"} | {name for name, _, _ in COMMANDS}
        self.assertEqual(set(members), expected)
        self.assertEqual(members[JOURNAL], b"-- journal --\nboot ok\n")
        self.assertEqual(members["mdstat"], b"Personalities : [raid1]\n")
        self.assertEqual(members["ip_addr"], b"output of ip addr\n")
        self.assertEqual(members["ip_route_v6"], b"output of ip -6 route\n")
        self.assertEqual(members["lsblk"], b"output of lsblk -a\n")
        self.assertEqual(members["udevadm"], b"output of udevadm info --export-db\n")
        called = calls(runner)
        self.assertIn(("journalctl", "--full", "--no-pager", "-b", "-n", "500"), called)
        self.assertIn(("ps", "aux"), called)
        self.assertEqual(called[("dmesg",)]["timeout"], COMMAND_TIMEOUT)
        manifest = members[MANIFEST].decode()
        for name in expected - {MANIFEST}:
            self.assertIn(f"\n{name}\t", manifest)
        self.assertNotIn("truncated", manifest)

    async def test_whole_journal_without_max_lines(self) -> None:
        runner = fake_runner(all_tools())
        await self.collect(runner)
        self.assertIn(("journalctl", "--full", "--no-pager", "-b"), calls(runner))

    async def test_var_log_without_journalctl(self) -> None:
        outputs = all_tools()
        del outputs["journalctl"]
        self.assertNotIn("journalctl", " ".join(outputs))
        var_log = self.make_tree({"syslog": b"Jan 1 kernel: hello\n",
                                  "nested/agent.log": b"agent started\n",
                                  "wtmp": b"\x00\x01binary\x00",
                                  "old.log.gz": b"\x1f\x8b compressed"})
        os.symlink(os.path.join(var_log, "syslog"), os.path.join(var_log, "link.log"))
        members = await self.collect(fake_runner(outputs), var_log=var_log)
        self.assertNotIn(JOURNAL, members)
        logs = {name: data for name, data in members.items() if name.startswith("var_log/")}
        self.assertEqual(logs, {"var_log/syslog": b"Jan 1 kernel: hello\n",
                                "var_log/nested/agent.log": b"agent started\n"})
        self.assertNotIn(ERRORS, members)  # journald being absent is not a problem
        self.assertIn("wtmp (binary)", members[MANIFEST].decode())

    async def test_failing_journalctl_falls_back_to_var_log(self) -> None:
        outputs = all_tools()
        outputs["journalctl"] = ProcessExecutionError(("journalctl",), 1, b"", b"no journal")
        var_log = self.make_tree({"messages": b"a message\n"})
        members = await self.collect(fake_runner(outputs), var_log=var_log)
        self.assertEqual(members["var_log/messages"], b"a message\n")
        self.assertIn(b"journal: 'journalctl --full --no-pager -b' failed", members[ERRORS])

    async def test_missing_tools_and_files_are_noted(self) -> None:
        outputs: dict[str, Output] = {
            "journalctl": b"journal\n", "ip": b"1: lo: <LOOPBACK>\n",
            "dmesg": ProcessExecutionError(("dmesg",), 1, b"", b"dmesg: Operation not permitted"),
            "df": ProcessExecutionError(("df", "-a"), 1, b"/dev/sda1 10 5\n", b"df: /x: gone")}
        empty_proc = self.make_tree({})
        members = await self.collect(fake_runner(outputs), proc_path=empty_proc,
                                     extra_files=["/nonexistent/file.log"])
        errors = members[ERRORS].decode()
        for name, argv, _ in COMMANDS:
            if argv[0] not in outputs:  # keyed by program here
                self.assertIn(f"{name}: {argv[0]} is not installed\n", errors)
        self.assertIn("dmesg: 'dmesg' failed (exit code 1): dmesg: Operation not permitted",
                      errors)
        self.assertIn("mdstat: ", errors)
        self.assertIn("nonexistent/file.log: /nonexistent/file.log does not exist", errors)
        self.assertNotIn("dmesg", members)
        self.assertEqual(members["df"], b"/dev/sda1 10 5\n")  # a partial output is kept
        self.assertEqual(members["ip_addr"], b"1: lo: <LOOPBACK>\n")
        self.assertIn(f"problem(s) noted in {ERRORS}", members[MANIFEST].decode())

    async def test_extra_files(self) -> None:
        extra = os.path.join(self.make_tree({"agent.conf": b"[DEFAULT]\n"}), "agent.conf")
        members = await self.collect(fake_runner(all_tools()), extra_files=[extra])
        self.assertEqual(members[extra.lstrip("/")], b"[DEFAULT]\n")

    async def test_huge_journal_is_cut_to_max_bytes(self) -> None:
        line = b"x" * 99 + b"\n"
        journal = line * 500_000 + b"the last line\n"  # 50 MB
        max_bytes = 1024 * 1024
        members = await self.collect(fake_runner(all_tools(journal)), max_bytes=max_bytes)
        self.assertLessEqual(sum(map(len, members.values())), max_bytes)
        self.assertGreater(len(members[JOURNAL]), max_bytes * 0.9)
        self.assertTrue(members[JOURNAL].startswith(b"[ipa-twisted: truncated: the first "))
        self.assertTrue(members[JOURNAL].endswith(line * 10 + b"the last line\n"))
        self.assertEqual(members["ip_addr"], b"output of ip addr\n")  # small ones stay whole
        self.assertIn(f"truncated: last {len(members[JOURNAL]) - members[JOURNAL].index(b'x')}"
                      f" of {len(journal)} bytes", members[MANIFEST].decode())

    async def test_tiny_cap_still_builds_an_archive(self) -> None:
        members = await self.collect(fake_runner(all_tools()), max_bytes=10)
        self.assertIn(MANIFEST, members)
        self.assertEqual(sum(len(v) for k, v in members.items() if k != MANIFEST), 0)

    async def test_big_var_log_files_are_read_as_tails(self) -> None:
        outputs = all_tools()
        del outputs["journalctl"]
        var_log = self.make_tree({"big.log": b"old\n" * 1_000_000 + b"newest\n",
                                  "small.log": b"small\n"})
        max_bytes = 64 * 1024
        members = await self.collect(fake_runner(outputs), var_log=var_log,
                                     max_bytes=max_bytes)
        self.assertLessEqual(sum(map(len, members.values())), max_bytes)
        self.assertEqual(members["var_log/small.log"], b"small\n")
        self.assertTrue(members["var_log/big.log"].endswith(b"old\nnewest\n"))
        self.assertIn(b"truncated", members["var_log/big.log"])

    async def test_commands_start_together(self) -> None:
        runner = fake_runner(all_tools(), hold=True)
        proc = self.make_tree({"mdstat": b""})
        collecting = Deferred.fromCoroutine(
            collect_system_logs(runner, reactor, proc_path=proc))  # type: ignore[arg-type]
        self.assertEqual(sorted(argv[0] for argv in runner.argvs),
                         sorted(["journalctl"] + [argv[0] for _, argv, _ in COMMANDS]))
        self.assertEqual(runner.pending, len(COMMANDS) + 1)
        self.assertNoResult(collecting)
        runner.release()
        members = unpack(await collecting)
        self.assertEqual(members["ps"], b"output of ps aux\n")

    async def test_archive_failure_is_a_command_execution_error(self) -> None:
        outputs: dict[str, Any] = all_tools()
        outputs["ps aux"] = lambda argv: ("text, not bytes", b"")  # breaks the tar writer
        with self.assertRaises(CommandExecutionError):
            await self.collect(fake_runner(outputs))
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    async def test_on_this_machine(self) -> None:
        runner = ProcessRunner(reactor, reactor)  # type: ignore[arg-type]
        members = unpack(await collect_system_logs(runner, reactor,  # type: ignore[arg-type]
                                                   journald_max_lines=100))
        self.assertIn(MANIFEST, members)
        self.assertTrue("dmesg" in members or b"dmesg: " in members.get(ERRORS, b""),
                        sorted(members))
        self.assertIn(b"lo", members["ip_addr"])


class GzipAndBase64EncodeTests(TestCase):
    def test_buffers_and_files(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(b"file content")
        members = unpack(gzip_and_base64encode({"a": b"one", "dir/b": b""}, [path]))
        self.assertEqual(members, {"a": b"one", "dir/b": b"", path.lstrip("/"): b"file content"})

    def test_empty(self) -> None:
        self.assertEqual(unpack(gzip_and_base64encode({})), {})
