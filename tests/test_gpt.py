"""Tests for moving a backup GPT to the end of its disk (ipa_twisted.blockdev.gpt) and for
``disks.fix_gpt_partition``, which uses it and leaves the rest to sgdisk.

GPTs are made by the real sgdisk on sparse image files (512-byte sectors), then the file is
made larger, as a whole-disk image written to a larger disk is; the same file's copy
relocated by ``sgdisk -e`` is the expected result, byte for byte.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess  # making test images with sgdisk before the reactor is involved

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipa_twisted.blockdev import disks
from ipa_twisted.blockdev.gpt import Relocation, relocate_backup
from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import InstanceDeployFailure
from ipa_twisted.testing.fake_process import FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem

MiB = 1 << 20
GiB = 1 << 30


def _sgdisk(*args: str) -> str:
    return subprocess.run(["sgdisk", *args], check=True, capture_output=True,
                          text=True).stdout


class ImageFiles:
    """Image files with a GPT made by sgdisk in a test's temporary directory."""

    def setUp(self) -> None:
        if shutil.which("sgdisk") is None:
            raise SkipTest("sgdisk (gdisk) is not installed: it makes the test GPTs")
        self.dir = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(self.dir)

    def image(self, name: str = "disk.img", size: int = 64 * MiB, grown: int = 100 * MiB,
              *options: str) -> str:
        """A ``size`` image with a GPT (a root and an ESP partition), then grown to
        ``grown`` bytes: its backup GPT is no longer at the end."""
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.truncate(size)
        _sgdisk("-o", *options, "-n", "1:2048:+20M", "-c", "1:root", "-n", "2:0:0",
                "-t", "2:ef00", path)
        with open(path, "r+b") as f:
            f.truncate(grown)
        return path

    def copy(self, path: str, name: str) -> str:
        target = os.path.join(self.dir, name)
        subprocess.run(["cp", "--sparse=always", path, target], check=True)
        return target

    @staticmethod
    def extents(path: str) -> list[tuple[int, int]]:
        """The data extents of sparse file ``path``, as ``(start, stop)`` offsets."""
        found = []
        with open(path, "rb") as f:
            end, offset = os.fstat(f.fileno()).st_size, 0
            while offset < end:
                try:
                    start = os.lseek(f.fileno(), offset, os.SEEK_DATA)
                except OSError:                       # only a hole is left
                    break
                offset = os.lseek(f.fileno(), start, os.SEEK_HOLE)
                found.append((start, offset))
        return found

    def assertSameBytes(self, a: str, b: str) -> None:
        """``a`` and ``b`` hold the same bytes (read where either has data)."""
        self.assertEqual(os.path.getsize(a), os.path.getsize(b))  # type: ignore
        with open(a, "rb") as f, open(b, "rb") as g:
            for start, stop in sorted(set(self.extents(a) + self.extents(b))):
                if os.pread(f.fileno(), stop - start, start) != os.pread(
                        g.fileno(), stop - start, start):
                    self.fail(f"{a} and {b} differ in bytes {start}-{stop}")  # type: ignore

    @staticmethod
    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()


