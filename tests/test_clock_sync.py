"""Clock sync commands, on a FakeRunner: nothing here touches this machine's clock."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted import errors
from ipa_twisted.clock_sync import sync_clock
from ipa_twisted.config import AgentConfig
from ipa_twisted.testing.fake_process import Exit, FakeRunner


class ClockSyncTests(SynchronousTestCase):
    def run_sync(self, runner: FakeRunner, server: str | None = "ntp.example",
                 ignore: bool = False) -> Deferred[bool]:
        return Deferred.fromCoroutine(sync_clock(runner, AgentConfig(ntp_server=server),
                                                 ignore_errors=ignore))

    def test_no_server_does_nothing(self) -> None:
        runner = FakeRunner()
        self.assertFalse(self.successResultOf(self.run_sync(runner, server=None)))
        self.assertEqual(runner.calls, [])

    def test_chrony_preferred(self) -> None:
        runner = FakeRunner({("chronyc", "shutdown"): Exit(1), ("chronyd",): Exit(0),
                             ("ntpdate",): Exit(0)})
        self.assertTrue(self.successResultOf(self.run_sync(runner)))
        self.assertEqual(runner.argvs, [("chronyc", "shutdown"),
                                        ("chronyd", "-q", "server ntp.example iburst")])

    def test_ntpdate(self) -> None:
        runner = FakeRunner({("ntpdate",): Exit(0)}, unknown_missing=True)
        self.assertTrue(self.successResultOf(self.run_sync(runner)))
        self.assertEqual(runner.argvs, [("ntpdate", "ntp.example")])

    def test_no_tool(self) -> None:
        runner = FakeRunner({}, unknown_missing=True)
        self.failureResultOf(self.run_sync(runner), errors.ClockSyncError)
        self.assertFalse(self.successResultOf(self.run_sync(runner, ignore=True)))

    def test_failure(self) -> None:
        runner = FakeRunner({("ntpdate",): Exit(1, stderr=b"no server suitable")},
                            unknown_missing=True)
        failure = self.failureResultOf(self.run_sync(runner), errors.ClockSyncError)
        self.assertIn("no server suitable", str(failure.value))
