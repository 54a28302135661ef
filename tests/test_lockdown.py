"""``system.lockdown``: the API closed for good (port and every connection, keep-alive
ones included), heartbeats stopped, the machine's interfaces taken down, the process kept.

Unit tests on fakes (Clock, StringTransport, FakeRunner, a fake sysfs); one test on this
machine's loopback with a real listening port, still with a FakeRunner for ``ip``. Real
interfaces are only ever taken down in ``tests/test_lockdown_netns.py``, inside a network
namespace that test makes.
"""

from __future__ import annotations

import json
import os

from treq.testing import StubTreq
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted.agent import STOP_DELAY, Agent
from ipa_twisted.api.app import AgentAPI
from ipa_twisted.api.site import AgentSite, make_site
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions import default_extensions
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.inventory import NetworkInterface
from ipa_twisted.net.lockdown import lockdown_interfaces, take_interfaces_down
from ipa_twisted.ironic.heartbeat import Heartbeater
from ipa_twisted.startup.lockdown import LOCKDOWN_MARKER, LockdownService
from ipa_twisted.tap import Options, make_tree
from ipa_twisted.testing.fake_ironic import FakeIronic
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem

MAC = "52:54:00:12:34:56"
TOKEN = "t" * 40
KEEP_ALIVE_GET = b"GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n"


def lockdown_request(token: str | None = None) -> bytes:
    body = json.dumps({"name": "system.lockdown", "params": {}}).encode()
    query = f"?agent_token={token}" if token else ""
    return (f"POST /v1/commands/{query} HTTP/1.1\r\nHost: agent\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def fake_machine(root: str) -> FakeSystem:
    """Two NICs, a VLAN on one, a bond, a bridge and the loopback."""
    system = FakeSystem(root)
    system.add_interface("eth0", MAC)
    system.add_interface("eth1", "52:54:00:00:00:02", pci_address="0000:00:1a.0")
    system.add_interface("eth0.100", MAC, physical=False)
    system.add_interface("bond0", "52:54:00:00:00:03", physical=False)
    os.makedirs(system.path("sys/class/net/bond0/bonding"))
    system.add_interface("br0", "52:54:00:00:00:04", physical=False)
    system.add_interface("lo", "00:00:00:00:00:00", physical=False)
    return system


class Interfaces:
    HARDWARE_MANAGER_NAME = "fake"
    HARDWARE_MANAGER_VERSION = "1"

    def evaluate_hardware_support(self) -> int:
        return 1

    def list_network_interfaces(self) -> list[NetworkInterface]:
        return [NetworkInterface(name="eth0", mac_address=MAC)]


class InterfaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.system = fake_machine(self.mktemp())

    def test_physical_vlan_and_bond_interfaces(self) -> None:
        self.assertEqual(lockdown_interfaces(self.system.sys_path),
                         ["bond0", "eth0", "eth0.100", "eth1"])

    def test_unreadable_sysfs_lists_nothing(self) -> None:
        with capturedLogs() as events:
            self.assertEqual(lockdown_interfaces(self.system.path("nowhere")), [])
        self.assertIn("nowhere", events[0]["directory"])

    def test_one_failure_does_not_stop_the_others(self) -> None:
        runner = FakeRunner({("ip", "link", "set"): Exit(0),
                             ("ip", "link", "set", "eth0.100"): Exit(1, stderr=b"busy")})
        with capturedLogs() as events:
            down = self.successResultOf(Deferred.fromCoroutine(
                take_interfaces_down(runner, self.system.sys_path)))
        self.assertEqual(down, ["bond0", "eth0", "eth1"])
        self.assertEqual(runner.argvs, [("ip", "link", "set", name, "down") for name in
                                        ("bond0", "eth0", "eth0.100", "eth1")])
        self.assertEqual([e["interface"] for e in events if "interface" in e], ["eth0.100"])


class Channel:
    """An API connection of the site over a StringTransport."""

    def __init__(self, site: AgentSite) -> None:
        self.transport = StringTransport()
        self.protocol = site.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        """The kernel reports the connection closed."""
        from twisted.internet.error import ConnectionDone
        self.protocol.connectionLost(Failure(ConnectionDone()))


class SiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        agent = Agent(AgentConfig(standalone=True), self.clock, FakeRunner(),  # type: ignore
                      managers=HardwareManagers([(Interfaces(), 1)]))
        self.site = make_site(AgentAPI(agent))
        self.site.reactor = self.clock           # idle timeouts on the fake clock

    def test_keep_alive_and_idle_connections_closed_new_ones_aborted(self) -> None:
        served, idle = Channel(self.site), Channel(self.site)
        served.send(KEEP_ALIVE_GET)
        self.assertIn(b"200 OK", served.transport.value())
        self.assertFalse(served.transport.disconnecting, "keep-alive: still open")
        self.assertEqual(self.site.open_connections, 2)
        closing = Deferred.fromCoroutine(self.site.close_connections(self.clock))
        self.assertTrue(served.transport.disconnecting)
        self.assertTrue(idle.transport.disconnecting)
        self.assertNoResult(closing)
        served.lose()
        idle.lose()
        self.successResultOf(closing)
        self.assertEqual(self.site.open_connections, 0)
        late = Channel(self.site)
        self.assertTrue(late.transport.disconnecting, "no connection served after lockdown")
        self.assertEqual(self.site.open_connections, 0)

    def test_a_connection_that_does_not_close_is_aborted(self) -> None:
        stuck = Channel(self.site)
        aborted: list[bool] = []
        stuck.transport.abortConnection = lambda: (aborted.append(True),  # type: ignore
                                                   stuck.lose())
        closing = Deferred.fromCoroutine(self.site.close_connections(self.clock, grace=5))
        self.clock.advance(4.9)
        self.assertNoResult(closing)
        self.assertEqual(aborted, [])
        self.clock.advance(0.1)
        self.assertEqual(aborted, [True])
        self.successResultOf(closing)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothing_open(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.site.close_connections(self.clock)))
        self.assertTrue(self.site.closed)


