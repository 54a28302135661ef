"""The REST API's contract: routes, JSON shapes, every error case, token and busy rules."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted import errors
from ipa_twisted.agent import Agent
from ipa_twisted.api.app import AgentAPI
from ipa_twisted.commands import async_command, sync_command
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions.base import Extension

TOKEN = "t" * 40


class ProbeExtension(Extension):
    """Commands whose completion the test controls."""

    name = "probe"
    gate: Deferred[Any]

    @sync_command("echo")
    def echo(self, text: str, count: int = 1) -> str:
        return text * count

    @sync_command("boom")
    def boom(self) -> None:
        raise RuntimeError("kaboom")

    @sync_command("rest_boom")
    def rest_boom(self) -> None:
        raise errors.CleaningError("disk on fire")

    @sync_command("wait")
    async def wait(self) -> Any:
        return await type(self).gate

    @async_command("slow")
    async def slow(self, value: dict[str, Any] | None = None) -> Any:
        return await type(self).gate

    @async_command("polled", answer_within=20)
    async def polled(self) -> Any:
        return await type(self).gate

    @async_command("mismatch")
    def mismatch(self) -> None:
        raise errors.VersionMismatch({"a": "1"}, {"a": "2"})


class APITestCase(SynchronousTestCase):
    token: str | None = TOKEN
    standalone = False

    def setUp(self) -> None:
        ProbeExtension.gate = Deferred()
        self.clock = Clock()
        self.clock.advance(1000)
        config = AgentConfig(agent_token=self.token, standalone=self.standalone)
        from ipa_twisted.extensions.flow import FlowExtension
        self.agent = Agent(config, self.clock, runner=None,  # type: ignore[arg-type]
                           extensions=[ProbeExtension, FlowExtension])
        self.forced: list[float] = []
        self.agent.async_finished.subscribe(lambda _: self.forced.append(self.clock.seconds()))
        self.treq = StubTreq(AgentAPI(self.agent).app.resource())

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                token: str | None | bool = True, **params: str) -> tuple[int, Any]:
        query = dict(params)
        if token is True and self.token:
            query["agent_token"] = self.token
        elif isinstance(token, str):
            query["agent_token"] = token
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        response = self.successResultOf(self.treq.request(
            method, "http://agent:9999" + path, params=query, data=data))
        content = self.successResultOf(response.content())
        try:
            parsed = json.loads(content) if content else None
        except ValueError:
            parsed = content
        return response.code, parsed

    def run_cmd(self, name: str, params: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", "/v1/commands/",
                            {"name": name, "params": {} if params is None else params}, **kw)


class DiscoveryTests(APITestCase):
    def test_root(self) -> None:
        code, body = self.request("GET", "/")
        self.assertEqual(code, 200)
        self.assertEqual(body["name"], "OpenStack Ironic Python Agent API")
        self.assertEqual(body["default_version"]["id"], "v1")
        self.assertEqual(body["default_version"]["links"][0],
                         {"href": "http://agent:9999/v1", "rel": "self"})

    def test_v1(self) -> None:
        code, body = self.request("GET", "/v1/")
        self.assertEqual(code, 200)
        self.assertEqual(body["commands"][0]["href"], "http://agent:9999/v1/commands")
        self.assertEqual(body["status"][1], {"href": "http://agent:9999/status",
                                             "rel": "bookmark"})
        self.assertEqual(body["media_types"][0]["type"],
                         "application/vnd.openstack.ironic-python-agent.v1+json")

    def test_v1_without_slash_redirects_308(self) -> None:
        response = self.successResultOf(self.treq.get("http://agent:9999/v1",
                                                      allow_redirects=False))
        self.assertEqual(response.code, 308)
        self.assertEqual(response.headers.getRawHeaders(b"location"),
                         [b"http://agent:9999/v1/"])

    def test_status_and_alias(self) -> None:
        for path in ("/v1/status", "/status"):
            code, body = self.request("GET", path)
            self.assertEqual(code, 200)
            self.assertEqual(body, {"started_at": 1000, "version": self.agent.version})

    def test_status_needs_no_token(self) -> None:
        self.assertEqual(self.request("GET", "/v1/status", token=False)[0], 200)

    def test_unknown_route_is_json_404(self) -> None:
        code, body = self.request("GET", "/v2/nothing")
        self.assertEqual(code, 404)
        self.assertEqual(body["faultcode"], "Client")

    def test_wrong_method_is_405(self) -> None:
        code, body = self.request("DELETE", "/v1/status")
        self.assertEqual(code, 405)
        self.assertEqual(body["faultcode"], "Client")
        code, _ = self.request("PUT", "/v1/commands/")
        self.assertEqual(code, 405)


class CommandTests(APITestCase):
    def test_sync_command_result_shape(self) -> None:
        code, body = self.run_cmd("probe.echo", {"text": "ab", "count": 2})
        self.assertEqual(code, 200)
        self.assertEqual(set(body), {"id", "command_name", "command_status", "command_error",
                                     "command_result"})
        self.assertEqual(body["command_name"], "echo")
        self.assertEqual(body["command_status"], "SUCCEEDED")
        self.assertIsNone(body["command_error"])
        self.assertEqual(body["command_result"], {"result": "echo: abab"})

    def test_params_are_never_echoed(self) -> None:
        _, body = self.run_cmd("probe.echo", {"text": "secret-password"})
        code, listing = self.request("GET", "/v1/commands/")
        self.assertNotIn("command_params", listing["commands"][0])

    def test_failed_command_is_200_with_error(self) -> None:
        code, body = self.run_cmd("probe.boom")
        self.assertEqual(code, 200)
        self.assertEqual(body["command_status"], "FAILED")
        self.assertEqual(body["command_error"]["type"], "CommandExecutionError")
        self.assertEqual(body["command_error"]["details"], "kaboom")
        self.flushLoggedErrors(RuntimeError)

    def test_sync_command_runs_on_when_its_caller_stops_waiting(self) -> None:
        waiting = Deferred.fromCoroutine(self.agent.execute_command("probe.wait", {}))
        with capturedLogs() as events:
            waiting.cancel()  # what Klein does when the client hangs up
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(events, [])
        _, listing = self.request("GET", "/v1/commands/")
        self.assertEqual([r["command_status"] for r in listing["commands"]], ["RUNNING"])
        # Still in flight: an async command is refused meanwhile.
        self.assertEqual(self.run_cmd("probe.slow")[0], 409)
        ProbeExtension.gate.callback({"done": True})
        _, listing = self.request("GET", "/v1/commands/")
        [result] = [r for r in listing["commands"] if r["command_name"] == "wait"]
        self.assertEqual((result["command_status"], result["command_result"]),
                         ("SUCCEEDED", {"done": True}))
        self.assertEqual(self.run_cmd("probe.slow")[0], 200)

    def test_sync_command_cancelled_from_within_fails_without_traceback(self) -> None:
        waiting = Deferred.fromCoroutine(self.agent.execute_command("probe.wait", {}))
        with capturedLogs() as events:
            ProbeExtension.gate.cancel()  # e.g. a step's own time limit
        self.assertEqual(self.successResultOf(waiting).command_status.name, "FAILED")
        self.assertEqual([(e["log_level"], e.get("command")) for e in events],
                         [(LogLevel.warn, "wait")])
        _, listing = self.request("GET", "/v1/commands/")
        [result] = listing["commands"]
        self.assertEqual(result["command_error"]["details"], "cancelled before it finished")

    def test_rest_error_keeps_its_type(self) -> None:
        _, body = self.run_cmd("probe.rest_boom")
        self.assertEqual(body["command_error"],
                         {"type": "CleaningError", "code": 500, "message": "Clean step failed",
                          "details": "disk on fire"})

    def test_async_command_runs_in_background(self) -> None:
        code, body = self.run_cmd("probe.slow")
        self.assertEqual((code, body["command_status"]), (200, "RUNNING"))
        code, got = self.request("GET", f"/v1/commands/{body['id']}")
        self.assertEqual(got["command_status"], "RUNNING")
        ProbeExtension.gate.callback({"done": True})
        code, got = self.request("GET", f"/commands/{body['id']}")
        self.assertEqual(got["command_status"], "SUCCEEDED")
        self.assertEqual(got["command_result"], {"done": True})
        self.assertEqual(self.forced, [1000], "completion forces one heartbeat")

    def test_wait_true_on_get_blocks_until_done(self) -> None:
        _, body = self.run_cmd("probe.slow")
        waiting = self.treq.get(f"http://agent:9999/v1/commands/{body['id']}",
                                params={"wait": "true", "agent_token": TOKEN})
        self.assertNoResult(waiting)
        ProbeExtension.gate.callback("ok")
        self.treq.flush()
        response = self.successResultOf(waiting)
        got = self.successResultOf(response.json())
        self.assertEqual(got["command_result"], {"result": "slow: ok"})

    def test_wait_true_on_post(self) -> None:
        waiting = self.treq.post("http://agent:9999/v1/commands/",
                                 params={"wait": "True", "agent_token": TOKEN},
                                 data=json.dumps({"name": "probe.slow", "params": {}}))
        self.assertNoResult(waiting)
        ProbeExtension.gate.callback(None)
        self.treq.flush()
        got = self.successResultOf(self.successResultOf(waiting).json())
        self.assertEqual(got["command_status"], "SUCCEEDED")

    def post(self, name: str) -> Any:
        return self.treq.post("http://agent:9999/v1/commands/",
                              params={"agent_token": TOKEN},
                              data=json.dumps({"name": name, "params": {}}))

    def test_polled_command_answers_when_done(self) -> None:
        """An async command Ironic polls right after the answer (answer_within): the
        answer waits for its end, so that first poll finds it finished."""
        waiting = self.post("probe.polled")
        self.clock.advance(19)
        self.assertNoResult(waiting)
        _, listing = self.request("GET", "/v1/commands/")   # listed (and busy) meanwhile
        self.assertEqual([c["command_status"] for c in listing["commands"]], ["RUNNING"])
        ProbeExtension.gate.callback("done")
        self.treq.flush()
        got = self.successResultOf(self.successResultOf(waiting).json())
        self.assertEqual((got["command_status"], got["command_result"]),
                         ("SUCCEEDED", {"result": "polled: done"}))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_polled_command_answers_running_after_its_bound(self) -> None:
        waiting = self.post("probe.polled")
        self.clock.advance(20)
        self.treq.flush()
        got = self.successResultOf(self.successResultOf(waiting).json())
        self.assertEqual(got["command_status"], "RUNNING")
        ProbeExtension.gate.callback("done")                # it ran on meanwhile
        _, again = self.request("GET", f"/v1/commands/{got['id']}")
        self.assertEqual(again["command_status"], "SUCCEEDED")

    def test_other_async_commands_answer_at_once(self) -> None:
        got = self.successResultOf(self.successResultOf(self.post("probe.slow")).json())
        self.assertEqual(got["command_status"], "RUNNING")

    def test_version_mismatch_status(self) -> None:
        _, body = self.run_cmd("probe.mismatch")
        _, got = self.request("GET", f"/v1/commands/{body['id']}")
        self.assertEqual(got["command_status"], "CLEAN_VERSION_MISMATCH")
        self.assertEqual(got["command_error"]["type"], "VersionMismatch")

    def test_list_in_submission_order(self) -> None:
        ids = [self.run_cmd("probe.echo", {"text": str(i)})[1]["id"] for i in range(3)]
        _, body = self.request("GET", "/v1/commands/")
        self.assertEqual([c["id"] for c in body["commands"]], ids)

    def test_unknown_command_id_is_404(self) -> None:
        code, body = self.request("GET", "/v1/commands/nope")
        self.assertEqual(code, 404)
        self.assertEqual(body["faultcode"], "Client")
        self.assertIn("nope", body["faultstring"])


class BusyTests(APITestCase):
    def test_409_while_async_runs_then_accepts(self) -> None:
        self.run_cmd("probe.slow")
        for name, params in (("probe.slow", {}), ("probe.echo", {"text": "x"})):
            code, body = self.run_cmd(name, params)
            self.assertEqual(code, 409)
            self.assertEqual(body["faultcode"], "Client")
            self.assertIn("Agent is busy", body["faultstring"])
        ProbeExtension.gate.callback(None)
        self.assertEqual(self.run_cmd("probe.echo", {"text": "x"})[0], 200)

    def test_busy_requests_are_not_recorded(self) -> None:
        self.run_cmd("probe.slow")
        self.run_cmd("probe.slow")
        self.assertEqual(len(self.agent.list_command_results()), 1)

    def test_failed_async_frees_the_agent(self) -> None:
        self.run_cmd("probe.slow")
        ProbeExtension.gate.errback(RuntimeError("nope"))
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.run_cmd("probe.slow")[0], 200)


class BadRequestTests(APITestCase):
    def assertBad(self, code: int, body: Any, status: int = 400) -> None:
        self.assertEqual(code, status, body)
        self.assertEqual(body["faultcode"], "Client")
        self.assertIsInstance(body["faultstring"], str)

    def test_invalid_json(self) -> None:
        self.assertBad(*self.request("POST", "/v1/commands/", raw=b"{"))

    def test_invalid_utf8(self) -> None:
        self.assertBad(*self.request("POST", "/v1/commands/", raw=b'{"name": "\xff\xfe"}'))

    def test_deep_nesting(self) -> None:
        self.assertBad(*self.request("POST", "/v1/commands/", raw=b"[" * 100000))

    def test_not_an_object(self) -> None:
        self.assertBad(*self.request("POST", "/v1/commands/", [1, 2]))

    def test_missing_name_or_params(self) -> None:
        self.assertBad(*self.request("POST", "/v1/commands/", {"params": {}}))
        self.assertBad(*self.request("POST", "/v1/commands/", {"name": "probe.echo"}))

    def test_params_not_an_object(self) -> None:
        self.assertBad(*self.request("POST", "/v1/commands/",
                                     {"name": "probe.echo", "params": ["x"]}))

    def test_name_without_dot_or_not_a_string(self) -> None:
        self.assertBad(*self.run_cmd("echo", {}))
        self.assertBad(*self.run_cmd(".echo", {}))
        self.assertBad(*self.request("POST", "/v1/commands/", {"name": 5, "params": {}}))

    def test_unknown_extension_is_404(self) -> None:
        self.assertBad(*self.run_cmd("nosuch.echo", {}), status=404)

    def test_unknown_command(self) -> None:
        self.assertBad(*self.run_cmd("probe.nosuch", {}))

    def test_missing_unknown_and_mistyped_params(self) -> None:
        self.assertBad(*self.run_cmd("probe.echo", {}))
        self.assertBad(*self.run_cmd("probe.echo", {"text": "a", "bogus": 1}))
        self.assertBad(*self.run_cmd("probe.echo", {"text": 5}))
        self.assertBad(*self.run_cmd("probe.echo", {"text": "a", "count": True}))
        self.assertBad(*self.run_cmd("probe.slow", {"value": [1]}))

    def test_bad_requests_do_not_poison_the_command_list(self) -> None:
        self.run_cmd("probe.echo", {"text": 5})
        self.run_cmd("probe.nosuch", {})
        self.assertEqual(self.request("GET", "/v1/commands/"), (200, {"commands": []}))
        self.assertEqual(self.run_cmd("probe.echo", {"text": "a"})[0], 200)

    def test_flow_validation(self) -> None:
        self.assertBad(*self.run_cmd("flow.start_flow", {"flow": "x"}))
        self.assertBad(*self.run_cmd("flow.start_flow", {"flow": [{"probe.echo": []}]}))
        self.assertBad(*self.run_cmd("flow.start_flow", {"flow": [{"probe.nope": {}}]}))
        self.assertBad(*self.run_cmd("flow.start_flow", {"flow": [{"probe.echo": {}}]}))

    def test_body_over_limit_is_413(self) -> None:
        big = json.dumps({"name": "probe.echo", "params": {"text": "x" * (2 << 20)}})
        code, body = self.request("POST", "/v1/commands/", raw=big.encode())
        self.assertEqual(code, 413)
        self.assertEqual(body["faultcode"], "Client")


class FlowTests(APITestCase):
    def test_flow_runs_commands_in_order(self) -> None:
        ProbeExtension.gate.callback("g")
        code, body = self.run_cmd("flow.start_flow", {"flow": [
            {"probe.echo": {"text": "a"}}, {"probe.slow": {}}]}, wait="true")
        self.assertEqual(body["command_status"], "SUCCEEDED", body)
        self.assertEqual([c["command_name"] for c in self.request(
            "GET", "/v1/commands/")[1]["commands"]], ["start_flow"])

    def test_flow_stops_at_first_failure(self) -> None:
        code, body = self.run_cmd("flow.start_flow", {"flow": [
            {"probe.rest_boom": {}}, {"probe.slow": {}}]}, wait="true")
        self.assertEqual(body["command_status"], "FAILED")
        self.assertIn("rest_boom failed", body["command_error"]["details"])


class TokenTests(APITestCase):
    def test_every_commands_endpoint_needs_the_token(self) -> None:
        _, body = self.run_cmd("probe.echo", {"text": "a"})
        for token in (False, "wrong", "", TOKEN + "x"):
            for method, path in (("GET", "/v1/commands/"), ("GET", "/commands/"),
                                 ("GET", f"/v1/commands/{body['id']}"),
                                 ("POST", "/v1/commands/"), ("POST", "/commands/")):
                code, answer = self.request(method, path, {"name": "probe.echo",
                                                           "params": {"text": "b"}},
                                            token=token)
                self.assertEqual((code, answer), (401, {"faultcode": "Client",
                                                        "faultstring": "Token invalid."}),
                                 (method, path, token))
        self.assertEqual(len(self.agent.list_command_results()), 1)

    def test_token_checked_before_body(self) -> None:
        self.assertEqual(self.request("POST", "/v1/commands/", raw=b"{", token=False)[0],
                         401)

    def test_token_from_lookup(self) -> None:
        self.agent.agent_token = None
        self.agent.process_lookup_data({"node": {"uuid": "n1"},
                                        "config": {"agent_token": "k" * 32}})
        self.assertEqual(self.request("GET", "/v1/commands/", token="k" * 32)[0], 200)
        self.assertEqual(self.request("GET", "/v1/commands/", token=TOKEN)[0], 401)


class LookupDataTests(APITestCase):
    def test_metrics_settings_applied(self) -> None:
        self.agent.process_lookup_data({"node": {"uuid": "n1"}, "config": {
            "heartbeat_timeout": 60, "metrics": {"backend": "statsd", "prepend_uuid": True,
                                                 "bogus": 1, "prepend_host": "yes",
                                                 "global_prefix": None},
            "metrics_statsd": {"statsd_host": "10.0.0.5", "statsd_port": 8126}}})
        config = self.agent.config
        self.assertEqual((config.metrics_backend, config.metrics_prepend_uuid,
                          config.metrics_prepend_host, config.metrics_statsd_host,
                          config.metrics_statsd_port),
                         ("statsd", True, True, "10.0.0.5", 8126))
        self.assertEqual(self.agent.heartbeat_timeout, 60)

    def test_short_or_masked_token_ignored(self) -> None:
        for token in ("short", "******"):
            self.agent.process_lookup_data({"node": {"uuid": "n1"},
                                            "config": {"agent_token": token}})
            self.assertEqual(self.agent.agent_token, TOKEN)


class NoTokenTests(APITestCase):
    """Without a token of its own (standalone), the agent takes requests without one."""

    token = None
    standalone = True

    def test_open_without_token(self) -> None:
        self.assertEqual(self.run_cmd("probe.echo", {"text": "a"})[0], 200)

    def test_a_token_the_agent_never_issued_is_refused(self) -> None:
        self.assertEqual(self.run_cmd("probe.echo", {"text": "a"}, token="guess")[0], 401)


class TokenNeverLoggedTests(APITestCase):
    def test_token_not_in_logs(self) -> None:
        from twisted.logger import capturedLogs, formatEvent
        with capturedLogs() as events:
            self.run_cmd("probe.echo", {"text": "a"})
            self.run_cmd("probe.boom")
            self.request("GET", "/v1/commands/", token="wrong-token-value")
        self.flushLoggedErrors(RuntimeError)
        text = " ".join(formatEvent(e) + repr(e) for e in events)
        self.assertNotIn(TOKEN, text)
        self.assertNotIn("wrong-token-value", text)
