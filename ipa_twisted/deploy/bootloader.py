# Over 500 lines: the reference's boot loader steps (UEFI, then GRUB2 in a chroot) read in order.
"""Installing the instance's boot loader (``image.install_bootloader``), as the reference does.

1. UEFI, when the agent itself booted in UEFI mode (and ``efibootmgr`` is installed): if the
   EFI system partition (ESP) of the install device already holds loaders (whole-disk
   images), they are registered in NVRAM and that is all (``manage_uefi``).
2. Otherwise, with a root partition (partition images), GRUB2 from the image itself is run
   in a chroot (``install_grub2``): the root partition is found by its UUID (file system
   UUID, partition UUID or label), mounted on a private temporary directory with the
   configured ``dev_path``, ``proc_path``, ``sys_path`` and ``/run`` bind-mounted under it,
   and

   - for BIOS: ``grub-install`` on the disk holding the root partition (on every holder
     disk of a software RAID device; on the PReP partition for PowerPC);
   - for UEFI (an ESP given by ``efi_system_part_uuid``, or one on the disk when the target
     is UEFI): the ESP is mounted on the image's ``/boot/efi``; EFI files the image keeps in
     its own ``/boot/efi/EFI`` are copied there, else ``grub-install --efi-directory``
     puts GRUB there (and in the removable-media path ``EFI/BOOT``) without touching
     NVRAM; the loaders are then registered with ``efibootmgr`` when running in UEFI mode;

   then ``grub-mkconfig`` writes ``/boot/grub/grub.cfg`` (``grub2-*`` and ``/boot/grub2``
   when the image has ``grub2-install``).

   Everything mounted is unmounted in reverse order afterwards, also on failure.

A root UUID of ``None`` or ``0x00000000`` means a whole-disk image: nothing is done after
step 1; when step 1 cannot run either (``nothing_to_install``), the command ends before any
disk is looked at. Failing programs become CommandExecutionError; a partition that cannot be found,
DeviceNotFound.

A BIOS install (a partition image without an ESP and a target other than UEFI:
``grub-install`` run from the image) needs ``enable_bios_bootloader_install`` (default off,
the CVE-2026-43003 mitigation, as the reference agent): ``bios_install_permitted`` refuses
it, naming the option, before any disk is looked at (with ``ignore_bootloader_failure``, it
is logged and nothing is done). Unlike the reference, which checks after trying the
firmware's own loaders (step 1), the check comes first: a BIOS target on a machine booted in
UEFI mode is refused too.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Sequence
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ipa_twisted.errors import (CommandExecutionError, DeviceNotFound,
                                InstanceDeployFailure, InvalidImage)
from ipa_twisted.blockdev import disks
from ipa_twisted.deploy import efi
from ipa_twisted.context import HardwareContext
from ipa_twisted.blockdev.mounts import MountStack, mounted, remove_mount_point
from ipa_twisted.process import ProcessExecutionError, failures_as

log = Logger()

GRUB_TIMEOUT = 600.0
"""Longest wait for one grub-install or grub-mkconfig run."""
LOOKUP_TIMEOUT = 60.0
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WHOLE_DISK_ROOT_UUIDS = (None, "0x00000000")
BIOS_INSTALL_DISABLED = (
    "Install of legacy BIOS bootloaders disabled by the agent option "
    "enable_bios_bootloader_install (Ironic's [agent]enable_bios_bootloader_install) as "
    "part of CVE-2026-43003 mitigation.")
"""Why a partition image's BIOS boot loader is not installed (the option is off)."""
BIND_MOUNTS = ("dev", "proc", "sys", "run")
"""Mounted under the image root for the chroot, in this order (unmounted in reverse)."""

_BIOS_TARGETS = {"x86_64": "i386-pc", "amd64": "i386-pc", "i386": "i386-pc",
                 "i486": "i386-pc", "i586": "i386-pc", "i686": "i386-pc"}
