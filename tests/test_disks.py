"""Tests for ipa_twisted.blockdev.disks and erase_devices_metadata.

The tests touching block devices use loop devices on sparse files only, named by path; the
agent sees nothing else (LoopOnlyRunner). They need root and the disk tools, and skip
otherwise.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipa_twisted.config import AgentConfig
from ipa_twisted.errors import BlockDeviceEraseError, InstanceDeployFailure
from ipa_twisted.blockdev import disks
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.context import HardwareContext
from ipa_twisted.process import ProcessExecutionError, ProcessRunner
from ipa_twisted.testing.fake_system import lsblk_row as _lsblk
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem
from ipa_twisted.testing.sandbox import (LoopDevice, LoopOnlyRunner, attach_loop_devices,
                                         loop_devices_unavailable)

MiB = 1 << 20
TOOLS = ("parted", "sgdisk", "wipefs", "mkfs.ext4", "blkid", "partprobe")

PARTED_GPT = """\
BYT;
/dev/sdz:1073741824B:scsi:512:4096:gpt:QEMU HARDDISK:;
1:17408B:1048575B:1031168B:free;
1:1048576B:577765375B:576716800B:fat32:primary:boot, esp;
2:577765376B:1006632959B:428867584B:ext4:root:;
1:1006632960B:1073724927B:67091968B:free;
"""


class RetryOptionTests(SynchronousTestCase):
    """``[disk_utils] partprobe_attempts`` and ``partition_detection_attempts``."""

    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        self.clock = Clock()

    def context(self, runner: FakeRunner, **config: Any) -> HardwareContext:
        return HardwareContext(self.system.config(**config), runner, self.clock, None)

    def test_partprobe_is_retried(self) -> None:
        outcomes: list[Any] = [Exit(1, b"", b"Device or resource busy")] * 2 + [b""]
        runner = FakeRunner({("partprobe",): lambda argv: outcomes.pop(0)})
        probing = Deferred.fromCoroutine(disks.partprobe(self.context(runner), "/dev/sdz"))
        self.assertEqual(len(runner.calls), 1)
        self.clock.advance(disks.PARTPROBE_RETRY_DELAY)
        self.clock.advance(disks.PARTPROBE_RETRY_DELAY)
        self.assertIs(self.successResultOf(probing), True)
        self.assertEqual(runner.argvs, [("partprobe", "/dev/sdz")] * 3)

    def test_partprobe_gives_up_after_the_attempts(self) -> None:
        runner = FakeRunner({("partprobe",): Exit(1, b"", b"busy")})
        with capturedLogs() as events:
            probing = Deferred.fromCoroutine(disks.partprobe(
                self.context(runner, partprobe_attempts=4), "/dev/sdz"))
            self.clock.pump([disks.PARTPROBE_RETRY_DELAY] * 3)
        self.assertIs(self.successResultOf(probing), False)
        self.assertEqual(len(runner.calls), 4)
        self.assertEqual([e["device"] for e in events if e["log_level"].name == "warn"],
                         ["/dev/sdz"])

    def test_missing_partprobe_is_not_retried(self) -> None:
        runner = FakeRunner({}, unknown_missing=True)
        with capturedLogs():
            probing = Deferred.fromCoroutine(disks.partprobe(self.context(runner), "/dev/sdz"))
        self.assertIs(self.successResultOf(probing), False)
        self.assertEqual(len(runner.calls), 1)

    def wait(self, **config: Any) -> Deferred[None]:
        context = self.context(FakeRunner({}), **config)
        dev = self.system.dev_path
        return Deferred.fromCoroutine(disks.wait_for_partition(
            context, f"{dev}/sdz", f"{dev}/sdz1"))

    def test_partition_wait_is_at_least_ten_seconds(self) -> None:
        waiting = self.wait()                        # the reference's 3 checks: 3 s
        self.clock.pump([disks.PARTITION_WAIT_DELAY] * (disks.PARTITION_WAIT_ATTEMPTS - 2))
        self.assertNoResult(waiting)
        self.clock.advance(disks.PARTITION_WAIT_DELAY)
        self.failureResultOf(waiting, InstanceDeployFailure)

    def test_partition_detection_attempts_lengthen_the_wait(self) -> None:
        waiting = self.wait(partition_detection_attempts=30)    # 30 s: 60 checks
        self.clock.pump([disks.PARTITION_WAIT_DELAY] * 58)
        self.assertNoResult(waiting)
        self.clock.advance(disks.PARTITION_WAIT_DELAY)
        self.failureResultOf(waiting, InstanceDeployFailure)


class ParsingTests(SynchronousTestCase):
    def test_parted_machine_output(self) -> None:
        layout = disks.parse_parted_machine_output("/dev/sdz", PARTED_GPT)
        self.assertEqual((layout.size, layout.logical_sector_size, layout.table),
                         (1073741824, 512, "gpt"))
        self.assertEqual([(p.number, p.start, p.size, p.filesystem, p.name, p.path)
                          for p in layout.partitions],
                         [(1, MiB, 576716800, "fat32", "primary", "/dev/sdz1"),
                          (2, 577765376, 428867584, "ext4", "root", "/dev/sdz2")])
        self.assertEqual(layout.partitions[0].flags, frozenset({"boot", "esp"}))
        self.assertEqual([(f.start, f.end) for f in layout.free],
                         [(17408, 1048575), (1006632960, 1073724927)])

    def test_no_table(self) -> None:
        layout = disks.parse_parted_machine_output(
            "/dev/loop3", "BYT;\n/dev/loop3:209715200B:loopback:512:512:unknown:Loopback "
            "device:;\n")
        self.assertEqual((layout.table, layout.partitions, layout.free), ("unknown", (), ()))
        self.assertRaises(ValueError, disks.parse_parted_machine_output, "/dev/x", "Error")

    def test_partition_paths(self) -> None:
        self.assertEqual(disks.partition_index_to_path("/dev/sda", 2), "/dev/sda2")
        self.assertEqual(disks.partition_index_to_path("/dev/nvme0n1", 1), "/dev/nvme0n1p1")
        self.assertEqual(disks.partition_index_to_path("/dev/loop7", 3), "/dev/loop7p3")




LSBLK = json.dumps({"blockdevices": [
    _lsblk("sda", 100 * 2**30, "disk", children=[_lsblk("sda1", 2**30, "part"),
                                                  _lsblk("sda2", 2**30, "part")]),
    _lsblk("sdb", 100 * 2**30, "disk"),
    _lsblk("sdc", 100 * 2**30, "disk"),
    _lsblk("sdd", 100 * 2**30, "disk"),
    _lsblk("sr0", 2**30, "rom"),
]}).encode()


class SharedFilesystemTests(SynchronousTestCase):
    """``find_shared_filesystems``: lsblk's tree or flat listing, and blkid where udev did
    not tell lsblk."""

    def find(self, lsblk: Any, blkid: dict[str, Any] | None = None,
             devices: tuple[str, ...] = ("/dev/sda", "/dev/sdb")) -> Any:
        answers: dict[tuple[str, ...], Any] = {("lsblk",): lsblk, ("blkid", "-p"): Exit(2)}
        for path, output in (blkid or {}).items():
            answers[("blkid", "-p", "-o", "export", path)] = output
        self.runner = FakeRunner(answers)
        context = HardwareContext(AgentConfig(), self.runner, Clock(), None)
        return Deferred.fromCoroutine(disks.find_shared_filesystems(context, devices))

    def test_tree(self) -> None:
        tree = {"blockdevices": [
            {"name": "sda", "kname": "sda", "fstype": None, "children": [
                {"name": "sda1", "kname": "sda1", "parttype": "0x83", "children": [
                    {"name": "md0", "kname": "md0", "fstype": "ocfs2"}]}]},
            {"name": "sdb", "kname": "sdb", "fstype": "gfs2"}]}
        self.assertEqual(self.successResultOf(self.find(json.dumps(tree))), [
            ("/dev/sda", "Oracle Cluster File System 2 (on /dev/md0)"),
            ("/dev/sdb", "Red Hat Global File System 2")])
        self.assertEqual(self.runner.argvs[0], ("lsblk", "-bia", "--json", "-o",
                                                disks.GUARD_LSBLK_COLUMNS, "/dev/sda",
                                                "/dev/sdb"))

    def test_flat_listing_follows_pkname(self) -> None:
        flat = {"blockdevices": [
            {"kname": "sda", "pkname": None}, {"kname": "sda1", "pkname": "sda"},
            {"kname": "sdb", "pkname": None},
            {"kname": "sdb2", "pkname": "sdb", "parttype": "0xFB"}]}
        self.assertEqual(self.successResultOf(self.find(json.dumps(flat))), [
            ("/dev/sdb", "VMware VMFS Partition (MBR) (on /dev/sdb2)")])

    def test_blkid_reads_what_lsblk_did_not_say(self) -> None:
        flat = {"blockdevices": [{"kname": "sda", "pkname": None},
                                 {"kname": "sda1", "pkname": "sda"}]}
        found = self.successResultOf(self.find(json.dumps(flat), {
            "/dev/sda1": "DEVNAME=/dev/sda1\nPART_ENTRY_SCHEME=gpt\nPART_ENTRY_TYPE="
                         "37affc90-ef7d-4e96-91c3-2d7ae055b174\n"}, devices=("/dev/sda",)))
        self.assertEqual(found, [("/dev/sda", "IBM GPFS Partition (on /dev/sda1)")])
        self.assertEqual([argv[-1] for argv in self.runner.argvs if argv[0] == "blkid"],
                         ["/dev/sda", "/dev/sda1"])

    def test_nothing_special(self) -> None:
        tree = {"blockdevices": [{"kname": "sda", "fstype": "ext4"},
                                 {"kname": "sdb", "fstype": "linux_raid_member"}]}
        self.assertEqual(self.successResultOf(self.find(json.dumps(tree))), [])
        self.assertEqual(self.successResultOf(self.find("", devices=())), [])

    def test_unreadable_lsblk(self) -> None:
        self.failureResultOf(self.find("not json"), ProcessExecutionError)
        self.failureResultOf(self.find(Exit(1, b"", b"lsblk: failed")),
                             ProcessExecutionError)
        broken = {"blockdevices": [{"kname": "sda"}]}
        self.failureResultOf(self.find(json.dumps(broken), {"/dev/sda": Exit(4)}),
                             ProcessExecutionError)


VMFS_GUID = "aa31e02a-400f-11db-9590-000c2911d1b8"
LINUX_GUID = "0fc63daf-8483-4772-8e79-3d69d8477de4"


def gpt_image(path: str, types: list[str], sector: int = 512) -> None:
    """A disk image whose GPT (header and entries, no CRCs) declares ``types``."""
    import uuid
    entries = b"".join(uuid.UUID(t).bytes_le + bytes(112) for t in types)
    header = b"EFI PART" + bytes(64) + struct.pack("<QII", 2, 128, 128)
    with open(path, "wb") as f:
        f.truncate(64 * sector)
        f.seek(510)
        f.write(b"\x55\xaa")
        f.seek(446 + 4)
        f.write(b"\xee")
        f.seek(sector)
        f.write(header)
        f.seek(2 * sector)
        f.write(entries)


def mbr_image(path: str, kinds: list[int]) -> None:
    with open(path, "wb") as f:
        f.truncate(4096)
        for number, kind in enumerate(kinds):
            f.seek(446 + 16 * number + 4)
            f.write(bytes([kind]))
        f.seek(510)
        f.write(b"\x55\xaa")


class PartitionTypeTests(SynchronousTestCase):
    """The partition types a disk's own table declares (read without the kernel)."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "disk.img")

    def test_gpt_512_and_4k_sectors(self) -> None:
        for sector in (512, 4096):
            gpt_image(self.path, [VMFS_GUID, LINUX_GUID], sector)
            self.assertEqual(disks.partition_types(self.path), [VMFS_GUID, LINUX_GUID])

    def test_mbr(self) -> None:
        mbr_image(self.path, [0x83, 0, 0xFB])
        self.assertEqual(disks.partition_types(self.path), ["0x83", "0xfb"])

    def test_no_table(self) -> None:
        mbr_image(self.path, [0xEE])                  # protective MBR, no GPT header
        self.assertEqual(disks.partition_types(self.path), [])
        with open(self.path, "wb") as f:
            f.truncate(4096)
        self.assertEqual(disks.partition_types(self.path), [])
        self.assertEqual(disks.partition_types(os.path.join(self.dir, "absent")), [])

    def test_guard_reads_tables_the_kernel_has_not_scanned(self) -> None:
        gpt_image(self.path, [LINUX_GUID, VMFS_GUID])
        listing = {"blockdevices": [{"name": "disk.img", "kname": "disk.img"}]}
        runner = FakeRunner({("lsblk",): json.dumps(listing), ("blkid", "-p"): Exit(2)})
        context = HardwareContext(AgentConfig(dev_path=self.dir), runner, Clock(), None)
        found = self.successResultOf(Deferred.fromCoroutine(
            disks.find_shared_filesystems(context, [self.path])))
        self.assertEqual(found, [(self.path,
                                  "VMware VMFS Partition (GPT) (in its partition table)")])


