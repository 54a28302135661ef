"""``standby.*``: write the instance image, and the machine's power actions."""

from __future__ import annotations

import os
from typing import Any

from ipa_twisted import errors
from ipa_twisted.commands import CommandStatus, async_command, sync_command
from ipa_twisted.context import Deployment
from ipa_twisted.extensions.base import Extension
from ipa_twisted.deploy.image_info import validate_image_info
from ipa_twisted.process import ProcessExecutionError


_WRITING_COMMANDS = frozenset({"prepare_image", "cache_image"})
"""This extension's commands that write an image (``cache_image`` may find it there)."""


def _validate_image(extension: Extension, image_info: Any = None, **_: Any) -> None:
    validate_image_info(image_info)


class StandbyExtension(Extension):
    """Writes images to the install disk and reboots or powers off into them."""

    name = "standby"

    _written = Deployment()
    """What this extension's own last write deployed (nothing before the first)."""

    async def _write(self, image_info: dict[str, Any], configdrive: str | None) -> str:
        """Write through the managers' ``write_image`` (the deploy step), so a vendor
        manager that overrides the step also serves the standby commands; keep what the
        step returns (a step that returns no ``Deployment`` leaves nothing known)."""
        managers = await self.agent.get_managers()
        node = managers.cached_node or {}
        result = await managers.dispatch_to_managers("write_image", node, [], image_info,
                                                     configdrive)
        self._written = result if isinstance(result, Deployment) else Deployment()
        return str(self._written.device)

    def _last_deployment(self) -> Deployment:
        """What the newest successful image write deployed, from the agent's command
        results: a ``deploy.execute_deploy_step`` of ``write_image`` (its result) or one of
        this extension's writes; nothing before the first."""
        for result in reversed(self.agent.list_command_results()):
            if result.command_status is not CommandStatus.SUCCEEDED:
                continue
            if result.command_name in _WRITING_COMMANDS:
                return self._written
            outcome = result.command_result
            if (result.command_name == "execute_deploy_step" and isinstance(outcome, dict)
                    and isinstance(outcome.get("deploy_result"), Deployment)):
                deployment: Deployment = outcome["deploy_result"]
                return deployment
        return Deployment()

    @async_command("prepare_image", validator=_validate_image)
    async def prepare_image(self, image_info: dict[str, Any] | None = None,
                            configdrive: str | None = None) -> str:
        """Write the image (and config drive) to the install device."""
        assert image_info is not None
        device = await self._write(image_info, configdrive)
        message = f"image ({image_info['id']}) written to device {device} "
        if configdrive:
            message += "and configdrive written "
        return message

    @async_command("cache_image", validator=_validate_image)
    async def cache_image(self, image_info: dict[str, Any] | None = None,
                          force: bool = False, configdrive: str | None = None) -> str:
        """Write the image unless it is already on the install device (or ``force``)."""
        assert image_info is not None
        deployed = self._last_deployment()
        if deployed.image_id == image_info["id"] and not force:
            return f"image ({image_info['id']}) already present on device {deployed.device} "
        device = await self._write(image_info, configdrive)
        return f"image ({image_info['id']}) cached to device {device} "

    @sync_command("get_partition_uuids")
    def get_partition_uuids(self) -> dict[str, Any]:
        """Partition UUIDs of the last partition image written (empty before)."""
        return dict(self._last_deployment().partition_uuids)

    # -- buffers and power ----------------------------------------------------------------------

    @sync_command("sync")
    async def sync(self) -> None:
        """Flush everything to the disks: every manager's ``full_sync`` (the generic one:
        ``sync``, the kernel's caches dropped, ``blockdev --flushbufs`` on each disk)."""
        await self._sync()

    async def _sync(self) -> None:
        managers = await self.agent.get_managers()
        try:
            await managers.dispatch_to_all_managers("full_sync")
            return
        except errors.HardwareManagerMethodNotFound:
            self.log.info("No hardware manager has full_sync; flushing with sync alone")
        try:
            await self.agent.runner.execute("sync", timeout=self.agent.config.command_timeout)
        except ProcessExecutionError as e:
            raise errors.CommandExecutionError(
                f"Flushing file system buffers failed: {e}") from e

    @async_command("run_image")
    async def run_image(self) -> None:
        """Reboot into the written image."""
        self.log.info("Rebooting system")
        await self._shutdown("reboot")

    @async_command("power_off")
    async def power_off(self) -> None:
        """Power the machine off."""
        self.log.info("Powering off system")
        await self._shutdown("poweroff")

    async def _shutdown(self, action: str) -> None:
        config = self.agent.config
        command = config.reboot_command if action == "reboot" else config.poweroff_command
        try:
            await self._sync()
        except errors.CommandExecutionError as e:
            self.log.warn("{error}; going on with {action}", error=str(e), action=action)
        argv = command.split()
        try:
            await self.agent.runner.execute(*argv, timeout=60)
            return
        except ProcessExecutionError as e:
            self.log.error("{action} command {argv} failed: {error}; trying sysrq",
                           action=action, argv=argv, error=str(e))
            failure = e
        trigger = os.path.join(config.proc_path, "sysrq-trigger")
        try:
            fd = os.open(trigger, os.O_WRONLY)  # never creates: it must be procfs's
            try:
                os.write(fd, b"b" if action == "reboot" else b"o")
            finally:
                os.close(fd)
        except OSError as sysrq_error:
            self.log.error("sysrq {action} failed: {error}", action=action,
                           error=str(sysrq_error))
            raise errors.SystemRebootError(
                failure.exit_code, failure.stdout.decode(errors="replace"),
                failure.stderr.decode(errors="replace")) from failure
