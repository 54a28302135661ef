"""The Ironic client against FakeIronic (in memory, StubTreq) and scripted answers."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from treq.testing import StringStubbingResource, StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.errors import (HeartbeatConflictError, HeartbeatConnectionError,
                                HeartbeatError, LookupNodeError)
from ipa_twisted.ironic.client import (MIN_IRONIC_VERSION, IronicClient, callback_url,
                                       error_message)
from ipa_twisted.testing.fake_ironic import DEFAULT_NODE_UUID, FakeIronic, error_body

MAC1, MAC2 = "52:54:00:12:34:56", "52:54:00:ab:cd:ef"
API = "http://ironic.test:6385"


def warnings(events: list[Any]) -> list[Any]:
    return [e for e in events if e["log_level"].name == "warn"]


class FailingHTTP:
    """An HTTP client whose first ``failures`` matching requests fail (or hang)."""

    def __init__(self, delegate: Any = None, failures: int = 10**9, match: str = "",
                 error: Callable[[], Exception] = ConnectionRefusedError,
                 hang: bool = False) -> None:
        self.delegate, self.failures, self.match = delegate, failures, match
        self.error, self.hang = error, hang
        self.calls: list[tuple[str, str]] = []
        self.cancelled = 0

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((method, url))
        if self.match in url and self.failures > 0:
            self.failures -= 1
            if self.hang:
                def cancelled(_: object) -> None:
                    self.cancelled += 1
                return Deferred(cancelled)
            return fail(self.error())
        return self.delegate.request(method, url, **kwargs)  # type: ignore[no-any-return]


def scripted(lookups: list[tuple[int, bytes]], version: str = "1.89") -> StubTreq:
    """A server answering GET / with ``version`` and lookups with the next scripted answer."""
    def answer(method: bytes, url: str, params: Any, headers: Any,
               data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        if "/v1/lookup" in url:
            code, body = lookups.pop(0) if lookups else (404, error_body("Node not found"))
            return code, {b"Content-Type": b"application/json"}, body
        if "/v1/heartbeat/" in url:
            code, body = lookups.pop(0)
            return code, {b"Content-Type": b"application/json"}, body
        return 200, {}, json.dumps({"default_version": {"version": version}}).encode()
    return StubTreq(StringStubbingResource(answer))


class ClientTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeIronic(clock=self.clock, heartbeat_timeout=60, version="1.89")
        self.node = self.fake.add_node(DEFAULT_NODE_UUID, [MAC1])

    def client(self, http: Any = None, **kwargs: Any) -> IronicClient:
        return IronicClient(API + "/", http or StubTreq(self.fake.app.resource()), self.clock,
                            "0.1.0", **kwargs)


class VersionTests(ClientTestCase):
    def test_discovered_and_cached(self) -> None:
        client = self.client()
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(client.api_version())),
                         (1, 89))
        self.successResultOf(Deferred.fromCoroutine(client.api_version()))
        self.assertEqual([r.kind for r in self.fake.requests], ["version"])

    def test_fallback_when_unreachable_is_not_cached(self) -> None:
        http = FailingHTTP(StubTreq(self.fake.app.resource()), failures=1)
        client = self.client(http)
        with capturedLogs() as events:
            version = self.successResultOf(Deferred.fromCoroutine(client.api_version()))
        self.assertEqual(version, MIN_IRONIC_VERSION)
        self.assertEqual(events[0]["log_level"].name, "warn")
        self.assertIn("ConnectionRefusedError", warnings(events)[0]["error"])
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(client.api_version())),
                         (1, 89))

    def test_fallback_on_bad_answers(self) -> None:
        for code, body in [(500, b"oops"), (200, b"not json"), (200, b'{"versions": []}')]:
            def answer(*args: Any, code: int = code,
                       body: bytes = body) -> tuple[int, dict[bytes, bytes], bytes]:
                return code, {}, body
            client = self.client(StubTreq(StringStubbingResource(answer)))
            with capturedLogs():
                self.assertEqual(
                    self.successResultOf(Deferred.fromCoroutine(client.api_version())),
                    MIN_IRONIC_VERSION)

    def test_version_header_is_capped_at_what_we_need(self) -> None:
        for ironic, sent in [("1.89", "1.68"), ("1.68", "1.68"), ("1.50", "1.50")]:
            self.fake.version = ironic
            client = self.client()
            self.successResultOf(Deferred.fromCoroutine(client.lookup([MAC1], timeout=1,
                                                                      interval=1)))
            self.assertEqual(self.fake.lookups[-1].headers["x-openstack-ironic-api-version"],
                             sent)

    def test_supports_auto_tls(self) -> None:
        for version, expected in [("1.67", False), ("1.68", True), ("1.89", True)]:
            self.fake.version = version
            self.assertEqual(self.successResultOf(Deferred.fromCoroutine(
                self.client().supports_auto_tls())), expected)

    def test_common_headers(self) -> None:
        client = self.client(global_request_id="req-1234")
        self.successResultOf(Deferred.fromCoroutine(client.api_version()))
        headers = self.fake.requests[0].headers
        self.assertEqual(headers["accept"], "application/json")
        self.assertEqual(headers["user-agent"], "ipa-twisted/0.1.0")
        self.assertEqual(headers["x-openstack-request-id"], "req-1234")
        self.assertNotIn("x-openstack-ironic-api-version", headers)
        self.successResultOf(Deferred.fromCoroutine(self.client().api_version()))
        self.assertNotIn("x-openstack-request-id", self.fake.requests[1].headers)


class LookupTests(ClientTestCase):
    def lookup(self, client: IronicClient, macs: list[str] | None = None,
               **kwargs: Any) -> Deferred[dict[str, Any]]:
        kwargs.setdefault("timeout", 300)
        kwargs.setdefault("interval", 1)
        return Deferred.fromCoroutine(client.lookup(macs or [MAC1], **kwargs))

    def test_query_carries_all_macs_and_node_uuid(self) -> None:
        content = self.successResultOf(self.lookup(self.client(), [MAC2, MAC1],
                                                   node_uuid=DEFAULT_NODE_UUID))
        self.assertEqual(content["node"]["uuid"], DEFAULT_NODE_UUID)
        self.assertEqual(self.fake.lookups[0].addresses, [MAC2, MAC1])
        self.assertEqual(self.fake.lookups[0].node_uuid, DEFAULT_NODE_UUID)

    def test_success_returns_config_and_never_logs_the_token(self) -> None:
        with capturedLogs() as events:
            content = self.successResultOf(self.lookup(self.client(), [MAC2, MAC1]))
        self.assertIsNone(self.fake.lookups[0].node_uuid)
        self.assertEqual(content["config"]["agent_token"], self.node.token)
        self.assertEqual(content["config"]["heartbeat_timeout"], 60)
        [info] = [e for e in events if e["log_level"].name == "info" and "node_uuid" in e]
        self.assertEqual(info["node_uuid"], DEFAULT_NODE_UUID)
        for event in events:
            self.assertNotIn(self.node.token, formatEvent(event) + repr(event))

    def test_waits_grow_exponentially_with_jitter_drawn_in_bounds(self) -> None:
        draws: list[tuple[float, float]] = []

        def uniform(low: float, high: float) -> float:
            draws.append((low, high))
            return high

        self.fake.fail_lookups(5, 500)
        with capturedLogs() as events:
            done = self.lookup(self.client(uniform=uniform), interval=1, max_interval=10)
            self.clock.pump([0.5] * 60)
        self.successResultOf(done)
        self.assertEqual(draws, [(1, 1), (1, 2), (1, 4), (1, 8), (1, 10)])
        self.assertEqual([r.time for r in self.fake.lookups], [0, 1, 3, 7, 15, 25])
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual([e["status"] for e in warnings], [500] * 5)
        self.assertEqual(warnings[0]["url"], API + "/v1/lookup")
        self.assertEqual(warnings[0]["error"], "Fake Ironic was told to fail this request.")

    def test_real_jitter_stays_in_bounds(self) -> None:
        self.fake.fail_lookups(8, 500)
        done = self.lookup(self.client(uniform=random.Random(4).uniform), interval=2,
                           max_interval=12)
        with capturedLogs():
            self.clock.pump([0.25] * 400)
        self.successResultOf(done)
        times = [r.time for r in self.fake.lookups]
        waits = [b - a for a, b in zip(times, times[1:])]
        for n, wait in enumerate(waits):
            cap = min(2 * 2 ** n, 12)
            self.assertTrue(2 <= wait <= cap + 0.25, (n, wait, cap))
        self.assertGreater(len(set(waits[3:])), 1)  # jittered, not a fixed grid

    def test_conflict_pauses_for_max_interval(self) -> None:
        self.fake.fail_lookups(1, 409)
        with capturedLogs() as events:
            done = self.lookup(self.client(uniform=lambda low, high: low), max_interval=30)
            self.clock.advance(29)
            self.assertNoResult(done)
            self.clock.advance(1)
        self.successResultOf(done)
        self.assertEqual([r.time for r in self.fake.lookups], [0, 30])
        self.assertIn("is locked", warnings(events)[0]["error"])

    def test_gives_up_at_the_timeout(self) -> None:
        with capturedLogs() as events:
            done = self.lookup(self.client(uniform=lambda low, high: high),
                               ["00:00:00:00:00:01"], timeout=10, interval=1)
            self.clock.pump([0.5] * 40)
        error = self.failureResultOf(done, LookupNodeError).value
        self.assertEqual(error.details, "Could not look up node info. Check logs for details.")
        self.assertEqual([r.time for r in self.fake.lookups], [0, 1, 3, 7, 10])
        self.assertEqual({e["status"] for e in events if "status" in e}, {404})
        self.assertEqual(warnings(events)[0]["error"], "Resource could not be found.")

    def test_connection_errors_and_hangs_are_retried(self) -> None:
        http = FailingHTTP(StubTreq(self.fake.app.resource()), failures=2, match="lookup")
        with capturedLogs() as events:
            done = self.lookup(self.client(http, uniform=lambda low, high: low))
            self.clock.pump([1] * 3)
        self.successResultOf(done)
        self.assertIn("ConnectionRefusedError", warnings(events)[0]["error"])
        self.assertIsNone(warnings(events)[0]["status"])

        hanging = FailingHTTP(StubTreq(self.fake.app.resource()), failures=1, match="lookup",
                              hang=True)
        with capturedLogs() as events:
            done = self.lookup(self.client(hanging, uniform=lambda low, high: low),
                               timeout=300)
            self.clock.advance(29.9)
            self.assertNoResult(done)
            self.clock.advance(0.1)  # the 30 s request timeout
            self.clock.advance(1)
        self.successResultOf(done)
        self.assertEqual(hanging.cancelled, 1)
        self.assertIn("TimeoutError", warnings(events)[0]["error"])

    def test_bad_content_is_retried(self) -> None:
        good = {"node": {"uuid": "u-1"}, "config": {"heartbeat_timeout": 30}}
        http = scripted([(200, b"{nope"), (200, b'{"node": {}}'), (200, b"[]"),
                         (200, json.dumps(good).encode())])
        with capturedLogs() as events:
            done = self.lookup(self.client(http, uniform=lambda low, high: low))
            self.clock.pump([1] * 5)
        self.assertEqual(self.successResultOf(done), good)
        self.assertIn("Error decoding response", warnings(events)[0]["error"])
        self.assertEqual(warnings(events)[1]["error"], "Got invalid node data in the response")

    def test_old_api_format_is_converted(self) -> None:
        old = {"node": {"uuid": "u-1"}, "heartbeat_timeout": 120}
        content = self.successResultOf(self.lookup(self.client(
            scripted([(200, json.dumps(old).encode())], version="1.31"))))
        self.assertEqual(content, {"node": {"uuid": "u-1"},
                                   "config": {"heartbeat_timeout": 120}})


class HeartbeatTests(ClientTestCase):
    def heartbeat(self, client: IronicClient, token: str | None = None,
                  verify_ca: str | None = None, uuid: str = DEFAULT_NODE_UUID) -> Deferred[None]:
        return Deferred.fromCoroutine(client.heartbeat(
            uuid, "http://10.0.0.5:9999", token, verify_ca))

    def test_body_fields_follow_the_api_version(self) -> None:
        expected = {
            "1.31": {"callback_url"},
            "1.36": {"callback_url", "agent_version"},
            "1.62": {"callback_url", "agent_version", "agent_token"},
            "1.68": {"callback_url", "agent_version", "agent_token", "agent_verify_ca"},
            "1.89": {"callback_url", "agent_version", "agent_token", "agent_verify_ca"},
        }
        for version, fields in expected.items():
            fake = FakeIronic(version=version)
            node = fake.add_node(DEFAULT_NODE_UUID, [MAC1])
            client = IronicClient(API, StubTreq(fake.app.resource()), self.clock, "0.1.0")
            content = self.successResultOf(Deferred.fromCoroutine(
                client.lookup([MAC1], timeout=1, interval=1)))
            token = content["config"].get("agent_token")
            self.assertEqual(token, node.token if version >= "1.62" else None)
            self.successResultOf(self.heartbeat(client, token, "CA PEM"))
            [beat] = fake.heartbeats
            self.assertEqual(set(beat.body), fields, version)
            self.assertEqual(beat.body["callback_url"], "http://10.0.0.5:9999")
            self.assertEqual(beat.headers["content-type"], "application/json")
            if "agent_version" in fields:
                self.assertEqual(beat.body["agent_version"], "0.1.0")
            if "agent_verify_ca" in fields:
                self.assertEqual(beat.body["agent_verify_ca"], "CA PEM")

    def test_no_verify_ca_field_when_none_given(self) -> None:
        self.node.token_issued = True
        self.successResultOf(self.heartbeat(self.client(), self.node.token))
        self.assertEqual(set(self.fake.heartbeats[0].body),
                         {"callback_url", "agent_version", "agent_token"})

    def test_conflict_carries_ironics_faultstring(self) -> None:
        self.fake.fail_heartbeats(1, 409)
        error = self.failureResultOf(self.heartbeat(self.client()),
                                     HeartbeatConflictError).value
        self.assertIn(f"Node {DEFAULT_NODE_UUID} is locked", error.details)

    def test_plain_faultstring_is_read_too(self) -> None:
        http = scripted([(409, b'{"faultstring": "busy"}')])
        error = self.failureResultOf(self.heartbeat(self.client(http)),
                                     HeartbeatConflictError).value
        self.assertEqual(error.details, "busy")

    def test_other_statuses_are_heartbeat_errors(self) -> None:
        self.fake.fail_heartbeats(1, 500)
        with capturedLogs() as events:
            error = self.failureResultOf(self.heartbeat(self.client()), HeartbeatError).value
            self.assertTrue(error.details.startswith("Invalid status code: 500: "), error.details)
            unknown = self.failureResultOf(self.heartbeat(self.client(), uuid="nope"),
                                           HeartbeatError).value
        self.assertTrue(unknown.details.startswith("Invalid status code: 404: "), unknown.details)
        self.assertIn("nope", unknown.details)  # Ironic's own message
        # Logged once, by the heartbeater that decides what to do next, not here too.
        self.assertEqual([e for e in events if e.get("log_level") in (LogLevel.warn,
                                                                       LogLevel.error)], [])

    def test_wrong_token_is_refused_by_the_fake(self) -> None:
        client = self.client()
        self.successResultOf(Deferred.fromCoroutine(client.lookup([MAC1], timeout=1,
                                                                  interval=1)))
        error = self.failureResultOf(self.heartbeat(client, "x" * 43), HeartbeatError).value
        self.assertTrue(error.details.endswith(": Invalid or missing agent token received."),
                        error.details)
        self.successResultOf(self.heartbeat(client, self.node.token))

    def test_connection_refused_and_timeout(self) -> None:
        refused = FailingHTTP(StubTreq(self.fake.app.resource()), match="heartbeat")
        error = self.failureResultOf(self.heartbeat(self.client(refused)),
                                     HeartbeatConnectionError).value
        self.assertIn("ConnectionRefusedError", error.details)

        hanging = FailingHTTP(StubTreq(self.fake.app.resource()), match="heartbeat",
                              hang=True)
        done = self.heartbeat(self.client(hanging))
        self.clock.advance(30)
        self.assertIn("TimeoutError", self.failureResultOf(
            done, HeartbeatConnectionError).value.details)
        self.assertEqual(hanging.cancelled, 1)

    def test_unexpected_errors_are_heartbeat_errors(self) -> None:
        broken = FailingHTTP(StubTreq(self.fake.app.resource()), match="heartbeat",
                             error=lambda: ValueError("bad url"))
        error = self.failureResultOf(self.heartbeat(self.client(broken)), HeartbeatError).value
        self.assertNotIsInstance(error, HeartbeatConnectionError)
        self.assertIn("bad url", error.details)


API_B = "http://ironic-b.example:6385"


class SeveralURLsTests(ClientTestCase):
    """``ipa-api-url=A,B``: each request tries the URLs in turn until one answers."""

    def lookup(self, client: IronicClient, **kwargs: Any) -> Deferred[dict[str, Any]]:
        kwargs.setdefault("timeout", 300)
        return Deferred.fromCoroutine(client.lookup([MAC1], interval=1, **kwargs))

    def test_the_next_url_after_a_connection_error_then_it_comes_first(self) -> None:
        http = FailingHTTP(StubTreq(self.fake.app.resource()), match="ironic.test")
        client = IronicClient(f"{API}/, {API_B}/", http, self.clock, "0.1.0")
        self.assertEqual(client.api_urls, [API, API_B])
        with capturedLogs() as events:
            content = self.successResultOf(self.lookup(client))
        self.assertEqual(content["node"]["uuid"], DEFAULT_NODE_UUID)
        self.assertEqual(http.calls, [("GET", f"{API}/"), ("GET", f"{API_B}/"),
                                      ("GET", f"{API_B}/v1/lookup")])
        self.assertEqual(client.api_url, API_B)
        self.assertEqual([e["url"] for e in warnings(events)], [f"{API}/"])
        self.assertIn("ConnectionRefusedError", warnings(events)[0]["error"])
        self.assertEqual([e["url"] for e in events if "node_uuid" in e],
                         [f"{API_B}/v1/lookup"])
        self.successResultOf(Deferred.fromCoroutine(client.heartbeat(
            DEFAULT_NODE_UUID, "http://10.0.0.5:9999", self.node.token)))
        self.assertEqual(http.calls[-1], ("POST", f"{API_B}/v1/heartbeat/{DEFAULT_NODE_UUID}"))

    def test_an_http_error_is_ironics_answer(self) -> None:
        http = FailingHTTP(StubTreq(self.fake.app.resource()), failures=0)
        client = IronicClient([API, API_B], http, self.clock, "0.1.0")
        with capturedLogs():
            done = Deferred.fromCoroutine(client.heartbeat("no-such-node", "http://h:1", None))
        self.assertIn("Invalid status code: 404",
                      self.failureResultOf(done, HeartbeatError).value.details)
        self.assertEqual(http.calls, [("GET", f"{API}/"),
                                      ("POST", f"{API}/v1/heartbeat/no-such-node")])
        self.assertEqual(client.api_url, API)

    def test_a_hanging_url_times_out_per_url(self) -> None:
        http = FailingHTTP(StubTreq(self.fake.app.resource()), match="ironic.test", hang=True)
        client = IronicClient([API, API_B], http, self.clock, "0.1.0", request_timeout=5)
        with capturedLogs() as events:
            done = self.lookup(client)
            self.clock.advance(4.9)
            self.assertNoResult(done)
            self.clock.advance(0.1)
        self.successResultOf(done)
        self.assertEqual(http.cancelled, 1)
        self.assertIn("TimeoutError", warnings(events)[0]["error"])

    def test_all_unreachable(self) -> None:
        refused = FailingHTTP(StubTreq(self.fake.app.resource()))
        client = IronicClient([API, API_B], refused, self.clock, "0.1.0")
        with capturedLogs() as events:
            done = self.lookup(client, timeout=1)
            self.clock.advance(1)
        self.failureResultOf(done, LookupNodeError)
        failed = [e for e in warnings(events) if "attempt" in e]
        self.assertEqual(failed[0]["url"], f"{API}/v1/lookup, {API_B}/v1/lookup")
        error = self.failureResultOf(Deferred.fromCoroutine(client.heartbeat(
            DEFAULT_NODE_UUID, "http://h:1", None)), HeartbeatConnectionError).value
        self.assertIn("ConnectionRefusedError", error.details)
        self.assertEqual(refused.calls[-2:], [
            ("POST", f"{API}/v1/heartbeat/{DEFAULT_NODE_UUID}"),
            ("POST", f"{API_B}/v1/heartbeat/{DEFAULT_NODE_UUID}")])

    def test_no_url(self) -> None:
        self.assertRaises(ValueError, IronicClient, " , ", StubTreq(self.fake.app.resource()),
                          self.clock, "0.1.0")


class ConfiguredVersionTests(ClientTestCase):
    def test_ironic_api_version_is_not_asked_for(self) -> None:
        client = self.client(api_version="1.62")
        self.successResultOf(Deferred.fromCoroutine(client.lookup([MAC1], timeout=1,
                                                                  interval=1)))
        self.assertEqual([r.kind for r in self.fake.requests], ["lookup"])
        self.assertEqual(self.fake.lookups[0].headers["x-openstack-ironic-api-version"],
                         "1.62")
        self.assertFalse(self.successResultOf(Deferred.fromCoroutine(
            client.supports_auto_tls())))

    def test_a_bad_version_is_logged_and_ironic_asked(self) -> None:
        with capturedLogs() as events:
            client = self.client(api_version="latest")
        self.assertEqual(warnings(events)[0]["value"], "latest")
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(client.api_version())),
                         (1, 89))


class HelperTests(SynchronousTestCase):
    def test_callback_url(self) -> None:
        self.assertEqual(callback_url("10.0.0.5", 9999, "http"), "http://10.0.0.5:9999")
        self.assertEqual(callback_url("fd00::1", 9999, "https"), "https://[fd00::1]:9999")
        self.assertEqual(callback_url("[fd00::1]", 9999, "http"), "http://[fd00::1]:9999")
        self.assertEqual(callback_url("agent.example", 443, "https"),
                         "https://agent.example:443")

    def test_error_message(self) -> None:
        self.assertEqual(error_message(error_body("Node not found")), "Node not found")
        self.assertEqual(error_message(b'{"faultstring": "plain"}'), "plain")
        self.assertEqual(error_message(b'{"error_message": {"faultstring": "dict"}}'), "dict")
        self.assertEqual(error_message(b'{"error_message": "not json"}'), "not json")
        self.assertEqual(error_message(b"<html>502</html>"), "<html>502</html>")
        self.assertEqual(error_message(b""), "(empty body)")
