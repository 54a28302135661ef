"""``log.collect_system_logs``: a compressed bundle of the ramdisk's logs."""

from __future__ import annotations

from typing import Any

from ipa_twisted.commands import sync_command
from ipa_twisted.extensions.base import Extension


class LogExtension(Extension):
    """Diagnostics for operators."""

    name = "log"

    @sync_command("collect_system_logs")
    async def collect_system_logs(self) -> dict[str, Any]:
        """``{"system_logs": <base64 of a tar.gz>}``."""
        from ipa_twisted.system_logs import collect_system_logs
        reactor: Any = self.agent.reactor
        logs = await collect_system_logs(self.agent.runner, reactor,
                                         proc_path=self.agent.config.proc_path)
        return {"system_logs": logs}
