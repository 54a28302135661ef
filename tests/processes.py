"""Helpers for integration tests: real child processes (the agent, a fake Ironic) on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest

from ipa_twisted.testing.sandbox import LoopDevice, sandbox_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Agents started by tests never reboot or power off this machine, whatever asks them to.
SAFE_POWER = "reboot_command = true\npoweroff_command = true\n"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """The environment for children: this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def physical_macs() -> list[str]:
    """MAC addresses of this machine's physical network interfaces."""
    macs = []
    for name in sorted(os.listdir("/sys/class/net")):
        base = f"/sys/class/net/{name}"
        if os.path.exists(f"{base}/device"):
            with open(f"{base}/address") as f:
                mac = f.read().strip()
            if mac and mac != "00:00:00:00:00:00":
                macs.append(mac)
    return macs


def physical_macs_or_skip() -> list[str]:
    """``physical_macs()``; the test is skipped when there is none to look a node up by."""
    macs = physical_macs()
    if not macs:
        raise SkipTest("this machine has no physical network interface to look up by")
    return macs


class Child(ProcessProtocol):
    """A child process whose output lines the test can wait for."""

    port = 0
    """The TCP port it serves on, when the helper that started it chose one."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.output = b""
        self.ended: Deferred[int | None] = Deferred()
        self.exit_code: int | None = None
        self.signal: int | None = None
        self._waiters: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []
        self.process = reactor.spawnProcess(self, self.argv[0], self.argv,
                                            env or child_env(), path=ROOT)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        for pattern, waiter in list(self._waiters):
            match = pattern.search(self.output)
            if match:
                self._waiters.remove((pattern, waiter))
                waiter.callback(match)

    def processEnded(self, reason: Failure) -> None:
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        if isinstance(reason.value, ProcessDone):
            self.exit_code = 0
        for _, waiter in self._waiters:
            waiter.errback(AssertionError(
                f"{self.argv[:4]} ended ({self.exit_code}) before printing what was "
                f"awaited; output:\n{self.output.decode(errors='replace')[-3000:]}"))
        self._waiters = []
        self.ended.callback(self.exit_code)

    @property
    def stopped_cleanly(self) -> bool:
        """Exited 0, or (twistd's way) re-raised the SIGTERM it stopped on."""
        return self.exit_code == 0 or (self.exit_code is None and self.signal == 15)

    async def wait_for(self, pattern: bytes, timeout: float = 30) -> re.Match[bytes]:
        """The first match of ``pattern`` in the output, waiting up to ``timeout``."""
        compiled = re.compile(pattern)
        match = compiled.search(self.output)
        if match:
            return match
        if self.ended.called:
            raise AssertionError(f"ended before {pattern!r}: {self.output[-3000:]!r}")
        waiter: Deferred[re.Match[bytes]] = Deferred()
        self._waiters.append((compiled, waiter))
        waiter.addTimeout(timeout, reactor)
        try:
            return await waiter
        except Exception:
            if (compiled, waiter) in self._waiters:
                self._waiters.remove((compiled, waiter))
            raise AssertionError(f"no {pattern!r} within {timeout}s; output:\n"
                                 f"{self.output.decode(errors='replace')[-3000:]}")

    async def stop(self, sig: str = "TERM", timeout: float = 15) -> int | None:
        """Signal the child and wait for it to end (KILL after ``timeout``)."""
        if not self.ended.called:
            try:
                self.process.signalProcess(sig)
            except Exception:
                pass
            guard = reactor.callLater(timeout, self._kill)
            await self.ended
            if guard.active():
                guard.cancel()
        return self.exit_code

    def _kill(self) -> None:
        if not self.ended.called:
            os.kill(self.process.pid, signal.SIGKILL)


async def sleep(seconds: float) -> None:
    """Wait on the reactor."""
    await deferLater(reactor, seconds, lambda: None)


async def poll(check: Any, timeout: float = 30, interval: float = 0.1) -> Any:
    """Call ``check()`` (sync or async) until it returns something truthy.

    ``timeout`` counts the pauses between checks, not the checks' own time: a check that
    hangs needs its own time limit, and a slow one stretches the wait (on a loaded machine
    that is the point; a test that needs a wall-clock deadline keeps its own).
    """
    waited = 0.0
    last_error: Exception | None = None
    while waited < timeout:
        try:
            value = check()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
        except Exception as e:  # not ready yet
            last_error = e
        await sleep(interval)
        waited += interval
    raise AssertionError(f"condition not met within {timeout}s (last error: {last_error!r})")


def in_sandbox(loops: Sequence[LoopDevice]) -> Callable[[list[str]], list[str]]:
    """An argv wrapper running a program in the disk sandbox, seeing only ``loops``."""
    def wrap(argv: list[str]) -> list[str]:
        wrapped = sandbox_argv(loops, argv)
        wrapped[0] = shutil.which(wrapped[0]) or wrapped[0]
        return wrapped
    return wrap


def start_agent(test: Any, directory: str, *, api_url: str | None = None,
                name: str = "agent", config: str = "", env: dict[str, str] | None = None,
                wrap: Callable[[list[str]], list[str]] | None = None,
                debug: bool = True, sandbox: Sequence[LoopDevice] | None = None) -> Child:
    """A real ``twistd ipa`` on a free port (``.port``) of 127.0.0.1, killed in ``test``'s
    cleanup: looking ``api_url`` up, else standalone.

    ``config`` adds ``[DEFAULT]`` lines; power commands are harmless and the kernel command
    line is empty. ``env`` replaces ``child_env()``; ``wrap`` rewrites the argv (a network
    namespace); ``sandbox`` runs it in the disk sandbox with those loop devices, its only
    disks (``include_loop_devices``).
    """
    if sandbox is not None:
        wrap, config = in_sandbox(sandbox), "include_loop_devices = true\n" + config
    port = free_port()
    config_path = os.path.join(directory, f"{name}.conf")
    cmdline = os.path.join(directory, f"{name}.cmdline")
    with open(config_path, "w") as f:
        f.write(f"[DEFAULT]\nadvertise_port = {port}\nlookup_interval = 0.2\n{config}"
                f"{SAFE_POWER}")
    with open(cmdline, "w") as f:
        f.write("\n")
    argv = TWISTD + ["-n", "--pidfile=", "ipa", "--no-default-config-files",
                     "--config-file", config_path, "--cmdline-path", cmdline,
                     "--listen", f"127.0.0.1:{port}"]
    argv += ["--api-url", api_url] if api_url else ["--standalone"]
    if debug:
        argv.append("--debug")
    if wrap is not None:
        argv = wrap(argv)
    else:
        argv, env = _guard_host(argv, env if env is not None else child_env(), directory)
    agent = Child(argv, env)
    agent.port = port
    test.addCleanup(agent.stop, "KILL")
    return agent


# An agent outside the disk sandbox sees this machine's disks, /proc and interfaces. What
# Ironic may ask of it (standby.sync flushes every disk's buffers and drops the kernel's
# caches; lockdown takes the interfaces down) must not reach them: blockdev's writing verbs
# and ``ip ... down`` are shadowed on its PATH and, as root, it runs in a private mount
# namespace where drop_caches and sysrq-trigger are /dev/null.
_BLOCKDEV_SHIM = """#!/bin/sh
for arg in "$@"; do
  case "$arg" in --flushbufs|--rereadpt|--setro|--setrw|--setra|--setfra|--setbsz)
    echo "blockdev $*" >>"$(dirname "$0")/refused.log"; exit 0;; esac
done
exec /usr/sbin/blockdev "$@"
"""
_PRIVATE_PROC = ('for f in /proc/sys/vm/drop_caches /proc/sysrq-trigger; do '
                 '[ ! -e "$f" ] || mount --bind /dev/null "$f" || exit 1; done; exec "$@"')


def _guard_host(argv: list[str], env: dict[str, str],
                directory: str) -> tuple[list[str], dict[str, str]]:
    """``argv`` and ``env`` for an agent outside the sandbox, unable to flush or drop
    this machine's disks and caches; shadowed commands are listed in
    ``DIRECTORY/host-shims/refused.log``."""
    shims = os.path.join(directory, "host-shims")
    os.makedirs(shims, exist_ok=True)
    path = os.path.join(shims, "blockdev")
    with open(path, "w") as f:
        f.write(_BLOCKDEV_SHIM)
    os.chmod(path, 0o755)
    from ipa_twisted.testing.sandbox_init import IP_GUARD
    real_ip = shutil.which("ip", path=env.get("PATH"))
    if real_ip is not None:
        ip = os.path.join(shims, "ip")
        with open(ip, "w") as f:
            f.write(IP_GUARD.format(ip=real_ip))
        os.chmod(ip, 0o755)
    env = dict(env, PATH=shims + os.pathsep + env.get("PATH", os.defpath))
    if os.geteuid() == 0:
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _PRIVATE_PROC,
                "sh", *argv]
    return argv, env


