"""A small bootable whole-disk image (BIOS, MBR) for end-to-end deploy tests: built once, cached.

``build_bootable_image()`` gives the path of a raw disk image: an MBR partition table with
GRUB's boot sector, GRUB's core image in the gap before the first partition, and one ext3
partition (file system UUID ``ROOTFS_UUID``, label ``ROOTFS_LABEL``) holding

- the small Debian of ``tests/rootfs.py`` (minbase, GRUB for BIOS and UEFI, udev): what the
  agent's ``image.install_bootloader`` needs to run ``grub-install`` and ``grub-mkconfig``
  from the image in a chroot, as it does for software RAID (Ironic then passes
  ``instance_info/image_rootfs_uuid`` = ``ROOTFS_UUID`` as the root UUID);
- ``/boot/vmlinuz-<version>``: the Debian kernel the ramdisk build downloaded
  (``.cache/ramdisk-downloads/debs``, made by ``ramdisk/build.sh`` if missing);
- ``/boot/initrd.img-<version>``: busybox, mdadm and the kernel modules for virtio, NVMe,
  SATA, md RAID and ISO 9660 / FAT. Its ``/init`` prints ``MARKER`` on the serial console,
  assembles any md arrays (``mdadm --assemble --scan``), finds the file system labelled
  ``config-2`` (a partition of the disk or of an md device), mounts it, prints
  ``CONFIGDRIVE_MARKER`` followed by the ``uuid`` of ``openstack/latest/meta_data.json``
  (or ``CONFIGDRIVE_MISSING``) and powers the machine off (or, when the config drive's
  meta_data holds ``STAY_META_DATA``, prints ``STAY_MARKER`` and idles). The root file
  system is never mounted: GRUB reads the kernel and the initramfs from it;
- mdadm (unpacked, not registered with dpkg), which ``grub-install`` asks for the name
  of an md array;
- ``/boot/grub/grub.cfg`` booting that kernel with ``console=ttyS0``, and
  ``/etc/default/grub`` saying the same to ``grub-mkconfig``.

The image boots as it is from a plain disk under SeaBIOS (GRUB finds its partition by
UUID). ``uefi=True`` gives the UEFI variant instead: a GPT, an EFI system partition with
GRUB at the removable-media path ``EFI/BOOT/BOOTX64.EFI`` (booted by OVMF with empty NVRAM;
GRUB needs more than 256 MiB of RAM there), then the same root partition.

Written onto an md RAID 1 with metadata 1.2 (which the agent creates over a partition of
each holder disk) the image does not boot by itself: the firmware reads the holder disk's
own partition table, so GRUB must be installed onto the holders from the image
(``install_bootloader`` with the root UUID, which Ironic calls for software RAID).

Needs root (the root file system tarball, ``chroot`` for ``grub-mkimage``, device nodes),
``dpkg-deb``, ``tar``, ``zstd``, ``cpio``, ``gzip``, ``mke2fs`` (with ``-d``) and
``parted`` (and ``mkfs.vfat``, ``mmd`` and ``mcopy`` for UEFI). 10-40 s the first time
(given the ramdisk's downloads and the root file system tarball), nothing afterwards: the
image is kept in ``.cache/bootable-image``, keyed by the inputs' names and this file's
text.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import struct
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from ipa_twisted.process import ProcessRunner
from tests import rootfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, ".cache", "bootable-image")
DEBS_DIR = os.path.join(ROOT, ".cache", "ramdisk-downloads", "debs")

MARKER = "IPA-E2E-DEPLOYED-OS booted"
"""Printed on ttyS0 by the deployed system's /init as soon as it runs."""
CONFIGDRIVE_MARKER = "IPA-E2E-CONFIGDRIVE uuid="
"""Followed by the config drive's ``uuid`` (meta_data.json), then a line end."""
CONFIGDRIVE_MISSING = "IPA-E2E-CONFIGDRIVE none"
"""Printed instead when no file system labelled config-2 was found."""
POWEROFF_MARKER = "IPA-E2E-DEPLOYED-OS powering off"
STAY_META_DATA = {"ipa_e2e": "stay"}
"""In the config drive's meta_data (Ironic's ``configdrive={"meta_data": {...}}``): the
deployed system stays up (idle) after printing the uuid, instead of powering off."""
STAY_MARKER = "IPA-E2E-DEPLOYED-OS staying up"
ROOTFS_UUID = "6b1d7c3e-2f4a-4e5b-9c8d-1a2b3c4d5e6f"
"""File system UUID of the image's root partition (Ironic's ``image_rootfs_uuid``)."""
ROOTFS_LABEL = "ipa-e2e-root"
KERNEL_COMMAND_LINE = "console=ttyS0,115200 panic=-1"

