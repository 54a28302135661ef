"""Tests for ipa_twisted.hardware.generic.raid on recorded mdadm, parted and /proc/mdstat outputs.

The machine is ``ipa_twisted.testing.fake_md.FakeMdMachine`` (the outputs recorded in the
ramdisk booted by tests/test_qemu_ramdisk.py). Partition device nodes are real block nodes
(made as the kernel would), so the tests creating partitions need root; the rest run
anywhere. The real thing runs in QEMU.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.blockdev import md
from ipa_twisted.blockdev.md import parse_examine_scan, parse_mdadm_detail, parse_mdstat
from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import CommandExecutionError, DeviceNotFound, SoftwareRAIDError
from ipa_twisted.hardware.generic import raid
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.hardware.generic.protection import Protection, protected_devices
from ipa_twisted.hardware.generic.raid import raid_clean_steps, raid_deploy_steps
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_md import FakeMdMachine, Part, parted_commands
from ipa_twisted.testing.fake_system import FakeSystem
from ipa_twisted.testing.ramdisk_recordings import EXAMINE_SCAN, MDADM_DETAIL, MDSTAT

_T = TypeVar("_T")
MiB, GiB = 1 << 20, 1 << 30

# A made-up /proc/mdstat: an inactive array, spares, a failed member, read-only.
MDSTAT_MIXED = """\
Personalities : [raid1] [raid10]
md127 : inactive sdc1[0](S)
      1047552 blocks super 1.2
       
md1 : active (auto-read-only) raid10 sdd1[3](S) sdb1[1] sda1[0] sdc2[2](F)
      2093056 blocks super 1.2 2 near-copies [2/2] [UU]

