"""Helpers for integration tests: real child processes (the agent, a fake Ironic) on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

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


class Child(ProcessProtocol):
    """A child process whose output lines the test can wait for."""

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
    """Call ``check()`` (sync or async) until it returns something truthy."""
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
