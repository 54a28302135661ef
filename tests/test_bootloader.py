"""Tests for the bootloader installation (ipa_twisted.deploy.bootloader, deploy.efi) and image.install_bootloader.

Unit tests run the command through the agent on a FakeRunner whose ``mount`` fills the
mount point with the files of a fake file system and whose ``umount`` empties it again.

The real tests (root only) write a small Debian root file system (``tests/rootfs.py``,
built by debootstrap once and cached) to partitioned loop devices, then run the command in
the disk sandbox (a private mount namespace; ``tests/sandboxed_agent.py``) with the real
``grub-install`` of that Debian in a chroot. This machine has no EFI variables, and the
agent's NVRAM writes must not reach a real firmware anyway: a fake ``efibootmgr`` put
first on the sandboxed agent's PATH records its arguments instead.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipa_twisted import errors
from ipa_twisted.agent import Agent
from ipa_twisted.api.app import AgentAPI
from ipa_twisted.commands import CommandResult
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions import default_extensions
from ipa_twisted.deploy import bootloader, efi
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.testing.fake_managers import FixedDeviceManager
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem
from ipa_twisted.testing.sandbox import (LoopDevice, attach_loop_devices,
                                         loop_devices_unavailable, run_in_sandbox)
from tests import rootfs
from tests.fat import fat_mount_dir

MiB = 1 << 20
ROOT_UUID = "7f3c2a1e-5b6d-4c8e-9f0a-1b2c3d4e5f60"
ESP_UUID = "ABCD-1234"
EFI_TARGET = bootloader.grub_target("uefi")
BIOS_TARGET = bootloader.grub_target("bios")


class Disk(FixedDeviceManager):
    """A hardware manager whose install device and boot mode the test decides."""

    HARDWARE_MANAGER_NAME = "disk"
    HARDWARE_MANAGER_VERSION = "1.0"


class FakeFilesystems:
    """``mount``/``umount`` answers: mounting a device fills the mount point with that
    device's files (executable, like on vfat); unmounting empties it, as the real mount
    hid them, after keeping a snapshot (``snapshots[mount point]``)."""

    def __init__(self, contents: dict[str, dict[str, bytes]]) -> None:
        self.contents = contents
        self.mounted: dict[str, bool] = {}
        self.snapshots: dict[str, dict[str, bytes]] = {}
        self.failing: set[str] = set()

    def mount(self, argv: tuple[str, ...]) -> bytes:
        source, target = argv[-2], argv[-1]
        self.mounted[target] = "bind" in argv
        if "bind" not in argv:
            for relative, data in self.contents.get(source, {}).items():
                path = os.path.join(target, relative)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                os.chmod(path, 0o755)
        return b""

    def umount(self, argv: tuple[str, ...]) -> bytes | Exit:
        target = argv[-1]
        if target in self.failing:
            return Exit(32, b"", b"umount: target is busy.")
        if not self.mounted.pop(target):
            snapshot: dict[str, bytes] = {}
            for directory, _, files in os.walk(target):
                for name in files:
                    path = os.path.join(directory, name)
                    with open(path, "rb") as f:
                        snapshot[os.path.relpath(path, target)] = f.read()
            self.snapshots[target] = snapshot
            for entry in os.listdir(target):
                path = os.path.join(target, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        return b""


def grub_chroot(argv: tuple[str, ...]) -> bytes:
    """What grub-install does to the ESP mounted at the chroot's /boot/efi."""
    root = argv[1]
    if any(a.startswith("--efi-directory") for a in argv):
        loader = ("EFI/BOOT/BOOTX64.EFI" if "--removable" in argv
                  else "EFI/debian/grubx64.efi")
        path = os.path.join(root, "boot/efi", loader)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"MZ")
        os.chmod(path, 0o755)
    return b""


EFIBOOTMGR_LIST = (b"BootCurrent: 0001\nBootOrder: 0001,0003\n"
                   b"Boot0001* debian\tHD(1,GPT,x)/File(\\EFI\\debian\\shimx64.efi)\n"
                   b"Boot0003* ironic1\tHD(1,GPT,y)/File(\\EFI\\BOOT\\BOOTX64.EFI)\n")


def parted(device: str, table: str, partitions: list[str]) -> bytes:
    lines = ["BYT;", f"{device}:10737418240B:scsi:512:512:{table}:QEMU HARDDISK:;"]
    return ("\n".join(lines + partitions) + "\n").encode()


