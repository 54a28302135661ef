"""The service tree's start-up order, lookup retries and heartbeat wiring, on a Clock."""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.agent import Agent
from ipa_twisted.commands import async_command
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions.base import Extension
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.inventory import NetworkInterface
from ipa_twisted.ironic.client import IronicClient
from ipa_twisted.process import ProcessExecutionError, ProcessRunner
from ipa_twisted.service import AgentService
from ipa_twisted.testing.fake_ironic import FakeIronic
from ipa_twisted.testing.fake_process_reactor import FakeProcessReactor

MAC = "52:54:00:12:34:56"
TOKEN = "s" * 40


class Interfaces:
    HARDWARE_MANAGER_NAME = "fake"
    HARDWARE_MANAGER_VERSION = "1"

    def evaluate_hardware_support(self) -> int:
        return 1

    def list_network_interfaces(self) -> list[NetworkInterface]:
        return [NetworkInterface(name="eth0", mac_address=MAC),
                NetworkInterface(name="eth1", mac_address="52:54:00:00:00:02")]


class Gate(Extension):
    name = "gate"
    gate: Deferred[None]

    @async_command("wait")
    async def wait(self) -> None:
        await type(self).gate


class Recorder(Service):
    """Stands in for the API listener: records when it starts."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def startService(self) -> None:
        super().startService()
        self.events.append("api")


class ServiceFixture(SynchronousTestCase):
    def setUp(self) -> None:
        Gate.gate = Deferred()
        self.clock = Clock()
        self.ironic = FakeIronic(heartbeat_timeout=100, agent_token=TOKEN, clock=self.clock)
        self.ironic.add_node("node-1", [MAC])
        self.treq = StubTreq(self.ironic.app.resource())
        self.events: list[str] = []

    def make(self, standalone: bool = False, **config: Any) -> AgentService:
        cfg = AgentConfig(standalone=standalone, api_url="http://ironic:6385",
                          lookup_interval=1, lookup_timeout=30, **config)
        self.agent = Agent(cfg, self.clock, runner=None,  # type: ignore[arg-type]
                           extensions=[Gate])
        client = IronicClient("http://ironic:6385", self.treq, self.clock, "1.0",
                              uniform=lambda a, b: a)

        async def load() -> HardwareManagers:
            self.events.append("managers")
            return HardwareManagers([(Interfaces(), 1)])

        async def address() -> str:
            return "192.0.2.10"

        return AgentService(self.agent, Recorder(self.events), load, client, address)

    def pump(self, seconds: float, step: float = 0.5) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
            self.treq.flush()


class ServiceTests(ServiceFixture):

    def test_api_first_then_managers_lookup_heartbeat(self) -> None:
        service = self.make()
        service.startService()
        self.pump(1)
        self.assertEqual(self.events, ["api", "managers"])
        self.assertEqual(self.agent.get_node_uuid(), "node-1")
        self.assertEqual(self.ironic.lookups[0].addresses, [MAC, "52:54:00:00:00:02"])
        self.assertTrue(self.agent.validate_agent_token(TOKEN))
        self.assertEqual(self.agent.heartbeat_timeout, 100)
        beat = self.ironic.heartbeats[0]
        self.assertEqual(beat.body["callback_url"], "http://192.0.2.10:9999")
        self.assertEqual(beat.body["agent_token"], TOKEN)
        self.successResultOf(service.stopService())

    def test_heartbeats_jittered_between_30_and_60_percent(self) -> None:
        service = self.make()
        service.startService()
        self.pump(400)
        times = [b.time for b in self.ironic.heartbeats]
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertGreater(len(gaps), 5)
        for gap in gaps:
            self.assertTrue(30 <= gap <= 60.5, gaps)
        self.successResultOf(service.stopService())

    def test_async_completion_forces_a_heartbeat(self) -> None:
        service = self.make()
        service.startService()
        self.pump(10)
        before = len(self.ironic.heartbeats)
        self.successResultOf(Deferred.fromCoroutine(self.agent.execute_command("gate.wait", {})))
        Gate.gate.callback(None)
        self.pump(1)
        self.assertEqual(len(self.ironic.heartbeats), before + 1)
        self.successResultOf(service.stopService())

    def test_lookup_retried_until_ironic_knows_the_node(self) -> None:
        self.ironic.fail_lookups(5, 500)
        service = self.make()
        service.startService()
        self.pump(60)
        self.assertEqual([r.status for r in self.ironic.lookups][:6],
                         [500, 500, 500, 500, 500, 200])
        self.assertEqual(self.agent.get_node_uuid(), "node-1")
        self.successResultOf(service.stopService())

    def test_lookup_outlasting_lookup_timeout_keeps_trying(self) -> None:
        self.ironic.fail_lookups(1000, 503)
        service = self.make()
        service.startService()
        self.pump(120)
        self.assertIsNone(self.agent.node)
        self.flushLoggedErrors()
        self.ironic._lookup_failures.clear()
        self.pump(60)
        self.assertEqual(self.agent.get_node_uuid(), "node-1")
        self.successResultOf(service.stopService())

    def test_standalone_no_lookup_no_heartbeat(self) -> None:
        service = self.make(standalone=True)
        service.startService()
        self.pump(100)
        self.assertEqual(self.ironic.requests, [])
        self.assertIsNotNone(self.agent.managers)
        self.successResultOf(service.stopService())

    def test_stop_kills_running_programs_and_waits(self) -> None:
        service = self.make(standalone=True)
        fake = FakeProcessReactor()
        self.agent.runner = ProcessRunner(fake, self.clock,  # type: ignore[arg-type]
                                          base_env={"PATH": "/usr/bin:/bin"})
        service.startService()
        self.pump(1)
        running = self.agent.runner.execute("sleep", "9")
        stopped = service.stopService()
        self.assertEqual(fake.signals, ["KILL"])
        self.assertNoResult(stopped)
        fake.children[0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(stopped)
        self.failureResultOf(running, ProcessExecutionError)

    def test_stop_during_lookup(self) -> None:
        self.ironic.fail_lookups(1000, 500)
        service = self.make()
        service.startService()
        self.pump(5)
        self.successResultOf(service.stopService())
        count = len(self.ironic.lookups)
        self.pump(60)
        self.assertEqual(len(self.ironic.lookups), count)

    def test_configured_advertise_host(self) -> None:
        service = self.make(advertise_host="fd00::5", advertise_port=8443,
                            advertise_protocol="https")
        service.startService()
        self.pump(1)
        self.assertEqual(self.ironic.heartbeats[0].body["callback_url"],
                         "https://[fd00::5]:8443")
        self.successResultOf(service.stopService())


class StartupFailureTests(SynchronousTestCase):
    def test_fatal_startup_error_stops_the_process(self) -> None:
        from ipa_twisted.testing.fake_process import FakeRunner
        clock, stopped = Clock(), []
        agent = Agent(AgentConfig(standalone=True, ntp_server="ntp.example",
                                  fail_if_clock_not_set=True), clock,
                      FakeRunner({}, unknown_missing=True))  # type: ignore[arg-type]

        async def load() -> HardwareManagers:
            return HardwareManagers([(Interfaces(), 1)])

        service = AgentService(agent, Recorder([]), load, None,
                               stop_process=lambda: stopped.append(True))
        service.startService()
        self.assertEqual(stopped, [True])
        from ipa_twisted.errors import ClockSyncError
        self.assertEqual(len(self.flushLoggedErrors(ClockSyncError)), 1)


class InspectionWiringTests(ServiceFixture):
    def make_inspecting(self, answer: Any) -> AgentService:
        service = self.make()

        async def inspect(managers: HardwareManagers) -> Any:
            self.events.append("inspect")
            if isinstance(answer, Exception):
                raise answer
            return answer

        service._inspect = inspect
        return service

    def test_inspection_node_uuid_goes_to_lookup(self) -> None:
        service = self.make_inspecting(("node-1", None))
        service.startService()
        self.pump(1)
        self.assertEqual(self.events, ["api", "managers", "inspect"])
        self.assertEqual(self.ironic.lookups[0].node_uuid, "node-1")
        self.successResultOf(service.stopService())

    def test_continue_inspection_answer_replaces_lookup(self) -> None:
        service = self.make_inspecting(("node-1", {"node": {"uuid": "node-1"},
                                                   "config": {"agent_token": TOKEN}}))
        service.startService()
        self.pump(1)
        self.assertEqual(self.ironic.lookups, [])
        self.assertEqual(self.ironic.heartbeats[0].node_uuid, "node-1")
        self.successResultOf(service.stopService())

    def test_failed_inspection_still_looks_up(self) -> None:
        service = self.make_inspecting(RuntimeError("receiver down"))
        service.startService()
        self.pump(1)
        self.assertEqual(self.agent.get_node_uuid(), "node-1")
        self.successResultOf(service.stopService())


class VmediaWiringTests(ServiceFixture):
    def test_vmedia_config_applies_before_anything_else(self) -> None:
        service = self.make()
        seen: list[str] = []

        async def vmedia(config: AgentConfig) -> AgentConfig:
            seen.append("vmedia")
            return config.override(advertise_port=8123)

        service._vmedia_config = vmedia
        service.startService()
        self.pump(1)
        self.assertEqual(seen, ["vmedia"])
        self.assertEqual(self.ironic.heartbeats[0].body["callback_url"],
                         "http://192.0.2.10:8123")
        self.successResultOf(service.stopService())
