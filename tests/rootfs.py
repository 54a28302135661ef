"""A small Debian root file system with GRUB, for boot loader tests: built once, then cached.

``debian_rootfs(runner)`` gives a zstd tarball of ``debootstrap --variant=minbase`` with
GRUB for BIOS and UEFI (the binaries only: no kernel, no initramfs) and udev (GRUB asks
``udevadm`` for a partition's start, which loop devices cannot answer by ioctl). Docs, man
pages, locales and apt's caches are left out, and an empty ``/boot/vmlinuz-*`` is added so
that grub-mkconfig writes a menu entry. About 45 s and 60 MB of downloads the first time;
then the tarball is reused from ``.cache/`` in the checkout (git-ignored by the
``.gitignore`` made inside it), keyed by a hash of everything that shapes it.

debootstrap runs in a private mount namespace (it mounts /proc and /sys in the target).
When it cannot reach the mirror (``IPA_TEST_DEBIAN_MIRROR``, default deb.debian.org) the
test is skipped with that reason; any other failure fails it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from twisted.trial.unittest import SkipTest

from ipa_twisted.process import ProcessExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, ".cache")
SUITE = "bookworm"
PACKAGES = ("grub-pc-bin", "grub-efi-amd64-bin", "grub2-common", "udev")
PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info",
         "var/cache/apt", "var/lib/apt/lists")
FAKE_KERNEL = "boot/vmlinuz-6.1.0-0-amd64"
RECIPE_VERSION = 1
DEBOOTSTRAP_TIMEOUT = 1800.0
_UNREACHABLE = ("Failed getting release file", "Couldn't download", "Temporary failure",
                "Could not resolve", "Connection refused", "Network is unreachable",
                "Connection timed out", "No route to host", "Unable to connect")


def mirror() -> str:
    return os.environ.get("IPA_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def cache_key() -> str:
    recipe = {"suite": SUITE, "packages": PACKAGES, "mirror": mirror(), "prune": PRUNE,
              "kernel": FAKE_KERNEL, "variant": "minbase", "version": RECIPE_VERSION,
              "arch": "amd64"}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def unavailable() -> str | None:
    """Why the root file system cannot be had here (a skip reason), or None."""
    if os.uname().machine not in ("x86_64", "amd64"):
        return "the GRUB test root file system is built for amd64 only"
    if os.path.exists(tarball_path()):
        return None
    for program in ("debootstrap", "tar", "zstd", "unshare"):
        if shutil.which(program) is None:
            return f"{program} is not installed (needed to build the test root file system)"
    return None


def tarball_path() -> str:
    return os.path.join(CACHE_DIR, f"debian-{SUITE}-grub-{cache_key()}.tar.zst")


def _prepare_cache_dir() -> None:
    os.makedirs(CACHE_DIR, exist_ok=True)
    ignore = os.path.join(CACHE_DIR, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w", encoding="ascii") as f:
            f.write("# Test caches (tests/rootfs.py): never committed.\n*\n")


async def debian_rootfs(runner: Any) -> str:
    """The cached tarball's path, building it first if needed (SkipTest if impossible)."""
    reason = unavailable()
    if reason is not None:
        raise SkipTest(reason)
    path = tarball_path()
    if os.path.exists(path):
        return path
    _prepare_cache_dir()
    work = tempfile.mkdtemp(prefix="rootfs-", dir=CACHE_DIR)
    target = os.path.join(work, "root")
    try:
        try:
            await runner.execute(
                "unshare", "--mount", "--propagation", "private", "--", "debootstrap",
                "--variant=minbase", "--include=" + ",".join(PACKAGES), SUITE, target,
                mirror(), timeout=DEBOOTSTRAP_TIMEOUT)
        except ProcessExecutionError as e:
            output = (e.stdout + e.stderr).decode("utf-8", "replace")
            log = os.path.join(target, "debootstrap", "debootstrap.log")
            if os.path.exists(log):
                with open(log, encoding="utf-8", errors="replace") as f:
                    output += f.read()[-4000:]
            if any(sign in output for sign in _UNREACHABLE):
                raise SkipTest(f"debootstrap cannot reach {mirror()}: "
                               f"{output.strip()[-300:]}") from e
            raise
        for relative in PRUNE:
            victim = os.path.join(target, relative)
            if os.path.isdir(victim) and not os.path.islink(victim):
                shutil.rmtree(victim)
                os.mkdir(victim)
            elif os.path.lexists(victim):
                os.unlink(victim)
        open(os.path.join(target, FAKE_KERNEL), "w").close()
        partial = os.path.join(work, "rootfs.tar.zst")
        await runner.execute("tar", "--zstd", "--numeric-owner", "-cf", partial, "-C",
                             target, ".", timeout=DEBOOTSTRAP_TIMEOUT)
        os.replace(partial, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