class BootloaderTestCase(SynchronousTestCase):
    disk = "sda"

    def setUp(self) -> None:
        self.fake = FakeSystem(self.mktemp())
        self.dev = self.fake.dev_path
        self.device = os.path.join(self.dev, self.disk)
        for name in (self.disk, self.disk + "1", self.disk + "2"):
            self.fake.write(f"dev/{name}", "")
        self.filesystems = FakeFilesystems({})
        self.runner = FakeRunner({
            ("sync",): b"", ("udevadm",): b"", ("partprobe",): b"",
            ("lsblk", "--list"): f"{self.disk} disk\n{self.disk}1 part\n"
                                 f"{self.disk}2 part\n",
            ("blkid", "-l"): Exit(2),
            ("mount",): self.filesystems.mount, ("umount",): self.filesystems.umount,
            ("chroot",): grub_chroot,
            ("efibootmgr", "-v"): EFIBOOTMGR_LIST,
            ("efibootmgr",): b"",
        })
        self.clock = Clock()

    def probe(self, name: str, **values: str) -> None:
        self.runner.answers[("blkid", "-p", "-o", "export", os.path.join(self.dev, name))] = \
            "".join(f"{k}={v}\n" for k, v in values.items())

    def bios_layout(self) -> None:
        self.runner.answers[("parted",)] = parted(self.device, "msdos", [
            "1:1048576B:10737418239B:10736369664B:ext4::;"])
        self.probe(self.disk + "1", UUID=ROOT_UUID, TYPE="ext4")
        self.probe(self.disk + "2")

    def uefi_layout(self) -> None:
        self.runner.answers[("parted",)] = parted(self.device, "gpt", [
            "1:1048576B:68157439B:67108864B:fat32:efi:boot, esp;",
            "2:68157440B:10737401855B:10669244416B:ext4:root:;"])
        self.probe(self.disk + "1", UUID=ESP_UUID, TYPE="vfat", PART_ENTRY_UUID="p-1")
        self.probe(self.disk + "2", UUID=ROOT_UUID, TYPE="ext4", PART_ENTRY_UUID="p-2")

    def agent(self, boot_mode: str = "bios", config: AgentConfig | None = None,
              clock: Any = None) -> Agent:
        """An agent installing on the fake disk; BIOS installs allowed unless ``config``
        says otherwise."""
        clock = clock if clock is not None else self.clock
        config = config or self.fake.config(enable_bios_bootloader_install=True)
        return Agent(config, clock, self.runner,  # type: ignore[arg-type]
                     managers=HardwareManagers([(Disk(self.device, boot_mode), 3)]),
                     reactor=clock, extensions=default_extensions())

    def install(self, agent: Agent, **params: Any) -> CommandResult:
        running = Deferred.fromCoroutine(agent.execute_command("image.install_bootloader",
                                                               params))
        result: CommandResult = self.successResultOf(running)
        for _ in range(10):
            if result.is_done():
                break
            self.clock.advance(1)
        self.assertTrue(result.is_done())
        return result

    def mounts(self) -> list[tuple[str, ...]]:
        return [argv for argv in self.runner.argvs
                if argv[0] in ("mount", "umount", "chroot", "efibootmgr")]

    def root_of(self) -> str:
        for argv in self.runner.argvs:
            if argv[0] == "mount" and os.path.basename(argv[-1]).startswith("ipa-bootloader"):
                return argv[-1]
        self.fail(f"the root was never mounted: {self.runner.argvs}")

    def binds(self, root: str) -> list[tuple[str, ...]]:
        config = self.fake.config()
        return [("mount", "-o", "bind", config.dev_path, f"{root}/dev"),
                ("mount", "-o", "bind", config.proc_path, f"{root}/proc"),
                ("mount", "-o", "bind", config.sys_path, f"{root}/sys"),
                ("mount", "-o", "bind", "/run", f"{root}/run")]

    def unbinds(self, root: str) -> list[tuple[str, ...]]:
        return [("umount", f"{root}/run"), ("umount", f"{root}/sys"),
                ("umount", f"{root}/proc"), ("umount", f"{root}/dev")]


