"""``clean_uefi_nvram`` in the real ramdisk booted with UEFI firmware (OVMF) in QEMU.

The ramdisk test (``tests/test_qemu_ramdisk.py``) boots with QEMU's BIOS; this one boots the
same ramdisk with OVMF, whose NVRAM (a copy of its VARS file) holds the firmware's own boot
entries. The test adds entries with the guest's ``efibootmgr`` (through the probe shell) on
a disk with a GPT and an EFI system partition, runs ``clean_uefi_nvram`` over the agent's
API as Ironic would (first with a pattern of its own, then the defaults), and reads the
entries again in the guest: the matching ones are gone, the firmware's own stay. OVMF sets
no ``BootCurrent`` when QEMU hands it the kernel directly, so keeping the entry the machine
booted from is shown by the unit tests only (``tests/test_firmware_records.py``). The fresh
``efibootmgr -v`` output goes to ``.cache/ramdisk-recordings/efibootmgr-v.txt`` and must be
read by the parser as the unit tests' recording is (``ipa_twisted/testing/
efibootmgr_recordings.py``).

Skipped where QEMU cannot run, the ramdisk cannot be built or OVMF is missing.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from ipa_twisted.hardware.generic.uefi_nvram import parse_boot_entries
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing import efibootmgr_recordings
from tests import qemu
from tests.processes import ROOT

log = Logger()
MiB = 1 << 20


class UefiNvramInQemuTests(TestCase):
    timeout = 900

    def setUp(self) -> None:
        reason = qemu.uefi_unavailable()
        if reason is not None:
            raise SkipTest(reason)
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)

    async def entries(self, vm: qemu.VirtualMachine) -> tuple[str | None, dict[str, str]]:
        code, out = await vm.run_in_guest(["efibootmgr", "-v"])
        text = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, text)
        current, entries = parse_boot_entries(text)
        self.last_output = text
        return current, {entry.label: entry.device_path for entry in entries}

    async def test_clean_uefi_nvram(self) -> None:
        ramdisk = await qemu.build_ramdisk()
        disk = qemu.Disk(os.path.join(self.work, "esp.img"), "virtio", "IPA-ESP-1", 64 * MiB)
        disk.create()
        await ProcessRunner(reactor, reactor).execute(
            "sgdisk", "-n", "1:2048:+32M", "-t", "1:EF00", disk.path)
        vm = qemu.VirtualMachine(ramdisk, [disk], probe=True, uefi=True)
        self.addCleanup(vm.stop)
        boot = await vm.start()
        self.assertIn("efi", (await vm.run_in_guest(["ls", "/sys/firmware"]))[1].decode())

        before_current, before = await self.entries(vm)
        kept = os.path.join(ROOT, ".cache", "ramdisk-recordings")
        os.makedirs(kept, exist_ok=True)
        with open(os.path.join(kept, "efibootmgr-v.txt"), "w") as f:
            f.write(self.last_output)
        # The firmware's entries read as the recording's are (same kinds of device path).
        recorded_current, recorded = parse_boot_entries(efibootmgr_recordings.OVMF_EFIBOOTMGR_V)
        self.assertEqual(before_current is None, recorded_current is None, self.last_output)
        self.assertEqual({path.split("(")[0] for path in before.values()},
                         {entry.device_path.split("(")[0] for entry in recorded}
                         - {"HD"}, self.last_output)

        inventory = (await vm.post("poll.get_hardware_info", {}))["command_result"]
        [device] = [d["name"] for d in inventory["disks"] if d["serial"] == "IPA-ESP-1"]
        for label, loader in [("ipa-grub", "\\EFI\\ipa\\grubx64.efi"),
                              ("ipa-other", "\\EFI\\ipa\\other.efi")]:
            code, out = await vm.run_in_guest(["efibootmgr", "-c", "-d", device, "-p", "1",
                                               "-L", label, "-l", loader])
            self.assertEqual(code, 0, out)
        _, added = await self.entries(vm)
        self.assertTrue(added["ipa-grub"].startswith("HD(1,GPT,"), added)

        listed = (await vm.post("clean.get_clean_steps", {"node": {}, "ports": []}))
        versions = listed["command_result"]["hardware_manager_version"]
        [step] = [s for group in listed["command_result"]["clean_steps"].values()
                  for s in group if s["step"] == "clean_uefi_nvram"]
        self.assertEqual((step["priority"], step["interface"], list(step["argsinfo"])),
                         (0, "deploy", ["match_patterns"]))

        async def clean(**args: Any) -> None:
            result, _, _ = await vm.run("clean.execute_clean_step", {
                "step": {"step": "clean_uefi_nvram", "priority": 0, "interface": "deploy",
                         "args": args}, "node": {}, "ports": [], "clean_version": versions})
            self.assertEqual(result["command_status"], "SUCCEEDED",
                             f"{result}\n{vm.console[-3000:]}")

        await clean(match_patterns=["grub.*\\.efi"])
        current, entries = await self.entries(vm)
        self.assertNotIn("ipa-grub", entries)
        self.assertIn("ipa-other", entries)
        self.assertEqual(set(before) - set(entries), set(), "a firmware entry went")

        await clean()                                    # the defaults: every HD( entry
        current, entries = await self.entries(vm)
        self.assertNotIn("ipa-other", entries)
        self.assertEqual(set(entries), set(before), self.last_output)
        self.assertEqual(current, before_current)
        log.info("UEFI NVRAM test: boot to API {boot} s; BootCurrent {current}; entries left "
                 "{entries}", boot=round(boot, 1), current=current, entries=sorted(entries))
