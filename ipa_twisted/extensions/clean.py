"""``clean.*``: the steps Ironic runs to clean a node."""

from __future__ import annotations

from typing import Any

from ipa_twisted import errors
from ipa_twisted.clock_sync import sync_clock
from ipa_twisted.commands import async_command, sync_command
from ipa_twisted.extensions.base import Extension
from ipa_twisted.extensions.steps import execute_step, list_steps, validate_step


def _validate(extension: Extension, step: dict[str, Any], **_: Any) -> None:
    validate_step(step)


class CleanExtension(Extension):
    """Lists and executes clean steps of the hardware managers."""

    name = "clean"

    @sync_command("get_clean_steps")
    async def get_clean_steps(self, node: dict[str, Any], ports: list[Any]) -> dict[str, Any]:
        """Clean steps by manager, and the manager versions Ironic must send back."""
        managers = await self.agent.get_managers()
        # Cleaning and deploying start here: set the clock first (when ntp_server is set).
        await sync_clock(self.agent.runner, self.agent.config, ignore_errors=True)
        return {"clean_steps": await list_steps(managers, "clean", node, ports),
                "hardware_manager_version": managers.get_current_versions()}

    @async_command("execute_clean_step", validator=_validate)
    async def execute_clean_step(self, step: dict[str, Any], node: dict[str, Any],
                                 ports: list[Any],
                                 clean_version: dict[str, Any] | list[Any] | None = None,
                                 **kwargs: Any) -> dict[str, Any]:
        """Run one clean step; CLEAN_VERSION_MISMATCH if the managers changed."""
        managers = await self.agent.get_managers()
        result = await execute_step(managers, "clean", step, node, ports, clean_version,
                                    kwargs, errors.CleaningError)
        return {"clean_result": result, "clean_step": step}