class BiosTests(BootloaderTestCase):
    def test_bios(self) -> None:
        self.bios_layout()
        result = self.install(self.agent(), root_uuid=ROOT_UUID)
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        root = self.root_of()
        self.assertEqual(self.mounts(), [
            ("mount", f"{self.dev}/sda1", root), *self.binds(root),
            ("chroot", root, "grub-install", f"--target={BIOS_TARGET}", "/dev/sda"),
            ("chroot", root, "grub-mkconfig", "-o", "/boot/grub/grub.cfg"),
            *self.unbinds(root), ("umount", root)])
        mkconfig = [c for c in self.runner.calls if "grub-mkconfig" in c.argv][0]
        self.assertEqual(mkconfig.kwargs["env"]["GRUB_DISABLE_OS_PROBER"], "true")
        self.assertIn("/usr/sbin", mkconfig.kwargs["env"]["PATH"])
        self.assertFalse(os.path.exists(root))

    def test_grub2_image(self) -> None:
        self.bios_layout()
        self.filesystems.contents[f"{self.dev}/sda1"] = {"usr/sbin/grub2-install": b""}
        self.install(self.agent(), root_uuid=ROOT_UUID)
        root = self.root_of()
        self.assertIn(("chroot", root, "grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"),
                      self.runner.argvs)
        self.assertIn(("chroot", root, "grub2-install", f"--target={BIOS_TARGET}",
                       "/dev/sda"), self.runner.argvs)

    def test_partition_by_label_and_partition_uuid(self) -> None:
        self.bios_layout()
        self.probe("sda1", UUID="other", LABEL="cloudimg-rootfs", PART_ENTRY_UUID="AB-01")
        self.install(self.agent(), root_uuid="cloudimg-rootfs")
        self.assertIn(("mount", f"{self.dev}/sda1", self.root_of()), self.runner.argvs)
        self.runner.calls.clear()
        self.install(self.agent(), root_uuid="ab-01")
        self.assertIn(("mount", f"{self.dev}/sda1", self.root_of()), self.runner.argvs)

    def test_failure_unmounts_everything(self) -> None:
        self.bios_layout()
        self.runner.answers[("chroot",)] = Exit(1, b"", b"grub-install: error: no space")
        result = self.install(self.agent(), root_uuid=ROOT_UUID)
        self.assertEqual(result.command_status.value, "FAILED")
        self.assertIsInstance(result.command_error, errors.CommandExecutionError)
        self.assertIn("no space", str(result.command_error))
        root = self.root_of()
        self.assertEqual(self.mounts()[-5:], [*self.unbinds(root), ("umount", root)])
        self.assertFalse(os.path.exists(root))
        self.flushLoggedErrors()

    def test_ignore_bootloader_failure(self) -> None:
        self.bios_layout()
        self.runner.answers[("chroot",)] = Exit(1)
        result = self.install(self.agent(), root_uuid=ROOT_UUID,
                              ignore_bootloader_failure=True)
        self.assertEqual(result.command_status.value, "SUCCEEDED")

    def test_unmount_failure_is_an_error_and_keeps_the_directory(self) -> None:
        self.bios_layout()
        calls: list[str] = []
        original = self.filesystems.mount

        def mount(argv: tuple[str, ...]) -> bytes:
            if argv[-1].endswith("/dev"):
                self.filesystems.failing.add(argv[-1])
                calls.append(argv[-1])
            return original(argv)
        self.runner.answers[("mount",)] = mount
        result = self.install(self.agent(), root_uuid=ROOT_UUID)
        self.assertEqual(result.command_status.value, "FAILED")
        self.assertIn("still mounted", str(result.command_error))
        root = self.root_of()
        self.assertEqual(self.runner.argvs.count(("umount", f"{root}/dev")), 3)
        self.assertIn(("umount", root), self.runner.argvs)
        self.assertTrue(os.path.isdir(root))
        shutil.rmtree(root)
        self.flushLoggedErrors()

    def test_root_partition_not_found(self) -> None:
        self.bios_layout()
        result = self.install(self.agent(), root_uuid="nope")
        self.assertIsInstance(result.command_error, errors.DeviceNotFound)
        self.assertNotIn("mount", [argv[0] for argv in self.runner.argvs])
        self.assertIn(("blkid", "-l", "-o", "device", "-t", "PARTUUID=nope"),
                      self.runner.argvs)

    def test_found_by_blkid_elsewhere(self) -> None:
        self.bios_layout()
        self.runner.answers[("blkid", "-l", "-o", "device", "-t", "UUID=elsewhere")] = \
            f"{self.dev}/sda2\n"
        self.install(self.agent(), root_uuid="elsewhere")
        self.assertIn(("mount", f"{self.dev}/sda2", self.root_of()), self.runner.argvs)

    def test_whole_disk_image_in_bios_mode_does_nothing(self) -> None:
        self.bios_layout()
        for root_uuid in (None, "0x00000000"):
            result = self.install(self.agent(), root_uuid=root_uuid)
            self.assertEqual(result.command_status.value, "SUCCEEDED")
        self.assertEqual(self.mounts(), [])

    def test_whole_disk_image_is_answered_finished(self) -> None:
        """Nothing to install (a whole-disk image, no EFI entry possible): the command's
        first answer already says SUCCEEDED, before the install device is even asked for
        (Ironic polls an unfinished one again only after command_wait_interval)."""
        pending: list[Deferred[str]] = []

        class SlowDisk(Disk):
            def get_os_install_device(self, permit_refresh: bool = False, *,
                                      node: Any = None) -> Any:
                pending.append(Deferred())
                return pending[-1]

        self.runner.missing.add("efibootmgr")
        for mode, root_uuid in (("bios", None), ("bios", "0x00000000"), ("uefi", None)):
            agent = Agent(self.fake.config(), self.clock, self.runner,  # type: ignore
                          managers=HardwareManagers([(SlowDisk(self.device, mode), 3)]),
                          reactor=self.clock, extensions=default_extensions())
            with capturedLogs() as events:
                result = self.successResultOf(Deferred.fromCoroutine(agent.execute_command(
                    "image.install_bootloader",
                    {"root_uuid": root_uuid, "target_boot_mode": "uefi"})))
            self.assertEqual(result.command_status.value, "SUCCEEDED", (mode, root_uuid))
            messages = [formatEvent(e) for e in events]
            self.assertTrue(any("Assuming a whole disk image" in m for m in messages))
            self.assertEqual(any("Boot mode mismatch" in m for m in messages),
                             mode == "bios")
        self.assertEqual((pending, self.runner.argvs), ([], []))

    def test_whole_disk_image_with_an_iscsi_target_takes_the_full_path(self) -> None:
        self.bios_layout()
        agent = self.agent()
        agent.extensions["iscsi"].exported_device = self.device  # type: ignore[attr-defined]
        self.runner.missing.add("tgtadm")     # tgtd not running: nothing to delete
        result = self.install(agent, root_uuid=None)
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        self.assertIsNone(agent.extensions["iscsi"].exported_device)  # type: ignore

    def test_bios_install_disabled_by_default(self) -> None:
        self.bios_layout()
        agent = self.agent(config=self.fake.config())
        for params in ({"root_uuid": ROOT_UUID}, {"root_uuid": ROOT_UUID,
                                                  "target_boot_mode": None},
                       {"root_uuid": ROOT_UUID, "prep_boot_part_uuid": "prep"}):
            with capturedLogs() as events:
                result = self.install(agent, **params)
            self.assertEqual(result.command_status.value, "FAILED")
            error = result.command_error
            self.assertIsInstance(error, errors.InvalidImage)
            self.assertEqual(error.serialize()["type"], "InvalidImage")
            self.assertIn("enable_bios_bootloader_install", str(error))
            self.assertIn("CVE-2026-43003", str(error))
            self.assertTrue(any("CVE-2026-43003" in formatEvent(e) for e in events
                                if e["log_level"] is LogLevel.error))
        # Refused before any disk was looked at: not a single program run.
        self.assertEqual(self.runner.argvs, [])
        # Also when the agent booted in UEFI mode (the firmware's loaders are not tried).
        result = self.install(self.agent("uefi", config=self.fake.config()),
                              root_uuid=ROOT_UUID, target_boot_mode="bios")
        self.assertIsInstance(result.command_error, errors.InvalidImage)
        self.assertEqual(self.runner.argvs, [])
        self.flushLoggedErrors()

    def test_bios_refusal_ignored_on_request(self) -> None:
        self.bios_layout()
        config = self.fake.config(ignore_bootloader_failure=True)
        with capturedLogs() as events:
            result = self.install(self.agent(config=config), root_uuid=ROOT_UUID)
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        self.assertEqual(self.mounts(), [])
        self.assertTrue(any("enable_bios_bootloader_install" in formatEvent(e)
                            for e in events if e["log_level"] is LogLevel.error))

    def test_lookup_policy_enables_bios_install(self) -> None:
        self.bios_layout()
        agent = self.agent(config=self.fake.config())
        agent.context = agent.hardware_context()
        agent.process_lookup_data({"node": {"uuid": "n-1"},
                                   "config": {"enable_bios_bootloader_install": True}})
        result = self.install(agent, root_uuid=ROOT_UUID)
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        self.assertIn(("chroot", self.root_of(), "grub-install", f"--target={BIOS_TARGET}",
                       "/dev/sda"), self.runner.argvs)

    def test_whole_disk_bios_image_is_not_refused(self) -> None:
        self.bios_layout()
        result = self.install(self.agent(config=self.fake.config()), root_uuid="0x00000000")
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)

    def test_validation(self) -> None:
        agent = self.agent()
        for params in ({}, {"root_uuid": ROOT_UUID, "target_boot_mode": "coreboot"},
                       {"root_uuid": ""}, {"root_uuid": 1}):
            self.failureResultOf(Deferred.fromCoroutine(
                agent.execute_command("image.install_bootloader", params)),
                errors.InvalidCommandParamsError)

    def test_software_raid_installs_on_every_holder(self) -> None:
        for disk in ("sda", "sdb"):
            self.fake.write(f"sys/block/{disk}/{disk}1/partition", "1\n")
            self.fake.symlink(f"sys/class/block/{disk}1", f"../../block/{disk}/{disk}1")
            os.makedirs(self.fake.path(f"sys/block/md0/slaves/{disk}1"), exist_ok=True)
        os.makedirs(self.fake.path("sys/block/md0/md"))
        self.fake.write("dev/md0", "")
        self.fake.write("dev/md0p1", "")
        self.device = os.path.join(self.dev, "md0")
        self.runner.answers[("lsblk", "--list")] = "md0 raid1\nmd0p1 part\n"
        self.probe("md0p1", UUID=ROOT_UUID)
        result = self.install(self.agent(), root_uuid=ROOT_UUID)
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        root = self.root_of()
        self.assertEqual([argv for argv in self.mounts() if "grub-install" in argv], [
            ("chroot", root, "grub-install", f"--target={BIOS_TARGET}", "/dev/sda"),
            ("chroot", root, "grub-install", f"--target={BIOS_TARGET}", "/dev/sdb")])


