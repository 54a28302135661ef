"""``flow.start_flow``: run a list of commands in order, stopping at the first failure."""

from __future__ import annotations

from typing import Any

from ipa_twisted import errors
from ipa_twisted.commands import CommandStatus, async_command
from ipa_twisted.extensions.base import Extension

MAX_FLOW_TASKS = 1000


def _validate(extension: Extension, flow: Any = None) -> None:
    if flow is None:
        raise errors.InvalidCommandParamsError("flow is required")
    if not isinstance(flow, list):
        raise errors.InvalidCommandParamsError("flow must be a list of tasks")
    if len(flow) > MAX_FLOW_TASKS:
        raise errors.InvalidCommandParamsError(f"flow holds more than {MAX_FLOW_TASKS} tasks")
    for task in flow:
        if not isinstance(task, dict) or not task:
            raise errors.InvalidCommandParamsError(
                "Each flow task must be an object of {command: params}")
        for command, params in task.items():
            if not isinstance(params, dict):
                raise errors.InvalidCommandParamsError("Command params must be a dict")
            extension.agent.check_command(command, params)


class FlowExtension(Extension):
    """Chains commands."""

    name = "flow"

    @async_command("start_flow", validator=_validate)
    async def start_flow(self, flow: list[Any] | None = None) -> None:
        """Run each task's commands in order; fail with the first failing one."""
        for task in flow or []:
            for command, params in task.items():
                self.log.info("Flow: executing {command}", command=command)
                result = await self.agent.execute_nested(command, params)
                if result.command_status is not CommandStatus.SUCCEEDED:
                    error = result.command_error
                    raise errors.CommandExecutionError(
                        f"{command} failed: {error.details if error else 'unknown error'}")