_EFI_TARGETS = {"x86_64": "x86_64-efi", "amd64": "x86_64-efi", "aarch64": "arm64-efi",
                "arm64": "arm64-efi", "i386": "i386-efi", "i686": "i386-efi",
                "riscv64": "riscv64-efi", "loongarch64": "loongarch64-efi",
                "armv7l": "arm-efi"}
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def grub_target(boot_mode: str, machine: str | None = None) -> str | None:
    """The ``grub-install --target`` for ``boot_mode`` on this CPU, or None to let GRUB pick.

    Naming it matters when the agent booted in another mode than the instance will.
    """
    machine = machine or os.uname().machine
    table = _EFI_TARGETS if boot_mode == "uefi" else _BIOS_TARGETS
    return table.get(machine)


def _timeout(context: HardwareContext, limit: float) -> float:
    return min(context.config.command_timeout, limit)


def _run_path(context: HardwareContext) -> str:
    return str(getattr(context.config, "run_path", "/run"))


def _sources(context: HardwareContext) -> dict[str, str]:
    config = context.config
    return {"dev": config.dev_path, "proc": config.proc_path, "sys": config.sys_path,
            "run": _run_path(context)}


# -- partitions and RAID ------------------------------------------------------------------------

def is_md_device(context: HardwareContext, device: str) -> bool:
    """Whether ``device`` is a Linux software RAID (md) device."""
    name = os.path.basename(os.path.realpath(device))
    return name.startswith("md") or os.path.isdir(
        os.path.join(context.config.sys_path, "block", name, "md"))


def holder_disks(context: HardwareContext, device: str) -> list[str]:
    """The disks holding the members of md ``device`` (``/dev/sda`` for ``sda1``)."""
    sys_path = context.config.sys_path
    name = os.path.basename(os.path.realpath(device))
    try:
        members = sorted(os.listdir(os.path.join(sys_path, "block", name, "slaves")))
    except OSError as e:
        raise CommandExecutionError(f"Cannot list the members of {device}: {e}") from e
    holders: list[str] = []
    for member in members:
        entry = os.path.join(sys_path, "class", "block", member)
        disk = member
        if os.path.exists(os.path.join(entry, "partition")):
            disk = os.path.basename(os.path.dirname(os.path.realpath(entry)))
        path = os.path.join(context.config.dev_path, disk)
        if path not in holders:
            holders.append(path)
    if not holders:
        raise CommandExecutionError(f"Software RAID device {device} has no members")
    return holders


def partition_number(context: HardwareContext, path: str) -> int:
    """The partition number of partition ``path`` (from sysfs, else its name)."""
    name = os.path.basename(os.path.realpath(path))
    try:
        with open(os.path.join(context.config.sys_path, "class", "block", name,
                               "partition"), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        pass
    match = _TRAILING_NUMBER.search(name)
    if match is None:
        raise DeviceNotFound(f"Cannot detect the partition number of the device {path}")
    return int(match.group(1))


async def _candidates(context: HardwareContext, device: str) -> list[str]:
    """Partitions (and md partitions) of ``device``, as paths under ``dev_path``."""
    out, _ = await context.runner.execute(
        "lsblk", "--list", "--noheadings", "--output", "KNAME,TYPE", device,
        timeout=_timeout(context, LOOKUP_TIMEOUT))
    own = os.path.basename(os.path.realpath(device))
    paths = []
    for line in out.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] != own and fields[1] in ("part", "md"):
            paths.append(os.path.join(context.config.dev_path, fields[0]))
    return paths


