"""Faults and secrets, with real ``twistd ipa`` children on 127.0.0.1.

- Ironic unreachable for a minute while the agent looks the node up (nothing listens on its
  port), then for a minute while it heartbeats (the fake Ironic frozen with SIGSTOP, so
  requests hang unanswered): the agent keeps retrying, explains why in its log, keeps
  answering its API quickly, and looks up / heartbeats again once Ironic is back.
- A command whose program hangs: killed and reaped at ``command_timeout``, the command
  FAILED with an error naming the program and the timeout.
- SIGTERM while a command's program runs: the agent stops cleanly, and the program with it.
- Secrets: the agent token and a rescue password reach neither the ``--debug`` log nor the
  command results.

The hanging program is a fake ``sync`` first on the agent's PATH (the runner's PATH is the
agent's). Bounded in time: about 2.5 minutes in all, nearly all of it the two outages
(``IPA_OUTAGE_SECONDS``, default 60, sets their length).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any
from urllib.parse import quote, quote_plus

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from ipa_twisted.ironic.client import REQUEST_TIMEOUT
from tests.processes import (Child, FakeIronicProcess, child_env, free_port, http_client,
                             physical_macs, poll, request_json, sleep, start_agent)

OUTAGE = float(os.environ.get("IPA_OUTAGE_SECONDS", "60"))
NODE = "5d2b8a38-2d2c-4bd4-9e1e-0f3f6a1b7c21"
# Characters that URL encoding changes, so that an encoded copy in a log is found too.
TOKEN = "fault+token/with=odd&chars_" + "t" * 24
RESCUE_PASSWORD = "p@ss w0rd/+=&ö-rescue"
HEARTBEAT_TIMEOUT = 2.0
STATUS_LATENCY = 0.5
# After Ironic comes back: lookup waits at most 30 s between attempts; a heartbeat in flight
# gives up after 30 s and the next comes 5-10 s later.
LOOKUP_RESUME = 45.0
HEARTBEAT_RESUME = 45.0


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def kill_all(marker: str) -> None:
    """SIGKILL what a failed test may have left running."""
    for pid in processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def exists(pid: int) -> bool:
    """Whether ``pid`` is still a process, running or a zombie (not yet reaped)."""
    return os.path.exists(f"/proc/{pid}")


def secret_forms(secret: str) -> list[bytes]:
    """``secret`` as it could appear in a log: plain, URL-encoded, JSON-escaped."""
    forms = {secret, quote(secret), quote(secret, safe=""), quote_plus(secret),
             json.dumps(secret)[1:-1]}
    return [form.encode() for form in forms]


class FaultTests(TestCase):
    """Outages of Ironic, a hanging program, SIGTERM during a command."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    async def status_through(self, agent: Child, base: str, seconds: float,
                             client: Any = None) -> list[float]:
        """Ask ``GET /v1/status`` again and again for ``seconds``: each answer's latency."""
        latencies = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            code, body = await request_json("GET", f"{base}/v1/status", client=client,
                                            timeout=5)
            latencies.append(time.monotonic() - started)
            self.assertEqual(code, 200)
            self.assertIn("started_at", body)
            self.assertIsNone(agent.exit_code, agent.output[-2000:])
            await sleep(0.2)
        self.assertLess(max(latencies), STATUS_LATENCY, latencies)
        return latencies

    # -- Ironic unreachable -----------------------------------------------------------------

    async def test_ironic_unreachable_during_lookup_then_heartbeats(self) -> None:
        macs = physical_macs()
        if not macs:
            raise self.skipTest("this machine has no physical network interface to look up by")
        ironic = FakeIronicProcess(self, self.dir, macs=macs, node_uuid=NODE, token=TOKEN,
                                   heartbeat_timeout=HEARTBEAT_TIMEOUT)
        ironic_port = free_port()  # nothing listens there yet
        agent = start_agent(self, self.dir, api_url=f"http://127.0.0.1:{ironic_port}")
        base = f"http://127.0.0.1:{agent.port}"
        await poll(lambda: request_json("GET", f"{base}/v1/status", timeout=2), timeout=30)

        # Lookup: refused for a minute; the agent says so, retries and answers meanwhile.
        answered = await self.status_through(agent, base, OUTAGE)
        retries = agent.output.count(b"(attempt ")
        self.assertGreaterEqual(retries, 3, agent.output[-3000:])
        self.assertIn(b"Lookup of node with addresses", agent.output)
        self.assertIn(b"ConnectionRefusedError", agent.output)
        self.assertIn(f"127.0.0.1:{ironic_port}/v1/lookup".encode(), agent.output)
        self.assertEqual(ironic.records("lookup"), [])

        # Ironic comes up on that port: lookup succeeds, heartbeats flow (now over HTTPS).
        back = time.monotonic()
        await ironic.start(ironic_port)
        await poll(lambda: [r for r in ironic.records("lookup") if r["status"] == 200],
                   timeout=LOOKUP_RESUME)
        beats = await poll(lambda: len(ironic.records("heartbeat")) >= 2 and
                           ironic.records("heartbeat"), timeout=30)
        print(f"\n  lookup outage: {len(answered)} status answers, max "
              f"{max(answered):.3f}s; {retries} lookup attempts logged; heartbeats "
              f"{time.monotonic() - back:.1f}s after Ironic came back")
        client = http_client(beats[0]["body"]["agent_verify_ca"])
        base = f"https://127.0.0.1:{agent.port}"

        # Heartbeats: Ironic frozen for a minute; requests hang until they time out.
        ironic.pause()
        failed_before = agent.output.count(b"Heartbeat failed")
        answered = await self.status_through(agent, base, OUTAGE, client)
        frozen_beats = len(ironic.records("heartbeat"))
        if OUTAGE > REQUEST_TIMEOUT:  # a beat in flight has given up: it says why
            failures = agent.output.count(b"Heartbeat failed: HeartbeatConnectionError")
            self.assertGreater(failures, failed_before, agent.output[-3000:])
        ironic.resume()
        back = time.monotonic()
        sent_before = agent.output.count(b"Heartbeat sent")
        await poll(lambda: len(ironic.records("heartbeat")) >= frozen_beats + 2 and
                   agent.output.count(b"Heartbeat sent") >= sent_before + 2,
                   timeout=HEARTBEAT_RESUME)
        resumed = time.monotonic() - back
        print(f"  heartbeat outage: {len(answered)} status answers, max "
              f"{max(answered):.3f}s; heartbeats again {resumed:.1f}s after Ironic resumed")
        self.assertEqual((await request_json("GET", f"{base}/v1/status", client=client))[0],
                         200)
        self.assertNotIn(b"Traceback", agent.output)
        await agent.stop("TERM")
        self.assertTrue(agent.stopped_cleanly, agent.output[-2000:])

    test_ironic_unreachable_during_lookup_then_heartbeats.timeout = (  # type: ignore
        2 * OUTAGE + LOOKUP_RESUME + HEARTBEAT_RESUME + 90)

    # -- a hanging program ------------------------------------------------------------------

    def hanging_agent(self, command_timeout: float) -> tuple[Child, str, str]:
        """A standalone agent whose ``sync`` hangs: (agent, its base URL, the pid file)."""
        bin_dir = os.path.join(self.dir, "bin")
        os.makedirs(bin_dir)
        pids = os.path.join(self.dir, "sync.pids")
        with open(os.path.join(bin_dir, "sync"), "w") as f:
            f.write(f"#!{sys.executable}\nimport os, time\n"
                    f"with open({pids!r}, 'a') as f:\n    f.write(f'{{os.getpid()}}\\n')\n"
                    "time.sleep(3600)\n")
        os.chmod(os.path.join(bin_dir, "sync"), 0o755)
        env = child_env()
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        agent = start_agent(self, self.dir, config=f"command_timeout = {command_timeout}\n",
                            env=env)
        self.addCleanup(kill_all, bin_dir)
        return agent, f"http://127.0.0.1:{agent.port}", pids

    async def started_pid(self, pids: str) -> int:
        """The pid of the hanging program, once it runs."""
        def read() -> int | None:
            with open(pids) as f:
                lines = f.read().split()
            return int(lines[0]) if lines else None
        pid: int = await poll(read, timeout=20)
        return pid

    async def test_hanging_program_is_killed_at_command_timeout(self) -> None:
        agent, base, pids = self.hanging_agent(command_timeout=2)
        await poll(lambda: request_json("GET", f"{base}/v1/status", timeout=2), timeout=30)
        started = time.monotonic()
        running = Deferred.fromCoroutine(request_json(
            "POST", f"{base}/v1/commands/", {"name": "standby.sync", "params": {}}))
        pid = await self.started_pid(pids)
        # The API answers while the command waits on its program.
        await self.status_through(agent, base, 1.0)
        code, answer = await running
        elapsed = time.monotonic() - started
        self.assertEqual(code, 200)
        self.assertTrue(2 <= elapsed < 6, elapsed)
        self.assertEqual(answer["command_status"], "FAILED", answer)
        # Killed and reaped before the command ended: not running, not a zombie.
        self.assertFalse(exists(pid), f"{pid} left after the command failed")
        self.assertEqual(processes_with(os.path.join(self.dir, "bin")), [])

        code, listing = await request_json("GET", f"{base}/v1/commands/")
        self.assertEqual(code, 200)
        [listed] = listing["commands"]
        self.assertEqual((listed["id"], listed["command_status"]), (answer["id"], "FAILED"))
        error = listed["command_error"]
        self.assertEqual(error["type"], "CommandExecutionError")
        self.assertIn("'sync'", error["details"])
        self.assertIn("timed out after 2.0 s", error["details"])
        self.assertIn(b"Killed ('sync',) after 2.0s", agent.output)
        self.assertNotIn(b"Traceback", agent.output)
        self.assertIsNone(agent.exit_code)

    async def stop_while_a_program_runs(self, command: dict[str, Any]) -> None:
        """Run ``command`` (its program hangs), then SIGTERM the agent."""
        agent, base, pids = self.hanging_agent(command_timeout=600)
        await poll(lambda: request_json("GET", f"{base}/v1/status", timeout=2), timeout=30)
        running = Deferred.fromCoroutine(request_json("POST", f"{base}/v1/commands/", command))
        running.addErrback(lambda _: None)  # a sync command's connection closes unanswered
        pid = await self.started_pid(pids)
        started = time.monotonic()
        await agent.stop("TERM")
        stopped = time.monotonic() - started
        await running
        self.assertTrue(agent.stopped_cleanly, agent.output[-2000:])
        self.assertLess(stopped, 5, agent.output[-2000:])
        self.assertNotIn(b"Traceback", agent.output)
        # Killed and reaped by the agent before it exited: not left to init.
        self.assertFalse(exists(pid), f"{pid} outlived the agent")
        self.assertEqual(processes_with(os.path.join(self.dir, "bin")), [])

    async def test_sigterm_while_a_sync_command_runs(self) -> None:
        await self.stop_while_a_program_runs({"name": "standby.sync", "params": {}})

    async def test_sigterm_while_an_async_command_runs(self) -> None:
        await self.stop_while_a_program_runs(
            {"name": "flow.start_flow", "params": {"flow": [{"standby.sync": {}}]}})