INITRAMFS_DEBS = ("busybox", "mdadm", "libc6", "libudev1", "libcap2")
"""Debian packages unpacked into the initramfs (busybox and mdadm with their libraries)."""
MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ahci", "nvme", "md_mod",
           "raid0", "raid1", "raid10", "isofs", "vfat", "nls_cp437", "nls_utf8",
           "nls_iso8859_1")
"""Kernel modules of the initramfs (with what they depend on), loaded in order by /init."""
CORE_MODULES = ("biosdisk", "part_msdos", "ext2", "search_fs_uuid")
"""Built into GRUB's core image; the rest is loaded from the image's /boot/grub/i386-pc."""
EFI_CORE_MODULES = ("part_gpt", "ext2", "search_fs_uuid")
"""The same for UEFI (the rest from /boot/grub/x86_64-efi)."""
ESP_MIB = 32
BUILD_TIMEOUT = 900.0
_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info",
          "usr/share/lintian", "usr/share/bash-completion", "usr/lib/x86_64-linux-gnu/gconv",
          "etc/cron.d", "etc/cron.daily", "lib/systemd", "lib/udev")

INIT = r"""#!/bin/busybox sh
# PID 1 of the deployed test system: say it booted, read the config drive, power off.
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp /run
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "@MARKER@"
while read -r module; do insmod "$module" 2>/dev/null; done </etc/modules.load
found=
tries=0
while [ "$tries" -lt 40 ]; do
  mdadm --assemble --scan --run >/dev/null 2>&1
  found=$(findfs LABEL=config-2 2>/dev/null) && [ -n "$found" ] && break
  found=
  tries=$((tries + 1))
  sleep 0.5
done
echo "ipa-e2e: md arrays: $(grep ^md /proc/mdstat | tr '\n' ';')"
uuid=
stay=
if [ -n "$found" ]; then
  echo "ipa-e2e: config drive on $found"
  if mount -o ro -t iso9660 "$found" /mnt 2>/dev/null || mount -o ro -t vfat "$found" /mnt; then
    meta=/mnt/openstack/latest/meta_data.json
    uuid=$(sed -n 's/.*"uuid"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$meta" | head -n 1)
    grep -q '"ipa_e2e"[[:space:]]*:[[:space:]]*"stay"' "$meta" && stay=1
    umount /mnt
  fi
fi
if [ -n "$uuid" ]; then
  echo "@CONFIGDRIVE@$uuid"
else
  echo "@MISSING@"
fi
if [ -n "$stay" ]; then
  echo "@STAY@"
  while :; do sleep 3600; done
fi
echo "@POWEROFF@"
sync
poweroff -f
"""

GRUB_CFG = """serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry "ipa-e2e deployed system" {{
  search --no-floppy --fs-uuid --set=root {uuid}
  linux /boot/vmlinuz-{kver} root=UUID={uuid} ro {cmdline}
  initrd /boot/initrd.img-{kver}
}}
"""

DEFAULT_GRUB = """GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=ipa-e2e
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="{cmdline}"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB_DISABLE_RECOVERY=true
"""

# GRUB's boot sector (boot.img): the code ends where the MBR's disk signature starts; the
# core image it loads sits at sector 1 (boot.img's default), and the first sector of the
# core image (diskboot.img) ends with one block list entry: start (8 bytes), length (2),
# segment (2).
_BOOT_CODE_END = 0x1B8
_BLOCKLIST = 0x200 - 12


