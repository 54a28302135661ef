"""Posting inspection data: both receivers, the backoff, and what is retried."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.config import AgentConfig
from ipa_twisted.errors import InspectionError
from ipa_twisted.inspector import post
from ipa_twisted.testing.fake_inspector import (DEFAULT_NODE_UUID, DEFAULT_TOKEN,
                                                FakeInspectionReceiver)

INSPECTOR = "http://inspector:5050/v1/continue"
IRONIC = "http://ironic:6385/v1/continue_inspection"
MAC = "52:54:00:12:34:56"
DATA = {"inventory": {"interfaces": [{"name": "eth0", "mac_address": MAC}],
                      "bmc_address": None},
        "logs": "H4sI...", "error": None}


def fixed(value: float) -> Any:
    """A ``uniform`` giving ``value`` (a jitter multiplier) and recording its bounds."""
    def uniform(low: float, high: float) -> float:
        uniform.bounds.append((low, high))  # type: ignore[attr-defined]
        return value
    uniform.bounds = []  # type: ignore[attr-defined]
    return uniform


class FlakyHTTP:
    """Refuses the first ``refusals`` connections, then lets ``http`` answer."""

    def __init__(self, http: Any, refusals: int) -> None:
        self._http, self.refusals, self.requests = http, refusals, 0

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.requests += 1
        if self.refusals:
            self.refusals -= 1
            return fail(ConnectionRefusedError("refused"))
        result: Deferred[Any] = self._http.request(method, url, **kwargs)
        return result


class BackoffTests(SynchronousTestCase):
    def test_delays(self) -> None:
        backoff = post.backoff(fixed(1.0))
        taken = [backoff.delay(n) for n in range(1, 11)]
        expected = [1.0, 2.7, 7.29, 19.683, 53.1441, 143.48907, 387.420489,
                    1046.0353203, 1200.0, 1200.0]
        for got, want in zip(taken, expected):
            self.assertAlmostEqual(got, want, places=6)

    def test_jitter_bounds(self) -> None:
        uniform = fixed(0.7)
        backoff = post.backoff(uniform)
        self.assertAlmostEqual(backoff.delay(1), 0.7)
        self.assertAlmostEqual(backoff.delay(2), 2.7 * 0.7)
        self.assertEqual(uniform.bounds, [(0.7, 1.2), (0.7, 1.2)])
        self.assertAlmostEqual(post.backoff(fixed(1.2)).delay(12), 1440.0)


class CallbackURLTests(SynchronousTestCase):
    def test_explicit(self) -> None:
        config = AgentConfig(inspection_callback_url=INSPECTOR, api_url="http://i:6385")
        self.assertEqual(post.callback_url(config), INSPECTOR)
        self.assertEqual(post.callback_url(config, requested=True), INSPECTOR)

    def test_derived_only_when_requested(self) -> None:
        config = AgentConfig(api_url="http://ironic:6385/")
        self.assertIsNone(post.callback_url(config))
        self.assertEqual(post.callback_url(config, requested=True), IRONIC)
        self.assertIsNone(post.callback_url(AgentConfig(api_url="mdns"), requested=True))
        self.assertIsNone(post.callback_url(AgentConfig(), requested=True))

    def test_each_api_url_when_several(self) -> None:
        config = AgentConfig(api_url="http://ironic:6385/,https://ironic-b:6385")
        self.assertEqual(post.callback_url(config, requested=True),
                         f"{IRONIC},https://ironic-b:6385/v1/continue_inspection")

    def test_mdns_is_passed_on(self) -> None:
        self.assertEqual(post.callback_url(AgentConfig(inspection_callback_url="mdns")),
                         "mdns")

    def test_receiver_kind(self) -> None:
        self.assertTrue(post.is_ironic_receiver(IRONIC))
        self.assertTrue(post.is_ironic_receiver(IRONIC + "/"))
        self.assertFalse(post.is_ironic_receiver(INSPECTOR))


class PostTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.receiver = FakeInspectionReceiver()
        self.receiver.add_node(macs=[MAC])
        self.http = StubTreq(self.receiver.app.resource())
        self.clock = Clock()

    def post(self, url: str, data: Any = DATA, http: Any = None, **kwargs: Any
             ) -> Deferred[post.InspectionAnswer]:
        kwargs.setdefault("uniform", fixed(1.0))
        return Deferred.fromCoroutine(post.post_inspection_data(
            http or self.http, url, data, self.clock, **kwargs))

    def test_inspector_answers_the_uuid(self) -> None:
        answer = self.successResultOf(self.post(INSPECTOR))
        self.assertEqual(answer, post.InspectionAnswer(DEFAULT_NODE_UUID, None))
        [received] = self.receiver.posts
        self.assertEqual(received.data, DATA)
        self.assertEqual(received.headers["content-type"], "application/json")
        self.assertNotIn("x-openstack-ironic-api-version", received.headers)

    def test_ironic_answers_lookup_content(self) -> None:
        answer = self.successResultOf(self.post(IRONIC))
        self.assertEqual(answer.node_uuid, DEFAULT_NODE_UUID)
        assert answer.lookup is not None
        self.assertEqual(answer.lookup["node"]["uuid"], DEFAULT_NODE_UUID)
        self.assertEqual(answer.lookup["config"]["agent_token"], DEFAULT_TOKEN)
        self.assertEqual(self.receiver.posts[0].headers["x-openstack-ironic-api-version"],
                         "1.84")
        self.assertEqual(self.receiver.posts[0].status, 202)

    def test_5xx_retried_with_the_backoff(self) -> None:
        self.receiver.fail(503, 500, 502)
        uniform = fixed(0.8)
        with capturedLogs() as events:
            posting = self.post(INSPECTOR, uniform=uniform)
            self.assertEqual(len(self.receiver.posts), 1)
            self.clock.advance(0.8 - 0.01)
            self.assertEqual(len(self.receiver.posts), 1)
            self.clock.advance(0.01)
            self.assertEqual(len(self.receiver.posts), 2)
            self.clock.advance(2.7 * 0.8)
            self.assertEqual(len(self.receiver.posts), 3)
            self.assertNoResult(posting)
            self.clock.advance(7.29 * 0.8)
        self.assertEqual(self.successResultOf(posting).node_uuid, DEFAULT_NODE_UUID)
        self.assertEqual([p.status for p in self.receiver.posts], [503, 500, 502, 200])
        warnings = [e for e in events if "retrying" in e["log_format"]]
        self.assertEqual([e["attempt"] for e in warnings], [1, 2, 3])
        self.assertIn("status 503: Injected failure", warnings[0]["error"])

    def test_connection_errors_retried(self) -> None:
        http = FlakyHTTP(self.http, refusals=2)
        posting = self.post(IRONIC, http=http)
        self.clock.advance(1.0)
        self.assertNoResult(posting)
        self.clock.advance(2.7)
        self.assertEqual(self.successResultOf(posting).node_uuid, DEFAULT_NODE_UUID)
        self.assertEqual(http.requests, 3)

    def test_several_urls_the_next_after_a_connection_error(self) -> None:
        class RefusingOne:
            def __init__(self, http: Any) -> None:
                self.http, self.urls = http, []  # type: Any, list[str]

            def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
                self.urls.append(url)
                if url.startswith("http://down"):
                    return fail(ConnectionRefusedError("refused"))
                result: Deferred[Any] = self.http.request(method, url, **kwargs)
                return result

        http = RefusingOne(self.http)
        down = "http://down:6385/v1/continue_inspection"
        with capturedLogs() as events:
            answer = self.successResultOf(self.post(f"{down},{IRONIC}", http=http))
        self.assertEqual(answer.node_uuid, DEFAULT_NODE_UUID)
        self.assertEqual(http.urls, [down, IRONIC])
        self.assertEqual([e["url"] for e in events if "next URL" in e["log_format"]], [down])
        self.assertEqual(self.receiver.posts[0].headers["x-openstack-ironic-api-version"],
                         "1.84")

    def test_several_urls_a_5xx_ends_the_attempt(self) -> None:
        self.receiver.fail(503)
        posting = self.post(f"{INSPECTOR},{IRONIC}")
        self.assertNoResult(posting)
        self.assertEqual(len(self.receiver.posts), 1)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(posting).node_uuid, DEFAULT_NODE_UUID)
        self.assertEqual([p.status for p in self.receiver.posts], [503, 200])

    def test_gives_up_after_the_attempts(self) -> None:
        http = FlakyHTTP(self.http, refusals=100)
        posting = self.post(INSPECTOR, http=http, attempts=3)
        self.clock.pump([1.0, 2.7])
        error = self.failureResultOf(posting, InspectionError).value
        self.assertIn("failed 3 times", str(error))
        self.assertIn("ConnectionRefusedError", str(error))
        self.assertEqual(http.requests, 3)

    def test_unlimited_attempts(self) -> None:
        http = FlakyHTTP(self.http, refusals=20)
        posting = self.post(INSPECTOR, http=http, attempts=None)
        self.clock.pump([1200.0] * 20)
        self.assertEqual(self.successResultOf(posting).node_uuid, DEFAULT_NODE_UUID)
        self.assertEqual(http.requests, 21)

    def test_4xx_is_final_with_the_inspector_message(self) -> None:
        data = {"inventory": {"interfaces": [{"name": "eth9",
                                              "mac_address": "00:11:22:33:44:55"}]}}
        error = self.failureResultOf(self.post(INSPECTOR, data), InspectionError).value
        self.assertIn("status 404", str(error))
        self.assertIn("Could not find a node for attributes", str(error))
        self.assertEqual(len(self.receiver.posts), 1)

    def test_4xx_is_final_with_ironic_faultstring(self) -> None:
        error = self.failureResultOf(self.post(IRONIC, {"inventory": {"interfaces": []}}),
                                     InspectionError).value
        self.assertIn("status 400: Invalid data: 'interfaces' should be non-empty",
                      str(error))

    def test_request_timeout_is_retried(self) -> None:
        class Hanging:
            calls = 0

            def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
                Hanging.calls += 1
                return Deferred()

        posting = self.post(INSPECTOR, http=Hanging(), attempts=2, timeout=30)
        self.clock.advance(30)
        self.assertEqual(Hanging.calls, 1)
        self.clock.advance(1.0)
        self.assertEqual(Hanging.calls, 2)
        self.clock.advance(30)
        self.assertIn("TimeoutError", str(self.failureResultOf(posting, InspectionError)))

    def test_the_logs_are_not_logged(self) -> None:
        with capturedLogs() as events:
            self.successResultOf(self.post(INSPECTOR))
        [debug] = [e for e in events if "data" in e and "log_format" in e
                   and e["log_format"].startswith("Inspection data:")]
        self.assertNotIn("logs", debug["data"])
        self.assertIn("inventory", debug["data"])


class AnswerTests(SynchronousTestCase):
    def test_shapes(self) -> None:
        parse = post.parse_answer
        self.assertEqual(parse(b'{"uuid": "u1"}'), post.InspectionAnswer("u1"))
        self.assertEqual(parse(b'{"node": {"uuid": "u2"}}'),
                         post.InspectionAnswer("u2", {"node": {"uuid": "u2"}, "config": {}}))
        self.assertEqual(parse(b""), post.InspectionAnswer(None))
        self.assertEqual(parse(b"[]"), post.InspectionAnswer(None))
        self.assertEqual(parse(b'{"uuid": ""}'), post.InspectionAnswer(None))
        with capturedLogs() as events:
            self.assertEqual(parse(b"<html>"), post.InspectionAnswer(None))
        self.assertEqual(len(events), 1)

    def test_lookup_content_is_what_the_agent_adopts(self) -> None:
        document = {"node": {"uuid": "u3", "properties": {}},
                    "config": {"agent_token": "t" * 32, "heartbeat_timeout": 60}}
        answer = post.parse_answer(json.dumps(document).encode())
        self.assertEqual(answer.lookup, document)