class UefiTests(BootloaderTestCase):
    def test_partition_image(self) -> None:
        self.uefi_layout()
        result = self.install(self.agent("uefi"), root_uuid=ROOT_UUID,
                              efi_system_part_uuid=ESP_UUID, target_boot_mode="uefi")
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        argvs = self.mounts()
        # First the ESP is looked at for loaders a whole-disk image would have: none.
        self.assertEqual(argvs[0][:2], ("mount", f"{self.dev}/sda1"))
        esp_probe = argvs[0][2]
        self.assertEqual(argvs[1], ("umount", esp_probe))
        root = self.root_of()
        grub = ("chroot", root, "grub-install", f"--target={EFI_TARGET}",
                "--efi-directory=/boot/efi", "--no-nvram")
        self.assertEqual(argvs[2:], [
            ("mount", f"{self.dev}/sda2", root), *self.binds(root),
            ("mount", f"{self.dev}/sda1", f"{root}/boot/efi"),
            grub, (*grub, "--removable"),
            ("chroot", root, "grub-mkconfig", "-o", "/boot/grub/grub.cfg"),
            ("efibootmgr", "-v"),
            ("efibootmgr", "-b", "0003", "-B"),
            ("efibootmgr", "-v", "-c", "-d", self.device, "-p", "1", "-w", "-L", "ironic1",
             "-l", "\\EFI\\BOOT\\BOOTX64.EFI"),
            ("umount", f"{root}/boot/efi"), *self.unbinds(root), ("umount", root)])
        self.assertEqual(sorted(self.filesystems.snapshots[f"{root}/boot/efi"]),
                         ["EFI/BOOT/BOOTX64.EFI", "EFI/debian/grubx64.efi"])

    def test_uefi_unaffected_by_the_bios_policy(self) -> None:
        self.uefi_layout()
        result = self.install(self.agent("uefi", config=self.fake.config()),
                              root_uuid=ROOT_UUID, efi_system_part_uuid=ESP_UUID,
                              target_boot_mode="uefi")
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        self.assertTrue(any("--efi-directory=/boot/efi" in argv for argv in self.mounts()))

    def test_agent_in_bios_mode_makes_no_boot_record(self) -> None:
        self.uefi_layout()
        result = self.install(self.agent("bios"), root_uuid=ROOT_UUID,
                              efi_system_part_uuid=ESP_UUID, target_boot_mode="uefi")
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        self.assertNotIn("efibootmgr", [argv[0] for argv in self.runner.argvs])
        self.assertTrue(any("--removable" in argv for argv in self.mounts()))

    def test_whole_disk_image_registers_its_loaders(self) -> None:
        self.uefi_layout()
        csv = "shimx64.efi,ubuntu,,This is the boot entry for ubuntu\n".encode("utf-16")
        self.filesystems.contents[f"{self.dev}/sda1"] = {
            "EFI/BOOT/BOOTX64.EFI": b"MZ", "EFI/ubuntu/shimx64.efi": b"MZ",
            "EFI/ubuntu/BOOTX64.CSV": csv}
        result = self.install(self.agent("uefi"), root_uuid=None)
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        esp = self.mounts()[0][2]
        self.assertEqual(self.mounts(), [
            ("mount", f"{self.dev}/sda1", esp), ("efibootmgr", "-v"),
            ("efibootmgr", "-v", "-c", "-d", self.device, "-p", "1", "-w", "-L", "ubuntu",
             "-l", "\\EFI\\ubuntu\\shimx64.efi"), ("umount", esp)])

    def test_answer_waits_for_the_end(self) -> None:
        """Loaders to register: Ironic's POST is answered once they are (not RUNNING at
        once), so its first poll finds the command finished."""
        self.uefi_layout()
        self.filesystems.contents[f"{self.dev}/sda1"] = {"EFI/BOOT/BOOTX64.EFI": b"MZ"}
        self.runner.hold = True
        agent = self.agent("uefi", config=self.fake.config(agent_token="t" * 40))
        treq = StubTreq(AgentAPI(agent).app.resource())
        answer = treq.post("http://agent/v1/commands/", params={"agent_token": "t" * 40},
                           data=json.dumps({"name": "image.install_bootloader",
                                            "params": {"root_uuid": None}}))
        self.assertNoResult(answer)
        self.assertGreater(self.runner.pending, 0)
        for _ in range(50):
            self.runner.release()
            self.clock.advance(0.1)
            treq.flush()
        got = self.successResultOf(self.successResultOf(answer).json())
        self.assertEqual(got["command_status"], "SUCCEEDED", got)
        self.assertIn("efibootmgr", [argv[0] for argv in self.runner.argvs])

    def test_no_efi_partition(self) -> None:
        self.bios_layout()
        result = self.install(self.agent("uefi"), root_uuid=ROOT_UUID)
        self.assertIsInstance(result.command_error, errors.DeviceNotFound)
        self.assertIn("UEFI-compatible image", str(result.command_error))

    def test_without_efibootmgr_grub_is_installed(self) -> None:
        self.uefi_layout()
        self.runner.missing.add("efibootmgr")
        result = self.install(self.agent("uefi"), root_uuid=ROOT_UUID,
                              efi_system_part_uuid=ESP_UUID, target_boot_mode="uefi")
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        self.assertEqual(self.mounts()[0][:2], ("mount", f"{self.dev}/sda2"))
        self.assertTrue(any("--removable" in argv for argv in self.mounts()))
        self.assertNotIn("efibootmgr", [argv[0] for argv in self.runner.argvs])

    def test_efibootmgr_failure_fails_and_unmounts(self) -> None:
        self.uefi_layout()
        self.runner.answers[("efibootmgr", "-v", "-c")] = Exit(5, b"", b"EFI variables "
                                                               b"are not supported")
        result = self.install(self.agent("uefi"), root_uuid=ROOT_UUID,
                              efi_system_part_uuid=ESP_UUID, target_boot_mode="uefi")
        self.assertIsInstance(result.command_error, errors.CommandExecutionError)
        root = self.root_of()
        self.assertEqual(self.mounts()[-6:], [("umount", f"{root}/boot/efi"),
                                              *self.unbinds(root), ("umount", root)])
        self.flushLoggedErrors()