class EraseMetadataFakeTests(SynchronousTestCase):
    """Ordering, skipping, concurrency and error collection, on recorded outputs."""

    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        for name in ("sda", "sdb", "sdc", "sdd"):
            self.system.add_block_device(name)
        self.system.write("sys/class/block/sdc/ro", "1\n")
        self.system.write("sys/class/block/sdd/removable", "1\n")
        self.wiped: list[str] = []

    def manager(self, runner: FakeRunner) -> GenericHardwareManager:
        async def wipe(device: str, reactor: Any) -> None:
            self.wiped.append(os.path.basename(device))
        manager = GenericHardwareManager(udev=lambda name: {}, wipe=wipe)
        manager.bind(HardwareContext(self.system.config(), runner, Clock(), None))
        return manager

    def names(self, runner: FakeRunner, program: str) -> list[str]:
        return [os.path.basename(argv[-1]) for argv in runner.argvs if argv[0] == program]

    def test_partitions_first_disks_concurrently(self) -> None:
        runner = FakeRunner({("lsblk",): LSBLK, ("wipefs",): b"", ("blockdev",): b"",
                             ("blkid",): Exit(2)},
                            hold=True)
        erasing = Deferred.fromCoroutine(self.manager(runner).erase_devices_metadata({}, []))
        runner.release_one()                    # lsblk: the devices
        while not self.names(runner, "wipefs"):  # the shared filesystem guard: lsblk,
            runner.release_one()                # then blkid -p on each device it lists
        dev = self.system.dev_path
        self.assertEqual(runner.argvs[1], ("lsblk", "-bia", "--json", "-o",
                                           disks.GUARD_LSBLK_COLUMNS, f"{dev}/sda",
                                           f"{dev}/sdb"))   # not the read-only nor removable
        self.assertEqual(self.names(runner, "wipefs"), ["sda2", "sdb"])   # both at once
        runner.release()
        self.successResultOf(erasing)
        self.assertEqual(self.names(runner, "wipefs"), ["sda2", "sdb", "sda1", "sda"])
        # whole disks only: the kernel re-reads their emptied tables, after the wipe
        self.assertEqual(self.names(runner, "blockdev"), ["sdb", "sda"])
        self.assertEqual(self.names(runner, "sgdisk"), [])
        self.assertEqual([name for name in self.wiped if name.startswith("sda")],
                         ["sda2", "sda1", "sda"])
        self.assertEqual(sorted(self.wiped), ["sda", "sda1", "sda2", "sdb"])
        self.assertIn(("wipefs", "--force", "--all", f"{self.system.dev_path}/sdb"),
                      runner.argvs)

    def test_errors_collected_after_trying_everything(self) -> None:
        runner = FakeRunner({("lsblk",): LSBLK, ("wipefs",): b"", ("blockdev",): b"",
                             ("blkid",): Exit(2),
                             ("wipefs", "--force", "--all", f"{self.system.dev_path}/sdb"):
                             Exit(1, b"", b"wipefs: error: probing initialization failed")})
        failure = self.failureResultOf(Deferred.fromCoroutine(
            self.manager(runner).erase_devices_metadata({}, [])), BlockDeviceEraseError)
        self.assertIn(f'"{self.system.dev_path}/sdb"', str(failure.value))
        self.assertIn("probing initialization failed", str(failure.value))
        self.assertNotIn("/sda", str(failure.value))
        self.assertEqual(self.wiped, ["sda2", "sda1", "sda"])
        self.flushLoggedErrors()

    def test_old_wipefs(self) -> None:
        dev = self.system.dev_path
        runner = FakeRunner({("wipefs", "--force", "--all", f"{dev}/sdb"):
                             Exit(1, b"", b"wipefs: unrecognized option '--force'"),
                             ("wipefs", "--all", f"{dev}/sdb"): b"", ("blockdev",): b""})
        context = HardwareContext(self.system.config(), runner, Clock(), None)

        async def wipe(device: str, reactor: Any) -> None:
            self.wiped.append(device)
            self.assertEqual(len(runner.argvs), 2)      # before the re-read
        self.successResultOf(Deferred.fromCoroutine(
            disks.destroy_disk_metadata(context, f"{dev}/sdb", wipe=wipe)))
        self.assertEqual(runner.argvs, [("wipefs", "--force", "--all", f"{dev}/sdb"),
                                        ("wipefs", "--all", f"{dev}/sdb"),
                                        ("blockdev", "--rereadpt", f"{dev}/sdb")])
        self.assertEqual(self.wiped, [f"{dev}/sdb"])

    def test_refused_reread_is_logged(self) -> None:
        """Partitions in use: the kernel keeps its view; the metadata is destroyed anyway
        (no sgdisk -Z, whose second-long sleeps before each re-read buy nothing more)."""
        dev = self.system.dev_path
        runner = FakeRunner({("wipefs",): b"", ("blockdev", "--rereadpt"): Exit(
            1, b"", b"blockdev: ioctl error on BLKRRPART: Device or resource busy")})
        context = HardwareContext(self.system.config(), runner, Clock(), None)

        async def wipe(device: str, reactor: Any) -> None:
            self.wiped.append(device)
        with capturedLogs() as events:
            self.successResultOf(Deferred.fromCoroutine(
                disks.destroy_disk_metadata(context, f"{dev}/sda", wipe=wipe)))
        self.assertEqual([argv[0] for argv in runner.argvs], ["wipefs", "blockdev"])
        self.assertEqual(self.wiped, [f"{dev}/sda"])
        self.assertTrue(any("Device or resource busy" in formatEvent(e) for e in events))
        # a partition's table is not re-read
        self.successResultOf(Deferred.fromCoroutine(
            disks.destroy_disk_metadata(context, f"{dev}/sda1", whole_disk=False, wipe=wipe)))
        self.assertEqual([argv[0] for argv in runner.argvs], ["wipefs", "blockdev", "wipefs"])


