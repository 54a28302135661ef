"""Tests for root device hints and the choice of the install device."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.errors import DeviceNotFound
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.context import HardwareContext
from ipa_twisted.hardware.inventory import BlockDevice
from ipa_twisted.hardware.root_device import (GiB, RootDeviceHintError, find_devices_by_hints,
                                              guess_root_disk, match_root_device_hints,
                                              parse_root_device_hints,
                                              root_device_hints_from_node, skip_list_from_node,
                                              skipped_devices)
from ipa_twisted.testing.fake_system import lsblk_row as _lsblk
from ipa_twisted.testing.fake_process import FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem


def disk(name: str, size_gib: float, **fields: Any) -> BlockDevice:
    values: dict[str, Any] = {"model": None, "rotational": False}
    values.update(fields)
    return BlockDevice(name=f"/dev/{name}", size=int(size_gib * GiB), **values)


SDA = disk("sda", 100, model="Samsung SSD 860", wwn="0x5002538e4098d1a3", serial="S3Z9NB0K",
           vendor="ATA", hctl="0:0:0:0", by_path="/dev/disk/by-path/pci-0000:00:1f.2-ata-1",
           wwn_with_extension="0x5002538e4098d1a3", wwn_vendor_extension="0x0001",
           tran="sata")
SDB = disk("sdb", 500, model="ST500DM002", wwn="0x5000c5009e9a3f11", serial="Z3T1",
           vendor="SEAGATE", rotational=True, hctl="1:0:0:0", tran="sas")
NVME = disk("nvme0n1", 10, model="Samsung SSD 970 EVO", serial="S4EWNX0N", tran="nvme")
DEVICES = [SDA, SDB, NVME]


class ParseTests(SynchronousTestCase):
    def test_defaults_and_normal_form(self) -> None:
        self.assertEqual(parse_root_device_hints({
            "model": "Samsung SSD 860", "size": 100, "rotational": "yes", "name": "sda",
            "by_path": "disk/by-path/pci-0000:00:1f.2-ata-1", "serial": " S3Z9 ",
        }), {
            "model": "s== samsung%20ssd%20860", "size": "== 100", "rotational": True,
            "name": "s== /dev/sda", "by_path": "s== /dev/disk/by-path/pci-0000%3A00%3A1f.2-ata-1",
            "serial": "s== s3z9",
        })

    def test_every_operator(self) -> None:
        for op in ("s==", "s!=", "s>=", "s<=", "s>", "s<", "<in>"):
            self.assertEqual(parse_root_device_hints({"model": f"{op} Foo"}),
                             {"model": f"{op} foo"})
        for op in ("==", "!=", ">=", "<=", ">", "<"):
            self.assertEqual(parse_root_device_hints({"size": f"{op} 10"}),
                             {"size": f"{op} 10"})
        self.assertEqual(parse_root_device_hints({"model": "<or> A b <or> C"}),
                         {"model": "<or> a%20b <or> c"})
        self.assertEqual(parse_root_device_hints({"size": "<or> 10 <or> 20"}),
                         {"size": "<or> 10 <or> 20"})
        self.assertEqual(parse_root_device_hints({"size": ">=100"}), {"size": ">= 100"})

    def test_normal_form_parses_to_itself(self) -> None:
        parsed = parse_root_device_hints({"model": "<in> Samsung SSD", "size": 10,
                                          "name": "<or> sda <or> /dev/vda",
                                          "rotational": False})
        self.assertEqual(parse_root_device_hints(parsed), parsed)

    def test_name_without_dev_but_not_for_substrings(self) -> None:
        self.assertEqual(parse_root_device_hints({"name": "<or> sda <or> /dev/vda"}),
                         {"name": "<or> /dev/sda <or> /dev/vda"})
        self.assertEqual(parse_root_device_hints({"name": "<in> nvme"}),
                         {"name": "<in> nvme"})

    def test_rotational_spellings(self) -> None:
        for value, expected in [(True, True), (False, False), ("true", True), ("0", False),
                                ("No", False), ("on", True), (1, True)]:
            self.assertEqual(parse_root_device_hints({"rotational": value}),
                             {"rotational": expected})

    def test_empty(self) -> None:
        self.assertEqual(parse_root_device_hints(None), {})
        self.assertEqual(parse_root_device_hints({}), {})

    def test_bad_hints(self) -> None:
        cases: list[tuple[Any, str]] = [
            ({"colour": "red"}, 'The hints "colour" are invalid'),
            ({"size": "big"}, 'hint "size" is not an integer'),
            ({"size": 0}, "should be a positive integer"),
            ({"size": "-3"}, "should be a positive integer"),
            ({"size": 10.5}, 'hint "size" is not an integer'),
            ({"size": True}, 'hint "size" is not an integer'),
            ({"size": "s== 10"}, "Operator s== is not valid for the numeric"),
            ({"model": ">= 5"}, "Operator >= is not valid for the string"),
            ({"model": 42}, 'hint "model" is not a string'),
            ({"model": "   "}, "expression is empty"),
            ({"model": "s=="}, "has the operator s== but no value"),
            ({"model": "<or>"}, "has the operator <or> but no value"),
            ({"rotational": "maybe"}, "is not a Boolean value"),
            ({"rotational": None}, "is not a Boolean value"),
            (["size"], "must be an object"),
        ]
        for hints, message in cases:
            with self.assertRaises(RootDeviceHintError, msg=repr(hints)) as caught:
                parse_root_device_hints(hints)
            self.assertIn(message, str(caught.exception))
            self.assertIsInstance(caught.exception, ValueError)


class MatchTests(SynchronousTestCase):
    def names(self, hints: dict[str, Any], devices: list[Any] = DEVICES,
              dev_path: str = "/dev") -> list[str]:
        return [str(d.name if isinstance(d, BlockDevice) else d["name"])
                for d in find_devices_by_hints(devices, hints, dev_path=dev_path)]

    def test_string_operators(self) -> None:
        self.assertEqual(self.names({"model": "samsung ssd 860"}), ["/dev/sda"])
        self.assertEqual(self.names({"model": "s== SAMSUNG SSD 860"}), ["/dev/sda"])
        self.assertEqual(self.names({"model": "s!= samsung ssd 860"}),
                         ["/dev/sdb", "/dev/nvme0n1"])
        self.assertEqual(self.names({"vendor": "s>= SEAGATE"}), ["/dev/sdb"])
        self.assertEqual(self.names({"vendor": "s> ata"}), ["/dev/sdb"])
        self.assertEqual(self.names({"vendor": "s<= ata"}), ["/dev/sda"])
        self.assertEqual(self.names({"vendor": "s< seagate"}), ["/dev/sda"])
        self.assertEqual(self.names({"model": "<in> Samsung SSD"}),
                         ["/dev/sda", "/dev/nvme0n1"])
        self.assertEqual(self.names({"serial": "<or> Z3T1 <or> S4EWNX0N"}),
                         ["/dev/sdb", "/dev/nvme0n1"])

    def test_size_in_gib(self) -> None:
        self.assertEqual(self.names({"size": 100}), ["/dev/sda"])
        self.assertEqual(self.names({"size": "100"}), ["/dev/sda"])
        self.assertEqual(self.names({"size": "== 10"}), ["/dev/nvme0n1"])
        self.assertEqual(self.names({"size": "!= 10"}), ["/dev/sda", "/dev/sdb"])
        self.assertEqual(self.names({"size": ">= 100"}), ["/dev/sda", "/dev/sdb"])
        self.assertEqual(self.names({"size": "> 100"}), ["/dev/sdb"])
        self.assertEqual(self.names({"size": "<= 100"}), ["/dev/sda", "/dev/nvme0n1"])
        self.assertEqual(self.names({"size": "< 100"}), ["/dev/nvme0n1"])
        self.assertEqual(self.names({"size": "<or> 10 <or> 500"}),
                         ["/dev/sdb", "/dev/nvme0n1"])
        # 10.5 GiB is not 10 GiB: sizes are compared exactly, as the reference does
        self.assertEqual(self.names({"size": 10}, [disk("vda", 10.5)]), [])
        self.assertEqual(self.names({"size": "> 10"}, [disk("vda", 10.5)]), ["/dev/vda"])

    def test_name_and_by_path(self) -> None:
        self.assertEqual(self.names({"name": "sdb"}), ["/dev/sdb"])
        self.assertEqual(self.names({"name": "/dev/sdb"}), ["/dev/sdb"])
        self.assertEqual(self.names({"name": "<in> nvme"}), ["/dev/nvme0n1"])
        self.assertEqual(self.names({"by_path": "/dev/disk/by-path/pci-0000:00:1f.2-ata-1"}),
                         ["/dev/sda"])

    def test_name_under_another_dev_path(self) -> None:
        devices = [BlockDevice(name="/tmp/x/dev/loop7", model=None, size=GiB,
                               rotational=False,
                               by_path="/tmp/x/dev/disk/by-path/platform-loop7")]
        self.assertEqual(self.names({"name": "loop7"}, devices, dev_path="/tmp/x/dev/"),
                         ["/tmp/x/dev/loop7"])
        self.assertEqual(self.names({"by_path": "disk/by-path/platform-loop7"}, devices,
                                    dev_path="/tmp/x/dev"), ["/tmp/x/dev/loop7"])
        self.assertEqual(self.names({"name": "loop7"}, devices), [])

    def test_identifiers(self) -> None:
        self.assertEqual(self.names({"wwn": "0x5000C5009E9A3F11"}), ["/dev/sdb"])
        self.assertEqual(self.names({"serial": "s3z9nb0k"}), ["/dev/sda"])
        self.assertEqual(self.names({"wwn_with_extension": "0x5002538e4098d1a3",
                                     "wwn_vendor_extension": "0x0001"}), ["/dev/sda"])
        self.assertEqual(self.names({"hctl": "1:0:0:0"}), ["/dev/sdb"])
        self.assertEqual(self.names({"tran": "<or> sas <or> nvme"}),
                         ["/dev/sdb", "/dev/nvme0n1"])

    def test_rotational(self) -> None:
        self.assertEqual(self.names({"rotational": True}), ["/dev/sdb"])
        self.assertEqual(self.names({"rotational": "false"}), ["/dev/sda", "/dev/nvme0n1"])
        dicts = [{"name": "/dev/a", "rotational": "1"}, {"name": "/dev/b", "rotational": "0"},
                 {"name": "/dev/c"}]
        self.assertEqual(self.names({"rotational": "yes"}, dicts), ["/dev/a"])

    def test_all_hints_must_match(self) -> None:
        self.assertEqual(self.names({"model": "<in> samsung", "size": "< 50"}),
                         ["/dev/nvme0n1"])
        self.assertEqual(self.names({"model": "<in> samsung", "rotational": True}), [])

    def test_missing_attributes_do_not_match(self) -> None:
        self.assertEqual(self.names({"wwn": "s!= x"}), ["/dev/sda", "/dev/sdb"])
        self.assertEqual(self.names({"serial": "x"}, [{"name": "/dev/a", "serial": ""}]), [])

    def test_match_root_device_hints(self) -> None:
        self.assertIs(match_root_device_hints(DEVICES, {"size": ">= 100"}), SDA)
        self.assertIsNone(match_root_device_hints(DEVICES, {"size": "> 1000"}))
        self.assertRaises(RootDeviceHintError, match_root_device_hints, DEVICES,
                          {"bogus": 1})

    def test_hints_from_node(self) -> None:
        self.assertIsNone(root_device_hints_from_node(None))
        self.assertEqual(root_device_hints_from_node(
            {"properties": {"root_device": {"name": "sda"}}}), {"name": "sda"})
        self.assertEqual(root_device_hints_from_node(
            {"instance_info": {"root_device": {"size": 5}},
             "properties": {"root_device": {"name": "sda"}}}), {"size": 5})

    def test_skip_list(self) -> None:
        node = {"properties": {"skip_block_devices": [{"name": "sda"},
                                                      {"volume_name": "large"}]}}
        skip = skip_list_from_node(node)
        self.assertEqual((skip.device_hints, skip.volume_names), (({"name": "sda"},),
                                                                  ("large",)))
        self.assertFalse(skip_list_from_node({}))
        self.assertFalse(skip_list_from_node({"properties": {"skip_block_devices": None}}))


class SkipListTests(SynchronousTestCase):
    """``skip_block_devices``: which entry matches which disk, and invalid entries."""

    def skipped(self, *entries: Any) -> dict[str, str]:
        return skipped_devices(DEVICES, {"properties": {"skip_block_devices": list(entries)}})

    def test_each_hint_kind_matches_and_says_which_entry(self) -> None:
        cases: list[tuple[dict[str, Any], set[str]]] = [
            ({"name": "/dev/sdb"}, {"/dev/sdb"}),
            ({"name": "sdb"}, {"/dev/sdb"}),
            ({"serial": "S3Z9NB0K"}, {"/dev/sda"}),
            ({"wwn": "0x5000C5009E9A3F11"}, {"/dev/sdb"}),
            ({"wwn_with_extension": "0x5002538e4098d1a3"}, {"/dev/sda"}),
            ({"wwn_vendor_extension": "0x0001"}, {"/dev/sda"}),
            ({"vendor": "seagate"}, {"/dev/sdb"}),
            ({"model": "<in> samsung"}, {"/dev/sda", "/dev/nvme0n1"}),
            ({"model": "<or> ST500DM002 <or> nothing"}, {"/dev/sdb"}),
            ({"size": ">= 100"}, {"/dev/sda", "/dev/sdb"}),
            ({"size": 10}, {"/dev/nvme0n1"}),
            ({"rotational": True}, {"/dev/sdb"}),
            ({"rotational": "false"}, {"/dev/sda", "/dev/nvme0n1"}),
            ({"hctl": "1:0:0:0"}, {"/dev/sdb"}),
            ({"by_path": "/dev/disk/by-path/pci-0000:00:1f.2-ata-1"}, {"/dev/sda"}),
            ({"tran": "nvme"}, {"/dev/nvme0n1"}),
            ({"serial": "S3Z9NB0K", "size": 500}, set()),      # every hint must hold
            ({"serial": "nothing-like-it"}, set()),
        ]
        for entry, expected in cases:
            skipped = self.skipped(entry)
            self.assertEqual(set(skipped), expected, entry)
            for reason in skipped.values():
                self.assertEqual(reason, f"skip_block_devices entry {entry} matches it")

    def test_first_matching_entry_is_the_reason(self) -> None:
        skipped = self.skipped({"serial": "Z3T1"}, {"rotational": True})
        self.assertEqual(skipped, {"/dev/sdb": "skip_block_devices entry {'serial': 'Z3T1'} "
                                               "matches it"})

    def test_volume_names_match_no_disk(self) -> None:
        self.assertEqual(self.skipped({"volume_name": "data"}), {})
        skip = skip_list_from_node({"properties": {"skip_block_devices": [
            {"volume_name": " data "}, {"volume_name": "data"}, {"volume_name": "db"}]}})
        self.assertEqual(skip.volume_names, ("data", "db"))
        self.assertTrue(skip)

    def test_dev_path(self) -> None:
        devices = [BlockDevice(name="/tmp/sandbox/dev/sdb", size=10 * GiB, model=None,
                               rotational=False)]
        skipped = skipped_devices(devices, {"properties": {"skip_block_devices": [
            {"name": "/dev/sdb"}]}}, dev_path="/tmp/sandbox/dev")
        self.assertEqual(list(skipped), ["/tmp/sandbox/dev/sdb"])

    def test_invalid_entries_say_which_and_why(self) -> None:
        cases: list[tuple[Any, str]] = [
            ("sdb", "skip_block_devices must be a list of objects"),
            ({"name": "sdb"}, "skip_block_devices must be a list of objects"),
            (["sdb"], "entry 1 ('sdb') must be a non-empty object"),
            ([{"name": "sda"}, {}], "entry 2 ({}) must be a non-empty object"),
            ([{"color": "red"}], 'entry 1 ({\'color\': \'red\'}) is invalid: The hints '
                                 '"color" are invalid'),
            ([{"size": "huge"}], 'is not an integer value'),
            ([{"size": -1}], "should be a positive integer"),
            ([{"name": 7}], "is not a string value"),
            ([{"rotational": "maybe"}], "is not a Boolean value"),
            ([{"model": "<in>"}], "has the operator <in> but no value"),
            ([{"size": "s== 10"}], "Operator s== is not valid for the numeric"),
            ([{"volume_name": ""}], "volume_name must be a non-empty string"),
            ([{"volume_name": 3}], "volume_name must be a non-empty string"),
            ([{"volume_name": "data", "name": "sdb"}],
             "names a RAID volume (volume_name) and device hints at once"),
        ]
        for value, message in cases:
            with self.assertRaises(RootDeviceHintError, msg=repr(value)) as caught:
                skip_list_from_node({"properties": {"skip_block_devices": value}})
            self.assertIn(message, str(caught.exception), repr(value))


class GuessTests(SynchronousTestCase):
    def test_smallest_of_at_least_4_gib(self) -> None:
        small = disk("sdc", 3.9)
        self.assertIs(guess_root_disk([SDB, small, SDA, NVME]), NVME)
        self.assertIs(guess_root_disk([SDB, SDA], min_size=200 * GiB), SDB)

    def test_ties_by_name(self) -> None:
        self.assertEqual(guess_root_disk([disk("sdb", 8), disk("sda", 8)]).name, "/dev/sda")

    def test_none_big_enough(self) -> None:
        for devices in ([disk("sda", 1)], []):
            with self.assertRaises(DeviceNotFound) as caught:
                guess_root_disk(devices)
            self.assertIn("all found block devices are smaller than 4294967296B",
                          str(caught.exception))




LSBLK = json.dumps({"blockdevices": [
    _lsblk("loop0", 20 * GiB, "loop"),
    _lsblk("sda", 2 * GiB, "disk", model="USB stick"),
    _lsblk("sdb", 64 * GiB, "disk", model="Virtual Media", serial="VM1"),
    _lsblk("sdc", 500 * GiB, "disk", model="Big disk", serial="BIG1", children=[
        _lsblk("sdc1", 100 * GiB, "part")]),
    _lsblk("sdd", 0, "disk"),
    _lsblk("sr0", 8 * GiB, "rom"),
    _lsblk("fd0", 8 * GiB, "disk"),
    _lsblk("ram0", 8 * GiB, "disk"),
    _lsblk("zram0", 8 * GiB, "disk"),
    _lsblk("md0", 200 * GiB, "raid1"),
    _lsblk("nvme0n1", 250 * GiB, "disk", model="Fast disk", serial="NV1"),
]}).encode()


class InstallDeviceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        for name in ("sda", "sdb", "sdc", "nvme0n1", "md0", "loop0"):
            self.system.add_block_device(name)
            self.system.write(f"sys/class/block/{name}/ro", "0\n")
        self.system.write("sys/class/block/sdb/ro", "1\n")      # read-only virtual media
        self.dev = self.system.dev_path

    def install_device(self, node: Any = None, **config: Any) -> Deferred[str]:
        runner = FakeRunner({("lsblk", "-bia", "--json"): LSBLK})
        manager = GenericHardwareManager(udev=lambda name: {})
        manager.bind(HardwareContext(self.system.config(**config), runner, Clock(), None))
        return Deferred.fromCoroutine(manager.get_os_install_device(node=node))

    def test_guess_skips_ro_rom_floppy_ram_empty_and_loop(self) -> None:
        # sdb (64 GiB) is read-only; md0 (200 GiB) counts; nvme0n1 (250) and sdc (500)
        self.assertEqual(self.successResultOf(self.install_device()), f"{self.dev}/md0")

    def test_loop_devices_only_when_configured(self) -> None:
        self.assertEqual(self.successResultOf(self.install_device(include_loop_devices=True)),
                         f"{self.dev}/loop0")

    def test_hints_choose(self) -> None:
        node = {"properties": {"root_device": {"serial": "BIG1"}}, "instance_info": {}}
        self.assertEqual(self.successResultOf(self.install_device(node)), f"{self.dev}/sdc")
        node = {"properties": {"root_device": {"name": "nvme0n1"}}}
        self.assertEqual(self.successResultOf(self.install_device(node)),
                         f"{self.dev}/nvme0n1")

    def test_hints_never_choose_excluded_devices(self) -> None:
        for hints in ({"serial": "VM1"}, {"name": "sr0"}, {"name": "fd0"}, {"name": "sdd"},
                      {"name": "loop0"}, {"name": "sdc1"}, {"name": "zram0"}):
            failure = self.failureResultOf(self.install_device(
                {"properties": {"root_device": hints}}), DeviceNotFound)
            self.assertIn("No suitable device was found for deployment using these hints",
                          str(failure.value))

    def test_bad_hints(self) -> None:
        failure = self.failureResultOf(self.install_device(
            {"properties": {"root_device": {"size": "huge"}}}), DeviceNotFound)
        self.assertIn("failed to validate", str(failure.value))

    def test_cached_node(self) -> None:
        runner = FakeRunner({("lsblk", "-bia", "--json"): LSBLK})
        manager = GenericHardwareManager(udev=lambda name: {})
        manager.bind(HardwareContext(self.system.config(), runner, Clock(), None))
        manager.cache_node({"properties": {"root_device": {"model": "<in> fast"}}})
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(
            manager.get_os_install_device())), f"{self.dev}/nvme0n1")

    def test_skip_block_devices(self) -> None:
        node: dict[str, dict[str, Any]] = {
            "properties": {"skip_block_devices": [{"name": "md0"}, {"serial": "NV1"}]}}
        self.assertEqual(self.successResultOf(self.install_device(node)), f"{self.dev}/sdc")
        node["properties"]["root_device"] = {"name": "md0"}
        failure = self.failureResultOf(self.install_device(node), DeviceNotFound)
        self.assertIn(f"{{'name': 'md0'}}; {self.dev}/md0 matches them but is protected by "
                      "skip_block_devices (skip_block_devices entry {'name': 'md0'} matches "
                      "it)", str(failure.value))

    def test_skipped_disks_are_logged_with_their_entry(self) -> None:
        node = {"properties": {"skip_block_devices": [{"serial": "BIG1"}]}}
        with capturedLogs() as events:
            self.assertEqual(self.successResultOf(self.install_device(node)), f"{self.dev}/md0")
            node["properties"]["root_device"] = {"size": ">= 400"}
            self.failureResultOf(self.install_device(node), DeviceNotFound)
        self.assertEqual([(e["device"], e["reason"]) for e in events
                          if "Not installing on" in e["log_format"]],
                         [(f"{self.dev}/sdc", "skip_block_devices entry {'serial': 'BIG1'} "
                                              "matches it")] * 2)

    def test_invalid_skip_list(self) -> None:
        failure = self.failureResultOf(self.install_device(
            {"properties": {"skip_block_devices": [{"name": "sdc"}, {"size": "0"}]}}),
            DeviceNotFound)
        self.assertIn("No install device was chosen: the node's skip_block_devices is "
                      "invalid: skip_block_devices entry 2 ({'size': '0'}) is invalid: ",
                      str(failure.value))
        self.assertIn("should be a positive integer", str(failure.value))

    def test_nothing_suitable(self) -> None:
        self.system.write("sys/class/block/md0/ro", "1\n")
        node = {"properties": {"skip_block_devices": [{"size": ">= 100"}]}}
        failure = self.failureResultOf(self.install_device(node), DeviceNotFound)
        self.assertIn("smaller than 4294967296B", str(failure.value))
