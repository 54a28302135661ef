"""``ironic-collect-introspection-data``: options, the daemon loop, and real runs."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted.config import AgentConfig, ConfigError
from ipa_twisted.errors import InspectionError
from ipa_twisted.inspector import cli
from ipa_twisted.process import ProcessExecutionError, ProcessRunner
from ipa_twisted.testing.fake_inspector import DEFAULT_NODE_UUID, FakeInspectionReceiver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*argv: str) -> cli.Options:
    options = cli.Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    def test_reference_spellings(self) -> None:
        options = parse("--inspection_callback_url", "http://10.0.0.1:5050/v1/continue",
                        "--introspection_daemon", "--introspection_daemon_post_interval",
                        "60", "--config-file", "/a.conf", "--config-file", "/b.conf",
                        "--debug")
        self.assertEqual(options["inspection_callback_url"],
                         "http://10.0.0.1:5050/v1/continue")
        self.assertTrue(options["introspection_daemon"])
        self.assertEqual(options["introspection_daemon_post_interval"], "60")
        self.assertEqual(options["config-files"], ["/a.conf", "/b.conf"])
        self.assertTrue(options["debug"])

    def test_dashed_spellings(self) -> None:
        options = parse("--inspection-callback-url=mdns", "--introspection-daemon",
                        "--inspection-collectors", "default,logs")
        self.assertEqual(options["inspection_callback_url"], "mdns")
        self.assertTrue(options["introspection_daemon"])
        self.assertEqual(options["inspection_collectors"], "default,logs")

    def test_bad_values(self) -> None:
        for argv in (["--inspection_callback_url", "ftp://x/"],
                     ["--introspection_daemon_post_interval", "0"],
                     ["--introspection_daemon_post_interval", "soon"],
                     ["--no-such-flag"]):
            self.assertRaises(usage.UsageError, parse, *argv)

    def test_help_lists_the_reference_flags(self) -> None:
        text = str(cli.Options())
        for flag in ("--inspection_callback_url", "--introspection_daemon",
                     "--introspection_daemon_post_interval", "--config-file", "--debug"):
            self.assertIn(flag, text)


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cmdline = self.mktemp()
        with open(self.cmdline, "w") as f:
            f.write("ipa-inspection-collectors=default,pci-devices ipa-debug=0\n")
        self.conf = self.mktemp()
        with open(self.conf, "w") as f:
            f.write("[DEFAULT]\nintrospection_daemon_post_interval = 120\n"
                    "inspection_callback_url = http://conf:5050/v1/continue\n")

    def config(self, *argv: str) -> AgentConfig:
        options = parse("--no-default-config-files", "--cmdline-path", self.cmdline,
                        "--config-file", self.conf, *argv)
        return cli.config_from_options(options)[0]

    def test_sources_merge(self) -> None:
        config = self.config()
        self.assertEqual(config.introspection_daemon_post_interval, 120.0)
        self.assertFalse(config.introspection_daemon)
        self.assertEqual(config.inspection_callback_url, "http://conf:5050/v1/continue")
        self.assertEqual(config.inspection_collectors, "default,pci-devices")

    def test_flags_win(self) -> None:
        config = self.config("--introspection_daemon", "--introspection_daemon_post_interval",
                             "30", "--inspection_callback_url", "mdns", "--debug",
                             "--inspection_collectors", "default")
        self.assertTrue(config.introspection_daemon)
        self.assertEqual(config.introspection_daemon_post_interval, 30.0)
        self.assertEqual(config.inspection_callback_url, "mdns")
        self.assertEqual(config.inspection_collectors, "default")
        self.assertTrue(config.debug)

    def test_defaults(self) -> None:
        options = parse("--no-default-config-files", "--cmdline-path", self.mktemp())
        config = cli.config_from_options(options)[0]
        self.assertEqual(config.introspection_daemon_post_interval, 300.0)
        self.assertIsNone(config.inspection_callback_url)

    def test_bad_file(self) -> None:
        with open(self.conf, "a") as f:
            f.write("introspection_daemon = maybe\n")
        self.assertRaises(ConfigError, self.config)


class RunTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runs: list[float] = []
        self.outcomes: list[Exception | None] = []

    async def inspect_once(self) -> tuple[str | None, Any]:
        self.runs.append(self.clock.seconds())
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        return DEFAULT_NODE_UUID, None

    def start(self, **config: Any) -> Deferred[int]:
        return Deferred.fromCoroutine(cli.run(AgentConfig(**config), self.inspect_once,
                                              self.clock))

    def test_once(self) -> None:
        self.assertEqual(self.successResultOf(self.start()), 0)
        self.assertEqual(self.runs, [0])

    def test_once_failing(self) -> None:
        self.outcomes = [InspectionError("refused with status 404")]
        with capturedLogs() as events:
            self.assertEqual(self.successResultOf(self.start()), 1)
        self.assertIn("refused", events[-1]["error"])

    def test_daemon_posts_every_interval_and_survives_failures(self) -> None:
        self.outcomes = [None, InspectionError("boom"), None]
        with capturedLogs():
            running = self.start(introspection_daemon=True)
            self.clock.pump([100.0] * 9)
        self.assertEqual(self.runs, [0, 300, 600, 900])
        self.assertNoResult(running)
        self.clock.advance(10)
        running.cancel()
        self.failureResultOf(running)

    def test_daemon_interval(self) -> None:
        running = self.start(introspection_daemon=True, introspection_daemon_post_interval=45)
        self.clock.pump([45.0] * 3)
        self.assertEqual(self.runs, [0, 45, 90, 135])
        running.cancel()
        self.failureResultOf(running)


class CommandTests(TestCase):
    """The command as a child process, posting this machine's data to a fake receiver."""

    timeout = 120

    def setUp(self) -> None:
        from twisted.internet import reactor
        self.reactor = reactor
        self.receiver = FakeInspectionReceiver(accept_any=True)
        self.receiver.add_node()
        self.port = self.receiver.listen(reactor)
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.runner = ProcessRunner(reactor, reactor)

    async def command(self, *argv: str) -> tuple[bytes, bytes]:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT,
                                                           os.environ.get("PYTHONPATH")]))}
        return await self.runner.execute(
            sys.executable, "-m", "ipa_twisted.inspector.cli", "--no-default-config-files",
            "--cmdline-path", os.devnull, *argv, timeout=90, env=env)

    async def test_to_ironic_inspector(self) -> None:
        _, err = await self.command("--inspection_callback_url", self.base + "/v1/continue")
        [received] = self.receiver.posts
        self.assertEqual((received.path, received.status), ("/v1/continue", 200))
        self.assertIn("inventory", received.data)
        self.assertIsNone(received.data["error"])
        expected = {name for name in os.listdir("/sys/class/net")
                    if os.path.lexists(f"/sys/class/net/{name}/device")}
        self.assertEqual({i["name"] for i in received.data["inventory"]["interfaces"]},
                         expected)
        self.assertIn(DEFAULT_NODE_UUID.encode(), err)

    async def test_to_ironic_from_api_url(self) -> None:
        await self.command("--api_url", self.base, "--inspection_collectors",
                           "default,pci-devices")
        [received] = self.receiver.posts
        self.assertEqual((received.path, received.status), ("/v1/continue_inspection", 202))
        self.assertEqual(received.headers["x-openstack-ironic-api-version"], "1.84")
        self.assertIn("pci_devices", received.data)

    async def test_refused(self) -> None:
        self.receiver.nodes.clear()
        error = None
        try:
            await self.command("--inspection_callback_url", self.base + "/v1/continue")
        except ProcessExecutionError as e:
            error = e
        assert error is not None
        self.assertEqual(error.exit_code, 1)
        self.assertIn(b"status 404", error.stderr)

    async def test_no_receiver(self) -> None:
        error = None
        try:
            await self.command()
        except ProcessExecutionError as e:
            error = e
        assert error is not None
        self.assertEqual(error.exit_code, 2)
        self.assertIn(b"no receiver", error.stderr)