class LoopTestCase(TestCase):
    """Real loop devices (root only); each is detached and its file removed afterwards."""

    timeout = 120

    def setUp(self) -> None:
        reason = loop_devices_unavailable(TOOLS)
        if reason is not None:
            raise SkipTest(reason)
        self.real_runner = ProcessRunner(reactor, reactor)
        self.workdir = os.path.abspath(self.mktemp())

    async def loops(self, *sizes: int, read_only: bool = False) -> list[LoopDevice]:
        return await attach_loop_devices(self.real_runner, self.workdir, sizes, self.addCleanup,
                                         read_only=read_only)

    def context(self, runner: Any, **config: Any) -> HardwareContext:
        return HardwareContext(AgentConfig(**config), runner, reactor, reactor)

    async def sh(self, *argv: str) -> str:
        out, _ = await self.real_runner.execute(*argv)
        return out.decode()

    async def make_gpt_with_ext4(self, device: str) -> int:
        """A GPT with an ESP and an ext4 partition; the ext4 partition's offset."""
        await self.sh("parted", "-s", "-a", "optimal", device, "--", "unit", "MiB",
                       "mklabel", "gpt", "mkpart", "esp", "fat32", "1", "9", "set", "1",
                       "esp", "on", "mkpart", "root", "ext4", "9", "100%")
        await self.sh("partprobe", device)
        await self.sh("mkfs.ext4", "-q", "-F", disks.partition_index_to_path(device, 2))
        return 9 * MiB

    def read(self, device: str, offset: int, length: int) -> bytes:
        with open(device, "rb") as f:
            f.seek(offset)
            return f.read(length)

    async def signatures(self, device: str) -> str:
        return (await self.sh("wipefs", device)).strip()