async def find_partition(context: HardwareContext, device: str, uuid: str) -> str:
    """The partition of ``device`` whose file system UUID, partition UUID or label is
    ``uuid``; DeviceNotFound if there is none, CommandExecutionError if looking fails."""
    log.debug("Looking for partition {uuid} on {device}", uuid=uuid, device=device)
    wanted = uuid.lower()
    with failures_as(CommandExecutionError, f"Finding the partition with UUID {uuid} on "
                     f"device {device} failed with {{error}}"):
        await disks.rescan_device(context, device)
        for path in await _candidates(context, device):
            if not os.path.exists(path):
                try:
                    await disks.wait_for_partition(context, device, path)
                except InstanceDeployFailure:
                    continue
            found = await disks.probe(context, path)
            if (found.get("UUID", "").lower() == wanted
                    or found.get("PART_ENTRY_UUID", "").lower() == wanted
                    or found.get("LABEL") == uuid):
                log.debug("Partition {uuid} is {path}", uuid=uuid, path=path)
                return path
        for tag in ("UUID", "PARTUUID"):
            out, _ = await context.runner.execute(
                "blkid", "-l", "-o", "device", "-t", f"{tag}={uuid}",
                timeout=_timeout(context, LOOKUP_TIMEOUT), check_exit_code=[0, 2])
            lines = out.decode("utf-8", "replace").split()
            if lines:
                return lines[0]
    if is_md_device(context, device):
        md_partition = disks.partition_index_to_path(device, 1)
        try:
            if stat.S_ISBLK(os.stat(md_partition).st_mode):
                return md_partition
        except OSError:
            pass
    raise DeviceNotFound(f"No partition with UUID {uuid} found on device {device}")


def _read_sector(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, 512, 0)
    finally:
        os.close(fd)


# Strings a boot loader leaves in its first sector. parted's generic MBR code (which only
# chains to the active partition) has none: a freshly partitioned disk is not bootable.
_LOADER_SIGNATURES = (b"GRUB", b"LILO", b"SYSLINUX", b"EXTLINUX", b"ISOLINUX", b"NTLDR",
                      b"BOOTMGR")


def _has_boot_code(sector: bytes) -> bool:
    return (len(sector) == 512 and sector[510:512] == b"\x55\xaa"
            and any(signature in sector for signature in _LOADER_SIGNATURES))


async def is_bootloader_loaded(context: HardwareContext, device: str) -> bool:
    """Whether ``device`` looks bootable already: a partition flagged ``boot`` and boot
    code (a signed boot sector) on the disk or on that partition."""
    try:
        layout = await disks.read_layout(context, device)
    except (ProcessExecutionError, CommandExecutionError):
        return False
    flagged = [p.path for p in layout.partitions if "boot" in p.flags]
    if not flagged:
        return False
    for path in [device, *flagged]:
        try:
            sector = await deferToThreadPool(context.reactor,
                                             context.reactor.getThreadPool(),
                                             _read_sector, path)
        except OSError:
            continue
        if _has_boot_code(sector):
            return True
    return False


# -- UEFI ---------------------------------------------------------------------------------------

async def manage_uefi(context: HardwareContext, device: str,
                      efi_system_part_uuid: str | None = None) -> bool:
    """Register the loaders already on the ESP of ``device`` in NVRAM.

    False when the ESP holds no loader (GRUB must be installed there); DeviceNotFound when
    there is no ESP at all.
    """
    await disks.rescan_device(context, device)
    number = await disks.get_efi_part_on_device(context, device)
    if number is not None:
        esp = disks.partition_index_to_path(device, number)
        if not os.path.exists(esp):
            await disks.wait_for_partition(context, device, esp)
    elif efi_system_part_uuid:
        esp = await find_partition(context, device, efi_system_part_uuid)
        number = partition_number(context, esp)
    else:
        raise DeviceNotFound(
            f"No EFI partition could be detected on device {device} and EFI partition "
            "UUID has not been recorded during deployment (which is often the case for "
            "whole disk images). Are you using a UEFI-compatible image?")
    with failures_as(CommandExecutionError, f"Could not configure UEFI boot on device {device}"):
        async with mounted(context, esp, prefix="ipa-esp-") as where:
            loaders = efi.find_efi_loaders(where)
            if not loaders:
                log.warn("Empty EFI partition detected on {device}", device=device)
                return False
            await efi.register(context, device, number, efi.boot_entries(where, loaders))
            return True


