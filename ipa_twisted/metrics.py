"""Metrics: timers, counters and gauges sent to statsd over UDP, or nowhere.

The backend and prefixes come from the configuration, which lookup may change (Ironic sends
``metrics`` and ``metrics_statsd`` settings), so the logger is asked for anew each time
rather than kept.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from ipa_twisted.config import AgentConfig

log = Logger()


class _StatsdSender(DatagramProtocol):
    """One UDP socket for every metric; sends never block and errors are dropped."""

    def __init__(self) -> None:
        self.sent = 0

    def send(self, line: bytes, address: tuple[str, int]) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(line, address)
            self.sent += 1
        except OSError as e:  # a full socket buffer or an unreachable host: metrics only
            log.debug("Metric not sent to {address}: {error}", address=address, error=str(e))


class Metrics:
    """Sends metrics as the configuration says; ``get(config, node_uuid)`` per use."""

    def __init__(self, reactor: Any, resolve: Callable[[str], str] | None = None) -> None:
        self._reactor = reactor
        self._sender: _StatsdSender | None = None
        self._resolve = resolve or self._numeric_only
        self._addresses: dict[str, str] = {}

    @staticmethod
    def _numeric_only(host: str) -> str:
        # statsd hosts are addresses in practice; a name resolves once, at first use.
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            return host
        except OSError:
            return socket.gethostbyname(host)  # reactor-safe: once per host, cached

    def _send(self, config: AgentConfig, line: str) -> None:
        if self._sender is None:
            self._sender = _StatsdSender()
            self._reactor.listenUDP(0, self._sender)
        host = self._addresses.get(config.metrics_statsd_host)
        if host is None:
            try:
                host = self._resolve(config.metrics_statsd_host)
            except OSError as e:
                log.warn("Cannot resolve statsd host {host}: {error}",
                         host=config.metrics_statsd_host, error=str(e))
                return
            self._addresses[config.metrics_statsd_host] = host
        self._sender.send(line.encode("utf-8"), (host, config.metrics_statsd_port))

    def prefix(self, config: AgentConfig, node_uuid: str | None) -> str:
        """The name prefix: global prefix, host (maybe reversed), node UUID."""
        parts = []
        if config.metrics_global_prefix:
            parts.append(config.metrics_global_prefix)
        if config.metrics_prepend_host:
            host = socket.gethostname()
            if config.metrics_prepend_host_reverse:
                host = ".".join(reversed(host.split(".")))
            parts.append(host)
        if config.metrics_prepend_uuid and node_uuid:
            parts.append(node_uuid)
        return ".".join(parts)

    def _emit(self, config: AgentConfig, node_uuid: str | None, name: str, value: float,
              kind: str) -> None:
        if config.metrics_backend != "statsd":
            return
        prefix = self.prefix(config, node_uuid)
        full = f"{prefix}.{name}" if prefix else name
        self._send(config, f"{full}:{value:g}|{kind}")

    def counter(self, config: AgentConfig, node_uuid: str | None, name: str,
                count: int = 1) -> None:
        """Count ``name`` up by ``count``."""
        self._emit(config, node_uuid, name, count, "c")

    def gauge(self, config: AgentConfig, node_uuid: str | None, name: str,
              value: float) -> None:
        """Set gauge ``name`` to ``value``."""
        self._emit(config, node_uuid, name, value, "g")

    def timing(self, config: AgentConfig, node_uuid: str | None, name: str,
               milliseconds: float) -> None:
        """Record a duration for ``name``."""
        self._emit(config, node_uuid, name, milliseconds, "ms")

    @contextmanager
    def timer(self, config: AgentConfig, node_uuid: str | None, name: str) -> Iterator[None]:
        """Time the block (also when it raises)."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.timing(config, node_uuid, name, (time.monotonic() - started) * 1000)

    def close(self) -> None:
        """Close the UDP socket."""
        if self._sender is not None and self._sender.transport is not None:
            self._sender.transport.stopListening()
        self._sender = None
