"""Temporary mounts: devices and bind mounts on private temporary directories, always undone.

``MountStack`` remembers what it mounted and unmounts it in reverse order, each unmount
tried ``UMOUNT_ATTEMPTS`` times ``UMOUNT_DELAY`` seconds apart (a file system may stay busy
for a moment after the last program using it exits). ``mounted`` is the common case: one
device on a fresh temporary directory for the length of an ``async with`` block; the
directory is removed only when nothing is left mounted on it.

Mounts are made with ``mount`` through the context's runner, in whatever mount namespace the
agent runs in (tests run it in a private one: see ``ipa_twisted.testing.sandbox``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from twisted.logger import Logger, LogLevel

from ipa_twisted.context import HardwareContext
from ipa_twisted.process import ProcessExecutionError
from ipa_twisted.retry import GaveUp, fixed, retry

log = Logger()

MOUNT_TIMEOUT = 120.0
"""Longest wait for one ``mount`` or ``umount``."""
UMOUNT_ATTEMPTS = 3
UMOUNT_DELAY = 1.0


class UnmountError(Exception):
    """Some mounts could not be undone; ``paths`` are still mounted."""

    def __init__(self, paths: Sequence[str], errors: Sequence[Exception]) -> None:
        self.paths = list(paths)
        self.errors = list(errors)
        super().__init__(f"Unable to unmount {', '.join(self.paths)}: "
                         + "; ".join(str(e) for e in self.errors))


def _timeout(context: HardwareContext) -> float:
    return min(context.config.command_timeout, MOUNT_TIMEOUT)


class MountStack:
    """Mounts made one after the other, undone last first."""

    def __init__(self, context: HardwareContext) -> None:
        self._context = context
        self.mounted: list[str] = []
        """Mount points, in the order they were mounted."""

    async def mount(self, source: str, target: str, *options: str,
                    fstype: str | None = None) -> str:
        """``mount [-t fstype] [-o options] source target``; ``target`` is returned."""
        argv = ["mount"]
        if fstype:
            argv += ["-t", fstype]
        if options:
            argv += ["-o", ",".join(options)]
        argv += [source, target]
        await self._context.runner.execute(*argv, timeout=_timeout(self._context))
        self.mounted.append(target)
        log.debug("Mounted {source} on {target}", source=source, target=target)
        return target

    async def bind(self, source: str, target: str) -> str:
        """Bind-mount directory ``source`` on ``target`` (not recursively)."""
        return await self.mount(source, target, "bind")

    async def unmount(self, target: str) -> None:
        """Unmount ``target``, retrying; the last ProcessExecutionError if it stays mounted."""
        context = self._context
        try:
            await retry(lambda: context.runner.execute("umount", target,
                                                       timeout=_timeout(context)),
                        context.clock, "Unmounting {target}", backoff=fixed(UMOUNT_DELAY),
                        attempts=UMOUNT_ATTEMPTS, retry_on=ProcessExecutionError, log=log,
                        level=LogLevel.debug, fields={"target": target})
        except GaveUp as e:
            raise e.last from None
        if target in self.mounted:
            self.mounted.remove(target)

    async def unmount_all(self) -> list[tuple[str, Exception]]:
        """Unmount everything, last first; ``(mount point, error)`` of what stayed."""
        failed: list[tuple[str, Exception]] = []
        for target in reversed(list(self.mounted)):
            try:
                await self.unmount(target)
            except ProcessExecutionError as e:
                log.warn("Unable to unmount {target}: {error}", target=target, error=str(e))
                failed.append((target, e))
        return failed


def remove_mount_point(path: str) -> None:
    """Remove the empty directory ``path`` (never recursively: it may hide a mount)."""
    try:
        os.rmdir(path)
    except OSError as e:
        log.warn("Unable to remove the temporary directory {path}: {error}", path=path,
                 error=str(e))


@asynccontextmanager
async def mounted(context: HardwareContext, device: str, *options: str,
                  fstype: str | None = None, prefix: str = "ipa-mount-"
                  ) -> AsyncIterator[str]:
    """Mount ``device`` on a new temporary directory for the ``async with`` block.

    It is unmounted afterwards, even if the block failed. When unmounting fails,
    UnmountError is raised (unless the block is already raising: that error wins and the
    unmount failure is logged); the directory is then left in place.
    """
    directory = tempfile.mkdtemp(prefix=prefix)
    stack = MountStack(context)
    try:
        await stack.mount(device, directory, *options, fstype=fstype)
    except BaseException:
        remove_mount_point(directory)
        raise
    try:
        yield directory
    except BaseException:
        if not await stack.unmount_all():
            remove_mount_point(directory)
        raise
    failed = await stack.unmount_all()
    if failed:
        raise UnmountError([path for path, _ in failed], [error for _, error in failed])
    remove_mount_point(directory)
