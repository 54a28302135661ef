"""The ``erase_pstore`` clean step: the kernel's persistent crash records go.

pstore keeps kernel oops and panic logs in firmware storage (ACPI ERST, UEFI variables, a
RAM region) and shows each record as a file of the ``pstore`` file system; deleting the file
deletes the record from the storage. As the reference agent does, the mount point is found
in ``{proc_path}/mounts`` and every entry under it is removed. Unlike the reference, which
does nothing when pstore is not mounted, the step mounts it on ``{sys_path}/fs/pstore`` when
the kernel has it (``{proc_path}/filesystems``) and unmounts it afterwards, so the records
go even where the ramdisk's init did not mount it.

A mount point listed as ``/sys/...`` is read under the configured ``sys_path`` (tests use a
fake tree); ``mount`` and ``umount`` run through the context's runner.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from twisted.logger import Logger

from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import CleaningError
from ipa_twisted.fileutils import read_text
from ipa_twisted.process import failures_as

log = Logger()

MOUNT_TIMEOUT = 60.0
_PSTORE_MOUNT = re.compile(r"^pstore (\S+) pstore\s")

ERASE_PSTORE_STEP: dict[str, Any] = {
    "step": "erase_pstore", "priority": 0, "interface": "deploy",
    "reboot_requested": False, "abortable": True}
"""The clean step, as the reference agent lists it."""


def find_pstore_mount(context: HardwareContext) -> str | None:
    """Where pstore is mounted (under ``sys_path`` when listed under ``/sys``), or None."""
    for line in (read_text(os.path.join(context.config.proc_path, "mounts")) or "").splitlines():
        match = _PSTORE_MOUNT.match(line + " ")
        if match is not None:
            return _under_sys(context, match.group(1))
    return None


def _under_sys(context: HardwareContext, path: str) -> str:
    if path == "/sys" or path.startswith("/sys/"):
        return os.path.join(context.config.sys_path, path[len("/sys/"):])
    return path


def _kernel_has_pstore(context: HardwareContext) -> bool:
    listed = read_text(os.path.join(context.config.proc_path, "filesystems")) or ""
    return any(line.split()[-1:] == ["pstore"] for line in listed.splitlines())


async def erase_pstore(context: HardwareContext) -> None:
    """Remove every pstore record, mounting pstore first if needed (see the module).

    Nothing happens (logged) when the kernel has no pstore. CleaningError naming the mount
    or the entry that could not be mounted or removed.
    """
    mounted_here = None
    path = find_pstore_mount(context)
    if path is None:
        if not _kernel_has_pstore(context):
            log.info("No pstore found: the kernel has no pstore file system")
            return
        path = os.path.join(context.config.sys_path, "fs", "pstore")
        if not os.path.isdir(path):
            log.info("No pstore found: {path} does not exist", path=path)
            return
        log.info("Mounting pstore on {path}", path=path)
        with failures_as(CleaningError, f"Cannot mount pstore on {path}"):
            await context.runner.execute("mount", "-t", "pstore", "pstore", path,
                                         timeout=MOUNT_TIMEOUT)
        mounted_here = path
    try:
        _remove_entries(path)
    finally:
        if mounted_here is not None:
            with failures_as(CleaningError, f"Cannot unmount pstore from {mounted_here}"):
                await context.runner.execute("umount", mounted_here, timeout=MOUNT_TIMEOUT)


def _remove_entries(path: str) -> None:
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise CleaningError(f"Cannot list the pstore entries in {path}: {e}") from e
    log.info("Cleaning up pstore in {path}: {count} entries", path=path, count=len(entries))
    for name in entries:
        entry = os.path.join(path, name)
        try:
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry)
            else:
                os.remove(entry)
        except OSError as e:
            raise CleaningError(f"Cannot remove the pstore entry {entry}: {e}") from e
        log.info("Removed the pstore entry {entry}", entry=entry)