class DestroyMetadataTests(LoopTestCase):
    async def test_gpt_and_signatures_gone(self) -> None:
        [loop] = await self.loops(64 * MiB)
        await self.make_gpt_with_ext4(loop.path)
        self.assertIn("gpt", await self.signatures(loop.path))
        context = self.context(LoopOnlyRunner(self.real_runner, [loop.path]))
        await disks.destroy_disk_metadata(context, loop.path)
        self.assertEqual(await self.signatures(loop.path), "")
        self.assertEqual(self.read(loop.path, 0, MiB), bytes(MiB))
        self.assertEqual(self.read(loop.path, loop.size - MiB, MiB), bytes(MiB))
        self.assertEqual(await disks.scan_partition_table_type(context, loop.path), "unknown")

    async def test_tables_and_efi_partition(self) -> None:
        [loop] = await self.loops(64 * MiB)
        context = self.context(LoopOnlyRunner(self.real_runner, [loop.path]))
        await disks.create_partition_table(context, loop.path, "msdos")
        self.assertEqual(await disks.scan_partition_table_type(context, loop.path), "msdos")
        self.assertIsNone(await disks.get_efi_part_on_device(context, loop.path))
        await self.make_gpt_with_ext4(loop.path)
        self.assertEqual(await disks.scan_partition_table_type(context, loop.path), "gpt")
        self.assertEqual(await disks.get_efi_part_on_device(context, loop.path), 1)
        self.assertEqual([p.number for p in await disks.list_partitions(context, loop.path)],
                         [1, 2])


