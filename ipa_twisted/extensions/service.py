"""``service.*``: steps Ironic runs on a deployed node (servicing)."""

from __future__ import annotations

from typing import Any

from ipa_twisted import errors
from ipa_twisted.commands import async_command, sync_command
from ipa_twisted.extensions.base import Extension
from ipa_twisted.extensions.steps import execute_step, list_steps, validate_step


class ServicingError(errors.RESTError):
    """A service step failed."""

    message = "Service step failed"


def _validate(extension: Extension, step: dict[str, Any], **_: Any) -> None:
    validate_step(step)


class ServiceExtension(Extension):
    """Lists and executes service steps of the hardware managers."""

    name = "service"

    @sync_command("get_service_steps")
    async def get_service_steps(self, node: dict[str, Any],
                                ports: list[Any]) -> dict[str, Any]:
        """Service steps by manager, and the manager versions."""
        managers = await self.agent.get_managers()
        return {"service_steps": await list_steps(managers, "service", node, ports),
                "hardware_manager_version": managers.get_current_versions()}

    @async_command("execute_service_step", validator=_validate)
    async def execute_service_step(self, step: dict[str, Any], node: dict[str, Any],
                                   ports: list[Any],
                                   service_version: dict[str, Any] | list[Any] | None = None,
                                   **kwargs: Any) -> dict[str, Any]:
        """Run one service step."""
        managers = await self.agent.get_managers()
        result = await execute_step(managers, "service", step, node, ports, service_version,
                                    kwargs, ServicingError)
        return {"service_result": result, "service_step": step}
