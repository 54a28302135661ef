"""``deploy.*``: the in-band deploy steps."""

from __future__ import annotations

from typing import Any

from ipa_twisted import errors
from ipa_twisted.clock_sync import sync_clock
from ipa_twisted.commands import async_command, sync_command
from ipa_twisted.extensions.base import Extension
from ipa_twisted.extensions.steps import execute_step, list_steps, validate_step


def _validate(extension: Extension, step: dict[str, Any], **_: Any) -> None:
    validate_step(step)


class DeployExtension(Extension):
    """Lists and executes deploy steps of the hardware managers."""

    name = "deploy"

    @sync_command("get_deploy_steps")
    async def get_deploy_steps(self, node: dict[str, Any], ports: list[Any]) -> dict[str, Any]:
        """Deploy steps by manager, and the manager versions."""
        managers = await self.agent.get_managers()
        # Cleaning and deploying start here: set the clock first (when ntp_server is set).
        await sync_clock(self.agent.runner, self.agent.config, ignore_errors=True)
        return {"deploy_steps": await list_steps(managers, "deploy", node, ports),
                "hardware_manager_version": managers.get_current_versions()}

    @async_command("execute_deploy_step", validator=_validate)
    async def execute_deploy_step(self, step: dict[str, Any], node: dict[str, Any],
                                  ports: list[Any],
                                  deploy_version: dict[str, Any] | list[Any] | None = None,
                                  **kwargs: Any) -> dict[str, Any]:
        """Run one deploy step."""
        managers = await self.agent.get_managers()
        result = await execute_step(managers, "deploy", step, node, ports, deploy_version,
                                    kwargs, errors.DeploymentError)
        return {"deploy_result": result, "deploy_step": step}