class FakeIronicProcess:
    """``python -m ipa_twisted.testing.fake_ironic`` on 127.0.0.1, recording each request
    it answers in a JSON-lines file (``records``).

    It can be killed, paused (SIGSTOP: connections are accepted by the kernel and never
    answered) and restarted on the same port to play an outage; every process it started
    is resumed and killed in ``test``'s cleanup.
    """

    def __init__(self, test: Any, directory: str, *, macs: Sequence[str], node_uuid: str,
                 token: str, heartbeat_timeout: float,
                 lookup_config: dict[str, Any] | None = None) -> None:
        self.record = os.path.join(directory, "ironic.jsonl")
        self.port = 0
        self._args = [sys.executable, "-m", "ipa_twisted.testing.fake_ironic",
                      "--node-uuid", node_uuid, "--token", token, "--heartbeat-timeout",
                      str(heartbeat_timeout), "--record", self.record]
        if lookup_config:
            self._args += ["--lookup-config", json.dumps(lookup_config)]
        for mac in macs:
            self._args += ["--mac", mac]
        self._children: list[Child] = []
        test.addCleanup(self.kill)

    @property
    def child(self) -> Child:
        """The process started last."""
        return self._children[-1]

    async def start(self, port: int | None = None) -> int:
        """Start it on ``port`` (else the port it had, else a free one); its port."""
        port = self.port if port is None else port
        self._children.append(Child(self._args + ["--port", str(port)]))
        self.port = int((await self.child.wait_for(rb"listening on (\d+)")).group(1))
        return self.port

    def pause(self) -> None:
        """Freeze it (SIGSTOP): requests hang unanswered until ``resume``."""
        os.kill(self.child.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if not self.child.ended.called:
            os.kill(self.child.process.pid, signal.SIGCONT)

    async def kill(self) -> None:
        """End every process it started (a paused one too)."""
        for child in self._children:
            if not child.ended.called:
                os.kill(child.process.pid, signal.SIGCONT)
            await child.stop("KILL")

    def records(self, kind: str) -> list[dict[str, Any]]:
        """What it recorded of ``kind`` ("lookup", "heartbeat", "version"), oldest first."""
        if not os.path.exists(self.record):
            return []
        with open(self.record) as f:
            return [r for r in map(json.loads, f) if r["kind"] == kind]


def http_client(trusted_pem: str | None = None) -> Any:
    """A treq client without persistent connections (trial wants none left open); for
    HTTPS, trusting only ``trusted_pem`` (as Ironic trusts the agent's CA)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent as WebAgent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    if trusted_pem is None:
        return HTTPClient(WebAgent(reactor, pool=pool))
    from twisted.internet.ssl import Certificate

    from ipa_twisted.http import AgentTLSPolicy
    policy = AgentTLSPolicy(trust_root=Certificate.loadPEM(trusted_pem.encode()))
    return HTTPClient(WebAgent(reactor, contextFactory=policy, pool=pool))


async def request_json(method: str, url: str, body: Any = None, *, client: Any = None,
                       timeout: float = 30, **params: str) -> tuple[int, Any]:
    """(status, decoded JSON body) of one request; ``params`` make the query string."""
    client = client or http_client()
    response = await client.request(method, url, params=params, timeout=timeout,
                                    **({} if body is None else {"json": body}))
    return response.code, await response.json()
