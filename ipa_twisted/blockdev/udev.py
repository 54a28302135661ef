"""Waiting for udev: the one wait that start-up and the disk steps share.

Its own module so that start-up, which settles udev before loading the hardware managers,
does not import the disk plumbing (``blockdev.disks``) an idle agent never uses.
"""

from __future__ import annotations

from twisted.logger import Logger

from ipa_twisted.context import HardwareContext
from ipa_twisted.process import ProcessExecutionError

log = Logger()

DISK_COMMAND_TIMEOUT = 300.0
"""Longest wait for one partitioning, probing or udev command."""


def command_timeout(context: HardwareContext) -> float:
    """Seconds one disk command may take: ``command_timeout``, at most DISK_COMMAND_TIMEOUT."""
    return min(context.config.command_timeout, DISK_COMMAND_TIMEOUT)


async def udev_settle(context: HardwareContext) -> bool:
    """Wait for udev's event queue to empty; False (logged) if it cannot be waited for."""
    if context.runner.which("udevadm") is None:
        return False
    try:
        await context.runner.execute("udevadm", "settle", timeout=command_timeout(context))
    except ProcessExecutionError as e:
        log.warn("udevadm settle failed: {error}", error=str(e))
        return False
    return True
