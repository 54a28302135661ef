"""Loop devices on sparse files, and a private mount namespace to run the agent against them.

Tests that touch real block devices use only loop devices made here and name them by path;
the agent is pointed at them explicitly (root device hints, ``include_loop_devices``).

``attach_loop_devices`` makes sparse files and attaches them (``losetup --find --show
--partscan``), registering their cleanup at once: each device is detached (only if it is
still backed by our file) and its file removed even when the test fails.

``sandbox_argv`` wraps a command so that it runs in a private mount namespace
(``unshare --mount --propagation private``) set up by ``ipa_twisted.testing.sandbox_init``:
a /dev holding only the basic character devices and the given loop devices, ``reboot`` and
``poweroff`` replaced by ``/bin/true``, and ``/proc/sysrq-trigger`` shadowed by /dev/null.
The agent run there cannot reboot or power off the machine, nor see its disks' device
nodes; udev does not run there, so the agent makes the partition nodes it needs from sysfs
(``ipa_twisted.blockdev.disks.wait_for_partition``).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from ipa_twisted.context import CommandRunner
from ipa_twisted.process import ProcessExecutionError

log = Logger()

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSETUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class LoopDevice:
    """An attached loop device and the sparse file behind it."""

    path: str
    backing_file: str
    size: int


def loop_devices_unavailable(tools: Sequence[str] = ()) -> str | None:
    """Why loop devices (and ``tools``) cannot be used here (a skip reason), or None."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if os.geteuid() != 0:
        return "loop devices need root"
    for program in ("losetup", "unshare"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (no loop device support)"
    return None


async def attach_loop_devices(runner: CommandRunner, directory: str, sizes: Sequence[int],
                              add_cleanup: Callable[..., object], *,
                              read_only: bool = False,
                              sector_size: int | None = None) -> list[LoopDevice]:
    """Attach one loop device per size (bytes) on sparse files in ``directory``.

    ``sector_size``: their logical sector size (``losetup --sector-size``, e.g. 4096).

    ``add_cleanup`` (a TestCase's ``addCleanup``) is given each device's cleanup as soon as
    the device exists; cleanups may return Deferreds.
    """
    os.makedirs(directory, exist_ok=True)
    devices: list[LoopDevice] = []
    for size in sizes:
        backing = os.path.join(os.path.abspath(directory),
                               f"disk-{len(os.listdir(directory))}.img")
        with open(backing, "wb") as f:
            f.truncate(size)
        add_cleanup(_remove, backing)
        argv = ["losetup", "--find", "--show", "--partscan"] + (
            ["--read-only"] if read_only else []) + (
            ["--sector-size", str(sector_size)] if sector_size else []) + [backing]
        out, _ = await runner.execute(*argv, timeout=LOSETUP_TIMEOUT)
        device = LoopDevice(out.decode().strip(), backing, size)
        add_cleanup(lambda d=device: Deferred.fromCoroutine(detach_loop_device(runner, d)))
        devices.append(device)
        log.info("Attached {path} to {file}", path=device.path, file=backing)
    return devices


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def backing_file(runner: CommandRunner, path: str) -> str | None:
    """The file behind loop device ``path``, or None if it is detached."""
    try:
        out, _ = await runner.execute("losetup", "--list", "--noheadings", "--output",
                                      "BACK-FILE", path, timeout=LOSETUP_TIMEOUT)
    except ProcessExecutionError:
        return None
    return out.decode("utf-8", "replace").strip() or None


async def loop_devices_of(runner: CommandRunner, backing: str) -> list[str]:
    """The loop devices attached to file ``backing``."""
    out, _ = await runner.execute("losetup", "--associated", backing,
                                  timeout=LOSETUP_TIMEOUT)
    return [line.split(":", 1)[0] for line in out.decode("utf-8", "replace").splitlines()
            if line.strip()]


async def detach_loop_device(runner: CommandRunner, device: LoopDevice) -> None:
    """Detach ``device`` if it is still backed by its own file (never anyone else's)."""
    backing = await backing_file(runner, device.path)
    if backing is None or os.path.realpath(backing.removesuffix(" (deleted)")) != \
            os.path.realpath(device.backing_file):
        log.warn("{path} is no longer backed by {file}; not detaching it",
                 path=device.path, file=device.backing_file)
        return
    await runner.execute("losetup", "--detach", device.path, timeout=LOSETUP_TIMEOUT)
    log.info("Detached {path}", path=device.path)


def sandbox_argv(loops: Sequence[LoopDevice | str], argv: Sequence[str], *,
                 shadow: Sequence[str] | None = None) -> list[str]:
    """``argv`` wrapped to run in the sandbox (see the module docstring).

    ``shadow`` lists the programs replaced by /bin/true (default: reboot, poweroff,
    shutdown, halt).
    """
    wrapped = ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
               "-m", "ipa_twisted.testing.sandbox_init",
               "--outer-ns", os.readlink("/proc/self/ns/mnt"),
               "--outer-net", os.readlink("/proc/self/ns/net")]
    for loop in loops:
        wrapped += ["--loop", loop.path if isinstance(loop, LoopDevice) else loop]
    if shadow is not None:
        wrapped += [f"--shadow={program}" for program in shadow] or ["--no-shadow"]
    return wrapped + ["--", *argv]


