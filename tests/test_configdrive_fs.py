"""Config drive file systems: ISO 9660 read as a guest would, FAT built for 4K sectors.

The ISO comes from pycdlib like Ironic's genisoimage -J -r (``tests.configdrive_iso``);
FAT images are checked with dosfstools' ``fsck.fat`` and blkid when installed, and read
back with our own reader.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted.config import AgentConfig
from ipa_twisted.errors import InstanceDeployFailure
from ipa_twisted.context import HardwareContext
from ipa_twisted.deploy import configdrive as cd
from ipa_twisted.deploy import configdrive_fs as fs
from ipa_twisted.testing.fake_process import FakeRunner
from tests.configdrive_iso import META_DATA, make_iso

MiB = 1 << 20


def tree(entries: list[fs.Entry]) -> dict[str, bytes | None]:
    return {e.path: None if e.is_dir else e.data for e in entries}


EXPECTED = {**{path: data for path, data in META_DATA.items()},
            **{d: None for d in ("openstack", "openstack/latest", "openstack/2012-08-10",
                                 "openstack/content", "ec2", "ec2/2009-04-04")}}


class ConfigDriveFsTests(SynchronousTestCase):
    def check_with_tools(self, image: bytes, sector: int) -> None:
        """fsck.fat finds nothing wrong; blkid sees a vfat labelled CONFIG-2."""
        path = os.path.join(self.mktemp())
        with open(path, "wb") as f:
            f.write(image)
        if shutil.which("fsck.fat"):
            done = subprocess.run(["fsck.fat", "-n", path], capture_output=True, text=True)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        if shutil.which("blkid"):
            done = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True,
                                  text=True)
            probed = dict(line.split("=", 1) for line in done.stdout.splitlines())
            self.assertEqual((probed["TYPE"], probed["LABEL"], probed["BLOCK_SIZE"]),
                             ("vfat", "CONFIG-2", str(sector)))

    def test_iso_names_are_the_long_ones(self) -> None:
        iso = make_iso(META_DATA)
        self.assertEqual(fs.sniff(iso), "iso9660")
        self.assertEqual(tree(fs.read_iso9660(iso)), EXPECTED)

    def test_sector_size_problems(self) -> None:
        iso = make_iso(META_DATA)
        self.assertIsNone(fs.sector_size_problem(iso, 512))
        self.assertIsNone(fs.sector_size_problem(iso, 2048))
        self.assertIn("4096-byte logical sectors", fs.sector_size_problem(iso, 4096) or "")
        fat512 = fs.build_fat(fs.read_iso9660(iso), 512)
        self.assertEqual(fs.sniff(fat512), "vfat")
        self.assertIsNone(fs.sector_size_problem(fat512, 512))
        self.assertIn("made for 512-byte sectors", fs.sector_size_problem(fat512, 4096) or "")
        self.assertIsNone(fs.sector_size_problem(fs.build_fat([], 4096), 4096))
        self.assertIsNone(fs.sniff(b"\0" * MiB))
        self.assertIsNone(fs.sector_size_problem(b"\0" * MiB, 4096))

    def test_rebuilt_for_4k_sectors(self) -> None:
        iso = make_iso(META_DATA)
        rebuilt = fs.rebuild_for_sector_size(iso, 4096)
        self.assertEqual(len(rebuilt) % MiB, 0)
        self.assertEqual(int.from_bytes(rebuilt[11:13], "little"), 4096)
        self.assertEqual(tree(fs.read_fat(rebuilt)), EXPECTED)
        self.check_with_tools(rebuilt, 4096)
        # a FAT made for 512-byte sectors is rebuilt the same way
        again = fs.rebuild_for_sector_size(fs.build_fat(fs.read_iso9660(iso), 512), 4096)
        self.assertEqual(tree(fs.read_fat(again)), EXPECTED)

    def test_fat12_and_fat16_with_many_names(self) -> None:
        entries = [fs.Entry("dir", True), fs.Entry("dir/sub", True)]
        entries += [fs.Entry(f"dir/sub/a rather long file name {i}.json", False,
                             os.urandom(i * 7919 % 70_000)) for i in range(150)]
        entries += [fs.Entry(f"FILE{i}.TXT", False, b"short name") for i in range(40)]
        entries += [fs.Entry("same.prefix.one", False, b"1"),
                    fs.Entry("same.prefix.two", False, b"2"), fs.Entry("empty", False, b"")]
        for sector, bits in ((4096, "FAT12"), (512, "FAT16")):
            image = fs.build_fat(entries, sector)
            self.assertEqual(image[54:59].decode(), bits)
            self.assertEqual(tree(fs.read_fat(image)), tree(entries))
            self.check_with_tools(image, sector)

    def test_malformed_images(self) -> None:
        iso = bytearray(make_iso(META_DATA))
        self.assertRaises(ValueError, fs.read_iso9660, bytes(iso[:17 * 2048]))
        self.assertRaises(ValueError, fs.rebuild_for_sector_size, b"\0" * MiB, 4096)
        fat = bytearray(fs.build_fat([fs.Entry("f", False, b"x" * 10_000)], 4096))
        fat[11:13] = (1000).to_bytes(2, "little")
        self.assertRaises(ValueError, fs.read_fat, bytes(fat))
        self.assertRaises(ValueError, fs.build_fat, [fs.Entry("a/b", False, b"")], 4096)
        self.assertRaises(ValueError, fs.build_fat, [], 3000)


def _parted(sector: int) -> bytes:
    return (f"BYT;\n/dev/sdb:1000204886016B:scsi:{sector}:{sector}:gpt:Disk:;\n"
            "1:1048576B:1000204885503B:1000203836928B:ext4:root:;\n").encode()


class FitSectorSizeTests(TestCase):
    """The decision to rebuild, on a fake parted answer."""

    def context(self, sector: int, **config: object) -> HardwareContext:
        runner = FakeRunner({("parted", "-s", "-m", "/dev/sdb", "unit", "B", "print", "free"):
                             _parted(sector)})
        return HardwareContext(AgentConfig(**config), runner, reactor, reactor)  # type: ignore[arg-type]

    async def test_iso_rebuilt_on_4k_only(self) -> None:
        iso = make_iso(META_DATA)
        self.assertIs(await cd.fit_sector_size(self.context(512), "/dev/sdb", iso), iso)
        rebuilt = await cd.fit_sector_size(self.context(4096), "/dev/sdb", iso)
        self.assertEqual(int.from_bytes(rebuilt[11:13], "little"), 4096)
        self.assertEqual(tree(fs.read_fat(rebuilt)), EXPECTED)

    async def test_config_drive_rebuild_option(self) -> None:
        iso = make_iso(META_DATA)
        rebuilt = await cd.fit_sector_size(self.context(512, config_drive_rebuild=True),
                                           "/dev/sdb", iso)
        self.assertEqual((fs.sniff(rebuilt), int.from_bytes(rebuilt[11:13], "little")),
                         ("vfat", 512))

    async def test_unreadable_drive_is_a_clear_failure(self) -> None:
        broken = bytearray(make_iso(META_DATA))
        broken[17 * 2048:] = bytes(len(broken) - 17 * 2048)   # no descriptor terminator
        with self.assertRaises(InstanceDeployFailure) as caught:
            await cd.fit_sector_size(self.context(4096), "/dev/sdb", bytes(broken))
        self.assertIn("must be rebuilt for /dev/sdb", str(caught.exception))
        self.assertIn("4096-byte logical sectors", str(caught.exception))
        # raw bytes that are neither ISO nor FAT are left alone
        self.assertEqual(await cd.fit_sector_size(self.context(4096), "/dev/sdb",
                                                  b"config" * 100), b"config" * 100)
