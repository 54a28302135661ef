"""``erase_pstore`` and ``clean_uefi_nvram`` on fake trees and recorded efibootmgr outputs."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import (CleaningError, CommandExecutionError,
                                InvalidCommandParamsError)
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.hardware.generic.uefi_nvram import (DEFAULT_MATCH_PATTERNS,
                                                     parse_boot_entries)
from ipa_twisted.process import ProcessExecutionError
from ipa_twisted.testing.efibootmgr_recordings import OVMF_EFIBOOTMGR_V, SERVER_EFIBOOTMGR_V
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem

PSTORE_MOUNTS = ("sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"
                 "pstore /sys/fs/pstore pstore rw,nosuid,nodev,noexec,relatime 0 0\n")


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake = FakeSystem(self.mktemp())
        self.runner = FakeRunner()
        clock = Clock()
        self.manager = GenericHardwareManager()
        self.manager.bind(HardwareContext(self.fake.config(), self.runner, clock, clock))

    def run_step(self, name: str, **args: Any) -> Any:
        return self.successResultOf(Deferred.fromCoroutine(
            getattr(self.manager, name)({}, [], **args)))

    def step_fails(self, name: str, **args: Any) -> BaseException:
        failure = self.failureResultOf(Deferred.fromCoroutine(
            getattr(self.manager, name)({}, [], **args)))
        error: BaseException = failure.value
        return error

    def listed(self, kind: str) -> dict[str, dict[str, Any]]:
        steps = getattr(self.manager, f"get_{kind}_steps")({}, [])
        return {step["step"]: step for step in steps}


class ErasePstoreTests(Base):
    def entries(self) -> list[str]:
        return sorted(os.listdir(self.fake.path("sys/fs/pstore")))

    def test_listed_as_the_reference_lists_it(self) -> None:
        self.assertEqual(self.listed("clean")["erase_pstore"], {
            "step": "erase_pstore", "priority": 0, "interface": "deploy",
            "reboot_requested": False, "abortable": True})
        self.assertNotIn("erase_pstore", self.listed("deploy"))
        self.assertNotIn("erase_pstore", self.listed("service"))

    def test_mounted_pstore_emptied(self) -> None:
        self.fake.write("proc/mounts", PSTORE_MOUNTS)
        self.fake.write("sys/fs/pstore/dmesg-erst-663482778", "oops")
        self.fake.write("sys/fs/pstore/dmesg-erst-663482780", "panic")
        os.makedirs(self.fake.path("sys/fs/pstore/a-directory/inner"))
        self.assertIsNone(self.run_step("erase_pstore"))
        self.assertEqual(self.entries(), [])
        self.assertEqual(self.runner.argvs, [])             # nothing mounted: it was

    def test_unmounted_pstore_mounted_emptied_and_unmounted(self) -> None:
        self.fake.write("proc/mounts", "sysfs /sys sysfs rw 0 0\n")
        self.fake.write("proc/filesystems", "nodev\tsysfs\nnodev\tpstore\n\text4\n")
        os.makedirs(self.fake.path("sys/fs/pstore"))
        path = self.fake.path("sys/fs/pstore")

        def mount(argv: tuple[str, ...]) -> bytes:
            # What mounting shows: the records held in firmware appear as files.
            self.fake.write("sys/fs/pstore/dmesg-efi-170000000101001", "oops")
            return b""
        self.runner.answers[("mount", "-t", "pstore", "pstore", path)] = mount
        self.runner.answers[("umount", path)] = b""
        self.run_step("erase_pstore")
        self.assertEqual(self.runner.argvs, [("mount", "-t", "pstore", "pstore", path),
                                             ("umount", path)])
        self.assertEqual(self.entries(), [])

    def test_no_pstore_in_the_kernel(self) -> None:
        self.fake.write("proc/mounts", "sysfs /sys sysfs rw 0 0\n")
        self.fake.write("proc/filesystems", "nodev\tsysfs\n\text4\n")
        self.assertIsNone(self.run_step("erase_pstore"))
        self.assertEqual(self.runner.argvs, [])

    def test_mount_failure_is_a_clear_cleaning_error(self) -> None:
        self.fake.write("proc/mounts", "")
        self.fake.write("proc/filesystems", "nodev\tpstore\n")
        os.makedirs(self.fake.path("sys/fs/pstore"))
        path = self.fake.path("sys/fs/pstore")
        self.runner.answers[("mount",)] = Exit(32, b"", b"mount: permission denied")
        error = self.step_fails("erase_pstore")
        self.assertIsInstance(error, CleaningError)
        self.assertIn(f"Cannot mount pstore on {path}", str(error))
        self.assertIn("permission denied", str(error))

    def test_listed_mount_point_that_cannot_be_read(self) -> None:
        self.fake.write("proc/mounts", "pstore /sys/fs/gone pstore rw 0 0\n")
        error = self.step_fails("erase_pstore")
        self.assertIsInstance(error, CleaningError)
        self.assertIn("Cannot list the pstore entries in "
                      f"{self.fake.path('sys/fs/gone')}", str(error))


class CleanUefiNvramTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.fake.set_efi()
        self.runner.answers[("efibootmgr", "-v")] = SERVER_EFIBOOTMGR_V
        self.runner.answers[("efibootmgr", "-b")] = b""

    def removed(self) -> list[str]:
        return [argv[2] for argv in self.runner.argvs if argv[:2] == ("efibootmgr", "-b")]

    def test_listed_for_clean_and_deploy_with_the_reference_argsinfo(self) -> None:
        clean, deploy = self.listed("clean")["clean_uefi_nvram"], \
            self.listed("deploy")["clean_uefi_nvram"]
        self.assertEqual((clean["priority"], clean["interface"], clean["abortable"],
                          clean["reboot_requested"]), (0, "deploy", True, False))
        self.assertEqual((deploy["priority"], deploy["interface"], deploy["reboot_requested"]),
                         (0, "deploy", False))
        self.assertNotIn("abortable", deploy)
        for step in (clean, deploy):
            self.assertEqual(step["argsinfo"]["match_patterns"]["required"], False)
            self.assertIn('["^HD\\(", "shim.*\\.efi", "grub.*\\.efi"]',
                          step["argsinfo"]["match_patterns"]["description"])
        self.assertNotIn("clean_uefi_nvram", self.listed("service"))

    def test_parse_recordings(self) -> None:
        current, entries = parse_boot_entries(SERVER_EFIBOOTMGR_V)
        self.assertEqual(current, "0004")
        self.assertEqual([(e.number, e.label) for e in entries], [
            ("0000", "UiApp"), ("0001", "UEFI PXEv4 (MAC:525400123456)"),
            ("0002", "EFI Internal Shell"), ("0003", "ubuntu"), ("0004", "ironic1"),
            ("0005", "Linux Boot Manager"), ("000A", "debian")])
        self.assertEqual(entries[3].device_path,
                         "HD(1,GPT,4a1c2b3d-5e6f-4a8b-9c0d-1e2f3a4b5c6d,0x800,0x100000)/"
                         "File(\\EFI\\ubuntu\\shimx64.efi)")
        current, entries = parse_boot_entries(OVMF_EFIBOOTMGR_V)
        self.assertIsNone(current)
        self.assertEqual([(e.number, e.label, e.device_path.split("(")[0]) for e in entries],
                         [("0000", "UiApp", "FvVol"), ("0001", "ipa-grub", "HD")])

    def test_defaults_remove_disk_entries_but_the_current_one(self) -> None:
        self.assertIsNone(self.run_step("clean_uefi_nvram"))
        # 0004 (ironic1, an HD( entry) is BootCurrent: kept; firmware entries untouched
        self.assertEqual(self.removed(), ["0003", "0005", "000A"])
        self.assertEqual(self.runner.argvs[0], ("efibootmgr", "-v"))
        self.assertEqual(self.runner.calls[1].kwargs["timeout"], 60.0)

    def test_own_patterns_match_the_path_case_aside(self) -> None:
        self.run_step("clean_uefi_nvram", match_patterns=["SHIM.*\\.EFI"])
        self.assertEqual(self.removed(), ["0003"])

    def test_patterns_match_labels_too(self) -> None:
        self.run_step("clean_uefi_nvram", match_patterns=["^ubuntu$", "PXE"])
        self.assertEqual(self.removed(), ["0001", "0003"])

    def test_current_entry_kept_even_by_label(self) -> None:
        self.run_step("clean_uefi_nvram", match_patterns=["ironic"])
        self.assertEqual(self.removed(), [])

    def test_utf16_output(self) -> None:
        self.runner.answers[("efibootmgr", "-v")] = SERVER_EFIBOOTMGR_V.encode("utf-16-le")
        self.run_step("clean_uefi_nvram", match_patterns=["grub"])
        self.assertEqual(self.removed(), ["000A"])

    def test_ovmf_recording(self) -> None:
        self.runner.answers[("efibootmgr", "-v")] = OVMF_EFIBOOTMGR_V
        self.run_step("clean_uefi_nvram", match_patterns=list(DEFAULT_MATCH_PATTERNS))
        self.assertEqual(self.removed(), ["0001"])

    def test_invalid_patterns_refused_before_anything_runs(self) -> None:
        for bad in ("^HD\\(", ["(unclosed"], [1], {"a": 1}):
            error = self.step_fails("clean_uefi_nvram", match_patterns=bad)
            self.assertIsInstance(error, InvalidCommandParamsError)
            self.assertIn("The match_patterns must be a list of strings", str(error))
        self.assertEqual(self.runner.argvs, [])

    def test_bios_machine_fails_clearly(self) -> None:
        os.rmdir(self.fake.path("sys/firmware/efi/efivars"))
        os.rmdir(self.fake.path("sys/firmware/efi"))
        error = self.step_fails("clean_uefi_nvram")
        self.assertIsInstance(error, CommandExecutionError)
        self.assertIn("did not boot in UEFI mode", str(error))
        self.assertEqual(self.runner.argvs, [])

    def test_efibootmgr_failure(self) -> None:
        self.runner.answers[("efibootmgr", "-b")] = Exit(5, b"", b"Could not delete variable")
        error = self.step_fails("clean_uefi_nvram")
        self.assertIsInstance(error, CommandExecutionError)
        self.assertIn("cannot remove the UEFI boot entry 0003 (ubuntu)", str(error))
        self.assertIsInstance(error.__cause__, ProcessExecutionError)
        self.assertEqual(self.removed(), ["0003"])           # stopped at the first failure