class PreserveTests(BootloaderTestCase, TestCase):
    """EFI files kept in the image's /boot/efi are copied to the ESP (thread pool: real
    reactor)."""

    async def test_preserved_assets(self) -> None:
        self.uefi_layout()
        self.filesystems.contents[f"{self.dev}/sda2"] = {
            "boot/efi/EFI/BOOT/BOOTX64.EFI": b"shim", "boot/efi/EFI/BOOT/fbx64.efi": b"fb",
            "boot/efi/EFI/redhat/shimx64.efi": b"shim", "usr/sbin/grub2-mkconfig": b"",
            "usr/sbin/grub2-install": b"", "boot/grub2/grub.cfg": b"menuentry",
            "etc/fstab": b"UUID=x / xfs defaults 0 0\n"}
        agent = Agent(self.fake.config(), reactor, self.runner,  # type: ignore[arg-type]
                      managers=HardwareManagers([(Disk(self.device, "uefi"), 3)]),
                      reactor=reactor, extensions=default_extensions())
        result = await agent.execute_command("image.install_bootloader", {
            "root_uuid": ROOT_UUID, "efi_system_part_uuid": ESP_UUID,
            "target_boot_mode": "uefi"})
        await result.wait()
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        root = self.root_of()
        self.assertNotIn("grub2-install", [a for argv in self.runner.argvs for a in argv])
        self.assertIn(("chroot", root, "grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"),
                      self.runner.argvs)
        self.assertIn(("efibootmgr", "-v", "-c", "-d", self.device, "-p", "1", "-w", "-L",
                       "ironic1", "-l", "\\EFI\\BOOT\\BOOTX64.EFI"), self.runner.argvs)
        esp = [argv[-1] for argv in self.runner.argvs
               if argv[:2] == ("mount", f"{self.dev}/sda1")][-1]
        copied = self.filesystems.snapshots[esp]
        self.assertEqual(copied["EFI/redhat/grub.cfg"], b"menuentry")
        self.assertEqual(copied["EFI/redhat/shimx64.efi"], b"shim")
        self.assertIn(f"UUID={ESP_UUID}\t/boot/efi\tvfat",
                      self.filesystems.snapshots[root]["etc/fstab"].decode())
        self.assertFalse(os.path.exists(root))


