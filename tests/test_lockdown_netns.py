"""Lockdown of a real ``twistd ipa`` in a network namespace of the test's, reached over a
veth pair: through its API with a keep-alive connection open, and at the end of a real
Ironic's deploy of a ``disable_power_off`` node (Ironic's own lockdown poll must pass).

Taking interfaces down only ever happens in the namespace made here: the agent runs inside
it (``ip netns exec``) and, within, in the disk sandbox (no disk of this machine, no
reboot, no cache dropped). A veth has no ``device`` link in sysfs, so the agent is given a
fake sysfs (``sys_path``) in which the namespace's veth end is a physical NIC with its real
MAC: the agent looks the node up by it and lockdown picks it. The host's end of the veth
has an address of the benchmarking range (198.18.0.0/15), removed with the veth when the
test ends.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from ipa_twisted.process import ProcessRunner
from ipa_twisted.startup.lockdown import LOCKDOWN_MARKER
from ipa_twisted.testing.fake_system import FakeSystem
from ipa_twisted.testing.sandbox import sandbox_argv
from tests import netns
from tests.ironic.harness import RealIronic, skip_reason as ironic_skip_reason, start_agent
from tests.processes import Child, poll, request_json, sleep
from tests.processes import start_agent as start_standalone_agent
from tests.test_lockdown import KEEP_ALIVE_GET, _Reader, lockdown_request

_subnets = itertools.count()
DISABLE_POWER_OFF_VERSION = "1.95"


def _skip_reason() -> str | None:
    reason = netns.skip_reason("unshare")
    if reason:
        return reason
    return None


class Network:
    """A namespace and a veth pair: ``host`` (this machine's end, ``host_ip``) and
    ``agent`` (the namespace's end, ``agent_ip``, MAC ``agent_mac``)."""

    namespace: str
    host: str
    agent: str
    host_ip: str
    agent_ip: str
    agent_mac: str

    @classmethod
    async def make(cls, test: TestCase) -> Network:
        self = cls()
        self.namespace = await netns.make_namespace(test)
        self.host, self.agent = netns.unique("vh"), netns.unique("vn")
        await netns.ip("link", "add", self.host, "type", "veth", "peer", "name", self.agent,
                       "netns", self.namespace)
        test.addCleanup(netns.try_ip, "link", "del", self.host)
        subnet = (os.getpid() + next(_subnets)) % 250
        self.host_ip, self.agent_ip = f"198.18.{subnet}.1", f"198.18.{subnet}.2"
        await netns.ip("addr", "add", f"{self.host_ip}/30", "dev", self.host)
        await netns.ip("link", "set", self.host, "up")
        await netns.ip("-n", self.namespace, "addr", "add", f"{self.agent_ip}/30", "dev",
                       self.agent)
        await netns.ip("-n", self.namespace, "link", "set", self.agent, "up")
        self.agent_mac = (await self.link(self.agent))["address"]
        return self

    async def link(self, name: str) -> dict[str, Any]:
        """``ip -j link show`` of an interface in the namespace."""
        out = await netns.ip("-n", self.namespace, "-j", "link", "show", "dev", name)
        return dict(json.loads(out)[0])

    def fake_sysfs(self, directory: str) -> str:
        """A sysfs in which the namespace's veth end is a physical NIC; its sys_path."""
        system = FakeSystem(directory)
        system.add_interface(self.agent, self.agent_mac)
        return system.sys_path

    def wrap(self, argv: list[str]) -> list[str]:
        """The agent's argv run in the namespace, in the disk sandbox, listening on every
        address of the namespace (the helpers make it listen on 127.0.0.1)."""
        argv = [f"0.0.0.0:{arg.rpartition(':')[2]}" if arg.startswith("127.0.0.1:") else arg
                for arg in argv]
        inner = sandbox_argv([], argv)
        inner[0] = shutil.which(inner[0]) or inner[0]
        return netns.in_namespace(self.namespace, inner)

    async def port_refuses(self, port: int) -> str:
        """What connecting to ``port`` on the namespace's loopback gives (from inside)."""
        probe = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', %d), 5)\n"
                 "    print('connected')\nexcept ConnectionRefusedError:\n"
                 "    print('refused')\n" % port)
        out, _ = await ProcessRunner(reactor, reactor).execute(
            *netns.in_namespace(self.namespace, [sys.executable, "-c", probe]), timeout=30)
        return out.decode().strip()


class LockdownInNamespaceTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:
        reason = _skip_reason()
        if reason:
            raise self.skipTest(reason)
        self.dir = os.path.abspath(self.mktemp())
        self.etc = os.path.join(self.dir, "etc")
        os.makedirs(self.etc)
        self.net = await Network.make(self)

    async def check_locked_down(self, agent: Child, port: int) -> None:
        """Port refused, interface down (loopback up), marker written, process alive."""
        await agent.wait_for(rb"Locked down: ", timeout=30)
        self.assertEqual(await self.net.port_refuses(port), "refused")
        link = await self.net.link(self.net.agent)
        self.assertNotIn("UP", link["flags"], link)
        self.assertIn("UP", (await self.net.link("lo"))["flags"])
        self.assertTrue(os.path.exists(os.path.join(self.etc, LOCKDOWN_MARKER)))
        await sleep(2)
        self.assertFalse(agent.ended.called, agent.output[-3000:])

    async def test_lockdown_through_the_api(self) -> None:
        config = (f"sys_path = {self.net.fake_sysfs(os.path.join(self.dir, 'fake'))}\n"
                  f"etc_path = {self.etc}\n")
        agent = start_standalone_agent(self, self.dir, config=config, wrap=self.net.wrap)
        url = f"http://{self.net.agent_ip}:{agent.port}"
        await poll(lambda: request_json("GET", f"{url}/v1/status", timeout=2), timeout=60)
        endpoint = TCP4ClientEndpoint(reactor, self.net.agent_ip, agent.port, timeout=5)
        keep_alive = await endpoint.connect(Factory.forProtocol(_Reader))
        asking = await endpoint.connect(Factory.forProtocol(_Reader))
        self.assertIn(b"200 OK", await keep_alive.request(KEEP_ALIVE_GET))
        answer = await asking.request(lockdown_request())
        self.assertIn(b"200 OK", answer)
        # Both connections end: the keep-alive one is closed by the agent, not left open.
        await keep_alive.closed.addTimeout(15, reactor)
        await asking.closed.addTimeout(15, reactor)
        await self.check_locked_down(agent, agent.port)
        self.assertIn(f"Locked down: the API is closed, heartbeats stopped, interfaces "
                      f"down: {self.net.agent};".encode(), agent.output)
        failed: Deferred[Any] = Deferred.fromCoroutine(
            request_json("GET", f"{url}/v1/status", timeout=5))
        with self.assertRaises(Exception):
            await failed

    async def test_real_ironic_deploys_a_disable_power_off_node_to_active(self) -> None:
        reason = ironic_skip_reason()
        if reason:
            raise self.skipTest(reason)
        ironic = RealIronic(os.path.join(self.dir, "ironic"), heartbeat_timeout=10,
                            options={"api": {"host_ip": self.net.host_ip}})
        ironic.api_url = f"http://{self.net.host_ip}:{ironic.port}"
        await ironic.start()
        self.addCleanup(ironic.stop)
        uuid = await ironic.enroll_node([self.net.agent_mac], deploy_interface="custom-agent")
        await ironic.request("PATCH", f"/v1/nodes/{uuid}", [
            {"op": "replace", "path": "/disable_power_off", "value": True}],
            microversion=DISABLE_POWER_OFF_VERSION, expect=[200])
        await ironic.deploy(uuid)
        await ironic.wait_for_state(uuid, "wait call-back", timeout=60)
        config = (f"sys_path = {self.net.fake_sysfs(os.path.join(self.dir, 'fake'))}\n"
                  f"etc_path = {self.etc}\nadvertise_host = {self.net.agent_ip}\n")
        agent = start_agent(self, ironic, self.dir, config=config, wrap=self.net.wrap)
        node = await ironic.wait_for_state(uuid, "active", timeout=90)
        self.assertIsNone(node["last_error"])
        self.assertIn(b"Executing command system.lockdown", agent.output)
        self.assertEqual([line for line in ironic.log_lines("ERROR") if "lockdown" in line],
                         [])
        await self.check_locked_down(agent, agent.port)
        # Ironic's poll found the agent gone (a connection failure), not still answering.
        with open(ironic.log_path, errors="replace") as f:
            self.assertNotIn("Failed to lock down", f.read())