def unavailable(cache_dir: str | None = None, *, uefi: bool = False) -> str | None:
    """Why the image cannot be had here (a skip reason), or None: it is built for the
    present inputs in ``cache_dir``, or it can be built."""
    if os.uname().machine not in ("x86_64", "amd64"):
        return "the bootable test image is built for x86_64 only"
    built = _image_path(cache_dir or CACHE_DIR, uefi)
    if built is not None and os.path.exists(built):
        return None
    if os.geteuid() != 0:
        return ("building the bootable test image needs root (chroot, device nodes, "
                "the root file system tarball)")
    tools = ["dpkg-deb", "tar", "zstd", "cpio", "gzip", "mke2fs", "parted", "chroot"]
    if uefi:
        tools += ["mkfs.vfat", "mmd", "mcopy"]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (needed to build the bootable test "
                "image; bash .ci/setup installs them)")
    return rootfs.unavailable()


def _deb(name: str) -> str | None:
    found = sorted(glob.glob(os.path.join(DEBS_DIR, f"{name}_*_amd64.deb")))
    return found[-1] if found else None


def _kernel_deb() -> str | None:
    found = sorted(glob.glob(os.path.join(DEBS_DIR, "linux-image-[0-9]*-amd64_*_amd64.deb")))
    return found[-1] if found else None


def _variant(uefi: bool) -> str:
    return "uefi" if uefi else "bios"


def _image_path(cache_dir: str, uefi: bool) -> str | None:
    """Where the image made of the present inputs is kept; None while some are missing."""
    tarball = rootfs.tarball_path()
    inputs = [_kernel_deb()] + [_deb(name) for name in INITRAMFS_DEBS]
    if not os.path.exists(tarball) or None in inputs:
        return None
    return os.path.join(cache_dir,
                        f"bootable-{_variant(uefi)}-{_cache_key(tarball, inputs)}.img")


def _cache_key(tarball: str, debs: list[Any]) -> str:
    digest = hashlib.sha256()
    with open(os.path.abspath(__file__), "rb") as f:
        digest.update(f.read())
    for name in [os.path.basename(tarball)] + sorted(os.path.basename(d) for d in debs):
        digest.update(name.encode() + b"\0")
    return digest.hexdigest()[:16]


def _modinfo_depends(path: str) -> list[str]:
    """The ``depends=`` of a kernel module file (module names, ``-`` as ``_``)."""
    with open(path, "rb") as f:
        data = f.read()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + 9:data.index(b"\0", at + 9)].decode()
    return [name.replace("-", "_") for name in value.split(",") if name]


