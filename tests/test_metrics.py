"""Metrics to a real statsd-style UDP listener on 127.0.0.1, and the noop default."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from ipa_twisted.agent import Agent
from ipa_twisted.commands import sync_command
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions.base import Extension
from ipa_twisted.metrics import Metrics


class Listener(DatagramProtocol):
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.waiting: list[tuple[int, Deferred[list[str]]]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.lines.append(data.decode())
        for count, d in list(self.waiting):
            if len(self.lines) >= count:
                self.waiting.remove((count, d))
                d.callback(self.lines)

    def wait(self, count: int) -> Deferred[list[str]]:
        d: Deferred[list[str]] = Deferred()
        if len(self.lines) >= count:
            d.callback(self.lines)
        else:
            self.waiting.append((count, d))
        return d.addTimeout(10, reactor)


class Probe(Extension):
    name = "probe"

    @sync_command("ok")
    def ok(self) -> None:
        return None

    @sync_command("bad")
    def bad(self) -> None:
        raise ValueError("no")


class MetricsTests(TestCase):
    def setUp(self) -> None:
        self.listener = Listener()
        self.port = reactor.listenUDP(0, self.listener, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def config(self, **kw: Any) -> AgentConfig:
        return AgentConfig(metrics_backend="statsd", metrics_statsd_host="127.0.0.1",
                           metrics_statsd_port=self.port.getHost().port, **kw)

    async def test_prefixes_and_kinds(self) -> None:
        metrics = Metrics(reactor)
        self.addCleanup(metrics.close)
        config = self.config(metrics_global_prefix="ipa", metrics_prepend_uuid=True)
        metrics.counter(config, "node-1", "errors", 2)
        metrics.gauge(config, None, "temp", 42.5)
        with metrics.timer(config, "node-1", "work"):
            pass
        lines = await self.listener.wait(3)
        self.assertEqual(lines[0], "ipa.node-1.errors:2|c")
        self.assertEqual(lines[1], "ipa.temp:42.5|g")
        self.assertTrue(lines[2].startswith("ipa.node-1.work:") and lines[2].endswith("|ms"))

    async def test_commands_are_timed_and_failures_counted(self) -> None:
        agent = Agent(self.config(), reactor, runner=None,  # type: ignore[arg-type]
                      extensions=[Probe], reactor=reactor)
        self.addCleanup(agent.metrics.close)
        await agent.execute_command("probe.ok", {})
        await agent.execute_command("probe.bad", {})
        lines = await self.listener.wait(3)
        self.flushLoggedErrors(ValueError)
        names = [line.split(":")[0] for line in lines]
        self.assertEqual(names, ["ironic_python_agent.commands.ok",
                                 "ironic_python_agent.commands.bad",
                                 "ironic_python_agent.commands.bad.failed"])

    def test_noop_sends_nothing(self) -> None:
        metrics = Metrics(reactor)
        metrics.counter(AgentConfig(), None, "x")
        self.assertIsNone(metrics._sender)

    def test_collector_sends_nothing(self) -> None:
        """The reference's in-memory backend: accepted, and nothing leaves the agent."""
        metrics = Metrics(reactor)
        metrics.counter(AgentConfig(metrics_backend="collector"), None, "x")
        self.assertIsNone(metrics._sender)