class RelocateTests(ImageFiles, SynchronousTestCase):
    def test_same_bytes_as_sgdisk(self) -> None:
        for grown, options in ((100 * MiB, ()), (100 * MiB, ("-S", "256")),
                               (9 * GiB, ())):       # past the MBR's last cylinder
            ours = self.image(f"ours-{grown}-{len(options)}.img", 64 * MiB, grown, *options)
            theirs = self.copy(ours, f"theirs-{grown}-{len(options)}.img")
            self.assertIn("doesn't reside at the end", " ".join(_sgdisk("-v", ours).split()))
            _sgdisk("-e", theirs)
            self.assertEqual(relocate_backup(ours), Relocation.MOVED)
            self.assertSameBytes(ours, theirs)
            self.assertIn("No problems found", _sgdisk("-v", ours))
            self.assertEqual(relocate_backup(ours), Relocation.IN_PLACE)
            os.remove(ours)
            os.remove(theirs)

    def test_backup_already_at_the_end(self) -> None:
        path = self.image(grown=64 * MiB)
        before = self.read(path)
        self.assertEqual(relocate_backup(path), Relocation.IN_PLACE)
        self.assertTrue(self.read(path) == before)

    def unhandled(self, path: str) -> None:
        before = self.read(path)
        self.assertEqual(relocate_backup(path), Relocation.UNHANDLED)
        self.assertTrue(self.read(path) == before, "written to")

    def test_no_gpt(self) -> None:
        path = os.path.join(self.dir, "blank.img")
        with open(path, "wb") as f:
            f.truncate(4 * MiB)
        self.unhandled(path)
        with open(path, "r+b") as f:                 # an MBR without a GPT
            f.seek(510)
            f.write(b"\x55\xaa")
        self.unhandled(path)

    def test_damaged_header_or_entries(self) -> None:
        path = self.image()
        with open(path, "r+b") as f:                 # the header's CRC no longer matches
            f.seek(512 + 40)
            f.write(struct.pack("<Q", 1234))
        self.unhandled(path)
        path = self.image("entries.img")
        with open(path, "r+b") as f:                 # a partition's name changed
            f.seek(2 * 512 + 56)
            f.write(b"X\x00")
        self.unhandled(path)

    def test_disk_smaller_than_the_image(self) -> None:
        self.unhandled(self.image(size=64 * MiB, grown=48 * MiB))

    def test_hybrid_mbr(self) -> None:
        path = self.image()
        with open(path, "r+b") as f:                 # a second MBR entry: a FAT partition
            f.seek(446 + 16 + 4)
            f.write(b"\x0c")
            f.seek(446 + 16 + 8)
            f.write(struct.pack("<II", 2048, 40960))
        self.unhandled(path)


class FixGptTests(ImageFiles, TestCase):
    """``fix_gpt_partition`` on image files, with every program faked: which ones run."""

    def context(self, runner: FakeRunner) -> HardwareContext:
        config = FakeSystem(self.mktemp()).config()
        return HardwareContext(config, runner, Clock(), reactor)

    async def test_moved_without_any_program(self) -> None:
        path = self.image()
        runner = FakeRunner({})
        await disks.fix_gpt_partition(self.context(runner), path)
        self.assertEqual(runner.argvs, [])
        self.assertIn("No problems found", _sgdisk("-v", path))
        await disks.fix_gpt_partition(self.context(runner), path)     # in place now
        self.assertEqual(runner.argvs, [])

    async def test_a_damaged_gpt_goes_to_sgdisk(self) -> None:
        path = self.image()
        with open(path, "r+b") as f:
            f.seek(512 + 40)
            f.write(struct.pack("<Q", 1234))
        parted = (f"BYT;\n{path}:104857600B:file:512:512:gpt::;\n"
                  "1:1048576B:22020095B:20971520B::root:;\n").encode()
        runner = FakeRunner({("parted",): parted, ("sgdisk", "-v"): (
            b"Problem: The secondary header's self-pointer indicates that it doesn't "
            b"reside\nat the end of the disk.\n"), ("sgdisk", "-e"): b""})
        await disks.fix_gpt_partition(self.context(runner), path)
        self.assertEqual([argv[:2] for argv in runner.argvs],
                         [("parted", "-s"), ("sgdisk", "-v"), ("sgdisk", "-e")])

    async def test_unreadable_device(self) -> None:
        runner = FakeRunner({})
        with self.assertRaises(InstanceDeployFailure) as caught:
            await disks.fix_gpt_partition(self.context(runner),
                                          os.path.join(self.dir, "absent"))
        self.assertIn("Failed to fix GPT data structures", str(caught.exception))
        self.assertEqual(runner.argvs, [])
