"""What Ironic is told once the node is known: where the API is, then heartbeats."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ipa_twisted.agent import Agent
from ipa_twisted.ironic.client import IronicClient, callback_url
from ipa_twisted.ironic.heartbeat import Heartbeater
from ipa_twisted.net.autotls import SwitchableTLSFactory, prepare_api_tls
from ipa_twisted.startup.tree import Stage
from ipa_twisted.when import When


class Advertised(NamedTuple):
    """What each heartbeat tells Ironic about the API."""

    url: str
    verify_ca: str | None


class AdvertiseService(Stage[Advertised]):
    """Once the node is known: the address to advertise (``advertise_host``, else the one
    that reaches Ironic: ``find_address()``), and the API's TLS. Manual TLS follows
    lookup's tls_min_version/tls_cipher_suites from the next connection on (those made
    before under other settings end here); automatic TLS, when Ironic supports it, starts
    for new connections."""

    def __init__(self, agent: Agent, ironic: Callable[[], IronicClient],
                 find_address: Callable[[], Awaitable[str]],
                 api_tls: SwitchableTLSFactory | None, after: When[Any], clock: IReactorTime,
                 fatal: Callable[[Failure], object] | None = None) -> None:
        super().__init__(fatal)
        self._agent, self._ironic, self._find_address = agent, ironic, find_address
        self._api_tls, self._after, self._clock = api_tls, after, clock

    async def run(self) -> Advertised:
        await self._after.wait()
        config = self._agent.config
        host = config.advertise_host or await self._find_address()
        protocol, verify_ca = config.advertise_protocol, None
        if self._api_tls is not None:
            self._api_tls.close_outdated()
            tls = await prepare_api_tls(config, self._ironic(), host, clock=self._clock,
                                        current=lambda: self._agent.config,
                                        runner=self._agent.runner)
            if tls.context is not None:
                self._api_tls.start_tls(tls.context)
            protocol, verify_ca = tls.protocol, tls.agent_verify_ca
        url = callback_url(host, config.advertise_port, protocol)
        self.log.info("Advertising {url} to Ironic", url=url)
        return Advertised(url, verify_ca)


COMMAND_DONE_BEAT_INTERVAL = 1.0
"""Shortest time (s) between a beat and the one an ended async command asks for. Beats never
overlap, and any number of commands ending within it make one beat."""


def heartbeats(agent: Agent, ironic: Callable[[], IronicClient], advertised: When[Advertised],
               clock: IReactorTime) -> Heartbeater:
    """The heartbeater, beating once the API is advertised, and again as soon as allowed
    each time an async command ends: at least ``COMMAND_DONE_BEAT_INTERVAL`` after the
    previous beat (the reference waits 5 s), so Ironic, which learns that a step ended only
    from a heartbeat, starts the next one sooner."""

    async def beat() -> None:
        where = advertised.value
        await ironic().heartbeat(agent.get_node_uuid(), where.url, agent.agent_token,
                                 agent_verify_ca=where.verify_ca)

    heartbeater = Heartbeater(beat, lambda: agent.heartbeat_timeout, clock, after=advertised,
                              min_forced_interval=COMMAND_DONE_BEAT_INTERVAL)
    agent.async_finished.subscribe(lambda _: heartbeater.force())
    return heartbeater
