"""FakeIronic, in memory (StubTreq) and as a separate process.

What it shares with the real Ironic is checked by tests/test_ironic_contract.py; these are
the fake's own knobs: records, failures on demand, waiting for heartbeats, its process.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

import ipa_twisted
from ipa_twisted.ironic.client import IronicClient
from ipa_twisted.testing.fake_ironic import DEFAULT_NODE_UUID, MASKED_TOKEN, FakeIronic, Record

MAC = "52:54:00:12:34:56"
URL = "http://ironic.test:6385"
V = {"X-OpenStack-Ironic-API-Version": "1.68"}


class FakeIronicTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.recorded: list[Record] = []
        self.fake = FakeIronic(clock=self.clock, heartbeat_timeout=42,
                               record=self.recorded.append)
        self.node = self.fake.add_node(DEFAULT_NODE_UUID, [MAC.upper()])
        self.treq = StubTreq(self.fake.app.resource())

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        response = self.successResultOf(
            self.treq.get(URL + path, headers=V if headers is None else headers))
        return response.code, json.loads(self.successResultOf(response.content()) or b"null")

    def beat(self, body: Any, uuid: str = DEFAULT_NODE_UUID,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.successResultOf(self.treq.post(
            f"{URL}/v1/heartbeat/{uuid}", data=data, headers=V if headers is None else headers))
        content = self.successResultOf(response.content())
        return response.code, json.loads(content) if content else None

    def token(self) -> str:
        """The agent token, from a lookup (as the agent gets it)."""
        token: str = self.get(f"/v1/lookup?addresses={MAC}")[1]["config"]["agent_token"]
        return token

    def fault(self, doc: Any) -> dict[str, Any]:
        fault: dict[str, Any] = json.loads(doc["error_message"])
        return fault

    def test_version_document(self) -> None:
        self.fake.version = "1.70"
        code, doc = self.get("/", headers={})
        self.assertEqual(code, 200)
        self.assertEqual(doc["default_version"], {"id": "v1", "version": "1.70",
                                                  "min_version": "1.1", "status": "CURRENT",
                                                  "links": []})
        self.assertEqual(doc["name"], "OpenStack Ironic API")
        self.assertEqual(self.recorded[0].kind, "version")

    def test_lookup_by_mac_gives_node_and_config(self) -> None:
        code, doc = self.get(f"/v1/lookup?addresses=aa:aa:aa:aa:aa:aa,{MAC}")
        self.assertEqual(code, 200)
        self.assertEqual(doc["node"], {"uuid": DEFAULT_NODE_UUID, "properties": {},
                                       "instance_info": {}, "driver_internal_info": {}})
        config = doc["config"]
        self.assertEqual(config["heartbeat_timeout"], 42)
        self.assertEqual(config["agent_token"], self.node.token)
        self.assertGreaterEqual(len(config["agent_token"]), 32)
        self.assertIs(config["agent_token_required"], True)
        self.assertEqual(config["metrics"]["backend"], "noop")
        self.assertIn("statsd_port", config["metrics_statsd"])
        [record] = self.fake.lookups
        self.assertEqual(record.addresses, ["aa:aa:aa:aa:aa:aa", MAC])
        self.assertIsNone(record.node_uuid)
        self.assertEqual(record.headers["x-openstack-ironic-api-version"], "1.68")

    def test_token_is_given_once(self) -> None:
        self.assertEqual(self.get(f"/v1/lookup?addresses={MAC}")[1]["config"]["agent_token"],
                         self.node.token)
        self.assertEqual(self.get(f"/v1/lookup?addresses={MAC}")[1]["config"]["agent_token"],
                         MASKED_TOKEN)
        self.fake.reissue_tokens = True
        self.assertEqual(self.get(f"/v1/lookup?addresses={MAC}")[1]["config"]["agent_token"],
                         self.node.token)

    def test_lookup_config_carries_the_policy_asked_for(self) -> None:
        from ipa_twisted.testing.fake_ironic import IRONIC_39_POLICY
        self.fake.lookup_config = dict(IRONIC_39_POLICY, tls_cipher_suites="ECDHE+AESGCM")
        code, doc = self.get(f"/v1/lookup?node_uuid={DEFAULT_NODE_UUID}")
        self.assertEqual(code, 200)
        self.assertEqual(doc["config"]["tls_min_version"], "1.3")
        self.assertEqual(doc["config"]["tls_cipher_suites"], "ECDHE+AESGCM")
        self.assertIs(doc["config"]["enable_bios_bootloader_install"], False)
        self.assertEqual(doc["config"]["heartbeat_timeout"], 42)   # the rest is kept

    def test_lookup_by_node_uuid(self) -> None:
        code, doc = self.get(f"/v1/lookup?node_uuid={DEFAULT_NODE_UUID}")
        self.assertEqual((code, doc["node"]["uuid"]), (200, DEFAULT_NODE_UUID))
        self.assertEqual(self.fake.lookups[0].node_uuid, DEFAULT_NODE_UUID)

    def test_lookup_failures_on_demand(self) -> None:
        self.fake.fail_lookups(2, 409)
        self.fake.fail_lookups(1, 500)
        codes = [self.get(f"/v1/lookup?addresses={MAC}") for _ in range(4)]
        self.assertEqual([code for code, _ in codes], [409, 409, 500, 200])
        self.assertIn("is locked", self.fault(codes[0][1])["faultstring"])
        self.assertEqual(self.fault(codes[2][1])["faultcode"], "Server")

    def test_heartbeat_is_recorded(self) -> None:
        token = self.get(f"/v1/lookup?addresses={MAC}")[1]["config"]["agent_token"]
        self.clock.advance(12.5)
        body = {"callback_url": "http://10.0.0.5:9999", "agent_token": token,
                "agent_version": "0.1.0"}
        self.assertEqual(self.beat(body), (202, None))
        [record] = self.fake.heartbeats
        self.assertEqual((record.time, record.node_uuid, record.body, record.status),
                         (12.5, DEFAULT_NODE_UUID, body, 202))
        self.assertEqual(record.headers["x-openstack-ironic-api-version"], "1.68")
        self.assertIs(self.recorded[-1], record)

    def test_heartbeat_failures_on_demand(self) -> None:
        ok = {"callback_url": "http://a:1", "agent_token": self.token(), "agent_version": "1"}
        self.fake.fail_heartbeats(1)
        code, doc = self.beat(ok)
        self.assertEqual(code, 409)
        self.assertIn("is locked", self.fault(doc)["faultstring"])
        self.assertEqual(self.beat(ok)[0], 202)

    def test_an_ironic_from_before_tokens_checks_none(self) -> None:
        self.fake.version = "1.61"
        code, doc = self.get(f"/v1/lookup?addresses={MAC}",
                             {"X-OpenStack-Ironic-API-Version": "1.61"})
        self.assertEqual((code, doc["config"]["agent_token"]), (200, None))
        self.assertEqual(self.beat({"callback_url": "http://a:1"},
                                   headers={"X-OpenStack-Ironic-API-Version": "1.31"})[0], 202)

    def test_refused_heartbeats_are_recorded_not_counted(self) -> None:
        self.assertEqual(self.beat({"callback_url": "http://a:1", "agent_version": "1"})[0],
                         400)
        self.assertEqual((len(self.fake.heartbeats), self.fake.requests[-1].status), (0, 400))

    def test_wait_for_heartbeats(self) -> None:
        ok = {"callback_url": "http://a:1", "agent_token": self.token(), "agent_version": "1"}
        waiting = self.fake.wait_for_heartbeats(2, timeout=10)
        self.beat(ok)
        self.assertNoResult(waiting)
        self.beat(ok)
        self.assertEqual(len(self.successResultOf(waiting)), 2)
        self.assertEqual(len(self.successResultOf(self.fake.wait_for_heartbeats(1))), 2)
        late = self.fake.wait_for_heartbeats(3, timeout=10)
        self.clock.advance(10)
        self.failureResultOf(late, TimeoutError)


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.listening.called and b"\n" in self.output:
            line = self.output.split(b"\n")[0].decode()
            if line.startswith("listening on "):
                self.listening.callback(int(line.split()[-1]))
            else:
                self.listening.errback(Exception(f"unexpected output {line!r}"))

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(Exception(f"exited: {self.output!r}"))
        self.ended.callback(None)


class StandaloneTests(TestCase):
    timeout = 30

    async def test_serves_and_records(self) -> None:
        record = self.mktemp()
        child = _Child()
        root = os.path.dirname(os.path.dirname(os.path.abspath(ipa_twisted.__file__)))
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            child, sys.executable,
            [sys.executable, "-m", "ipa_twisted.testing.fake_ironic", "--port", "0",
             "--mac", MAC, "--heartbeat-timeout", "7", "--token", "t" * 40,
             "--record", record],
            env={"PYTHONPATH": root, "PATH": os.environ.get("PATH", "")})

        async def stop() -> None:
            if process.pid is not None:
                process.signalProcess("TERM")
            await child.ended
        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        port = await child.listening.addTimeout(20, reactor)  # type: ignore[arg-type]

        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=pool))  # type: ignore[arg-type]
        client = IronicClient(f"http://127.0.0.1:{port}", http, reactor,  # type: ignore[arg-type]
                              "0.1.0")
        with capturedLogs():
            content = await Deferred.fromCoroutine(client.lookup([MAC], timeout=10, interval=1))
            self.assertEqual(content["config"]["heartbeat_timeout"], 7)
            self.assertEqual(content["config"]["agent_token"], "t" * 40)
            await Deferred.fromCoroutine(client.heartbeat(
                content["node"]["uuid"], "http://127.0.0.1:9999", "t" * 40))

        with open(record) as f:
            records = [json.loads(line) for line in f]
        self.assertEqual([r["kind"] for r in records], ["version", "lookup", "heartbeat"])
        self.assertEqual(records[1]["addresses"], [MAC])
        self.assertEqual(records[2]["body"]["agent_token"], "t" * 40)
        self.assertEqual(records[2]["status"], 202)
