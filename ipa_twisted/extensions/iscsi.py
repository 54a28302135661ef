"""``iscsi.start_iscsi_target``: expose the install disk as an iSCSI target, with tgtd.

As the reference agent does with tgt (Linux-IO through rtslib is not used here): ``tgtd`` is
started unless it answers already (it daemonizes; ``tgtadm ... --op show`` is polled until
it answers), a portal is added for a port other than 3260 (tgtd listens on 3260 by itself),
and target 1 is made with the IQN (``iqn.2008-10.org.openstack:<random UUID>`` when none is
given), LUN 1 backed by the install device, open to every initiator.

``clean_up(context, device)`` deletes the targets whose LUN is backed by ``device`` and,
when none is left, stops tgtd (``image.install_bootloader`` calls it first, so the disk is
no longer exported while the boot loader is written). There is no ``iscsi.clean_up``
command, as in the reference agent.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger, LogLevel

from ipa_twisted import errors
from ipa_twisted.commands import sync_command
from ipa_twisted.extensions.base import Extension
from ipa_twisted.blockdev import disks
from ipa_twisted.context import HardwareContext
from ipa_twisted.process import ProcessExecutionError, failures_as
from ipa_twisted.retry import GaveUp, fixed, retry

log = Logger()

DEFAULT_ISCSI_PORTAL_PORT = 3260
IQN_PREFIX = "iqn.2008-10.org.openstack:"
TGTD_WAIT_ATTEMPTS = 10
TGTD_WAIT_DELAY = 1.0
TGT_TIMEOUT = 60.0
_SHOW = ("tgtadm", "--lld", "iscsi", "--mode", "target", "--op", "show")
_TARGET = re.compile(r"^Target (\d+): (\S+)")
_BACKING = re.compile(r"^\s*Backing store path: (.+)$")


def _error(message: str) -> Callable[[ProcessExecutionError], errors.ISCSICommandError]:
    """A failed tgt command as the ISCSICommandError saying ``message`` (logged)."""
    def make(e: ProcessExecutionError) -> errors.ISCSICommandError:
        log.error("{message}: {error}", message=message, error=str(e))
        return errors.ISCSICommandError(message, e.exit_code, e.stdout_text, e.stderr_text)
    return make


async def _tgtadm(context: HardwareContext, message: str, *args: str) -> bytes:
    with failures_as(make=_error(message)):
        out, _ = await context.runner.execute(
            "tgtadm", "--lld", "iscsi", *args,
            timeout=min(context.config.command_timeout, TGT_TIMEOUT))
    return out


async def tgtd_running(context: HardwareContext) -> bool:
    """Whether tgtd answers ``tgtadm``."""
    try:
        await context.runner.execute(*_SHOW, timeout=min(context.config.command_timeout,
                                                         TGT_TIMEOUT))
    except ProcessExecutionError:
        return False
    return True


async def start_tgtd(context: HardwareContext) -> None:
    """Start tgtd (unless it answers already) and wait until it answers."""
    if await tgtd_running(context):
        log.info("tgtd is running already")
        return
    timeout = min(context.config.command_timeout, TGT_TIMEOUT)
    with failures_as(make=_error("Unable to start the ISCSI daemon")):
        await context.runner.execute("tgtd", timeout=timeout)
    try:
        await retry(lambda: context.runner.execute(*_SHOW, timeout=timeout), context.clock,
                    "Waiting for tgtd to answer", backoff=fixed(TGTD_WAIT_DELAY),
                    attempts=TGTD_WAIT_ATTEMPTS, retry_on=ProcessExecutionError, log=log,
                    level=LogLevel.debug)
    except GaveUp as e:
        assert isinstance(e.last, ProcessExecutionError)
        raise _error("ISCSI daemon didn't initialize")(e.last) from e.last


def parse_targets(show: str) -> dict[int, tuple[str, list[str]]]:
    """``{tid: (iqn, backing store paths)}`` from ``tgtadm --mode target --op show``."""
    targets: dict[int, tuple[str, list[str]]] = {}
    current: int | None = None
    for line in show.splitlines():
        match = _TARGET.match(line)
        if match is not None:
            current = int(match.group(1))
            targets[current] = (match.group(2), [])
            continue
        backing = _BACKING.match(line)
        if backing is not None and current is not None and backing.group(1) != "None":
            targets[current][1].append(backing.group(1).strip())
    return targets


async def start_target(context: HardwareContext, iqn: str, portal_port: int,
                       device: str) -> None:
    """Target 1 for ``iqn`` with LUN 1 backed by ``device``, open to all initiators."""
    await start_tgtd(context)
    if portal_port != DEFAULT_ISCSI_PORTAL_PORT:
        await _tgtadm(context, f"Error when adding a new portal with portal_port "
                      f"{portal_port}", "--mode", "portal", "--op", "new", "--param",
                      f"portal=0.0.0.0:{portal_port}")
    await _tgtadm(context, f"Error when adding a new target for iqn {iqn}",
                  "--mode", "target", "--op", "new", "--tid", "1", "--targetname", iqn)
    await _tgtadm(context, f"Error when adding a new logical unit for iqn {iqn}",
                  "--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
                  "--backing-store", device)
    await _tgtadm(context, "Error when enabling the target to accept the specific "
                  f"initiators for iqn {iqn}", "--mode", "target", "--op", "bind",
                  "--tid", "1", "--initiator-address", "ALL")


async def clean_up(context: HardwareContext, device: str, *, stop_daemon: bool = True) -> None:
    """Delete the targets exporting ``device``; stop tgtd when none is left.

    Nothing to do when tgtd is not running. ISCSIError if a target cannot be deleted.
    """
    if context.runner.which("tgtadm") is None or not await tgtd_running(context):
        log.info("tgtd is not running; no iSCSI target to clean up for {device}",
                 device=device)
        return
    out = await _tgtadm(context, "Error when listing the iSCSI targets",
                        "--mode", "target", "--op", "show")
    targets = parse_targets(out.decode("utf-8", "replace"))
    for tid, (iqn, backing) in sorted(targets.items()):
        if device in backing:
            log.info("Deleting iSCSI target {iqn} for device {device}", iqn=iqn,
                     device=device)
            await _tgtadm(context, f"Failed to delete iSCSI target {iqn} for device "
                          f"{device}", "--mode", "target", "--op", "delete", "--force",
                          "--tid", str(tid))
            del targets[tid]
    if stop_daemon and not targets:
        log.info("Stopping tgtd")
        await _tgtadm(context, "Failed to stop tgtd", "--mode", "system", "--op", "delete")


class ISCSIExtension(Extension):
    """Exports the install device over iSCSI."""

    name = "iscsi"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.exported_device: str | None = None
        """The device ``start_iscsi_target`` exported, until it is cleaned up."""

    @sync_command("start_iscsi_target")
    async def start_iscsi_target(self, iqn: str | None = None,
                                 wipe_disk_metadata: bool = False,
                                 portal_port: int | None = None) -> dict[str, str]:
        """Expose the install disk as an iSCSI target; ``{"iscsi_target_iqn": iqn}``.

        ``wipe_disk_metadata`` erases its partition tables and signatures first.
        """
        if portal_port is not None and not 0 < portal_port < 65536:
            raise errors.InvalidCommandParamsError(f"Invalid portal_port {portal_port}")
        if iqn is None:
            iqn = IQN_PREFIX + str(uuid.uuid4())
        managers = await self.agent.get_managers()
        device = str(await managers.dispatch_to_managers("get_os_install_device"))
        context = self.agent.hardware_context()
        if wipe_disk_metadata:
            try:
                await disks.destroy_disk_metadata(context, device)
            except (ProcessExecutionError, OSError) as e:
                raise errors.ISCSIError(f"Failed to wipe the metadata of {device}: "
                                        f"{e}") from e
        port = DEFAULT_ISCSI_PORTAL_PORT if portal_port is None else portal_port
        log.debug("Starting ISCSI target with iqn {iqn} on device {device}", iqn=iqn,
                  device=device)
        await start_target(context, iqn, port, device)
        self.exported_device = device
        log.info("Created iSCSI target with iqn {iqn}, portal port {port}, on device "
                 "{device} using tgtd", iqn=iqn, port=port, device=device)
        return {"iscsi_target_iqn": iqn}

    async def clean_up_started_target(self, device: str) -> None:
        """``clean_up`` if this agent exported ``device`` (``image.install_bootloader``)."""
        if self.exported_device is None:
            return
        await clean_up(self.agent.hardware_context(), device)
        self.exported_device = None