async def efi_boot_setup(context: HardwareContext, device: str,
                         efi_system_part_uuid: str | None, target_boot_mode: str | None,
                         current_boot_mode: str) -> bool:
    """Step 1 of the module docstring; True if the boot loader is set up."""
    if target_boot_mode and target_boot_mode != current_boot_mode:
        log.warn("Boot mode mismatch: target boot mode is {target}, current boot mode is "
                 "{current}. Installing boot loader may fail or work incorrectly.",
                 target=target_boot_mode, current=current_boot_mode)
    if current_boot_mode != "uefi" or is_md_device(context, device):
        return False
    if context.runner.which(efi.EFIBOOTMGR) is None:
        log.warn("efibootmgr is not available in the ramdisk")
        return False
    return await manage_uefi(context, device, efi_system_part_uuid)


# -- GRUB2 in a chroot --------------------------------------------------------------------------

def _in_chroot(context: HardwareContext, path: str) -> str:
    """Where device ``path`` (under ``dev_path``) is seen inside the chroot."""
    dev = os.path.realpath(context.config.dev_path)
    real = os.path.realpath(os.path.dirname(path))
    if real == dev or real.startswith(dev + os.sep):
        return "/dev/" + os.path.relpath(os.path.join(real, os.path.basename(path)), dev)
    return path


