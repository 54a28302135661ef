"""The service tree ``ipa_twisted.tap.make_tree`` builds, started in memory: a
MemoryReactorClock for time and ports, StubTreq over the fake Ironic (and the fake
inspection receiver), fake hardware managers. No real network, no programs run."""

from __future__ import annotations

import os
from typing import Any

from treq.testing import StubTreq
from twisted.application.service import IService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from ipa_twisted.agent import Agent
from ipa_twisted.commands import CommandResult
from ipa_twisted.config import AgentConfig, ConfigError
from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import ClockSyncError, HardwareManagerNotFound
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.inventory import NetworkInterface
from ipa_twisted.process import ProcessExecutionError, ProcessRunner
from ipa_twisted.startup.config import ConfigResolution
from ipa_twisted.startup.hardware import (UDEV_TRIGGER_POLL, UDEV_TRIGGER_WAIT, ClockSync,
                                          settle_then_load)
from ipa_twisted.startup.heartbeat import AdvertiseService
from ipa_twisted.startup.lookup import LOOKUP_RETRY_PAUSE, LookupService
from ipa_twisted.tap import Options, check_startup_config, make_tree
from ipa_twisted.testing.fake_inspector import FakeInspectionReceiver
from ipa_twisted.testing.fake_ironic import FakeIronic
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.when import When
from tests.test_process import FakeProcessReactor

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

    def list_hardware_info(self) -> dict[str, Any]:
        return {"interfaces": [{"name": "eth0", "mac_address": MAC}], "disks": [],
                "cpu": {}, "memory": {}, "bmc_address": None, "boot": None,
                "system_vendor": {}}


class ByPath(Resource):
    """The fake inspection receiver under /v1/continue*, the fake Ironic elsewhere (StubTreq
    routes by path, whatever the host)."""

    isLeaf = True

    def __init__(self, ironic: IResource, receiver: IResource) -> None:
        super().__init__()
        self.ironic, self.receiver = ironic, receiver

    def render(self, request: Request) -> Any:
        to = self.receiver if request.path.startswith(b"/v1/continue") else self.ironic
        return to.render(request)


