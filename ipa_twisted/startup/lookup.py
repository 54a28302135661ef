"""The lookup stage: which node this machine is (unless standalone)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel

from ipa_twisted.agent import Agent
from ipa_twisted.ironic.client import IronicClient
from ipa_twisted.retry import fixed, retry
from ipa_twisted.startup.tree import Stage
from ipa_twisted.when import When

LOOKUP_RETRY_PAUSE = 10.0
"""Seconds between two lookups (each of which retries for ``lookup_timeout``)."""


class LookupService(Stage[str]):
    """Once inspection (or the clock) is done: adopts the node Ironic knows this machine
    as, and ``done`` fires with its UUID. Inspection's continue_inspection answer stands in
    for lookup's; otherwise lookup is retried for as long as it takes (an Ironic outage
    never stops the agent)."""

    def __init__(self, agent: Agent, ironic: Callable[[], IronicClient], after: When[Any],
                 clock: IReactorTime) -> None:
        super().__init__()
        self._agent, self._ironic, self._after, self._clock = agent, ironic, after, clock

    async def run(self) -> str:
        inspected = await self._after.wait()
        content: Mapping[str, Any] | None
        node_uuid, content = inspected if inspected is not None else (None, None)
        if content is None:
            content = await retry(lambda: self._look_up(node_uuid), self._clock,
                                  "Lookup ({timeout} s of attempts)",
                                  backoff=fixed(LOOKUP_RETRY_PAUSE), level=LogLevel.error,
                                  fields={"timeout": self._agent.config.lookup_timeout})
        self._agent.process_lookup_data(content)
        return self._agent.get_node_uuid()

    async def _look_up(self, node_uuid: str | None) -> dict[str, Any]:
        managers = await self._agent.get_managers()
        interfaces = await managers.dispatch_to_managers("list_network_interfaces")
        macs = [i.mac_address for i in interfaces if getattr(i, "mac_address", None)]
        config = self._agent.config
        content: dict[str, Any] = await self._ironic().lookup(
            macs, node_uuid, timeout=config.lookup_timeout, interval=config.lookup_interval)
        return content
