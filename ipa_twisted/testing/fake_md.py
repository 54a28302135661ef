"""FakeMdMachine: a Linux machine with md support, as parted, mdadm, wipefs and sgdisk see it.

``FakeMdMachine`` answers parted, mdadm, wipefs, sgdisk, blockdev and lsblk (``answers()``, for
a ``FakeRunner``) like a machine whose kernel has md support would, in the output formats
recorded in the project's ramdisk (``ramdisk_recordings``, which the QEMU test re-checks),
keeping partition tables, superblocks and ``/proc/mdstat`` in a ``FakeSystem`` tree.
Partition device nodes are real block nodes (made as the kernel would), so creating
partitions needs root. ``tests/test_fake_md.py`` checks it against the recordings; the real
thing runs in QEMU (``tests/test_qemu_ramdisk.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

from ipa_twisted.testing.fake_process import Exit
from ipa_twisted.testing.fake_system import FakeSystem
from ipa_twisted.testing.ramdisk_recordings import MDADM_DETAIL

MiB = 1 << 20
NO_SUPERBLOCK = "mdadm: No md superblock detected on {device}.\n"


def detail_output(device: str, level: str, name: str, members: list[str]) -> str:
    """``mdadm --detail`` in the recorded format."""
    head = MDADM_DETAIL.split("    Number")[0]
    head = head.replace("/dev/md0:", f"{device}:").replace("raid1", f"raid{level}")
    head = head.replace("ipa-ramdisk:root", f"ipa-ramdisk:{name}")
    rows = "".join(f"       {i}     253       {i * 16 + 2:2d}        {i}      active sync   "
                   f"{member}\n" for i, member in enumerate(members))
    return head + "    Number   Major   Minor   RaidDevice State\n" + rows


def parted_commands(argv: tuple[str, ...]) -> list[list[str]]:
    """The commands of one parted run (after ``--``): [["mklabel", "gpt"], ["mkpart", ...]]."""
    commands: list[list[str]] = []
    for word in argv[argv.index("--") + 1:]:
        if word in ("mklabel", "mkpart", "set") or not commands:
            commands.append([word])
        else:
            commands[-1].append(word)
    return commands


@dataclass
class Part:
    """One partition of a fake table (byte offsets, inclusive end)."""

    number: int
    start: int
    end: int
    name: str
    flags: set[str] = field(default_factory=set)


@dataclass
class Array:
    """One md array: its level, name, members and whether it runs."""

    level: str
    name: str
    members: list[str]
    active: bool = True


class FakeMdMachine:
    """Disks, partition tables and md arrays behind recorded tool outputs (see module doc)."""

    def __init__(self, system: FakeSystem, disks: dict[str, tuple[int, str]]) -> None:
        self.system = system
        self.disks = {self.dev(name): (size, serial) for name, (size, serial) in disks.items()}
        self.tables: dict[str, str | None] = {disk: None for disk in self.disks}
        self.parts: dict[str, list[Part]] = {disk: [] for disk in self.disks}
        self.arrays: dict[str, Array] = {}
        self.superblocks: dict[str, str] = {}       # member → array name
        self.refuse_to_join: set[str] = set()
        self.refuse_to_stop: set[str] = set()
        self.next_minor = 1
        for name in disks:
            system.add_block_device(name)
        self.write_mdstat()

    def dev(self, name: str) -> str:
        """The path of device ``name`` in the fake /dev."""
        return os.path.join(self.system.dev_path, name)

    def part_path(self, disk: str, number: int) -> str:
        """Partition ``number`` of ``disk`` as the kernel names it (``vda2``, ``nvme0n1p2``)."""
        return f"{disk}p{number}" if disk[-1].isdigit() else f"{disk}{number}"

    # -- state → files ----------------------------------------------------------------------
    def write_mdstat(self) -> None:
        """``/proc/mdstat`` for the arrays, in the recorded format."""
        lines = ["Personalities : [raid0] [raid1] [raid10] [raid6] [raid5] [raid4] [linear] "]
        for name, array in self.arrays.items():
            members = " ".join(f"{os.path.basename(m)}[{i}]"
                               for i, m in reversed(list(enumerate(array.members))))
            if array.active:
                lines += [f"{name} : active raid{array.level} {members}",
                          f"      56256 blocks super 1.2 [{len(array.members)}/"
                          f"{len(array.members)}] [{'U' * len(array.members)}]", "      "]
            else:
                lines += [f"{name} : inactive {members}", "      56256 blocks super 1.2", ""]
        lines.append("unused devices: <none>")
        self.system.write("proc/mdstat", "\n".join(lines) + "\n")

    def make_node(self, path: str) -> None:
        """A block device node at ``path`` (as udev would make it)."""
        if not os.path.exists(path):
            os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(259, self.next_minor))
            self.next_minor += 1

    # -- the tools ----------------------------------------------------------------------------
    def answers(self) -> dict[tuple[str, ...], Any]:
        """``FakeRunner`` answers for the tools this machine plays."""
        return {("lsblk", "-bia", "--json"): self.lsblk,
                ("lsblk", "--fs", "--noheadings"): self.lsblk_fs,
                ("parted",): self.parted, ("mdadm",): self.mdadm, ("wipefs",): self.wipefs,
                ("sgdisk", "-Z"): self.sgdisk_zap, ("blockdev", "--rereadpt"): self.reread,
                ("partprobe",): b"", ("udevadm",): b"",
                ("sync",): b"", ("mkfs.vfat",): b"mkfs.fat 4.2 (2021-01-31)\n",
                ("blkid", "-p"): Exit(2)}

    def lsblk(self, argv: tuple[str, ...]) -> bytes:
        """``lsblk -bia --json``: the disks, their partitions and the running arrays."""
        def row(name: str, size: int, kind: str, **extra: Any) -> dict[str, Any]:
            return {"kname": name, "model": None, "size": size, "rota": False, "type": kind,
                    "uuid": None, "partuuid": None, "serial": None, "wwn": None,
                    "vendor": None, "log-sec": 512, "phy-sec": 512, "tran": None, **extra}
        devices = []
        for disk, (size, serial) in self.disks.items():
            children = []
            for part in self.parts[disk]:
                path = self.part_path(disk, part.number)
                md = [row(name, size // 2, f"raid{a.level}") for name, a in self.arrays.items()
                      if path in a.members and a.active]
                children.append(row(os.path.basename(path), part.end - part.start + 1, "part",
                                    **({"children": md} if md else {})))
            devices.append(row(os.path.basename(disk), size, "disk", serial=serial,
                               **({"children": children} if children else {})))
        return json.dumps({"blockdevices": devices}).encode()

    def lsblk_fs(self, argv: tuple[str, ...]) -> bytes:
        """``lsblk --fs --noheadings DISK``: the disk, its partitions and the arrays on them."""
        device = argv[-1]
        children = sorted({self.part_path(device, p.number) for p in self.parts.get(device, [])}
                          | {m for m in self.superblocks if m != device and m.startswith(device)})
        lines = [os.path.basename(device) + self._member_fs(device)]
        for index, child in enumerate(children):
            last = index == len(children) - 1
            lines.append(("\u2514\u2500" if last else "\u251c\u2500") + os.path.basename(child)
                         + self._member_fs(child))
            lines += [("  " if last else "\u2502 ") + "\u2514\u2500" + name
                      for name, array in self.arrays.items()
                      if child in array.members and array.active]
        return ("\n".join(lines) + "\n").encode()

    def _member_fs(self, path: str) -> str:
        """The FSTYPE, FSVER, LABEL and UUID columns of an md member (nothing otherwise)."""
        array = self.superblocks.get(path)
        if array is None:
            return ""
        name = self.arrays[array].name if array in self.arrays else array
        uuid = self.uuid(array)
        return (f" linux_raid_member 1.2 ipa-ramdisk:{name} "
                f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}")

    @staticmethod
    def uuid(array: str) -> str:
        """The array's UUID (32 hex digits), the same for the same name."""
        return hashlib.sha256(array.encode()).hexdigest()[:32]

    def _disk_of(self, argv: tuple[str, ...]) -> str:
        return next(arg for arg in argv if arg in self.disks)

    def parted(self, argv: tuple[str, ...]) -> Any:
        """``parted -m DISK print`` and ``parted DISK -- mklabel/mkpart/set ...``."""
        disk = self._disk_of(argv)
        size = self.disks[disk][0]
        if "print" in argv:
            table = self.tables[disk]
            head = (f"BYT;\n{disk}:{size}B:virtblk:512:512:{table or 'unknown'}:"
                    "Virtio Block Device:;\n")
            if table is None:
                return Exit(1, head.encode(), f"Error: {disk}: unrecognised disk label\n".encode())
            rows = "".join(f"{p.number}:{p.start}B:{p.end}B:{p.end - p.start + 1}B::{p.name}:"
                           f"{', '.join(sorted(p.flags))};\n" for p in self.parts[disk])
            return head + rows
        for command in parted_commands(argv):
            if command[0] == "mklabel":
                self.tables[disk], self.parts[disk] = command[1], []
            elif command[0] == "mkpart":
                start, end = (self._offset(text, size) for text in command[-2:])
                if end > size or start >= end:
                    return Exit(1, b"", b"Error: The location is outside of the device.\n")
                number = len(self.parts[disk]) + 1
                self.parts[disk].append(Part(number, start, end - 1, command[1]))
                self.make_node(self.part_path(disk, number))
            elif command[0] == "set":
                self.parts[disk][int(command[1]) - 1].flags.add(command[2])
            else:
                raise AssertionError(argv)
        return b""

    @staticmethod
    def _offset(text: str, size: int) -> int:
        if text == "100%":
            return size - 34 * 512
        match = re.match(r"^(\d+)MiB$", text)
        assert match is not None, text
        return int(match.group(1)) * MiB

    def mdadm(self, argv: tuple[str, ...]) -> Any:
        """``mdadm`` --create, --detail, --examine [--scan], --stop, --zero-superblock,
        --assemble and --add."""
        action = argv[1]
        if action == "--create":
            device = argv[2]
            level = argv[argv.index("--level") + 1]
            name = argv[argv.index("--name") + 1]
            count = int(argv[argv.index("--raid-devices") + 1])
            members = list(argv[-count:])
            md = os.path.basename(device)
            self.arrays[md] = Array(level, name,
                                    [m for m in members if m not in self.refuse_to_join])
            for member in members:
                self.superblocks[member] = md
            self.make_node(device)
            self.write_mdstat()
            return (b"", f"mdadm: array {device} started.\n".encode())
        if action == "--detail":
            array = self.arrays.get(os.path.basename(argv[2]))
            if array is None:
                return Exit(1, b"", f"mdadm: cannot open {argv[2]}: No such file or "
                                    "directory\n".encode())
            return detail_output(argv[2], array.level, array.name, array.members)
        if action == "--examine" and argv[2:] == ("--scan",):
            return "".join(f"ARRAY /dev/md/{a.name}  metadata=1.2 UUID="
                           f"{':'.join(self.uuid(md)[i:i + 8] for i in range(0, 32, 8))} "
                           f"name=ipa-ramdisk:{a.name}\n" for md, a in self.arrays.items())
        if action == "--examine":
            if argv[2] in self.superblocks:
                return f"{argv[2]}:\n          Magic : a92b4efc\n        Version : 1.2\n"
            return Exit(1, b"", NO_SUPERBLOCK.format(device=argv[2]).encode())
        if action == "--stop":
            name = os.path.basename(argv[2])
            if name in self.refuse_to_stop or name not in self.arrays:
                return Exit(1, b"", f"mdadm: Cannot get exclusive access to {argv[2]}\n"
                            .encode())
            del self.arrays[name]
            self.write_mdstat()
            return (b"", f"mdadm: stopped {argv[2]}\n".encode())
        if action == "--zero-superblock":
            self.superblocks.pop(argv[2], None)
            return b""
        if action == "--assemble":
            found = False
            for member, name in self.superblocks.items():
                if name not in self.arrays:
                    self.arrays[name] = Array("1", name, [])
                    found = True
                if member not in self.arrays[name].members:
                    self.arrays[name].members.append(member)
            self.write_mdstat()
            return b"" if found else Exit(1, b"", b"mdadm: No arrays found in config file "
                                          b"or automatically\n")
        if action == "--add":
            self.arrays[os.path.basename(argv[2])].members.append(argv[3])
            return (b"", f"mdadm: added {argv[3]}\n".encode())
        raise AssertionError(argv)

    def wipefs(self, argv: tuple[str, ...]) -> bytes:
        """``wipefs``: a whole disk loses its partition table."""
        if argv[-1] in self.disks:
            self.tables[argv[-1]] = None
        return b""

    def reread(self, argv: tuple[str, ...]) -> bytes:
        """``blockdev --rereadpt``: a disk without a table loses its partitions."""
        if argv[-1] in self.disks and self.tables.get(argv[-1]) is None:
            self.parts[argv[-1]] = []
        return b""

    def sgdisk_zap(self, argv: tuple[str, ...]) -> bytes:
        """``sgdisk -Z``: the table and partitions go."""
        self.tables[argv[-1]], self.parts[argv[-1]] = None, []
        return b"GPT data structures destroyed!\n"