class TreeFixture(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.ironic = FakeIronic(heartbeat_timeout=100, agent_token=TOKEN, clock=self.reactor)
        self.ironic.add_node("node-1", [MAC])
        self.receiver = FakeInspectionReceiver(accept_any=True, agent_token=TOKEN,
                                               heartbeat_timeout=100)
        self.receiver.add_node("node-1", [MAC])
        self.treq = StubTreq(ByPath(self.ironic.app.resource(),
                                    self.receiver.app.resource()))
        self.events: list[str] = []

    def options(self, **config: Any) -> Options:
        settings: dict[str, Any] = dict(
            api_url="http://ironic:6385", lookup_interval=1, lookup_timeout=30,
            listen_host="127.0.0.1", advertise_host="192.0.2.10", enable_auto_tls=False,
            cmdline_path=self.mktemp())                 # no file: not booted from vmedia
        settings.update(config)
        options = Options()
        options.config, options.config_warnings = AgentConfig(**settings), []
        return options

    async def load(self, context: HardwareContext) -> HardwareManagers:
        self.events.append(f"managers (api listening: {bool(self.reactor.tcpServers)})")
        return HardwareManagers([(Interfaces(), 1)])

    def start(self, runner: Any = None, **config: Any) -> IService:
        async def resolve_mdns(config: AgentConfig) -> AgentConfig:
            self.events.append("mdns")
            return config.override(api_url="http://ironic:6385")

        tree = make_tree(self.options(**config), self.reactor, runner=runner,
                         http_client=lambda: self.treq, load_managers=self.load,
                         resolve_mdns=resolve_mdns)
        tree.startService()
        self.addCleanup(lambda: tree.running and tree.stopService())
        self.agent: Agent = tree.agent  # type: ignore[attr-defined]
        return tree

    def pump(self, seconds: float, step: float = 0.5) -> None:
        for _ in range(int(seconds / step)):
            self.reactor.advance(step)
            self.treq.flush()


class StartupOrderTests(TreeFixture):
    def test_standalone(self) -> None:
        tree = self.start(standalone=True)
        self.pump(100)
        self.assertEqual(self.events, ["managers (api listening: True)"])
        self.assertEqual(self.reactor.tcpServers[0][0:1], (9999,))
        self.assertEqual(self.ironic.requests, [])
        self.assertIsNotNone(self.agent.managers)
        self.assertNotIn("LookupService", [type(s).__name__ for s in tree])
        self.successResultOf(tree.stopService())

    def test_lookup_then_heartbeats(self) -> None:
        tree = self.start()
        self.pump(1)
        self.assertEqual(self.events, ["managers (api listening: True)"])
        self.assertEqual(self.ironic.lookups[0].addresses, [MAC, "52:54:00:00:00:02"])
        self.assertEqual(self.agent.get_node_uuid(), "node-1")
        self.assertTrue(self.agent.validate_agent_token(TOKEN))
        self.assertEqual(self.agent.heartbeat_timeout, 100)
        beat = self.ironic.heartbeats[0]
        self.assertEqual(beat.body["callback_url"], "http://192.0.2.10:9999")
        self.assertEqual(beat.body["agent_token"], TOKEN)
        self.assertEqual(self.receiver.posts, [], "no inspection unless configured")
        self.successResultOf(tree.stopService())

    def inspecting(self, url: str) -> IService:
        return self.start(inspection_callback_url=url, inspection_collectors="default",
                          inspection_dhcp_wait_timeout=0, sys_path=self.mktemp())

    def test_inspection_first(self) -> None:
        tree = self.inspecting("http://inspector:5050/v1/continue")
        self.pump(1)
        self.assertEqual([post.status for post in self.receiver.posts], [200])
        self.assertEqual(self.ironic.lookups[0].node_uuid, "node-1",
                         "the UUID inspection gave goes to lookup")
        self.assertEqual(self.ironic.heartbeats[0].node_uuid, "node-1")
        self.successResultOf(tree.stopService())

    def test_inspection_only_without_api_url(self) -> None:
        """Ironic's managed inspection (no fast track) hands the ramdisk only the inspection
        callback: the agent inspects, neither looks up nor heartbeats, and keeps serving."""
        config = dict(api_url=None, inspection_callback_url="http://ironic:6385/v1/"
                      "continue_inspection", inspection_collectors="default",
                      inspection_dhcp_wait_timeout=0, sys_path=self.mktemp())
        check_startup_config(self.options(**config).config)
        tree = self.start(**config)
        self.pump(100)
        self.assertEqual([post.status for post in self.receiver.posts], [202])
        self.assertEqual((self.ironic.lookups, self.ironic.heartbeats), ([], []))
        self.assertNotIn("LookupService", [type(s).__name__ for s in tree])
        self.assertEqual(self.reactor.tcpServers[0][0:1], (9999,))
        self.assertTrue(tree.running)
        with self.assertRaisesRegex(ConfigError, "api_url is required"):
            check_startup_config(self.options(api_url=None).config)
        self.successResultOf(tree.stopService())

    def test_continue_inspection_answer_replaces_lookup(self) -> None:
        self.ironic.nodes["node-1"].token_issued = True  # by continue_inspection's answer
        tree = self.inspecting("http://ironic:6385/v1/continue_inspection")
        self.pump(1)
        self.assertEqual([post.status for post in self.receiver.posts], [202])
        self.assertEqual(self.ironic.lookups, [])
        self.assertTrue(self.agent.validate_agent_token(TOKEN))
        self.assertEqual(self.ironic.heartbeats[0].node_uuid, "node-1")
        self.successResultOf(tree.stopService())

    def test_failed_inspection_still_looks_up(self) -> None:
        self.receiver.fail(400)
        tree = self.inspecting("http://inspector:5050/v1/continue")
        self.pump(1)
        self.assertEqual([post.status for post in self.receiver.posts], [400])
        self.assertEqual(self.ironic.lookups[0].node_uuid, None)
        self.assertEqual(self.agent.get_node_uuid(), "node-1")
        self.successResultOf(tree.stopService())

    def test_mdns_before_managers(self) -> None:
        tree = self.start(api_url="mdns")
        self.pump(1)
        self.assertEqual(self.events, ["mdns", "managers (api listening: True)"])
        self.assertEqual(self.agent.config.api_url, "http://ironic:6385")
        self.assertEqual(self.ironic.heartbeats[0].node_uuid, "node-1")
        self.successResultOf(tree.stopService())


class LookupAndHeartbeatTests(TreeFixture):
    def test_heartbeats_jittered_between_30_and_60_percent(self) -> None:
        tree = self.start()
        self.pump(400)
        times = [b.time for b in self.ironic.heartbeats]
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertGreater(len(gaps), 5)
        for gap in gaps:
            self.assertTrue(30 <= gap <= 60.5, gaps)
        self.successResultOf(tree.stopService())

    def test_async_completion_forces_a_heartbeat(self) -> None:
        tree = self.start()
        self.pump(10)
        before = len(self.ironic.heartbeats)
        self.agent.async_finished.notify(CommandResult("clean.execute_clean_step", {}, True))
        self.pump(1)
        self.assertEqual(len(self.ironic.heartbeats), before + 1)
        self.successResultOf(tree.stopService())

    def test_async_completion_beats_a_second_after_the_last_beat(self) -> None:
        """A step that ends just after a beat is reported one second after that beat, not
        the reference's five: Ironic starts the next step (or the next deploy stage) that
        much sooner."""
        tree = self.start()
        self.pump(10)
        done = CommandResult("deploy.execute_deploy_step", {}, True)
        self.agent.async_finished.notify(done)
        self.pump(0.5)
        before = len(self.ironic.heartbeats)
        last = self.ironic.heartbeats[-1].time
        self.agent.async_finished.notify(done)     # half a second after that beat
        self.pump(3)
        self.assertEqual(len(self.ironic.heartbeats), before + 1)
        self.assertLessEqual(self.ironic.heartbeats[-1].time - last, 1.0)
        self.successResultOf(tree.stopService())

    def test_lookup_retried_until_ironic_knows_the_node(self) -> None:
        self.ironic.fail_lookups(5, 500)
        tree = self.start()
        self.pump(60)
        self.assertEqual([r.status for r in self.ironic.lookups][:6],
                         [500, 500, 500, 500, 500, 200])
        self.assertEqual(self.agent.get_node_uuid(), "node-1")
        self.successResultOf(tree.stopService())

    def test_lookup_outlasting_lookup_timeout_keeps_trying(self) -> None:
        self.ironic.fail_lookups(1000, 503)
        tree = self.start()
        self.pump(120)
        self.assertIsNone(self.agent.node)
        self.ironic._lookup_failures.clear()
        self.pump(30 + LOOKUP_RETRY_PAUSE)
        self.assertEqual(self.agent.get_node_uuid(), "node-1")
        self.successResultOf(tree.stopService())

    def test_stop_during_lookup(self) -> None:
        self.ironic.fail_lookups(1000, 500)
        tree = self.start()
        self.pump(5)
        self.successResultOf(tree.stopService())
        count = len(self.ironic.lookups)
        self.pump(60)
        self.assertEqual(len(self.ironic.lookups), count)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_configured_advertise_protocol_and_port(self) -> None:
        tree = self.start(advertise_host="fd00::5", advertise_port=8443,
                          advertise_protocol="https")
        self.pump(1)
        self.assertEqual(self.ironic.heartbeats[0].body["callback_url"],
                         "https://[fd00::5]:8443")
        self.successResultOf(tree.stopService())


class StopTests(TreeFixture):
    def test_stop_kills_running_programs_and_waits(self) -> None:
        fake = FakeProcessReactor()
        runner = ProcessRunner(fake, self.reactor,  # type: ignore[arg-type]
                               base_env={"PATH": "/usr/bin:/bin"})
        tree = self.start(runner=runner, standalone=True)
        self.pump(1)
        running = runner.execute("sleep", "9")
        stopped = tree.stopService()
        self.assertEqual(fake.signals, ["KILL"])
        self.assertNoResult(stopped)
        fake.children[0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(stopped)
        self.failureResultOf(running, ProcessExecutionError)

    def test_fatal_startup_error_stops_the_process(self) -> None:
        async def none_fits(context: HardwareContext) -> HardwareManagers:
            raise HardwareManagerNotFound()

        self.load = none_fits  # type: ignore[method-assign]
        self.start(standalone=True)
        self.pump(1)
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(len(self.flushLoggedErrors(HardwareManagerNotFound)), 1)

    def test_clock_not_set_is_fatal_when_required(self) -> None:
        agent = Agent(AgentConfig(ntp_server="ntp.example", fail_if_clock_not_set=True),
                      self.reactor, FakeRunner({}, unknown_missing=True))  # type: ignore
        managers: When[Any] = When()
        fatal: list[Failure] = []
        stage = ClockSync(agent, managers, fatal.append)
        stage.startService()
        self.assertEqual(fatal, [], "waits for the managers")
        managers.fire(None)
        self.assertEqual(len(fatal), 1)
        self.assertEqual(len(self.flushLoggedErrors(ClockSyncError)), 1)

    def test_rescue_stop_stops_the_reactor(self) -> None:
        self.start(standalone=True)
        self.agent.request_stop()
        self.assertFalse(self.reactor.hasStopped, "after the answer is sent")
        self.pump(1)
        self.assertTrue(self.reactor.hasStopped)


class StageTests(TreeFixture):
    """Stages alone: each waits for what it is handed."""

    def test_vmedia_parameters_apply_before_mdns(self) -> None:
        agent = Agent(AgentConfig(api_url="mdns"), self.reactor, runner=None)  # type: ignore
        seen: list[Any] = []

        async def vmedia(config: AgentConfig) -> dict[str, str]:
            seen.append("vmedia")
            return {"ipa-advertise-port": "8123"}

        def remerge(params: Any) -> tuple[AgentConfig, list[str]]:
            seen.append(dict(params))
            return agent.config.override(advertise_port=8123), []

        async def mdns(config: AgentConfig) -> AgentConfig:
            seen.append(("mdns", config.advertise_port))
            return config.override(api_url="http://found:6385")

        stage = ConfigResolution(agent, None, self.reactor, remerge,  # type: ignore[arg-type]
                                 vmedia_params=vmedia, resolve_mdns=mdns)
        stage.startService()
        resolved = self.successResultOf(stage.done.wait())
        self.assertEqual(seen, ["vmedia", {"ipa-advertise-port": "8123"}, ("mdns", 8123)])
        self.assertEqual((resolved.api_url, resolved.advertise_port),
                         ("http://found:6385", 8123))
        self.assertIs(agent.config, resolved)
        self.assertIs(agent.hardware_context().config, resolved, "one configuration")

    def test_lookup_waits_for_what_it_is_handed(self) -> None:
        from ipa_twisted.ironic.client import IronicClient
        agent = Agent(AgentConfig(lookup_interval=1, lookup_timeout=30), self.reactor,
                      runner=None, managers=HardwareManagers([(Interfaces(), 1)]))  # type: ignore
        client = IronicClient("http://ironic:6385", self.treq, self.reactor, "1.0")
        ready: When[Any] = When()
        lookup = LookupService(agent, lambda: client, ready, self.reactor)
        lookup.startService()
        self.pump(5)
        self.assertEqual(self.ironic.lookups, [])
        ready.fire(("node-1", None))
        self.pump(1)
        self.assertEqual(self.successResultOf(lookup.done.wait()), "node-1")
        self.assertEqual(self.ironic.lookups[0].node_uuid, "node-1")

    def test_advertise_stage_failure_is_fatal(self) -> None:
        agent = Agent(AgentConfig(), self.reactor, runner=None)  # type: ignore[arg-type]
        fatal: list[Failure] = []

        async def no_address() -> str:
            raise RuntimeError("no route to Ironic")

        found: When[Any] = When()
        stage = AdvertiseService(agent, lambda: None, no_address, None,  # type: ignore
                                 found, self.reactor, fatal.append)
        stage.startService()
        found.fire("node-1")
        self.assertEqual([f.getErrorMessage() for f in fatal], ["no route to Ironic"])
        self.assertFalse(stage.done.fired)
        self.flushLoggedErrors(RuntimeError)


class DeferredTypeTests(SynchronousTestCase):
    def test_when_hands_each_waiter_its_own_deferred(self) -> None:
        event: When[int] = When()
        first, second = event.wait(), event.wait()
        first.cancel()
        self.failureResultOf(first)
        event.fire(3)
        event.fire(4)
        self.assertEqual(self.successResultOf(second), 3)
        self.assertEqual(self.successResultOf(event.wait()), 3)
        self.assertIsInstance(second, Deferred)


class SettleThenLoadTests(SynchronousTestCase):
    """The agent's own start-up loads the managers once udev has settled (the ramdisk's init
    no longer waits for udev before starting it)."""

    def load(self, runner: FakeRunner) -> list[str]:
        seen: list[str] = []

        async def found(cls: type, context: HardwareContext) -> HardwareManagers:
            seen.append(f"managers after {[' '.join(argv) for argv in runner.argvs]}")
            return HardwareManagers([(Interfaces(), 1)])
        self.patch(HardwareManagers, "load", classmethod(found))
        context = HardwareContext(AgentConfig(), runner, MemoryReactorClock(), None)
        managers = self.successResultOf(Deferred.fromCoroutine(settle_then_load(context)))
        self.assertEqual(managers.get_current_versions(), {"fake": "1"})
        return seen

    def test_udev_settles_first(self) -> None:
        runner = FakeRunner({("udevadm", "settle"): b""})
        self.assertEqual(self.load(runner), ["managers after ['udevadm settle']"])

    def test_managers_load_without_udev_or_when_it_fails(self) -> None:
        self.assertEqual(self.load(FakeRunner(missing=["udevadm"])), ["managers after []"])
        self.assertEqual(self.load(FakeRunner({("udevadm", "settle"): Exit(1)})),
                         ["managers after ['udevadm settle']"])

    def pending_load(self) -> tuple[str, MemoryReactorClock, FakeRunner, Deferred[Any]]:
        pending = self.mktemp()
        with open(pending, "w"):
            pass
        runner = FakeRunner({("udevadm", "settle"): b""})
        self.patch(HardwareManagers, "load", classmethod(
            lambda cls, context: succeed(HardwareManagers([(Interfaces(), 1)]))))
        clock = MemoryReactorClock()
        context = HardwareContext(AgentConfig(), runner, clock, None)
        loading = Deferred.fromCoroutine(settle_then_load(context, pending))
        return pending, clock, runner, loading

    def test_udev_settles_once_the_ramdisks_trigger_is_done(self) -> None:
        # init starts the agent beside `udevadm trigger`: settling before the events are
        # queued would load the managers without the disks.
        pending, clock, runner, loading = self.pending_load()
        clock.advance(5)
        self.assertNoResult(loading)
        self.assertEqual(runner.argvs, [])
        os.unlink(pending)
        clock.advance(UDEV_TRIGGER_POLL)
        self.assertEqual(self.successResultOf(loading).get_current_versions(), {"fake": "1"})
        self.assertEqual(runner.argvs, [("udevadm", "settle")])

    def test_a_trigger_never_done_is_waited_for_a_bounded_time(self) -> None:
        pending, clock, runner, loading = self.pending_load()
        clock.pump([UDEV_TRIGGER_POLL] * int(UDEV_TRIGGER_WAIT / UDEV_TRIGGER_POLL + 2))
        self.assertEqual(self.successResultOf(loading).get_current_versions(), {"fake": "1"})
        self.assertEqual(runner.argvs, [("udevadm", "settle")])
        self.assertTrue(os.path.exists(pending))