class PartitionNodeTests(LoopTestCase):
    async def test_missing_nodes_made_from_sysfs_under_dev_path_only(self) -> None:
        [loop] = await self.loops(64 * MiB)
        dev = os.path.join(self.workdir, "dev")
        os.makedirs(dev)
        node = os.path.join(dev, os.path.basename(loop.path))
        os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(loop.path).st_rdev)
        context = self.context(LoopOnlyRunner(self.real_runner, [node]), dev_path=dev)
        await self.make_gpt_with_ext4(loop.path)      # the same device, seen from /dev
        part = disks.partition_index_to_path(node, 2)
        self.assertFalse(os.path.exists(part))
        await disks.wait_for_partition(context, node, part)
        self.assertEqual(os.stat(part).st_rdev,
                         os.stat(disks.partition_index_to_path(loop.path, 2)).st_rdev)
        self.assertEqual((await disks.probe(context, part)).get("TYPE"), "ext4")
        # a stale node (another device number) is replaced
        os.unlink(part)
        os.mknod(part, 0o600 | stat.S_IFBLK, os.makedev(1, 3))
        await disks.wait_for_partition(context, node, part)
        self.assertTrue(stat.S_ISBLK(os.stat(part).st_mode))
        self.assertNotEqual(os.stat(part).st_rdev, os.makedev(1, 3))
        # outside dev_path nothing is created; a partition that does not exist times out
        elsewhere = os.path.join(self.workdir, "elsewhere")
        os.makedirs(elsewhere)
        with self.assertRaises(InstanceDeployFailure):
            await disks.wait_for_partition(context, node,
                                           os.path.join(elsewhere, os.path.basename(part)),
                                           attempts=2, delay=0.01)
        with self.assertRaises(InstanceDeployFailure):
            await disks.wait_for_partition(context, node, disks.partition_index_to_path(
                node, 7), attempts=2, delay=0.01)
        self.assertEqual(os.listdir(elsewhere), [])