class SecretTests(TestCase):
    """The agent token and the rescue password are kept out of logs and command results."""

    timeout = 120

    async def test_token_and_rescue_password_stay_secret(self) -> None:
        macs = physical_macs()
        if not macs:
            raise self.skipTest("this machine has no physical network interface to look up by")
        directory = os.path.abspath(self.mktemp())
        etc = os.path.join(directory, "etc")
        os.makedirs(etc)
        ironic = FakeIronicProcess(self, directory, macs=macs, node_uuid=NODE, token=TOKEN,
                                   heartbeat_timeout=HEARTBEAT_TIMEOUT)
        await ironic.start()
        agent = start_agent(self, directory, api_url=f"http://127.0.0.1:{ironic.port}",
                            config=f"etc_path = {etc}\n")
        beats = await poll(lambda: ironic.records("heartbeat"), timeout=30)
        self.assertEqual(beats[0]["body"]["agent_token"], TOKEN)  # Ironic's side has it
        client = http_client(beats[0]["body"]["agent_verify_ca"])
        base = f"https://127.0.0.1:{agent.port}"
        answers = []

        async def call(method: str, path: str, body: Any = None) -> Any:
            code, answer = await request_json(method, f"{base}{path}", body, client=client,
                                              agent_token=TOKEN)
            answers.append(answer)
            return code, answer

        # A rescue that cannot write its password file fails, and the agent stays.
        blocker = os.path.join(etc, "ipa-rescue-config")
        with open(blocker, "w") as f:
            f.write("not a directory\n")
        rescue = {"name": "rescue.finalize_rescue",
                  "params": {"rescue_password": RESCUE_PASSWORD}}
        code, failed = await call("POST", "/v1/commands/", rescue)
        self.assertEqual((code, failed["command_status"]), (200, "FAILED"), failed)
        self.assertEqual((await call("GET", "/v1/commands/"))[0], 200)
        self.assertEqual((await call("GET", f"/v1/commands/{failed['id']}"))[0], 200)
        self.assertIsNone(agent.exit_code)

        # Then it can: the file holds a crypt, and the agent stops after answering.
        os.remove(blocker)
        code, done = await call("POST", "/v1/commands/", rescue)
        self.assertEqual((code, done["command_status"]), (200, "SUCCEEDED"), done)
        await agent.ended
        self.assertTrue(agent.stopped_cleanly, agent.output[-2000:])
        with open(os.path.join(etc, "ipa-rescue-config", "ipa-rescue-password")) as f:
            self.assertTrue(f.read().startswith("$6$"))
        self.assertTrue(os.path.exists(os.path.join(etc, ".rescued")))

        self.assertIn(b"Executing command rescue.finalize_rescue", agent.output)  # --debug
        self.assertIn(b"/v1/commands/", agent.output)  # the access log is on
        for secret in (TOKEN, RESCUE_PASSWORD):
            for form in secret_forms(secret):
                self.assertNotIn(form, agent.output)
                for answer in answers:
                    self.assertNotIn(form, json.dumps(answer).encode())
                    self.assertNotIn(form, json.dumps(answer, ensure_ascii=False).encode())
        self.assertNotIn(b"Traceback", agent.output)