class ServiceLockdownTests(SynchronousTestCase):
    """The whole lockdown, from the command, in the agent's service tree on a
    MemoryReactorClock with a fake Ironic."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.system = fake_machine(self.mktemp())
        self.runner = FakeRunner({("ip", "link", "set"): Exit(0)})
        self.ironic = FakeIronic(heartbeat_timeout=100, agent_token=TOKEN, clock=self.clock)
        self.ironic.add_node("node-1", [MAC])
        self.treq = StubTreq(self.ironic.app.resource())
        options = Options()
        options.config = self.system.config(
            api_url="http://ironic:6385", lookup_interval=1, lookup_timeout=30,
            advertise_host="192.0.2.10", listen_host="127.0.0.1", enable_auto_tls=False)
        options.config_warnings = []

        async def load(context: object) -> HardwareManagers:
            return HardwareManagers([(Interfaces(), 1)])
        tree = make_tree(options, self.clock, runner=self.runner,  # type: ignore[arg-type]
                         http_client=lambda: self.treq, load_managers=load)
        self.agent, self.site = tree.agent, tree.site  # type: ignore[attr-defined]
        self.site.reactor = self.clock
        self.api = next(s for s in tree if isinstance(s, StreamServerEndpointService))
        self.service = next(s for s in tree if isinstance(s, LockdownService))
        self.heartbeater = next(s for s in tree if isinstance(s, Heartbeater))
        tree.startService()
        self.pump(5)
        self.assertTrue(self.ironic.heartbeats, "heartbeating before the lockdown")

    def pump(self, seconds: float, step: float = 0.5) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
            self.treq.flush()

    def test_lockdown(self) -> None:
        keep_alive = Channel(self.site)
        keep_alive.send(KEEP_ALIVE_GET)
        asking = Channel(self.site)
        asking.send(lockdown_request(TOKEN))
        answer = asking.transport.value()
        self.assertIn(b"200 OK", answer)
        self.assertIn(b'"command_status": "SUCCEEDED"', answer.replace(b'":"', b'": "'))
        # The answer goes out first: nothing is closed yet.
        self.assertTrue(self.api.running)
        self.assertFalse(keep_alive.transport.disconnecting)
        self.assertEqual(self.runner.argvs, [])
        beats = len(self.ironic.heartbeats)

        self.clock.advance(STOP_DELAY)
        self.assertFalse(self.api.running, "the listening port is closed")
        self.assertIsNone(self.api.parent, "twistd's shutdown will not restart it")
        self.assertTrue(keep_alive.transport.disconnecting)
        self.assertTrue(asking.transport.disconnecting)
        self.assertEqual(self.runner.argvs, [], "interfaces go down once connections are gone")
        keep_alive.lose()
        asking.lose()
        self.successResultOf(self.service.lockdown)
        self.assertEqual(self.runner.argvs, [("ip", "link", "set", name, "down") for name in
                                             ("bond0", "eth0", "eth0.100", "eth1")])
        self.assertFalse(self.heartbeater.running)
        self.pump(600)
        self.assertEqual(len(self.ironic.heartbeats), beats, "no heartbeat after lockdown")
        self.assertFalse(self.clock.hasStopped, "the process keeps running")
        with open(os.path.join(self.system.etc_path, LOCKDOWN_MARKER)) as f:
            self.assertTrue(f.read().strip())
        # Commands are refused even if a request could still arrive.
        failure = self.failureResultOf(Deferred.fromCoroutine(
            self.agent.execute_command("system.lockdown", {})))
        self.assertIn("locked down", str(failure.value))

    def test_lockdown_twice_runs_once(self) -> None:
        self.service.lock_down_once()
        self.service.lock_down_once()
        self.successResultOf(self.service.lockdown)
        self.assertEqual(len(self.runner.argvs), 4)

    def test_marker_that_cannot_be_written_is_logged(self) -> None:
        os.rmdir(self.system.etc_path)
        with capturedLogs() as events:
            self.service.lock_down_once()
            self.successResultOf(self.service.lockdown)
        self.assertTrue([e for e in events if "marker" in e.get("log_format", "")])
        self.assertEqual(len(self.runner.argvs), 4, "the rest of the lockdown still runs")


class _Reader(Protocol):
    """A client connection that records what it received and when it was closed."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()
        self.got: Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.got is not None and b"\r\n\r\n" in self.data:
            got, self.got = self.got, None
            got.callback(None)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.closed.callback(None)

    async def request(self, data: bytes) -> bytes:
        self.data = b""
        self.got = Deferred()
        self.transport.write(data)
        await self.got.addTimeout(10, reactor)
        return self.data


