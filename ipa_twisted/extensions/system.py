"""``system.lockdown``: stop answering anyone."""

from __future__ import annotations

from ipa_twisted.commands import sync_command
from ipa_twisted.extensions.base import Extension


class SystemExtension(Extension):
    """System-wide actions."""

    name = "system"

    @sync_command("lockdown")
    def lockdown(self) -> None:
        """Close the API and stop heartbeating once this answer is sent."""
        self.log.info("Lockdown requested: the API closes after this answer")
        self.agent.request_lockdown()
