"""Tests for ipa_twisted.testing.fake_process.FakeRunner."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.process import (CommandNotFoundError, ProcessExecutionError,
                                 ProcessTimeoutError)
from ipa_twisted.testing.fake_process import Exit, FakeRunner


class FakeRunnerTests(SynchronousTestCase):
    def test_exact_and_prefix_answers(self) -> None:
        runner = FakeRunner({("ip", "-j"): b"[]", ("ip", "-j", "addr"): ("out", "err"),
                             ("lscpu",): "Architecture: x86_64"})
        self.assertEqual(self.successResultOf(runner.execute("ip", "-j", "addr", "show")),
                         ("out", "err"))
        self.assertEqual(self.successResultOf(runner.execute("ip", "-j", "link")),
                         (b"[]", b""))
        self.assertEqual(self.successResultOf(runner.execute("lscpu")),
                         (b"Architecture: x86_64", b""))
        self.assertEqual(runner.argvs, [("ip", "-j", "addr", "show"), ("ip", "-j", "link"),
                                        ("lscpu",)])

    def test_records_keyword_arguments(self) -> None:
        runner = FakeRunner({("true",): b""})
        runner.execute("true", timeout=5)
        self.assertEqual(runner.calls[0].kwargs["timeout"], 5)

    def test_exit_codes_follow_check_exit_code(self) -> None:
        runner = FakeRunner({("grep",): Exit(1, b"", b"no match")})
        error = self.failureResultOf(runner.execute("grep"), ProcessExecutionError).value
        self.assertEqual((error.exit_code, error.stderr), (1, b"no match"))
        self.assertEqual(self.successResultOf(runner.execute("grep", check_exit_code=[0, 1])),
                         (b"", b"no match"))
        self.assertEqual(self.successResultOf(runner.execute("grep", check_exit_code=False)),
                         (b"", b"no match"))

    def test_unanswered_argv_of_known_program_fails(self) -> None:
        runner = FakeRunner({("ipmitool", "lan", "print", "1"): b"IP Address : 10.0.0.1"})
        self.failureResultOf(runner.execute("ipmitool", "lan", "print", "2"),
                             ProcessExecutionError)

    def test_missing_programs(self) -> None:
        runner = FakeRunner({("lsblk",): b""}, missing=["biosdevname"])
        self.failureResultOf(runner.execute("biosdevname", "-i", "eth0"),
                             CommandNotFoundError)
        self.assertIsNone(runner.which("biosdevname"))
        self.assertEqual(runner.which("lsblk"), "/usr/bin/lsblk")
        self.assertEqual(runner.which("dmidecode"), "/usr/bin/dmidecode")

    def test_unknown_programs_missing_when_told(self) -> None:
        runner = FakeRunner({("lsblk",): b""}, unknown_missing=True)
        self.failureResultOf(runner.execute("dmidecode"), CommandNotFoundError)
        self.assertIsNone(runner.which("dmidecode"))
        self.assertEqual(runner.which("lsblk"), "/usr/bin/lsblk")

    def test_exceptions_and_callables(self) -> None:
        runner = FakeRunner({("sleep",): ProcessTimeoutError(("sleep",), None, b"", b""),
                             ("echo",): lambda argv: " ".join(argv[1:]).encode()})
        self.failureResultOf(runner.execute("sleep", "9"), ProcessTimeoutError)
        self.assertEqual(self.successResultOf(runner.execute("echo", "a", "b")), (b"a b", b""))

    def test_hold_until_release(self) -> None:
        runner = FakeRunner({("a",): b"1", ("b",): b"2"}, hold=True)
        first, second = runner.execute("a"), runner.execute("b")
        self.assertNoResult(first)
        self.assertEqual(runner.pending, 2)
        runner.release_one()
        self.assertEqual(self.successResultOf(first), (b"1", b""))
        self.assertNoResult(second)
        runner.release()
        self.assertEqual(self.successResultOf(second), (b"2", b""))
        self.assertEqual(runner.pending, 0)

    def test_try_execute(self) -> None:
        runner = FakeRunner({("ok",): b"yes"}, missing=["gone"])
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(
            runner.try_execute("ok"))), (b"yes", b""))
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(
            runner.try_execute("gone"))))
