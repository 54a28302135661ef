"""FAT file systems in tests on kernels that cannot mount them (no ``vfat`` module).

Some test machines run a kernel without vfat (and without loadable modules), yet ESPs and
virtual media floppies are FAT. ``fat_mount_dir`` then makes a directory holding a ``mount``
wrapper that mounts FAT block devices with ``fusefat`` (FUSE, read-write with ``rw+``) and
hands everything else to the real ``mount``; tests put it first on PATH of what they run in
the sandbox (the agent's ``mount`` calls go through it; ``umount`` works on FUSE mounts as
it is; the wrapper makes /dev/fuse in the sandbox's /dev). On a kernel with vfat no
wrapper is needed.
"""

from __future__ import annotations

import os
import shutil
import sys

from twisted.trial.unittest import SkipTest

WRAPPER = """#!{python}
# mount for tests on kernels without vfat: FAT block devices through fusefat (FUSE).
import os, stat, subprocess, sys

args = sys.argv[1:]
options, positional, i = [], [], 0
while i < len(args):
    if args[i] in ("-o", "-t") and i + 1 < len(args):
        if args[i] == "-o":
            options += args[i + 1].split(",")
        i += 2
        continue
    positional.append(args[i])
    i += 1
if len(positional) == 2 and not any(p.startswith("-") for p in positional) \\
        and "bind" not in options and os.path.exists(positional[0]):
    kind = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", positional[0]],
                          capture_output=True, text=True).stdout.strip()
    if kind == "vfat":
        if not os.path.exists("/dev/fuse"):   # the sandbox's /dev has only the basics
            os.mknod("/dev/fuse", 0o666 | stat.S_IFCHR, os.makedev(10, 229))
        mode = "ro" if "ro" in options else "rw+"
        done = subprocess.run(["fusefat", "-o", mode + ",fsname=" + positional[0],
                               positional[0], positional[1]], stdout=subprocess.DEVNULL)
        if done.returncode != 0 or not os.path.ismount(positional[1]):
            sys.exit("mount (fusefat): cannot mount " + positional[0])
        sys.exit(0)
os.execv({mount!r}, ["mount", *args])
"""


def kernel_has_vfat() -> bool:
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return any(line.split()[-1:] == ["vfat"] for line in f)
    except OSError:
        return False


def fat_mount_dir(directory: str) -> str | None:
    """A directory with the ``mount`` wrapper, or None when the kernel mounts FAT itself.

    SkipTest when neither the kernel nor fusefat can mount FAT.
    """
    if kernel_has_vfat():
        return None
    if shutil.which("fusefat") is None or not os.path.exists("/dev/fuse"):
        raise SkipTest("this kernel cannot mount FAT (no vfat) and fusefat (Debian "
                       "package fusefat) or /dev/fuse is missing")
    mount = shutil.which("mount")
    if mount is None:
        raise SkipTest("mount is not installed")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "mount")
    with open(path, "w", encoding="utf-8") as f:
        f.write(WRAPPER.format(python=sys.executable, mount=os.path.realpath(mount)))
    os.chmod(path, 0o755)
    return directory