class EfiTests(SynchronousTestCase):
    def test_find_loaders(self) -> None:
        esp = self.mktemp()
        for relative, mode in (("EFI/BOOT/BOOTX64.EFI", 0o755), ("EFI/debian/grubx64.efi",
                                                                 0o755),
                               ("EFI/BOOT/bootaa64.efi", 0o644)):
            path = os.path.join(esp, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").close()
            os.chmod(path, mode)
        self.assertEqual(efi.find_efi_loaders(esp), ["EFI/BOOT/BOOTX64.EFI"])
        with open(os.path.join(esp, "EFI/debian/BOOTX64.CSV"), "wb") as f:
            f.write("shimx64.efi,debian\n".encode("utf-16-le"))
        self.assertEqual(efi.find_efi_loaders(esp), ["EFI/debian/BOOTX64.CSV"])
        self.assertEqual(efi.boot_entries(esp, ["EFI/debian/BOOTX64.CSV",
                                                "EFI/BOOT/BOOTX64.EFI"], "(RAID)"),
                         [efi.BootEntry("\\EFI\\debian\\shimx64.efi", "debian (RAID)"),
                          efi.BootEntry("\\EFI\\BOOT\\BOOTX64.EFI", "ironic2 (RAID)")])

    def test_grub_target(self) -> None:
        self.assertEqual(bootloader.grub_target("bios", "x86_64"), "i386-pc")
        self.assertEqual(bootloader.grub_target("uefi", "x86_64"), "x86_64-efi")
        self.assertEqual(bootloader.grub_target("uefi", "aarch64"), "arm64-efi")
        self.assertIsNone(bootloader.grub_target("bios", "ppc64le"))


# -- real GRUB on loop devices ------------------------------------------------------------------

FAKE_EFIBOOTMGR = """#!/bin/sh
# A fake efibootmgr for tests: records its arguments, lists one stale ironic1 record.
printf '%s\\n' "$*" >> {log}
if [ "$*" = "-v" ]; then
  printf 'BootCurrent: 0001\\nBootOrder: 0001,0003\\n'
  printf 'Boot0001* debian\\tHD(1,GPT,0)/File(\\\\EFI\\\\debian\\\\shimx64.efi)\\n'
  printf 'Boot0003* ironic1\\tHD(1,GPT,0)/File(\\\\EFI\\\\BOOT\\\\BOOTX64.EFI)\\n'
fi
"""

TOOLS = ("parted", "partprobe", "mkfs.ext4", "mkfs.vfat", "blkid", "chroot", "tar", "zstd",
         "lsblk", "mount", "umount")

EXTRACT = """set -e
dir=$(mktemp -d)
mount "$1" "$dir"
tar --zstd --numeric-owner -xf "$2" -C "$dir"
umount "$dir"
rmdir "$dir"
"""

INSPECT = """set -e
dir=$(mktemp -d)
mount -o ro "$1" "$dir"
cd "$dir"
find . -type f | sort
echo ====
cat "$2" 2>/dev/null || true
cd /
umount "$dir"
rmdir "$dir"
"""


class RealGrubTests(TestCase):
    """grub-install of a real Debian on loop devices, in the sandbox."""

    timeout = 1800

    def setUp(self) -> None:
        reason = loop_devices_unavailable(TOOLS) or rootfs.unavailable()
        if reason is not None:
            raise SkipTest(reason)
        self.runner = ProcessRunner(reactor, reactor)

    async def _disk(self, table: str, layout: list[list[str]]) -> LoopDevice:
        tarball = await rootfs.debian_rootfs(self.runner)
        self.tarball = tarball
        loop, = await attach_loop_devices(self.runner, os.path.abspath(self.mktemp()),
                                          [640 * MiB], self.addCleanup)
        argv = ["parted", "-s", loop.path, "--", "mklabel", table]
        for part in layout:
            argv += part
        await self.runner.execute(*argv)
        await self.runner.execute("partprobe", loop.path)
        return loop

    async def _uuid(self, path: str) -> str:
        out, _ = await self.runner.execute("blkid", "-p", "-o", "value", "-s", "UUID", path)
        return out.decode().strip()

    async def _run_agent(self, loop: LoopDevice, spec: dict[str, Any],
                   env: dict[str, str] | None = None) -> dict[str, Any]:
        out, err = await run_in_sandbox(
            self.runner, [loop], [sys.executable, "-m", "tests.sandboxed_agent",
                                  json.dumps(spec)], timeout=900, env=env)
        lines = out.decode().strip().splitlines()
        self.assertTrue(lines, err.decode(errors="replace")[-3000:])
        outcome: dict[str, Any] = json.loads(lines[-1])
        self.assertEqual(outcome["status"], "SUCCEEDED",
                         f"{outcome}\n{err.decode(errors='replace')[-3000:]}")
        return outcome

    async def _inspect(self, loop: LoopDevice, partition: str, cat: str,
                       env: dict[str, str] | None = None) -> tuple[list[str], str]:
        out, _ = await run_in_sandbox(self.runner, [loop], ["sh", "-c", INSPECT, "sh",
                                                            partition, cat], env=env)
        files, _, text = out.decode(errors="replace").partition("====\n")
        return [f.removeprefix("./") for f in files.split()], text

    async def test_bios_msdos_ext4(self) -> None:
        loop = await self._disk("msdos", [["mkpart", "primary", "ext4", "1MiB", "100%"]])
        root = loop.path + "p1"
        await self.runner.execute("mkfs.ext4", "-q", "-L", "root", root)
        await run_in_sandbox(self.runner, [loop], ["sh", "-c", EXTRACT, "sh", root,
                                                   self.tarball], timeout=600)
        await self._run_agent(loop, {"device": loop.path, "boot_mode": "bios",
                               "command": "image.install_bootloader",
                               "config": {"enable_bios_bootloader_install": True},
                               "params": {"root_uuid": await self._uuid(root)}})
        with open(loop.path, "rb") as f:
            mbr = f.read(512)
        self.assertTrue(any(mbr[:0x1b8]), "no boot code in the MBR")
        self.assertIn(b"GRUB", mbr)
        files, config = await self._inspect(loop, root, "boot/grub/grub.cfg")
        self.assertIn("boot/grub/grub.cfg", files)
        self.assertIn("boot/grub/i386-pc/core.img", files)
        self.assertIn("menuentry 'GNU/Linux'", config)
        self.assertIn("linux\t/boot/vmlinuz-6.1.0-0-amd64", config)

    async def test_uefi_gpt_esp(self) -> None:
        loop = await self._disk("gpt", [["mkpart", "esp", "fat32", "1MiB", "65MiB"],
                                        ["set", "1", "esp", "on"],
                                        ["mkpart", "root", "ext4", "65MiB", "100%"]])
        esp, root = loop.path + "p1", loop.path + "p2"
        await self.runner.execute("mkfs.vfat", esp)
        await self.runner.execute("mkfs.ext4", "-q", root)
        await run_in_sandbox(self.runner, [loop], ["sh", "-c", EXTRACT, "sh", root,
                                                   self.tarball], timeout=600)
        fakes = os.path.abspath(self.mktemp())
        os.makedirs(fakes)
        fat_mount_dir(fakes)     # when this kernel has no vfat: FAT through FUSE
        env = {"PATH": fakes + os.pathsep + os.environ.get("PATH", "")}
        log = os.path.join(fakes, "efibootmgr.log")
        with open(os.path.join(fakes, "efibootmgr"), "w") as f:
            f.write(FAKE_EFIBOOTMGR.format(log=log))
        os.chmod(os.path.join(fakes, "efibootmgr"), 0o755)
        await self._run_agent(loop, {"device": loop.path, "boot_mode": "uefi",
                               "command": "image.install_bootloader",
                               "params": {"root_uuid": await self._uuid(root),
                                          "efi_system_part_uuid": await self._uuid(esp),
                                          "target_boot_mode": "uefi"}}, env=env)
        files, _ = await self._inspect(loop, esp, "/dev/null", env)
        self.assertIn("EFI/BOOT/BOOTX64.EFI", files)
        self.assertTrue(any(f.endswith("/grubx64.efi") for f in files), files)
        with open(log) as f:
            calls = f.read().splitlines()
        self.assertEqual(calls, [
            "-v", "-b 0003 -B",
            f"-v -c -d {loop.path} -p 1 -w -L ironic1 -l \\EFI\\BOOT\\BOOTX64.EFI"])
        files, config = await self._inspect(loop, root, "boot/grub/grub.cfg")
        self.assertIn("boot/grub/x86_64-efi/normal.mod", files)
        self.assertIn("menuentry 'GNU/Linux'", config)
