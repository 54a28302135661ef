"""FakeMdMachine checked against the outputs recorded in the ramdisk (re-checked in QEMU)."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.testing.fake_md import Array, FakeMdMachine, Part
from ipa_twisted.testing.fake_system import FakeSystem
from ipa_twisted.testing.ramdisk_recordings import RECORDINGS, Recording

MiB = 1 << 20


class FakeMdMachineTests(SynchronousTestCase):
    """A RAID-1 over two virtio disks' second partitions, as in the ramdisk's recordings."""

    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        self.machine = FakeMdMachine(self.system, {"vda": (64 * MiB, "V1"),
                                                   "vdb": (64 * MiB, "V2")})
        self.members = []
        for disk in ("vda", "vdb"):
            path = self.machine.dev(disk)
            self.machine.tables[path] = "gpt"
            self.machine.parts[path] = [Part(1, MiB, 2 * MiB - 1, "bios", {"bios_grub"}),
                                        Part(2, 2 * MiB, 60 * MiB - 1, "root")]
            self.members.append(self.machine.part_path(path, 2))
        self.machine.arrays["md0"] = Array("1", "root", list(self.members))
        for member in self.members:
            self.machine.superblocks[member] = "md0"
        self.machine.write_mdstat()

    def fake_output(self, recording: Recording) -> str:
        argv = tuple(word.format(md="md0", virtio="vda") for word in recording.command)
        if argv == ("cat", "/proc/mdstat"):
            with open(self.system.path("proc/mdstat"), encoding="utf-8") as f:
                return f.read()
        argv = tuple(self.machine.dev(word[5:]) if word.startswith("/dev/vd") else word
                     for word in argv)
        answer: Any = self.machine.answers()[argv[:3] if argv[0] == "lsblk" else argv[:1]]
        output = answer(argv)
        return output.decode() if isinstance(output, bytes) else str(output)

    def test_outputs_have_the_recorded_shape(self) -> None:
        faked = [r for r in RECORDINGS if r.command[0] in ("mdadm", "cat", "lsblk")]
        self.assertEqual(len(faked), 4)
        for recording in faked:
            output = self.fake_output(recording)
            self.assertEqual(recording.shape(output), recording.shape(recording.output),
                             f"{recording.name}:\n{output}")
            self.assertEqual(recording.parsed(output), recording.parsed(recording.output),
                             recording.name)

    def test_lsblk_tree_of_a_member_disk(self) -> None:
        disk = self.machine.dev("vda")
        lines = self.machine.lsblk_fs(("lsblk", "--fs", "--noheadings", disk)).decode()
        self.assertEqual([line.split()[0] for line in lines.splitlines()],
                         ["vda", "\u251c\u2500vda1", "\u2514\u2500vda2", "\u2514\u2500md0"])
        self.assertNotIn("linux_raid_member", self.machine.lsblk_fs(
            ("lsblk", "--fs", "--noheadings", os.path.join(self.system.dev_path, "vdc")))
            .decode())
