"""rescue.finalize_rescue, system.lockdown, service steps, and SHA-512 crypt."""

from __future__ import annotations

import os
import subprocess  # test-only: cross-check our crypt against openssl
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.agent import Agent
from ipa_twisted.commands import CommandResult
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions import default_extensions
from ipa_twisted.passwords import sha512_crypt
from ipa_twisted.startup.lockdown import LockdownService


class CryptTests(SynchronousTestCase):
    def test_known_vectors(self) -> None:
        # Vectors from the SHA-crypt specification.
        self.assertEqual(
            sha512_crypt("Hello world!", "saltstring"),
            "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFd"
            "cbYEdFCoEOfaS35inz1")
        self.assertEqual(
            sha512_crypt("Hello world!", "saltstringsaltstring", rounds=10000),
            "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/Ur"
            "jmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.")

    def test_matches_openssl(self) -> None:
        try:
            out = subprocess.run(["openssl", "passwd", "-6", "-salt", "abcdefgh", "p455w0rd"],
                                 capture_output=True, check=True, text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            raise self.skipTest("openssl passwd -6 is not available")
        self.assertEqual(sha512_crypt("p455w0rd", "abcdefgh"), out)

    def test_random_salt(self) -> None:
        one, two = sha512_crypt("x"), sha512_crypt("x")
        self.assertNotEqual(one, two)
        self.assertTrue(one.startswith("$6$"))
        self.assertEqual(sha512_crypt("x", one.split("$")[2]), one)


class RescueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.etc = os.path.abspath(self.mktemp())
        os.makedirs(self.etc)
        self.clock = Clock()
        self.agent = Agent(AgentConfig(etc_path=self.etc), self.clock,
                           runner=None, extensions=default_extensions())  # type: ignore
        self.stopped: list[float] = []
        self.agent.stop_wanted.wait().addCallback(
            lambda _: self.stopped.append(self.clock.seconds()))

    def run_cmd(self, name: str, **params: Any) -> CommandResult:
        return self.successResultOf(Deferred.fromCoroutine(
            self.agent.execute_command(name, params)))

    def test_finalize_rescue_writes_crypted_password_then_stops(self) -> None:
        result = self.run_cmd("rescue.finalize_rescue", rescue_password="p455w0rd")
        self.assertEqual(result.command_status.value, "SUCCEEDED")
        path = os.path.join(self.etc, "ipa-rescue-config", "ipa-rescue-password")
        with open(path) as f:
            crypted = f.read()
        self.assertEqual(sha512_crypt("p455w0rd", crypted.split("$")[2]), crypted)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertTrue(os.path.exists(os.path.join(self.etc, ".rescued")))
        self.assertEqual(self.stopped, [], "stops only after the answer went out")
        self.clock.advance(0.5)
        self.assertEqual(self.stopped, [0.5])

    def test_hashed_password_written_as_is(self) -> None:
        self.run_cmd("rescue.finalize_rescue", rescue_password="$6$x$y", hashed=True)
        with open(os.path.join(self.etc, "ipa-rescue-config", "ipa-rescue-password")) as f:
            self.assertEqual(f.read(), "$6$x$y")

    def test_password_required(self) -> None:
        failure = self.failureResultOf(Deferred.fromCoroutine(
            self.agent.execute_command("rescue.finalize_rescue", {})))
        self.assertEqual(failure.value.status_code, 400)


class Stoppable(Service):
    pass


class LockdownTests(SynchronousTestCase):
    def test_lockdown_closes_api_and_refuses_commands(self) -> None:
        # More in tests/test_lockdown.py. Fakes only: lockdown takes interfaces down.
        from ipa_twisted.testing.fake_process import Exit, FakeRunner
        from ipa_twisted.testing.fake_system import FakeSystem
        clock = Clock()
        system = FakeSystem(self.mktemp())
        system.add_interface("eth0", "52:54:00:12:34:56")
        runner = FakeRunner({("ip", "link", "set", "eth0", "down"): Exit(0)})
        agent = Agent(system.config(standalone=True), clock, runner,  # type: ignore[arg-type]
                      extensions=default_extensions())
        api, tree = Stoppable(), MultiService()
        api.setServiceParent(tree)
        LockdownService(agent, None, [api]).setServiceParent(tree)
        tree.startService()
        result = self.successResultOf(Deferred.fromCoroutine(
            agent.execute_command("system.lockdown", {})))
        self.assertEqual(result.command_status.value, "SUCCEEDED")
        self.assertTrue(api.running)
        clock.advance(1)
        self.assertFalse(api.running)
        self.assertEqual(runner.argvs, [("ip", "link", "set", "eth0", "down")])
        failure = self.failureResultOf(Deferred.fromCoroutine(
            agent.execute_command("system.lockdown", {})))
        self.assertIn("locked down", str(failure.value))