class EraseDevicesMetadataTests(LoopTestCase):
    async def test_erases_loop_disks_and_partitions_skipping_read_only(self) -> None:
        first, second = await self.loops(64 * MiB, 80 * MiB)
        offsets = [await self.make_gpt_with_ext4(loop.path) for loop in (first, second)]
        spare = (await self.loops(64 * MiB))[0]
        await self.make_gpt_with_ext4(spare.path)
        [read_only] = await attach_loop_devices(self.real_runner, self.workdir + "-ro",
                                                [64 * MiB], self.addCleanup, read_only=True)
        runner = LoopOnlyRunner(self.real_runner, [first.path, second.path, read_only.path])
        manager = GenericHardwareManager()
        manager.bind(self.context(runner, include_loop_devices=True))
        devices = [d.name for d in await manager.list_block_devices(include_partitions=True)]
        self.assertEqual(sorted(devices), sorted([
            first.path, first.path + "p1", first.path + "p2",
            second.path, second.path + "p1", second.path + "p2", read_only.path]))

        await manager.erase_devices_metadata({"uuid": "node-1"}, [])

        self.assertEqual(runner.refused, [])
        for loop, offset in zip((first, second), offsets):
            self.assertEqual(await self.signatures(loop.path), "")
            self.assertEqual(self.read(loop.path, 0, MiB), bytes(MiB))
            self.assertEqual(self.read(loop.path, loop.size - MiB, MiB), bytes(MiB))
            # the ext4 superblock of partition 2 was wiped before the table went away
            self.assertEqual(self.read(loop.path, offset + 1024, 1024), bytes(1024))
        self.assertIn("gpt", await self.signatures(spare.path))      # never seen
        self.assertEqual(await manager.get_os_install_device(
            node={"properties": {"root_device": {"name": first.path}}}), first.path)

    async def test_failures_are_collected(self) -> None:
        [loop] = await self.loops(64 * MiB)
        runner = LoopOnlyRunner(self.real_runner, [loop.path])
        manager = GenericHardwareManager()

        async def broken_wipe(device: str, reactor: Any) -> None:
            raise ProcessExecutionError(["wipe", device], 1, b"", b"no luck")
        manager = GenericHardwareManager(wipe=broken_wipe)
        manager.bind(self.context(runner, include_loop_devices=True))
        with self.assertRaises(BlockDeviceEraseError) as caught:
            await manager.erase_devices_metadata({}, [])
        self.assertIn(loop.path, str(caught.exception))
        self.assertIn("no luck", str(caught.exception))
        self.flushLoggedErrors()