def sandbox_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment additions for sandboxed commands: ipa_twisted importable."""
    path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": _PACKAGE_ROOT + (os.pathsep + path if path else "")}
    env.update(extra or {})
    return env


async def run_in_sandbox(runner: Any, loops: Sequence[LoopDevice | str], argv: Sequence[str],
                         *, timeout: float = 60.0, shadow: Sequence[str] | None = None,
                         env: Mapping[str, str] | None = None,
                         check_exit_code: bool | Sequence[int] = True) -> tuple[bytes, bytes]:
    """Run ``argv`` in the sandbox with ``runner`` (a ProcessRunner); its output."""
    out, err = await runner.execute(*sandbox_argv(loops, argv, shadow=shadow),
                                    timeout=timeout, env=sandbox_env(env),
                                    check_exit_code=check_exit_code)
    return out, err


def spawn_in_sandbox(reactor: Any, protocol: ProcessProtocol,
                     loops: Sequence[LoopDevice | str], argv: Sequence[str], *,
                     shadow: Sequence[str] | None = None,
                     env: Mapping[str, str] | None = None,
                     path: str | None = None) -> IProcessTransport:
    """Start a long-running ``argv`` (``twistd -n ipa ...``) in the sandbox."""
    wrapped = sandbox_argv(loops, argv, shadow=shadow)
    executable = shutil.which(wrapped[0]) or wrapped[0]
    child_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                 "LC_ALL": "C", "LANG": "C", **sandbox_env(env)}
    transport: IProcessTransport = reactor.spawnProcess(protocol, executable, wrapped,
                                                        child_env, path)
    return transport


class LoopOnlyRunner:
    """A runner that lets programs see only the given devices (a test's safety net).

    ``lsblk`` without a device argument is given the allowed devices, so the agent lists
    only them; any other argv naming a /dev path that is not an allowed device, one of its
    partitions, /dev/null or /dev/zero fails as if the program had failed, without running.
    """

    _HARMLESS = ("/dev/null", "/dev/zero", "/dev/urandom")

    def __init__(self, runner: Any, devices: Sequence[str]) -> None:
        self._runner = runner
        self.devices = [os.path.normpath(d) for d in devices]
        self.refused: list[tuple[str, ...]] = []

    def which(self, name: str) -> str | None:
        found: str | None = self._runner.which(name)
        return found

    def _allowed(self, path: str) -> bool:
        path = os.path.normpath(path)
        if path in self._HARMLESS or path in self.devices:
            return True
        for device in self.devices:
            rest = path[len(device):] if path.startswith(device) else ""
            if device[-1:].isdigit():
                rest = rest[1:] if rest.startswith("p") else ""
            if rest.isdigit():
                return True
        return False

    def execute(self, *argv: str, **kwargs: Any) -> Deferred[tuple[bytes, bytes]]:
        if argv and argv[0] == "lsblk" and not any(a.startswith("/") for a in argv[1:]):
            argv = (*argv, *self.devices)
        for arg in argv[1:]:
            path = arg.partition("=")[2] if "=" in arg else arg
            if "/dev/" in path and not self._allowed(path):
                self.refused.append(tuple(argv))
                from twisted.internet.defer import fail
                return fail(ProcessExecutionError(argv, None, b"", b"refused: "
                                                  b"not one of the test's devices"))
        result: Deferred[tuple[bytes, bytes]] = self._runner.execute(*argv, **kwargs)
        return result
