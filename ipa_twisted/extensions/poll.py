"""``poll.*``: hardware information and passive (standalone) node configuration."""

from __future__ import annotations

from typing import Any

from ipa_twisted import errors
from ipa_twisted.commands import sync_command
from ipa_twisted.encoding import to_jsonable
from ipa_twisted.extensions.base import Extension


def _validate_set_node_info(extension: Extension, node_info: Any = None) -> None:
    if not extension.agent.standalone:
        raise errors.InvalidCommandError(
            "Node lookup data can only be set when the agent is running in standalone mode.")
    if not isinstance(node_info, dict):
        raise errors.InvalidCommandParamsError("node_info must be an object")
    node = node_info.get("node")
    if not isinstance(node, dict) or not isinstance(node.get("uuid"), str):
        raise errors.InvalidCommandParamsError("node_info must hold node.uuid")
    if not isinstance(node_info.get("config", {}), dict):
        raise errors.InvalidCommandParamsError("node_info config must be an object")


class PollExtension(Extension):
    """Answers questions about the machine without changing it."""

    name = "poll"

    @sync_command("get_hardware_info")
    async def get_hardware_info(self) -> Any:
        """The full hardware inventory."""
        managers = await self.agent.get_managers()
        return to_jsonable(await managers.list_hardware_info())

    @sync_command("set_node_info", validator=_validate_set_node_info)
    def set_node_info(self, node_info: dict[str, Any] | None = None) -> None:
        """Adopt lookup data given by an operator (standalone mode only)."""
        assert node_info is not None
        self.agent.process_lookup_data(node_info)
