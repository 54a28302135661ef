"""``python -m ipa_twisted.testing.sandbox_init``: set up a disk sandbox, then exec a program.

Run as root *inside a private mount namespace* (``unshare --mount --propagation private``;
see ``ipa_twisted.testing.sandbox``), it:

1. refuses to do anything unless its mount namespace differs from ``--outer-ns`` (the
   namespace of whoever started it), so it can never remount the host's /dev;
2. mounts a tmpfs on /dev holding only ``null``, ``zero``, ``full``, ``random``,
   ``urandom``, ``tty``, the ``fd``/``stdin``/``stdout``/``stderr`` links, an empty
   ``shm`` tmpfs, and the ``--loop`` devices with the partition nodes they have now (later
   partition nodes are the agent's business: nothing runs udev in here);
3. bind-mounts /bin/true over every ``--shadow`` program (by default the ``reboot``,
   ``poweroff``, ``shutdown`` and ``halt`` found on PATH);
4. bind-mounts the new /dev/null over /proc/sysrq-trigger and /proc/sys/vm/drop_caches
   (when the kernel has them: ``standby.sync`` must not empty the host's caches);
5. when the program would run in the network namespace of whoever started it (``--outer-net``:
   this machine's own), puts an ``ip``
   first on its PATH that refuses to take any interface down (lockdown does that): only
   a network namespace that a test made may lose its interfaces;
6. execs the program after ``--``.

Everything it mounts disappears with the namespace when the program exits.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import shutil
import stat
import sys
from collections.abc import Sequence

MS_NOSUID = 0x2
MS_NOEXEC = 0x8
MS_BIND = 0x1000

SYSRQ_TRIGGER = "/proc/sysrq-trigger"
DROP_CACHES = "/proc/sys/vm/drop_caches"
DEFAULT_SHADOWED = ("reboot", "poweroff", "shutdown", "halt")
CHARACTER_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
                     "urandom": (1, 9), "tty": (5, 0)}
LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
         "stderr": "/proc/self/fd/2"}


class SandboxError(Exception):
    """The sandbox cannot be set up; nothing is executed."""


_libc: ctypes.CDLL | None = None


def _mount(source: str, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    result = _libc.mount(source.encode(), target.encode(),
                         fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                         data.encode() if data else None)
    if result != 0:
        code = ctypes.get_errno()
        raise SandboxError(f"mount {source} on {target}: {os.strerror(code)}")


def _block_nodes(loop: str, sys_path: str = "/sys") -> dict[str, int]:
    """``{name: device number}`` of a loop device and of its partitions now."""
    status = os.stat(loop)
    if not stat.S_ISBLK(status.st_mode):
        raise SandboxError(f"{loop} is not a block device")
    name = os.path.basename(loop)
    nodes = {name: status.st_rdev}
    directory = os.path.join(sys_path, "class", "block", name)
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        entries = []
    for entry in entries:
        if entry.startswith(name + "p"):
            try:
                with open(os.path.join(directory, entry, "dev"), encoding="ascii") as f:
                    major, _, minor = f.read().strip().partition(":")
                nodes[entry] = os.makedev(int(major), int(minor))
            except (OSError, ValueError):
                continue
    return nodes


def build_dev(loops: Sequence[str], dev: str = "/dev") -> None:
    """Mount the private /dev (step 2 of the module docstring)."""
    blocks: dict[str, int] = {}
    for loop in loops:
        blocks.update(_block_nodes(loop))
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=4m")
    for name, (major, minor) in CHARACTER_DEVICES.items():
        path = os.path.join(dev, name)
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(path, 0o666)
    for name, target in LINKS.items():
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    _mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID, "mode=1777,size=16m")
    for name, number in blocks.items():
        os.mknod(os.path.join(dev, name), 0o600 | stat.S_IFBLK, number)


def shadow_programs(programs: Sequence[str], true: str = "/bin/true") -> list[str]:
    """Bind-mount ``true`` over each program; the real paths shadowed."""
    done: list[str] = []
    source = os.path.realpath(true)
    for program in programs:
        found = program if os.sep in program else shutil.which(program)
        if not found or not os.path.exists(found):
            continue
        target = os.path.realpath(found)
        if target in done or target == source:
            continue
        _mount(source, target, None, MS_BIND)
        done.append(target)
    return done


IP_GUARD = """#!/bin/sh
# The disk sandbox runs in this machine's network namespace: no interface goes down.
for arg in "$@"; do
  if [ "$arg" = down ]; then echo "ip $*" >>"$(dirname "$0")/refused.log"; exit 0; fi
done
exec {ip} "$@"
"""
GUARD_DIR = "/dev/shm/ipa-sandbox-guard"
"""Where the ``ip`` guard lives: the sandbox's own /dev/shm, gone with the namespace."""


def in_network_namespace(outer: str | None) -> bool:
    """Whether this process runs in the network namespace ``outer`` (or cannot tell)."""
    try:
        return outer is None or os.readlink("/proc/self/ns/net") == outer
    except OSError:
        return True      # cannot tell: guard


def guard_interfaces(env: dict[str, str]) -> dict[str, str]:
    """``env`` with an ``ip`` that refuses ``... down`` first on its PATH."""
    real = shutil.which("ip", path=env.get("PATH"))
    if real is None:
        return env
    os.makedirs(GUARD_DIR, exist_ok=True)
    path = os.path.join(GUARD_DIR, "ip")
    with open(path, "w") as f:
        f.write(IP_GUARD.format(ip=real))
    os.chmod(path, 0o755)
    return dict(env, PATH=GUARD_DIR + os.pathsep + env.get("PATH", os.defpath))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipa_twisted.testing.sandbox_init")
    parser.add_argument("--loop", action="append", default=[], help="a loop device to keep")
    parser.add_argument("--shadow", action="append", default=None,
                        help="a program to replace with /bin/true (repeatable)")
    parser.add_argument("--no-shadow", action="store_true",
                        help="replace no program with /bin/true")
    parser.add_argument("--outer-ns", required=True,
                        help="the mount namespace (readlink /proc/self/ns/mnt) outside")
    parser.add_argument("--outer-net", default=None,
                        help="the network namespace (readlink /proc/self/ns/net) outside: "
                             "inside it no interface may go down")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run after --")
    try:
        if os.readlink("/proc/self/ns/mnt") == args.outer_ns:
            raise SandboxError("not in a private mount namespace: refusing to touch /dev "
                               "(run through unshare --mount --propagation private)")
        build_dev(args.loop)
        if not args.no_shadow:
            shadow_programs(DEFAULT_SHADOWED if args.shadow is None else args.shadow)
        for shadowed in (SYSRQ_TRIGGER, DROP_CACHES):
            if os.path.exists(shadowed):      # absent: nothing of the kernel's to protect
                _mount("/dev/null", shadowed, None, MS_BIND)
        env = dict(os.environ)
        if in_network_namespace(args.outer_net):
            env = guard_interfaces(env)
    except (SandboxError, OSError) as e:
        print(f"sandbox_init: {e}", file=sys.stderr)
        return 125
    os.execvpe(command[0], command, env)
    return 127   # not reached


if __name__ == "__main__":
    raise SystemExit(main())