def _module_load_order(modules_dir: str, wanted: tuple[str, ...]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``wanted`` and their dependencies, each after
    what it depends on; built-in modules are left out, unknown ones are an error."""
    files: dict[str, str] = {}
    for directory, _, names in os.walk(os.path.join(modules_dir, "kernel")):
        for name in names:
            if name.endswith(".ko"):
                files[name[:-3].replace("-", "_")] = os.path.relpath(
                    os.path.join(directory, name), modules_dir)
    builtin = set()
    with open(os.path.join(modules_dir, "modules.builtin")) as f:
        for line in f:
            builtin.add(os.path.basename(line.strip())[:-3].replace("-", "_"))
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in files:
            if name in builtin:
                return
            raise AssertionError(f"kernel module {name} is neither a module file nor "
                                 f"built in ({modules_dir})")
        for dependency in _modinfo_depends(os.path.join(modules_dir, files[name])):
            visit(dependency)
        order.append(files[name])

    for name in wanted:
        visit(name)
    return order


def _write_file(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def _prune(root: str, relatives: tuple[str, ...]) -> None:
    for relative in relatives:
        victim = os.path.join(root, relative)
        if os.path.isdir(victim) and not os.path.islink(victim):
            shutil.rmtree(victim)
        elif os.path.lexists(victim):
            os.unlink(victim)


def _stage_initramfs(work: str, kver: str, modules: list[str]) -> str:
    """Fill ``work/initramfs`` (debs already unpacked there): modules, /init, /dev/console."""
    initramfs = os.path.join(work, "initramfs")
    _prune(initramfs, _PRUNE + ("etc/init.d", "etc/logcheck", "etc/mdadm",
                                "usr/share/initramfs-tools", "usr/lib/x86_64-linux-gnu/audit"))
    source = os.path.join(work, "kernel", "lib", "modules", kver)
    target = os.path.join(initramfs, "lib", "modules", kver)
    for relative in modules:
        os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
        shutil.copy2(os.path.join(source, relative), os.path.join(target, relative))
    _write_file(os.path.join(initramfs, "etc", "modules.load"),
                "".join(f"/lib/modules/{kver}/{relative}\n" for relative in modules))
    _write_file(os.path.join(initramfs, "init"),
                INIT.replace("@MARKER@", MARKER).replace("@CONFIGDRIVE@", CONFIGDRIVE_MARKER)
                .replace("@MISSING@", CONFIGDRIVE_MISSING)
                .replace("@POWEROFF@", POWEROFF_MARKER).replace("@STAY@", STAY_MARKER), 0o755)
    for directory in ("dev", "proc", "sys", "mnt", "tmp", "run", "bin", "sbin", "usr/bin",
                      "usr/sbin"):
        os.makedirs(os.path.join(initramfs, directory), exist_ok=True)
    console = os.path.join(initramfs, "dev", "console")
    if not os.path.exists(console):
        os.mknod(console, 0o600 | 0o020000, os.makedev(5, 1))
    return initramfs


def _stage_root(work: str, kver: str, uefi: bool) -> None:
    """Put the kernel, GRUB's files and configuration into ``work/root``."""
    root = os.path.join(work, "root")
    _prune(root, (rootfs.FAKE_KERNEL,))
    boot = os.path.join(root, "boot")
    shutil.copy2(os.path.join(work, "kernel", "boot", f"vmlinuz-{kver}"),
                 os.path.join(boot, f"vmlinuz-{kver}"))
    platform = "x86_64-efi" if uefi else "i386-pc"
    shutil.copytree(os.path.join(root, "usr", "lib", "grub", platform),
                    os.path.join(boot, "grub", platform), dirs_exist_ok=True)
    _write_file(os.path.join(boot, "grub", "grub.cfg"),
                GRUB_CFG.format(uuid=ROOTFS_UUID, kver=kver, cmdline=KERNEL_COMMAND_LINE))
    _write_file(os.path.join(root, "etc", "default", "grub"),
                DEFAULT_GRUB.format(cmdline=KERNEL_COMMAND_LINE))
    _write_file(os.path.join(root, "etc", "fstab"), f"UUID={ROOTFS_UUID} / ext3 defaults 0 1\n")
    _write_file(os.path.join(root, "etc", "hostname"), "ipa-e2e-deployed\n")
    _write_file(os.path.join(root, "tmp", "load.cfg"),
                f"search.fs_uuid {ROOTFS_UUID} root {'hd0,gpt2' if uefi else 'hd0,msdos1'}\n"
                "set prefix=($root)'/boot/grub'\n")


def _tree_bytes(path: str) -> int:
    total = 0
    for directory, _, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            if not os.path.islink(full):
                total += os.lstat(full).st_size
    return total


def _install_grub_boot(image: str, core_img: str, boot_img: str) -> None:
    """GRUB's boot code into the MBR (its partition table kept) and core image at sector 1,
    as ``grub-bios-setup`` would for an MBR disk."""
    with open(boot_img, "rb") as f:
        boot = f.read()
    with open(core_img, "rb") as f:
        core = f.read()
    if len(boot) != 512:
        raise AssertionError(f"{boot_img} is {len(boot)} bytes, not one sector")
    start, length = struct.unpack_from("<QH", core, _BLOCKLIST)
    sectors = (len(core) + 511) // 512
    if start != 2 or length != sectors - 1:
        raise AssertionError(f"{core_img}: unexpected block list (start {start}, length "
                             f"{length}, image of {sectors} sectors)")
    if sectors >= 2048:
        raise AssertionError(f"{core_img} ({len(core)} bytes) does not fit before 1 MiB")
    with open(image, "r+b") as f:
        f.seek(0)
        f.write(boot[:_BOOT_CODE_END])
        f.seek(512)
        f.write(core)


def _place(part_image: str, image: str, at: int) -> None:
    """Copy a partition's content into the image at byte ``at`` (holes kept)."""
    with open(part_image, "rb") as source, open(image, "r+b") as target:
        offset = 0
        while chunk := source.read(1 << 20):
            if chunk.count(0) != len(chunk):
                target.seek(at + offset)
                target.write(chunk)
            offset += len(chunk)


async def build_bootable_image(cache_dir: str | None = None, runner: Any = None, *,
                               uefi: bool = False) -> str:
    """The path of the bootable whole-disk raw image (see the module docstring), built
    first if it is not in ``cache_dir`` (default ``.cache/bootable-image``) yet.

    With ``uefi`` the image is for UEFI instead: a GPT with an EFI system partition
    holding GRUB as ``EFI/BOOT/BOOTX64.EFI`` (the removable-media path, which firmware
    boots with empty NVRAM), then the same root partition (partition 2).

    SkipTest when it cannot be built here (``unavailable()``); AssertionError or
    ProcessExecutionError when building fails. The root file system's UUID is
    ``ROOTFS_UUID``; the console markers are ``MARKER``, ``CONFIGDRIVE_MARKER`` and
    ``CONFIGDRIVE_MISSING``.
    """
    cache_dir = cache_dir or CACHE_DIR
    reason = unavailable(cache_dir, uefi=uefi)
    if reason is not None:
        raise SkipTest(reason)
    runner = runner or ProcessRunner(reactor, reactor)
    if _kernel_deb() is None or any(_deb(name) is None for name in INITRAMFS_DEBS):
        from tests.qemu import build_ramdisk          # fills the download cache
        await build_ramdisk()
    kernel_deb = _kernel_deb()
    debs = [_deb(name) for name in INITRAMFS_DEBS]
    if kernel_deb is None or None in debs:
        raise AssertionError(f"the ramdisk build left no kernel or no {INITRAMFS_DEBS} "
                             f"packages in {DEBS_DIR}")
    await rootfs.debian_rootfs(runner)
    tarball, path = rootfs.tarball_path(), _image_path(cache_dir, uefi)
    assert path is not None
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    ignore = os.path.join(cache_dir, ".gitignore")
    if not os.path.exists(ignore):
        _write_file(ignore, "# Test caches (tests/bootable_image.py): never committed.\n*\n")
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="build-", dir=cache_dir)
    try:
        root = os.path.join(work, "root")
        kernel = os.path.join(work, "kernel")
        initramfs = os.path.join(work, "initramfs")
        for directory in (root, kernel, initramfs):
            os.makedirs(directory)
        await runner.execute("tar", "--zstd", "--numeric-owner", "-xf", tarball, "-C", root,
                             timeout=BUILD_TIMEOUT)
        await runner.execute(
            "sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" ./boot ./lib/modules',
            "sh", kernel_deb, kernel, timeout=BUILD_TIMEOUT)
        for deb in debs:
            assert deb is not None
            await runner.execute("dpkg-deb", "-x", deb, initramfs, timeout=BUILD_TIMEOUT)
        kver = os.listdir(os.path.join(kernel, "lib", "modules"))[0]
        modules = await deferToThread(_module_load_order,
                                      os.path.join(kernel, "lib", "modules", kver), MODULES)
        await deferToThread(_stage_initramfs, work, kver, modules)
        initrd = os.path.join(work, "initrd.img")
        await runner.execute(
            "sh", "-c", 'cd "$1" && find . -print0 | LC_ALL=C sort -z '
            '| cpio --null -o -H newc --quiet | gzip -6 > "$2"',
            "sh", initramfs, initrd, timeout=BUILD_TIMEOUT)
        await deferToThread(_stage_root, work, kver, uefi)
        # grub-install names a partition of an md device by the array's UUID, which it
        # asks mdadm for: an image for software RAID carries mdadm, as real ones do.
        # (the root is merged-/usr: /sbin and /lib stay links to /usr's)
        await runner.execute(
            "sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -x --keep-directory-symlink '
            '-C "$2" ./sbin/mdadm', "sh", _deb("mdadm"), root, timeout=BUILD_TIMEOUT)
        shutil.move(initrd, os.path.join(root, "boot", f"initrd.img-{kver}"))
        platform, grub_modules = (("x86_64-efi", EFI_CORE_MODULES) if uefi
                                  else ("i386-pc", CORE_MODULES))
        await runner.execute(
            "chroot", root, "/usr/bin/grub-mkimage", "-O", platform, "-o", "/tmp/core.img",
            "-c", "/tmp/load.cfg", "-p", "/boot/grub", "-d", f"/usr/lib/grub/{platform}",
            *grub_modules, timeout=BUILD_TIMEOUT)
        core_img = os.path.join(work, "core.img")
        boot_img = os.path.join(work, "boot.img")
        shutil.move(os.path.join(root, "tmp", "core.img"), core_img)
        shutil.copy(os.path.join(root, "usr", "lib", "grub", "i386-pc", "boot.img"), boot_img)
        os.unlink(os.path.join(root, "tmp", "load.cfg"))
        await deferToThread(_prune, root, ("usr/share/lintian", "usr/share/bash-completion",
                                           "usr/lib/udev/hwdb.bin", "usr/lib/udev/hwdb.d"))
        used = await deferToThread(_tree_bytes, root)
        fs_mib = int(used * 1.25) // (1 << 20) + 48
        fs_image = os.path.join(work, "root.ext3")
        await runner.execute("mke2fs", "-q", "-F", "-t", "ext3", "-d", root, "-U", ROOTFS_UUID,
                             "-L", ROOTFS_LABEL, "-E", "lazy_itable_init=0", fs_image,
                             f"{fs_mib}M", timeout=BUILD_TIMEOUT)
        partial = os.path.join(work, "disk.img")
        if uefi:
            esp_image = os.path.join(work, "esp.vfat")
            await runner.execute("mkfs.vfat", "-C", "-n", "ESP", esp_image,
                                 str(ESP_MIB * 1024), timeout=BUILD_TIMEOUT)
            await runner.execute("mmd", "-i", esp_image, "::/EFI", "::/EFI/BOOT",
                                 timeout=BUILD_TIMEOUT)
            await runner.execute("mcopy", "-i", esp_image, core_img,
                                 "::/EFI/BOOT/BOOTX64.EFI", timeout=BUILD_TIMEOUT)
            root_start = 1 + ESP_MIB
            with open(partial, "wb") as f:
                f.truncate((root_start + fs_mib + 1) << 20)       # + the backup GPT
            await runner.execute(
                "parted", "-s", partial, "--", "mklabel", "gpt",
                "mkpart", "ESP", "fat32", "1MiB", f"{root_start}MiB", "set", "1", "esp", "on",
                "mkpart", "root", "ext2", f"{root_start}MiB", f"{root_start + fs_mib}MiB",
                timeout=BUILD_TIMEOUT)
            await deferToThread(_place, esp_image, partial, 1 << 20)
            await deferToThread(_place, fs_image, partial, root_start << 20)
        else:
            with open(partial, "wb") as f:
                f.truncate((fs_mib + 1) << 20)
            await runner.execute("parted", "-s", partial, "--", "mklabel", "msdos", "mkpart",
                                 "primary", "ext2", "1MiB", "100%", "set", "1", "boot", "on",
                                 timeout=BUILD_TIMEOUT)
            await deferToThread(_place, fs_image, partial, 1 << 20)
            await deferToThread(_install_grub_boot, partial, core_img, boot_img)
        os.replace(partial, path)
        for stale in glob.glob(os.path.join(cache_dir, f"bootable-{_variant(uefi)}-*.img")):
            if stale != path:                     # an older recipe's image
                for victim in (stale, stale + ".txt"):
                    if os.path.exists(victim):
                        os.unlink(victim)
        _write_file(path + ".txt", f"kernel: {kver}\nbuild seconds: "
                                   f"{time.monotonic() - started:.1f}\n"
                                   f"size: {os.path.getsize(path)}\n"
                                   f"rootfs uuid: {ROOTFS_UUID}\n")
    finally:
        await deferToThread(shutil.rmtree, work, True)
    return path
