"""``rescue.finalize_rescue``: hand the ramdisk over to the tenant's rescue user."""

from __future__ import annotations

import os
from typing import Any

from ipa_twisted import errors
from ipa_twisted.commands import sync_command
from ipa_twisted.extensions.base import Extension
from ipa_twisted.passwords import sha512_crypt


def _validate(extension: Extension, rescue_password: Any = "", hashed: Any = False) -> None:
    if not isinstance(rescue_password, str) or not rescue_password:
        raise errors.InvalidCommandParamsError("rescue_password is required")


class RescueExtension(Extension):
    """Writes the rescue password, answers, then stops the agent."""

    name = "rescue"

    @sync_command("finalize_rescue", validator=_validate)
    def finalize_rescue(self, rescue_password: str = "", hashed: bool = False) -> None:
        """Store the crypted password for the rescue user and stop serving the API."""
        etc = self.agent.config.etc_path
        directory = os.path.join(etc, "ipa-rescue-config")
        path = os.path.join(directory, "ipa-rescue-password")
        crypted = rescue_password if hashed else sha512_crypt(rescue_password)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(crypted)
        except OSError as e:
            raise errors.CommandExecutionError(
                "Rescue Operation failed when writing the hashed rescue password to the "
                f"password file. Error {e}") from e
        try:
            open(os.path.join(etc, ".rescued"), "w").close()
        except OSError as e:
            self.log.warn("Failed to create rescue state file marker: {error}", error=str(e))
        self.log.info("Rescue password written; the agent stops after answering")
        # The API must not stay reachable from the tenant's network.
        self.agent.request_stop()
