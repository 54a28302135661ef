"""The inspection stage (where ``inspection_callback_url`` is set)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from twisted.internet.defer import CancelledError

from ipa_twisted.agent import Agent
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.startup.tree import Stage
from ipa_twisted.when import When


class Inspected(NamedTuple):
    """What posting the inspection data gave: the node's UUID, and Ironic's
    continue_inspection answer, which stands in for lookup's when present."""

    node_uuid: str | None
    lookup: Any


Inspect = Callable[[HardwareManagers], Awaitable[tuple[str | None, Any]]]


class InspectionService(Stage[Inspected]):
    """Once the clock is set: inspects this machine and posts the data. A failure is
    logged and start-up goes on to lookup without a node UUID."""

    def __init__(self, agent: Agent, http_client: Callable[[], Any], after: When[Any],
                 inspect: Inspect | None = None) -> None:
        super().__init__()
        self._agent, self._http_client, self._after = agent, http_client, after
        self._inspect = inspect or self._post_inspection

    async def _post_inspection(self, managers: HardwareManagers) -> tuple[str | None, Any]:
        from ipa_twisted.inspector.inspect import inspect
        return await inspect(self._agent.hardware_context(), managers, self._agent.config,
                             self._http_client())

    async def run(self) -> Inspected:
        await self._after.wait()
        managers = await self._agent.get_managers()
        try:
            return Inspected(*await self._inspect(managers))
        except CancelledError:
            raise
        except Exception as e:
            self.log.error("Inspection failed ({error}); going on with lookup", error=str(e))
            return Inspected(None, None)