unused devices: <none>
"""

class RaidTestCase(SynchronousTestCase):
    DISKS = {"vda": (100 * GiB, "V1"), "vdb": (100 * GiB, "V2"), "vdc": (100 * GiB, "V3")}

    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        self.machine = FakeMdMachine(self.system, self.DISKS)
        self.wiped: list[str] = []

    def needs_root(self) -> None:
        if os.geteuid() != 0:
            raise self.skipTest("partition device nodes are block nodes: needs root")

    def manager(self, runner: FakeRunner | None = None) -> GenericHardwareManager:
        self.runner = runner or FakeRunner(self.machine.answers())

        async def wipe(device: str, reactor: Any) -> None:
            self.wiped.append(device)
        manager = GenericHardwareManager(udev=lambda name: {}, wipe=wipe)
        manager.bind(HardwareContext(self.system.config(), self.runner, Clock(), None))
        return manager

    def dev(self, name: str) -> str:
        return os.path.join(self.system.dev_path, name)

    def result(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return self.successResultOf(Deferred.fromCoroutine(coroutine))

    def failure(self, coroutine: Coroutine[Any, Any, Any]) -> str:
        return str(self.failureResultOf(Deferred.fromCoroutine(coroutine),
                                        SoftwareRAIDError).value)

    def parted(self, disk: str) -> list[list[str]]:
        """The commands parted ran on ``disk`` (in one run: the RAID layout is written at once)."""
        runs = [argv for argv in self.runner.argvs
                if argv[0] == "parted" and self.dev(disk) in argv and "--" in argv]
        self.assertLessEqual(len(runs), 1, runs)
        return [command for argv in runs for command in parted_commands(argv)]

    def creates(self) -> list[tuple[str, ...]]:
        return [argv for argv in self.runner.argvs if argv[:2] == ("mdadm", "--create")]

def node(*logical_disks: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"uuid": "1be26c0b-03f2-4d2e-ae87-c02d7f33c123",
            "target_raid_config": {"logical_disks": list(logical_disks)}, **extra}

RAID1_MAX = {"size_gb": "MAX", "raid_level": "1", "controller": "software"}

# -- parsing ---------------------------------------------------------------------------------

class ParsingTests(SynchronousTestCase):
    def test_mdadm_detail(self) -> None:
        detail = parse_mdadm_detail("/dev/md0", MDADM_DETAIL)
        self.assertEqual((detail.level, detail.state, detail.uuid, detail.name,
                          detail.volume_name, detail.components),
                         ("raid1", "clean", "f2071a93:29233306:efd5edf0:0258fb51",
                          "ipa-ramdisk:root  (local to host ipa-ramdisk)", "root",
                          ("/dev/vda2", "/dev/vdb2")))

    def test_mdstat(self) -> None:
        [md0] = parse_mdstat(MDSTAT)
        self.assertEqual((md0.name, md0.active, md0.level, md0.members),
                         ("md0", True, "raid1", ("vdb2", "vda2")))
        md127, md1 = parse_mdstat(MDSTAT_MIXED)
        self.assertEqual((md127.name, md127.active, md127.level, md127.members),
                         ("md127", False, None, ("sdc1",)))
        self.assertEqual((md1.active, md1.level, md1.members),
                         (True, "raid10", ("sdd1", "sdb1", "sda1", "sdc2")))
        self.assertEqual(parse_mdstat("Personalities : \nunused devices: <none>\n"), [])

    def test_examine_scan(self) -> None:
        self.assertEqual(parse_examine_scan(EXAMINE_SCAN), {"/dev/md/root": {
            "metadata": "1.2", "UUID": "f2071a93:29233306:efd5edf0:0258fb51",
            "name": "ipa-ramdisk:root"}})

    def test_names(self) -> None:
        self.assertEqual(raid.mdadm_level("1+0"), "10")
        self.assertEqual(raid.mdadm_level("5"), "5")
        for name in ("/dev/md0", "md127", "/dev/md/root", "/dev/md0p1"):
            self.assertTrue(md.is_md_name(name), name)
        for name in ("/dev/sda", "/dev/mdx", "/dev/nvme0n1"):
            self.assertFalse(md.is_md_name(name), name)

    def test_parent_disk(self) -> None:
        system = FakeSystem(self.mktemp())
        context = HardwareContext(system.config(), FakeRunner(), Clock(), None)
        self.assertEqual(md.parent_disk(context, "/dev/sda1"), "/dev/sda")
        self.assertEqual(md.parent_disk(context, "/dev/nvme0n1p3"), "/dev/nvme0n1")
        self.assertEqual(md.parent_disk(context, "/dev/md0p1"), "/dev/md0")
        self.assertEqual(md.parent_disk(context, "/dev/sda"), "/dev/sda")
        self.assertEqual(md.parent_disk(context, "/dev/nvme0n1"), "/dev/nvme0n1")
        self.assertEqual(md.parent_disk(context, "/dev/mmcblk0p1"), "/dev/mmcblk0")
        # sysfs knows better than names: a whole disk named like a partition
        system.write("sys/devices/virtual/block/loop1/size", "0")
        os.makedirs(system.path("sys/class/block"), exist_ok=True)
        os.symlink(system.path("sys/devices/virtual/block/loop1"),
                   system.path("sys/class/block/loop1"))
        self.assertEqual(md.parent_disk(context, "/dev/loop1"), "/dev/loop1")
        system.write("sys/devices/virtual/block/loop1/loop1p2/partition", "2")
        os.symlink(system.path("sys/devices/virtual/block/loop1/loop1p2"),
                   system.path("sys/class/block/loop1p2"))
        self.assertEqual(md.parent_disk(context, "/dev/loop1p2"), "/dev/loop1")

    def test_steps(self) -> None:
        self.assertEqual([(s["step"], s["priority"], s["interface"], s["abortable"])
                          for s in raid_clean_steps()],
                         [("delete_configuration", 0, "raid", True),
                          ("create_configuration", 0, "raid", True)])
        [apply] = raid_deploy_steps()
        self.assertEqual((apply["step"], apply["priority"], apply["interface"],
                          apply["reboot_requested"]), ("apply_configuration", 0, "raid", False))
        self.assertEqual(apply["argsinfo"]["raid_config"]["required"], True)
        self.assertEqual(apply["argsinfo"]["delete_existing"]["required"], False)

# -- validation --------------------------------------------------------------------------------

class ValidateTests(RaidTestCase):
    def check(self, *logical_disks: Any) -> str:
        config = {"logical_disks": list(logical_disks)}
        return self.failure(self.manager().validate_configuration(config, node()))

    def test_valid(self) -> None:
        manager = self.manager()
        for config in (
                [RAID1_MAX],
                [{"size_gb": 10, "raid_level": "1", "controller": "software",
                  "volume_name": "root"}, {**RAID1_MAX, "raid_level": "5"}],
                [{**RAID1_MAX, "physical_disks": [{"serial": "V1"}, {"serial": "V3"}]},
                 {"size_gb": "20", "raid_level": "0", "controller": "software"}],
                [RAID1_MAX, {"size_gb": 50, "raid_level": "1+0", "controller": "software"}]):
            self.result(manager.validate_configuration({"logical_disks": config}, node()))

    def test_invalid(self) -> None:
        self.assertIn("No RAID configuration", self.failure(
            self.manager().validate_configuration({}, node())))
        self.assertIn("no logical disks", self.failure(
            self.manager().validate_configuration({"logical_disks": []}, node())))
        self.assertIn("one or two logical disks", self.check(RAID1_MAX, RAID1_MAX, RAID1_MAX))
        self.assertIn("'controller'='software'", self.check({**RAID1_MAX, "controller": None}))
        self.assertIn("RAID-1 for the first", self.check({**RAID1_MAX, "raid_level": "0"}))
        self.assertIn("only one RAID device with size 'MAX'", self.check(RAID1_MAX, RAID1_MAX))
        self.assertIn("RAID level 50", self.check(RAID1_MAX, {**RAID1_MAX, "size_gb": 1,
                                                              "raid_level": "50"}))
        self.assertIn("size_gb", self.check({**RAID1_MAX, "size_gb": -3}))
        self.assertIn("size_gb", self.check({**RAID1_MAX, "size_gb": "lots"}))
        self.assertIn("at least 2 items", self.check({**RAID1_MAX,
                                                      "physical_disks": [{"serial": "V1"}]}))
        self.assertIn("list of device hints", self.check(
            {**RAID1_MAX, "physical_disks": ["/dev/vda", "/dev/vdb"]}))
        self.assertIn("No candidates for physical disk", self.check(
            {**RAID1_MAX, "physical_disks": [{"serial": "V1"}, {"serial": "NOPE"}]}))
        self.assertIn("No candidates left", self.check(
            {**RAID1_MAX, "physical_disks": [{"serial": "V1"}, {"serial": "V1"}]}))
        self.assertIn("volume_name", self.check({**RAID1_MAX, "volume_name": "a b"}))
        self.assertIn("1be26c0b", self.check({**RAID1_MAX, "raid_level": "0"}))

    def test_enough_disks_for_the_level(self) -> None:
        self.assertIn("RAID level 6 with only 3 block devices", self.check(
            RAID1_MAX, {"size_gb": 1, "raid_level": "6", "controller": "software"}))
        del self.machine.disks[self.dev("vdc")]
        self.machine.disks.pop(self.dev("vdb"))
        self.assertIn("RAID level 1 with only 1 block devices", self.check(RAID1_MAX))

    def test_read_only_and_skipped_disks_are_no_holders(self) -> None:
        self.system.write("sys/class/block/vdc/ro", "1\n")
        self.assertIn("RAID level 5 with only 2", self.check(
            RAID1_MAX, {"size_gb": 1, "raid_level": "5", "controller": "software"}))
        config = {"logical_disks": [RAID1_MAX]}
        skip = node(RAID1_MAX, properties={"skip_block_devices": [{"serial": "V2"}]})
        self.assertIn("only 1 block devices", self.failure(
            self.manager().validate_configuration(config, skip)))

# -- creation ----------------------------------------------------------------------------------

class CreateTests(RaidTestCase):
    DISKS = {"vda": (64 * MiB, "V1"), "vdb": (64 * MiB, "V2")}

    def test_nothing_to_do(self) -> None:
        manager = self.manager()
        self.assertEqual(self.result(manager.create_configuration({}, [])), {})
        self.assertEqual(self.result(manager.create_configuration(
            node({**RAID1_MAX, "controller": "hardware"}), [])), {})
        self.assertEqual(self.runner.argvs, [])

    def test_raid1_over_two_disks_bios_gpt(self) -> None:
        self.needs_root()
        manager = self.manager()
        the_node = node({**RAID1_MAX, "volume_name": "root"},
                        properties={"capabilities": "boot_mode:bios,disk_label:gpt"})
        config = self.result(manager.create_configuration(the_node, []))
        self.assertEqual(config, the_node["target_raid_config"])
        for disk in ("vda", "vdb"):
            self.assertEqual(self.parted(disk), [
                ["mklabel", "gpt"],
                ["mkpart", f"bios-boot-part-{0 if disk == 'vda' else 1}", "1MiB", "8MiB"],
                ["set", "1", "bios_grub", "on"],
                ["mkpart", "raid-root", "8MiB", "100%"], ["set", "2", "raid", "on"]])
        self.assertEqual(self.creates(), [(
            "mdadm", "--create", self.dev("md0"), "--force", "--run", "--metadata=1",
            "--level", "1", "--name", "root", "--raid-devices", "2", self.dev("vda2"),
            self.dev("vdb2"))])
        [md0] = md.list_md_devices(manager.context)
        self.assertEqual((md0.name, md0.active, md0.level), ("md0", True, "raid1"))
        self.assertEqual(self.result(manager.get_holder_disks(self.dev("md0"))),
                         [self.dev("vda"), self.dev("vdb")])
        self.assertEqual(self.result(manager.software_raid_install_device(the_node)),
                         self.dev("md0"))

    def test_bios_msdos_starts_at_one_mib(self) -> None:
        self.needs_root()
        manager = self.manager()
        self.result(manager.create_configuration(node(RAID1_MAX), []))
        self.assertEqual(self.parted("vda"), [["mklabel", "msdos"],
                                              ["mkpart", "primary", "1MiB", "100%"],
                                              ["set", "1", "raid", "on"]])
        self.assertEqual(self.creates()[0][9], "md0")            # the default name

    def test_partitions_must_be_gone(self) -> None:
        self.needs_root()
        self.machine.tables[self.dev("vdb")] = "gpt"
        self.machine.parts[self.dev("vdb")] = [raid_part := Part(1, MiB, 2 * MiB, "data")]
        del raid_part
        error = self.failure(self.manager().create_configuration(node(RAID1_MAX), []))
        self.assertIn(f"Partitions detected on devices {self.dev('vdb')}", error)
        self.assertEqual(self.creates(), [])

    def test_a_member_that_did_not_join_is_added(self) -> None:
        self.needs_root()
        self.machine.refuse_to_join.add(self.dev("vdb1"))
        manager = self.manager()
        self.result(manager.create_configuration(node(RAID1_MAX), []))
        self.assertIn(("mdadm", "--add", self.dev("md0"), self.dev("vdb1")), self.runner.argvs)

    def test_mdadm_failure(self) -> None:
        self.needs_root()
        answers = self.machine.answers()
        answers[("mdadm", "--create")] = Exit(1, b"", b"mdadm: cannot open /dev/vda1: "
                                              b"Device or resource busy\n")
        error = self.failure(self.manager(FakeRunner(answers)).create_configuration(
            node(RAID1_MAX), []))
        self.assertIn("Failed to create md device", error)
        self.assertIn("Device or resource busy", error)

    def test_too_big(self) -> None:
        self.needs_root()
        error = self.failure(self.manager().create_configuration(
            node({**RAID1_MAX, "size_gb": 1}), []))
        self.assertIn("Failed to create partitions", error)

class CreateUefiTests(RaidTestCase):
    def test_two_logical_disks_with_hints_and_esps(self) -> None:
        self.needs_root()
        manager = self.manager()
        the_node = node(
            {"size_gb": "MAX", "raid_level": "0", "controller": "software",
             "volume_name": "data"},
            {"size_gb": 10, "raid_level": "1", "controller": "software",
             "volume_name": "root", "physical_disks": [{"serial": "V3"}, {"serial": "V1"}]},
            instance_info={"deploy_boot_mode": "uefi"})
        # the first logical disk must be RAID-1; put it first as Ironic would
        the_node["target_raid_config"]["logical_disks"].reverse()
        self.result(manager.create_configuration(the_node, []))
        self.assertEqual(self.parted("vdc"), [
            ["mklabel", "gpt"], ["mkpart", "uefi-holder-0", "fat32", "1MiB", "551MiB"],
            ["set", "1", "esp", "on"],
            ["mkpart", "raid-root", "551MiB", "10791MiB"], ["set", "2", "raid", "on"],
            ["mkpart", "raid-data", "10791MiB", "100%"], ["set", "3", "raid", "on"]])
        self.assertEqual(self.parted("vdb")[1:4], [
            ["mkpart", "uefi-holder-2", "fat32", "1MiB", "551MiB"], ["set", "1", "esp", "on"],
            ["mkpart", "raid-data", "551MiB", "100%"]])
        root, data = self.creates()
        self.assertEqual(root[2:], (self.dev("md0"), "--force", "--run", "--metadata=1",
                                    "--level", "1", "--name", "root", "--raid-devices", "2",
                                    self.dev("vdc2"), self.dev("vda2")))
        self.assertEqual(data[2:], (self.dev("md1"), "--force", "--run", "--metadata=1",
                                    "--level", "0", "--name", "data", "--raid-devices", "3",
                                    self.dev("vdc3"), self.dev("vda3"), self.dev("vdb2")))
        self.assertEqual(self.result(manager.software_raid_install_device(the_node)),
                         self.dev("md0"))
        # at bootloader time the ESPs become one mirrored ESP
        esp = self.result(raid.prepare_boot_partitions_for_softraid(
            manager.context, self.dev("md0"), "uefi"))
        self.assertEqual(esp, self.dev("md2"))
        self.assertEqual(self.creates()[2][2:], (
            self.dev("md2"), "--force", "--run", "--metadata=1.0", "--level", "1", "--name",
            "esp", "--raid-devices", "2", self.dev("vdc1"), self.dev("vda1")))
        self.assertIn(("mkfs.vfat", "-F", "32", "-n", "EFI-SYSTEM", self.dev("md2")),
                      self.runner.argvs)
        self.assertEqual(self.result(raid.prepare_boot_partitions_for_softraid(
            manager.context, self.dev("md0"), "uefi")), self.dev("md2"))   # reused
        self.assertIsNone(self.result(raid.prepare_boot_partitions_for_softraid(
            manager.context, self.dev("md0"), "bios")))

    def test_raid10_is_mdadm_level_10(self) -> None:
        self.needs_root()
        manager = self.manager()
        self.result(manager.create_configuration(node(
            {"size_gb": 1, "raid_level": "1", "controller": "software"},
            {"size_gb": 2, "raid_level": "1+0", "controller": "software"}), []))
        self.assertEqual([argv[argv.index("--level") + 1] for argv in self.creates()],
                         ["1", "10"])
        self.assertEqual(self.parted("vda")[1:], [
            ["mkpart", "primary", "1MiB", "1025MiB"], ["set", "1", "raid", "on"],
            ["mkpart", "primary", "1025MiB", "3073MiB"], ["set", "2", "raid", "on"]])

# -- deletion and apply ------------------------------------------------------------------------

class DeleteTests(RaidTestCase):
    DISKS = {"vda": (64 * MiB, "V1"), "vdb": (64 * MiB, "V2"), "vdc": (64 * MiB, "V3")}

    def setUp(self) -> None:
        super().setUp()
        self.needs_root()
        self.creator = self.manager()
        self.result(self.creator.create_configuration(node(
            {**RAID1_MAX, "volume_name": "root",
             "physical_disks": [{"serial": "V1"}, {"serial": "V2"}]}), []))

    def test_delete_everything(self) -> None:
        # a stale superblock on a disk outside any running array: assembled, then deleted
        self.machine.superblocks[self.dev("vdc")] = "md9"
        manager = self.manager()
        self.result(manager.delete_configuration(node(), []))
        argvs = self.runner.argvs
        self.assertIn(("mdadm", "--assemble", "--scan", "--verbose"), argvs)
        self.assertIn(("wipefs", "-af", self.dev("md0")), argvs)
        self.assertIn(("mdadm", "--stop", self.dev("md0")), argvs)
        for member in ("vda1", "vdb1", "vdc"):
            self.assertIn(("mdadm", "--zero-superblock", self.dev(member)), argvs)
        self.assertEqual(self.machine.arrays, {})
        self.assertEqual(self.machine.superblocks, {})
        self.assertEqual(md.list_md_devices(manager.context), [])
        # the holders' partition tables are gone (wipefs, both ends zeroed, the table re-read)
        self.assertEqual(self.wiped, [self.dev("vda"), self.dev("vdb"), self.dev("vdc")])
        self.assertEqual(self.machine.parts[self.dev("vda")], [])
        # the stop comes before the members' superblocks are zeroed
        self.assertLess(argvs.index(("mdadm", "--stop", self.dev("md0"))),
                        argvs.index(("mdadm", "--zero-superblock", self.dev("vda1"))))

    def test_unassembled_arrays_are_found(self) -> None:
        self.machine.arrays["md0"].active = False
        del self.machine.arrays["md0"]        # not running: only the superblocks say so
        self.machine.write_mdstat()
        self.result(self.manager().delete_configuration(node(), []))
        self.assertEqual(self.machine.superblocks, {})

    def test_arrays_named_in_skip_block_devices_are_kept(self) -> None:
        manager = self.manager()
        keep = node(properties={"skip_block_devices": [{"volume_name": "root"}]})
        self.result(manager.delete_configuration(keep, []))
        self.assertIn("md0", self.machine.arrays)
        self.assertNotIn(("mdadm", "--stop", self.dev("md0")), self.runner.argvs)

    def test_arrays_that_will_not_stop(self) -> None:
        self.machine.refuse_to_stop.add("md0")
        error = self.failure(self.manager().delete_configuration(node(), []))
        self.assertIn("Unable to clean all softraid correctly", error)
        self.assertIn(self.dev("md0"), error)

    def test_apply_deletes_then_creates(self) -> None:
        manager = self.manager()
        config = {"logical_disks": [{**RAID1_MAX, "volume_name": "new"}]}
        self.assertEqual(self.result(manager.apply_configuration(node(), [], config)), config)
        argvs = self.runner.argvs
        stop = argvs.index(("mdadm", "--stop", self.dev("md0")))
        create = next(i for i, a in enumerate(argvs) if a[:2] == ("mdadm", "--create"))
        self.assertLess(stop, create)
        [array] = self.machine.arrays.values()
        self.assertEqual((array.name, len(array.members)), ("new", 3))

    def test_apply_validates_first(self) -> None:
        error = self.failure(self.manager().apply_configuration(
            node(), [], {"logical_disks": [{**RAID1_MAX, "raid_level": "0"}]}))
        self.assertIn("RAID-1 for the first", error)
        self.assertNotIn(("mdadm", "--stop", self.dev("md0")), self.runner.argvs)

    def test_apply_without_delete_fails_on_partitions(self) -> None:
        error = self.failure(self.manager().apply_configuration(
            node(), [], {"logical_disks": [RAID1_MAX]}, delete_existing=False))
        self.assertIn("Partitions detected", error)

class HelperTests(RaidTestCase):
    def test_md_helpers(self) -> None:
        self.needs_root()
        manager = self.manager()
        context = manager.context
        self.result(manager.create_configuration(node(RAID1_MAX), []))
        md0 = self.dev("md0")
        self.assertTrue(self.result(md.is_md_device(context, md0)))
        self.assertFalse(self.result(md.is_md_device(context, self.dev("vda"))))
        self.assertEqual(self.result(md.get_component_devices(context, md0)),
                         [self.dev("vda1"), self.dev("vdb1"), self.dev("vdc1")])
        self.assertEqual(list(self.result(md.md_get_raid_devices(context))),
                         ["/dev/md/md0"])
        self.result(md.md_restart(context, md0))
        self.assertIn(("mdadm", "--assemble", md0, self.dev("vda1"), self.dev("vdb1"),
                       self.dev("vdc1")), self.runner.argvs)

    def test_restart_failure(self) -> None:
        answers = self.machine.answers()
        answers[("mdadm", "--stop")] = Exit(1, b"", b"mdadm: Cannot get exclusive access")
        context = self.manager(FakeRunner(answers)).context
        failed = Deferred.fromCoroutine(md.md_restart(context, self.dev("md0")))
        self.assertIn("Cannot get exclusive access",
                      str(self.failureResultOf(failed, CommandExecutionError).value))

    def test_without_mdadm(self) -> None:
        context = self.manager(FakeRunner({}, missing=["mdadm"])).context
        self.assertFalse(self.result(md.is_md_device(context, self.dev("md0"))))
        self.result(md.md_scan_and_assemble(context))        # logged, not raised
        self.assertEqual(md.list_md_devices(context), [])

# -- skip_block_devices: protected disks and volumes ------------------------------------------

DATA_ON_V1_V2 = {"size_gb": 1, "raid_level": "1", "controller": "software",
                 "volume_name": "data", "physical_disks": [{"serial": "V1"}, {"serial": "V2"}]}
SCRATCH_ON_V1_V2 = {"size_gb": "MAX", "raid_level": "1", "controller": "software",
                    "volume_name": "scratch",
                    "physical_disks": [{"serial": "V1"}, {"serial": "V2"}]}

def protect(*entries: dict[str, Any], raid: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    return node(*raid, properties={"skip_block_devices": list(entries)})

class ProtectedRaidTests(RaidTestCase):
    """Which arrays and disks ``skip_block_devices`` protects, and what each step does."""

    DISKS = {"vda": (100 * GiB, "V1"), "vdb": (100 * GiB, "V2"), "vdc": (100 * GiB, "V3"),
             "vdd": (100 * GiB, "V4")}

    def setUp(self) -> None:
        super().setUp()
        self.needs_root()
        self.result(self.manager().create_configuration(
            node(DATA_ON_V1_V2, SCRATCH_ON_V1_V2), []))
        self.assertEqual({a.name for a in self.machine.arrays.values()}, {"data", "scratch"})
        self.md = {a.name: self.dev(n) for n, a in self.machine.arrays.items()}

    def protection(self, *entries: dict[str, Any]) -> Protection:
        manager = self.manager()
        devices = self.result(manager.list_block_devices())
        return self.result(protected_devices(manager.context, protect(*entries), devices))

    def test_volume_name_protects_the_array_and_its_holders(self) -> None:
        protection = self.protection({"volume_name": "data"})
        named = "skip_block_devices entry {'volume_name': 'data'} names its RAID volume"
        self.assertEqual(protection.devices, {
            self.md["data"]: named,
            self.dev("vda"): f"it holds the protected RAID device {self.md['data']} ({named})",
            self.dev("vdb"): f"it holds the protected RAID device {self.md['data']} ({named})"})
        self.assertEqual(protection.kept_arrays, {self.md["data"]: "data"})
        self.assertEqual(protection.neighbours, {self.md["scratch"]: "scratch"})

    def test_a_member_disk_protects_its_arrays(self) -> None:
        protection = self.protection({"serial": "V2"})
        hint = "skip_block_devices entry {'serial': 'V2'} matches it"
        self.assertEqual(protection.devices[self.dev("vdb")], hint)
        for name in ("data", "scratch"):
            self.assertEqual(protection.devices[self.md[name]],
                             f"it has a member on the protected disk {self.dev('vdb')} ({hint})")
        self.assertIn("it holds the protected RAID device", protection.devices[self.dev("vda")])
        self.assertNotIn(self.dev("vdc"), protection.devices)
        self.assertEqual(protection.neighbours, {})

    def test_an_md_device_named_by_a_hint(self) -> None:
        name = os.path.basename(self.md["scratch"])
        protection = self.protection({"name": f"/dev/{name}"})
        self.assertEqual(set(protection.devices),
                         {self.md["scratch"], self.dev("vda"), self.dev("vdb")})
        self.assertEqual(protection.neighbours, {self.md["data"]: "data"})

    def test_nothing_protected_runs_nothing(self) -> None:
        self.assertFalse(self.protection())
        self.assertEqual(self.runner.argvs[1:], [])     # the lsblk listing only

    def test_an_absent_volume_protects_nothing(self) -> None:
        self.assertEqual(self.protection({"volume_name": "elsewhere"}).devices, {})

    def test_delete_keeps_the_protected_array_and_its_neighbours(self) -> None:
        manager = self.manager()
        self.machine.superblocks[self.dev("vdc")] = "md9"       # a stray superblock
        self.result(manager.delete_configuration(protect({"volume_name": "data"}), []))
        self.assertEqual({a.name for a in self.machine.arrays.values()}, {"data", "scratch"})
        argvs = self.runner.argvs
        self.assertIn(("wipefs", "-af", self.md["scratch"]), argvs)    # contents wiped
        self.assertNotIn(("wipefs", "-af", self.md["data"]), argvs)
        for array in self.md.values():
            self.assertNotIn(("mdadm", "--stop", array), argvs)
        touched = [argv for argv in argvs if argv[0] in ("mdadm", "wipefs", "sgdisk", "parted")
                   and any(a.startswith((self.dev("vda"), self.dev("vdb"))) for a in argv)]
        self.assertEqual(touched, [])
        self.assertEqual(self.wiped, [self.dev("vdc")])    # the stray array's holder only
        self.assertNotIn(self.dev("vdc"), self.machine.superblocks)
        self.assertEqual(len(self.machine.parts[self.dev("vda")]), 2)

    def test_create_reuses_kept_volumes_and_builds_the_rest_elsewhere(self) -> None:
        self.result(self.manager().delete_configuration(protect({"volume_name": "data"}), []))
        new = {"size_gb": "MAX", "raid_level": "1", "controller": "software",
               "volume_name": "new"}
        target = protect({"volume_name": "data"},
                         raid=(DATA_ON_V1_V2, SCRATCH_ON_V1_V2, new))
        # three logical disks are one too many for validation: drop the second
        target["target_raid_config"]["logical_disks"] = [DATA_ON_V1_V2, new]
        error = self.failure(self.manager().create_configuration(target, []))
        self.assertIn(f"{self.md['scratch']} (scratch) share holder disks", error)
        target["target_raid_config"]["logical_disks"] = [DATA_ON_V1_V2, SCRATCH_ON_V1_V2]
        manager = self.manager()
        self.assertEqual(self.result(manager.create_configuration(target, [])),
                         target["target_raid_config"])
        self.assertEqual(self.creates(), [])
        self.assertEqual([a for a in self.runner.argvs if a[0] == "parted" and "--" in a], [])

    def test_create_never_partitions_a_protected_disk(self) -> None:
        self.result(self.manager().delete_configuration(node(), []))
        self.assertEqual(self.machine.arrays, {})
        manager = self.manager()
        self.result(manager.create_configuration(protect({"serial": "V3"}, raid=(RAID1_MAX,)),
                                                 []))
        self.assertEqual(self.parted("vdc"), [])
        [array] = self.machine.arrays.values()
        self.assertEqual(array.members, [self.dev("vda1"), self.dev("vdb1"), self.dev("vdd1")])

    def test_physical_disk_hint_on_a_protected_disk(self) -> None:
        self.result(self.manager().delete_configuration(node(), []))
        error = self.failure(self.manager().create_configuration(
            protect({"name": "vdb"}, raid=(DATA_ON_V1_V2,)), []))
        self.assertIn("No candidates for physical disk {'serial': 'V2'}", error)
        self.assertIn(f"{self.dev('vdb')} matches but cannot be used: protected by "
                      "skip_block_devices: skip_block_devices entry {'name': 'vdb'} matches it",
                      error)
        self.assertEqual(self.creates(), [])

    def test_invalid_skip_list(self) -> None:
        for step in ("create_configuration", "delete_configuration"):
            manager = self.manager()
            error = self.failure(getattr(manager, step)(
                protect({"size": "big"}, raid=(RAID1_MAX,)), []))
            self.assertIn("Invalid skip_block_devices in the node's properties: "
                          "skip_block_devices entry 1", error)
            self.assertEqual([a for a in self.runner.argvs
                              if a[:2] in (("mdadm", "--stop"), ("mdadm", "--create"))], [])

    def test_metadata_erase_spares_the_protected_array(self) -> None:
        manager = self.manager()
        self.result(manager.erase_devices_metadata(protect({"volume_name": "data"}), []))
        wiped = {argv[-1] for argv in self.runner.argvs if argv[0] == "wipefs"}
        self.assertNotIn(self.md["data"], wiped)
        self.assertFalse(wiped & {self.dev(n) for n in ("vda", "vda1", "vda2", "vdb",
                                                         "vdb1", "vdb2")}, wiped)
        self.assertIn(self.md["scratch"], wiped)       # its contents, not the holders' table
        self.assertIn(self.dev("vdc"), wiped)
        self.assertEqual(len(self.machine.parts[self.dev("vdb")]), 2)

    def test_install_device_is_never_a_protected_volume(self) -> None:
        manager = self.manager()
        failure = self.failureResultOf(Deferred.fromCoroutine(manager.get_os_install_device(
            node=protect({"volume_name": "data"}, raid=(DATA_ON_V1_V2,)))), DeviceNotFound)
        self.assertIn(f"The software RAID device {self.md['data']} of the node's RAID "
                      "configuration is protected by skip_block_devices", str(failure.value))
        self.assertEqual(self.result(manager.get_os_install_device(
            node=protect({"volume_name": "scratch"}, raid=(DATA_ON_V1_V2,)))),
            self.md["data"])
