"""``standby.*``: image preparation and the machine's power actions."""

from __future__ import annotations

from typing import Any

from ipa_twisted import errors
from ipa_twisted.commands import sync_command
from ipa_twisted.extensions.base import Extension
from ipa_twisted.process import ProcessExecutionError


class StandbyExtension(Extension):
    """Writes images and reboots into them (image commands come with the deploy work)."""

    name = "standby"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.partition_uuids: dict[str, Any] = {}

    @sync_command("get_partition_uuids")
    def get_partition_uuids(self) -> dict[str, Any]:
        """Partition UUIDs of the last partition image written (empty before)."""
        return dict(self.partition_uuids)

    @sync_command("sync")
    async def sync(self) -> None:
        """Flush file system buffers to disk."""
        try:
            await self.agent.runner.execute("sync", timeout=self.agent.config.command_timeout)
        except ProcessExecutionError as e:
            raise errors.CommandExecutionError(
                f"Flushing file system buffers failed. Error: {e}") from e