async def _chroot(context: HardwareContext, root: str, *argv: str,
                  env: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    runner: Any = context.runner
    out, err = await runner.execute("chroot", root, *argv, env={"PATH": CHROOT_PATH,
                                                                 **(env or {})},
                                    timeout=_timeout(context, GRUB_TIMEOUT))
    return out, err


def _grub_name(root: str) -> str:
    return "grub2" if os.path.exists(os.path.join(root, "usr/sbin/grub2-install")) \
        else "grub"


def _has_grub(root: str) -> bool:
    return any(os.path.exists(os.path.join(root, directory, f"{name}-mkconfig"))
               for directory in ("usr/sbin", "usr/bin", "sbin", "bin")
               for name in ("grub", "grub2"))


async def _md_uuids(context: HardwareContext) -> list[str]:
    """``MD_UUID`` of every md device the kernel has."""
    uuids: list[str] = []
    try:
        names = sorted(n for n in os.listdir(os.path.join(context.config.sys_path, "block"))
                       if n.startswith("md"))
    except OSError:
        return uuids
    for name in names:
        out, _ = await context.runner.execute(
            "mdadm", "--detail", "--export", os.path.join(context.config.dev_path, name),
            timeout=_timeout(context, LOOKUP_TIMEOUT))
        for line in out.decode("utf-8", "replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "MD_UUID" and value.strip():
                uuids.append(value.strip())
    return uuids


def _add_kernel_parameters(root: str, parameters: Sequence[str]) -> None:
    path = os.path.join(root, "etc/default/grub")
    with open(path, encoding="utf-8") as f:
        contents = f.read()
    contents = re.sub(r'GRUB_CMDLINE_LINUX="(.*)"',
                      lambda m: f'GRUB_CMDLINE_LINUX="{m.group(1)} {" ".join(parameters)}"',
                      contents)
    with open(path, "w", encoding="utf-8") as f:
        f.write(contents)


async def configure_grub(context: HardwareContext, device: str, root: str) -> None:
    """``grub-mkconfig`` in the chroot at ``root`` (``rd.md.uuid`` added for dracut+RAID)."""
    grub = _grub_name(root)
    if is_md_device(context, device) and os.path.exists(
            os.path.join(root, "etc/default/grub")) and any(
            os.path.exists(os.path.join(root, d, "dracut")) for d in ("usr/bin", "usr/sbin")):
        parameters = [f"rd.md.uuid={uuid}" for uuid in await _md_uuids(context)]
        if parameters:
            log.debug("Setting kernel parameters {parameters}", parameters=parameters)
            _add_kernel_parameters(root, parameters)
    await _chroot(context, root, f"{grub}-mkconfig", "-o", f"/boot/{grub}/grub.cfg",
                  env={"GRUB_DISABLE_OS_PROBER": "true", "GRUB_SAVEDEFAULT": "true"})


def _copy_efi_assets(root: str, esp: str) -> list[str]:
    """Copy the image's ``/boot/efi/EFI`` to the mounted ESP, with GRUB's config and
    environment next to each loader directory that lacks them; the directories copied."""
    source = os.path.join(root, "boot/efi/EFI")
    target = os.path.join(esp, "EFI")
    shutil.copytree(source, target, dirs_exist_ok=True)
    directories = sorted(d for d in os.listdir(source)
                         if os.path.isdir(os.path.join(source, d)))
    for name in ("grub.cfg", "grubenv"):
        for grub_dir in ("boot/grub2", "boot/grub"):
            found = os.path.join(root, grub_dir, name)
            if not os.path.isfile(found):
                continue
            for directory in directories:
                destination = os.path.join(target, directory, name)
                if not os.path.isfile(destination):
                    try:
                        shutil.copy2(found, destination)
                    except OSError as e:
                        log.warn("Failed to copy {file} for EFI boot: {error}", file=found,
                                 error=str(e))
            break
    return directories


def _append_esp_to_fstab(root: str, efi_system_part_uuid: str | None) -> None:
    if not efi_system_part_uuid:
        return
    fstab = os.path.join(root, "etc/fstab")
    if not os.path.exists(fstab):
        return
    try:
        with open(fstab, "r+", encoding="utf-8") as f:
            if efi_system_part_uuid not in f.read():
                f.write(f"UUID={efi_system_part_uuid}\t/boot/efi\tvfat\tumask=0077\t0\t1\n")
    except OSError as e:
        log.debug("Failed to add the ESP to /etc/fstab: {error}", error=str(e))


async def _register_esp(context: HardwareContext, device: str, esp: str, esp_mount: str,
                        current_boot_mode: str) -> None:
    """Register the loaders on the mounted ESP in NVRAM, when that can be done."""
    if current_boot_mode != "uefi":
        log.warn("Not registering UEFI boot records: the agent booted in {mode} mode; the "
                 "firmware will find the removable-media loader", mode=current_boot_mode)
        return
    if is_md_device(context, device):
        log.warn("Not registering UEFI boot records for software RAID device {device}",
                 device=device)
        return
    if context.runner.which(efi.EFIBOOTMGR) is None:
        log.warn("efibootmgr is not available in the ramdisk; no UEFI boot record made")
        return
    loaders = efi.find_efi_loaders(esp_mount)
    if not loaders:
        raise CommandExecutionError(f"No EFI boot loader was installed on {esp}")
    await efi.register(context, device, partition_number(context, esp),
                       efi.boot_entries(esp_mount, loaders))


async def _install_efi_grub(context: HardwareContext, root: str, grub: str) -> None:
    """grub-install for UEFI into the ESP mounted at the chroot's /boot/efi, twice: the
    distribution's path and the removable-media path. NVRAM is left alone."""
    target = grub_target("uefi")
    argv = [f"{grub}-install", *([f"--target={target}"] if target else []),
            "--efi-directory=/boot/efi", "--no-nvram"]
    errors: list[ProcessExecutionError] = []
    for extra in ([], ["--removable"]):
        try:
            await _chroot(context, root, *argv, *extra)
        except ProcessExecutionError as e:
            log.warn("GRUB2 installation {how} failed: {error}",
                     how="to the removable-media path" if extra else "for UEFI",
                     error=str(e))
            errors.append(e)
    if len(errors) == 2:
        raise errors[0]


async def install_grub2(context: HardwareContext, device: str, root_uuid: str, *,
                        efi_system_part_uuid: str | None = None,
                        prep_boot_part_uuid: str | None = None,
                        target_boot_mode: str | None = "bios",
                        current_boot_mode: str = "bios") -> None:
    """Step 2 of the module docstring."""
    log.debug("Installing GRUB2 boot loader on device {device}", device=device)
    root_partition = await find_partition(context, device, root_uuid)
    md = is_md_device(context, device)
    if (not md and not (efi_system_part_uuid or prep_boot_part_uuid)
            and current_boot_mode == "bios" and await is_bootloader_loaded(context, device)):
        log.info("Skipping installation of bootloader on device {device} as it is already "
                 "marked bootable.", device=device)
        return

    esp: str | None = None
    if efi_system_part_uuid:
        esp = await find_partition(context, device, efi_system_part_uuid)
    elif target_boot_mode == "uefi":
        number = await disks.get_efi_part_on_device(context, device)
        if number is not None:
            esp = disks.partition_index_to_path(device, number)
    if md and target_boot_mode == "uefi" and esp is None:
        raise CommandExecutionError(
            f"No EFI system partition on software RAID device {device}: give "
            "efi_system_part_uuid or create one with the RAID configuration")
    if prep_boot_part_uuid:
        targets = [await find_partition(context, device, prep_boot_part_uuid)]
    elif md:
        targets = holder_disks(context, device)
    else:
        targets = [device]

    root = tempfile.mkdtemp(prefix="ipa-bootloader-")
    mounts = MountStack(context)
    failure: BaseException | None = None
    try:
        await mounts.mount(root_partition, root)
        sources = _sources(context)
        for name in BIND_MOUNTS:
            where = os.path.join(root, name)
            os.makedirs(where, exist_ok=True)
            await mounts.bind(sources[name], where)
        grub = _grub_name(root)
        if esp is not None:
            esp_mount = os.path.join(root, "boot/efi")
            if not md and os.path.isdir(os.path.join(esp_mount, "EFI")):
                if await _preserve_efi_assets(context, device, root, esp, current_boot_mode):
                    _append_esp_to_fstab(root, efi_system_part_uuid)
                    return
            os.makedirs(esp_mount, exist_ok=True)
            log.warn("GRUB2 will be installed for UEFI on EFI partition {esp} using the "
                     "install command, which does not place Secure Boot signed binaries.",
                     esp=esp)
            await mounts.mount(esp, esp_mount)
            await _install_efi_grub(context, root, grub)
        else:
            target = grub_target("bios") if not prep_boot_part_uuid else None
            log.info("GRUB2 will be installed on {disks}", disks=", ".join(targets))
            for disk in targets:
                await _chroot(context, root, f"{grub}-install",
                              *([f"--target={target}"] if target else []),
                              _in_chroot(context, disk))
        await configure_grub(context, device, root)
        if esp is not None:
            _append_esp_to_fstab(root, efi_system_part_uuid)
            await _register_esp(context, device, esp, os.path.join(root, "boot/efi"),
                                current_boot_mode)
        log.info("GRUB2 successfully installed on {device}", device=device)
    except ProcessExecutionError as e:
        failure = e
        raise CommandExecutionError(f"Installing GRUB2 boot loader to device {device} "
                                    f"failed with {e}.") from e
    except BaseException as e:
        failure = e
        raise
    finally:
        left = await mounts.unmount_all()
        if not left:
            remove_mount_point(root)
        elif failure is None:
            raise CommandExecutionError(
                "Unmounting failed after installing the boot loader; still mounted: "
                + ", ".join(path for path, _ in left))


async def _preserve_efi_assets(context: HardwareContext, device: str, root: str, esp: str,
                               current_boot_mode: str) -> bool:
    """Copy the EFI files the image keeps in its /boot/efi to the ESP and register them.

    False (logged) if that did not work: GRUB is installed instead.
    """
    log.debug("EFI asset folder detected in the image; preserving the assets")
    try:
        if _has_grub(root):
            await configure_grub(context, device, root)
        async with mounted(context, esp, prefix="ipa-esp-") as esp_mount:
            copied = await deferToThreadPool(context.reactor,
                                             context.reactor.getThreadPool(),
                                             _copy_efi_assets, root, esp_mount)
            log.debug("EFI assets {copied} copied to {esp}", copied=copied, esp=esp)
            if current_boot_mode == "uefi" and not is_md_device(context, device) \
                    and context.runner.which(efi.EFIBOOTMGR) is not None:
                loaders = efi.find_efi_loaders(esp_mount)
                if not loaders:
                    return False
                await efi.register(context, device, partition_number(context, esp),
                                   efi.boot_entries(esp_mount, loaders))
        return True
    except Exception as e:
        log.warn("Preserving the image's EFI assets failed ({error}); installing GRUB2 "
                 "instead", error=str(e))
        return False


def nothing_to_install(context: HardwareContext, root_uuid: str | None,
                       target_boot_mode: str | None, current_boot_mode: str) -> bool:
    """Whether ``image.install_bootloader`` has nothing to do, whatever the disk holds.

    True for a whole-disk image (a root UUID of None or ``0x00000000``: the image brings its
    own boot loader) when step 1 cannot run either: the agent did not boot in UEFI mode, or
    ``efibootmgr`` is not installed. Decided from the parameters, the boot mode and PATH
    alone, before any disk or hardware manager is asked, so the command is answered as
    finished at once (Ironic polls an unfinished one again only after
    ``[agent]command_wait_interval``). Logs what the full path would have logged.
    """
    if root_uuid not in WHOLE_DISK_ROOT_UUIDS:
        return False
    if current_boot_mode == "uefi" and context.runner.which(efi.EFIBOOTMGR) is not None:
        return False
    if target_boot_mode and target_boot_mode != current_boot_mode:
        log.warn("Boot mode mismatch: target boot mode is {target}, current boot mode is "
                 "{current}. Installing boot loader may fail or work incorrectly.",
                 target=target_boot_mode, current=current_boot_mode)
    if current_boot_mode == "uefi":
        log.warn("efibootmgr is not available in the ramdisk")
    log.info("Not using grub2-install since root UUID is not provided. Assuming a whole "
             "disk image")
    return True


def bios_install_permitted(config: Any, root_uuid: str | None,
                           efi_system_part_uuid: str | None, target_boot_mode: str | None,
                           ignore_failure: bool) -> bool:
    """Whether ``image.install_bootloader`` may go on under ``enable_bios_bootloader_install``.

    A partition image (a root UUID) without an ESP and with a target other than UEFI gets
    a BIOS (or PReP) ``grub-install`` run from the image: with the option off (``config``'s,
    which Ironic's lookup sets) that is InvalidImage naming the option and CVE-2026-43003,
    or, with ``ignore_failure``, False after logging it. Decided from the parameters alone,
    before any disk is looked at.
    """
    if (root_uuid in WHOLE_DISK_ROOT_UUIDS or efi_system_part_uuid
            or target_boot_mode == "uefi" or config.enable_bios_bootloader_install):
        return True
    log.error("{error}", error=BIOS_INSTALL_DISABLED)
    if not ignore_failure:
        raise InvalidImage(BIOS_INSTALL_DISABLED)
    return False


async def install_bootloader(context: HardwareContext, device: str, root_uuid: str | None, *,
                             efi_system_part_uuid: str | None = None,
                             prep_boot_part_uuid: str | None = None,
                             target_boot_mode: str | None = "bios",
                             current_boot_mode: str = "bios",
                             ignore_failure: bool = False) -> None:
    """The whole of ``image.install_bootloader`` on ``device`` (see the module docstring),
    once ``bios_install_permitted`` said yes.

    With ``ignore_failure`` errors are logged and the boot loader is left as it is.
    """
    try:
        if await efi_boot_setup(context, device, efi_system_part_uuid, target_boot_mode,
                                current_boot_mode):
            return
    except Exception as e:
        log.error("Error setting up bootloader. Error {error}", error=str(e))
        if not ignore_failure:
            raise
    if root_uuid in WHOLE_DISK_ROOT_UUIDS:
        log.info("Not using grub2-install since root UUID is not provided. Assuming a "
                 "whole disk image")
        return
    assert root_uuid is not None
    try:
        await install_grub2(context, device, root_uuid,
                            efi_system_part_uuid=efi_system_part_uuid,
                            prep_boot_part_uuid=prep_boot_part_uuid,
                            target_boot_mode=target_boot_mode,
                            current_boot_mode=current_boot_mode)
    except Exception as e:
        log.error("Error setting up bootloader. Error {error}", error=str(e))
        if not ignore_failure:
            raise