class LoopbackLockdownTests(TestCase):
    """A real port on 127.0.0.1 and real keep-alive connections; ``ip`` is a FakeRunner's
    and the interfaces those of a fake sysfs, so nothing of this machine changes."""

    timeout = 30

    async def test_keep_alive_connection_closed_and_port_refuses(self) -> None:
        system = fake_machine(self.mktemp())
        runner = FakeRunner({("ip", "link", "set"): Exit(0)})
        agent = Agent(system.config(standalone=True), reactor, runner,  # type: ignore
                      reactor=reactor, extensions=default_extensions())
        site = make_site(AgentAPI(agent))
        api = StreamServerEndpointService(TCP4ServerEndpoint(reactor, 0,
                                                             interface="127.0.0.1"), site)

        tree = MultiService()
        api.setServiceParent(tree)
        service = LockdownService(agent, site, [api])
        service.setServiceParent(tree)
        tree.startService()
        self.addCleanup(tree.stopService)
        port = (await api._waitingForPort).getHost().port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)

        async def connect() -> _Reader:
            return await endpoint.connect(Factory.forProtocol(_Reader))

        idle, asking = await connect(), await connect()
        self.assertIn(b"200 OK", await idle.request(KEEP_ALIVE_GET))
        answer = await asking.request(lockdown_request())
        self.assertIn(b"200 OK", answer)
        await idle.closed.addTimeout(10, reactor)
        await asking.closed.addTimeout(10, reactor)
        await service.lockdown
        with self.assertRaises(ConnectionRefusedError):
            await connect()
        self.assertEqual(runner.argvs, [("ip", "link", "set", name, "down") for name in
                                        ("bond0", "eth0", "eth0.100", "eth1")])
        self.assertTrue(service.running and tree.running,
                        "the agent's service tree keeps running")
