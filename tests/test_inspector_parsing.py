"""Tests for the inspector's pure parts: dmidecode, sysfs PCI, USB and NUMA, inventory
fixes."""

from __future__ import annotations

import os

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.errors import IncompatibleNumaFormatError
from ipa_twisted.hardware.inventory import BlockDevice, NetworkInterface
from ipa_twisted.inspector import dmi, enrich, sysfs
from ipa_twisted.testing.fake_system import FakeSystem

# Recorded from a Dell PowerEdge R640 (dmidecode 3.3), trimmed to two DIMMs.
DMIDECODE = """\
# dmidecode 3.3
Getting SMBIOS data from sysfs.
SMBIOS 3.2 present.

Handle 0x0000, DMI type 0, 26 bytes
BIOS Information
\tVendor: Dell Inc.
\tVersion: 2.10.0
\tRelease Date: 01/15/2021
\tAddress: 0xF0000
\tRuntime Size: 64 kB
\tROM Size: 32 MB
\tCharacteristics:
\t\tISA is supported
\t\tPCI is supported
\t\tBIOS is upgradeable
\tBIOS Revision: 2.10

Handle 0x0400, DMI type 4, 48 bytes
Processor Information
\tSocket Designation: CPU1
\tType: Central Processor
\tFamily: Xeon
\tManufacturer: Intel
\tID: 54 06 05 00 FF FB EB BF
\tSignature: Type 0, Family 6, Model 85, Stepping 4
\tFlags:
\t\tFPU (Floating-point unit on-chip)
\t\tVME (Virtual mode extension)
\tVersion: Intel(R) Xeon(R) Silver 4110 CPU @ 2.10GHz
\tMax Speed: 4000 MHz
\tCurrent Speed: 2100 MHz
\tCore Count: 8
\tThread Count: 16
\tCharacteristics:
\t\t64-bit capable
\t\tMulti-Core

Handle 0x0401, DMI type 4, 48 bytes
Processor Information
\tSocket Designation: CPU2
\tVersion: Intel(R) Xeon(R) Silver 4110 CPU @ 2.10GHz
\tCore Count: 8

Handle 0x1000, DMI type 16, 23 bytes
Physical Memory Array
\tLocation: System Board Or Motherboard
\tUse: System Memory
\tError Correction Type: Multi-bit ECC
\tMaximum Capacity: 1536 GB
\tError Information Handle: Not Provided
\tNumber Of Devices: 12

Handle 0x1001, DMI type 16, 23 bytes
Physical Memory Array
\tLocation: System Board Or Motherboard
\tMaximum Capacity: 1536 GB
\tNumber Of Devices: 12

Handle 0x1100, DMI type 17, 84 bytes
Memory Device
\tArray Handle: 0x1000
\tSize: 16 GB
\tForm Factor: DIMM
\tLocator: A1
\tType: DDR4
\tSpeed: 2666 MT/s
\tManufacturer: 00AD00B300AD
\tSerial Number: 12345678

Handle 0x1101, DMI type 17, 84 bytes
Memory Device
\tArray Handle: 0x1000
\tSize: No Module Installed
\tLocator: A2

Handle 0x1300, DMI type 19, 31 bytes
Memory Array Mapped Address
\tStarting Address: 0x00000000000
\tRange Size: 16 GB

Handle 0xBAD, DMI type x, 1 bytes
Broken record
\tKey: value
"""


class ParseDMITests(SynchronousTestCase):
    def test_bios_cpus_memory(self) -> None:
        with capturedLogs() as events:
            parsed = dmi.parse_dmi(DMIDECODE)
        self.assertEqual(set(parsed), {"bios", "cpu", "memory"})
        self.assertEqual(parsed["bios"]["Vendor"], "Dell Inc.")
        self.assertEqual(parsed["bios"]["Characteristics"],
                         ["ISA is supported", "PCI is supported", "BIOS is upgradeable"])
        self.assertEqual(parsed["bios"]["BIOS Revision"], "2.10")
        self.assertEqual(parsed["bios"]["Handle"], "Handle 0x0000, DMI type 0, 26 bytes")
        self.assertEqual([c["Socket Designation"] for c in parsed["cpu"]], ["CPU1", "CPU2"])
        self.assertEqual(parsed["cpu"][0]["Flags"], ["FPU (Floating-point unit on-chip)",
                                                     "VME (Virtual mode extension)"])
        self.assertEqual(parsed["cpu"][0]["Characteristics"], ["64-bit capable", "Multi-Core"])
        self.assertEqual(parsed["cpu"][0]["Max Speed"], "4000 MHz")
        memory = parsed["memory"]
        self.assertEqual(memory["Number Of Devices"], 24)
        self.assertEqual(memory["Maximum Capacity"], "1536 GB")
        self.assertNotIn("Handle", memory)
        self.assertEqual([d["Locator"] for d in memory["devices"]], ["A1", "A2"])
        self.assertEqual(memory["devices"][0]["Size"], "16 GB")
        self.assertTrue(any("unreadable handle" in e["log_format"] for e in events))

    def test_nothing_known(self) -> None:
        self.assertEqual(dmi.parse_dmi("# dmidecode 3.4\n# No SMBIOS nor DMI entry point "
                                       "found, sorry.\n"),
                         {"bios": {}, "cpu": [], "memory": {"devices": []}})

    def test_devices_without_an_array(self) -> None:
        text = "Handle 0x1100, DMI type 17, 84 bytes\nMemory Device\n\tSize: 8 GB\n"
        self.assertEqual(dmi.parse_dmi(text)["memory"],
                         {"devices": [{"Handle": "Handle 0x1100, DMI type 17, 84 bytes",
                                       "Size": "8 GB"}]})

    def test_list_items_with_colons_stay_items(self) -> None:
        text = ("Handle 0x0000, DMI type 0, 24 bytes\nBIOS Information\n"
                "\tCharacteristics:\n\t\tBoot from CD: supported\n\tVersion: 1\n")
        self.assertEqual(dmi.parse_dmi(text)["bios"]["Characteristics"],
                         ["Boot from CD: supported"])
        self.assertEqual(dmi.parse_dmi(text)["bios"]["Version"], "1")


def add_pci_device(system: FakeSystem, address: str, vendor: str, device: str,
                   pci_class: str = "0x020000", revision: str | None = "0x01",
                   numa_node: str | None = "0") -> None:
    """A PCI function in sys/devices and its sys/bus/pci/devices link, as the kernel has."""
    base = f"sys/devices/pci0000:00/{address}"
    for name, value in (("vendor", vendor), ("device", device), ("class", pci_class),
                        ("revision", revision), ("numa_node", numa_node)):
        if value is not None:
            system.write(f"{base}/{name}", value + "\n")
    link = system.path(f"sys/bus/pci/devices/{address}")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if not os.path.lexists(link):
        os.symlink(os.path.relpath(system.path(base), os.path.dirname(link)), link)


class PCITests(SynchronousTestCase):
    def test_devices(self) -> None:
        system = FakeSystem(self.mktemp())
        add_pci_device(system, "0000:3b:00.0", "0x8086", "0x1572", numa_node="0")
        add_pci_device(system, "0000:00:1f.2", "0x8086", "0xa182", "0x010601",
                       revision=None, numa_node=None)
        add_pci_device(system, "0000:00:00.0", "0x8086", "garbage")
        system.write("sys/bus/pci/devices/stray-file", "")
        with capturedLogs() as events:
            devices = sysfs.list_pci_devices(system.sys_path)
        self.assertEqual(devices, [
            {"vendor_id": "8086", "product_id": "a182", "class": "010601", "revision": None,
             "bus": "0000:00:1f.2", "numa_node_id": None},
            {"vendor_id": "8086", "product_id": "1572", "class": "020000", "revision": "01",
             "bus": "0000:3b:00.0", "numa_node_id": "0"},
        ])
        self.assertEqual([e["address"] for e in events if "Skipping" in e["log_format"]],
                         ["0000:00:00.0"])

    def test_no_pci_bus(self) -> None:
        system = FakeSystem(self.mktemp())
        self.assertRaises(OSError, sysfs.list_pci_devices, system.sys_path)


def add_usb_device(system: FakeSystem, name: str, bus: int | None, number: int | None,
                   vendor_id: str, product_id: str, device_class: str = "00",
                   manufacturer: str | None = None, product: str | None = None) -> None:
    """A USB device (or hub: class ``09``) under its controller in sys/devices, with its
    first interface and their sys/bus/usb/devices links, as the kernel lays them out."""
    parent = name.rpartition(".")[0] if "." in name else f"usb{name.partition('-')[0]}"
    controller = "sys/devices/pci0000:00/0000:00:14.0"
    base = f"{controller}/{parent}/{name}" if not name.startswith("usb") \
        else f"{controller}/{name}"
    for key, value in (("busnum", bus), ("devnum", number), ("idVendor", vendor_id),
                       ("idProduct", product_id), ("bDeviceClass", device_class),
                       ("manufacturer", manufacturer), ("product", product)):
        if value is not None:
            system.write(f"{base}/{key}", f"{value}\n")
    interface = f"{name}:1.0" if not name.startswith("usb") else f"{name[3:]}-0:1.0"
    system.write(f"{base}/{interface}/bInterfaceClass", "09\n" if device_class == "09"
                 else "03\n")
    links = system.path("sys/bus/usb/devices")
    os.makedirs(links, exist_ok=True)
    for entry, target in ((name, base), (interface, f"{base}/{interface}")):
        link = os.path.join(links, entry)
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(system.path(target), links), link)


def usb_machine(system: FakeSystem) -> None:
    """Two buses: root hubs, an external hub with a keyboard behind it, a BMC's virtual
    media, and a device without strings."""
    add_usb_device(system, "usb1", 1, 1, "1d6b", "0002", "09", "Linux 6.1 xhci-hcd",
                   "xHCI Host Controller")
    add_usb_device(system, "usb2", 2, 1, "1d6b", "0003", "09")
    add_usb_device(system, "1-4", 1, 3, "046b", "ff01", "00", "American Megatrends Inc.",
                   "Virtual Hub")
    add_usb_device(system, "1-1", 1, 2, "0424", "2514", "09", None, None)
    add_usb_device(system, "1-1.2", 1, 5, "413c", "2113", "00", "Dell Computer Corp.",
                   "Dell KB216 Wired Keyboard")
    add_usb_device(system, "2-3", 2, 2, "0781", "5583")


class USBTests(SynchronousTestCase):
    def test_devices_without_hubs_by_bus_and_number(self) -> None:
        system = FakeSystem(self.mktemp())
        usb_machine(system)
        self.assertEqual(sysfs.list_usb_devices(system.sys_path), [
            {"product": "Virtual Hub", "vendor": "American Megatrends Inc.",
             "handle": "USB:1:3", "vendor_id": "046b", "product_id": "ff01"},
            {"product": "Dell KB216 Wired Keyboard", "vendor": "Dell Computer Corp.",
             "handle": "USB:1:5", "vendor_id": "413c", "product_id": "2113"},
            {"product": "", "vendor": "", "handle": "USB:2:2", "vendor_id": "0781",
             "product_id": "5583"},
        ])

    def test_a_device_without_numbers_is_skipped(self) -> None:
        system = FakeSystem(self.mktemp())
        add_usb_device(system, "1-2", None, 4, "0781", "5583")
        add_usb_device(system, "1-3", 1, 6, "0781", "5584")
        system.write("sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/busnum", "x\n")
        with capturedLogs() as events:
            devices = sysfs.list_usb_devices(system.sys_path)
        self.assertEqual([d["handle"] for d in devices], ["USB:1:6"])
        self.assertEqual([e["name"] for e in events if "Skipping" in e["log_format"]],
                         ["1-2"])

    def test_no_usb_is_an_empty_list(self) -> None:
        self.assertEqual(sysfs.list_usb_devices(FakeSystem(self.mktemp()).sys_path), [])


def add_numa_node(system: FakeSystem, node: int, memory: str,
                  threads: dict[int, tuple[int, int]]) -> None:
    """``threads``: thread id -> (package, core)."""
    base = f"sys/devices/system/node/node{node}"
    system.write(f"{base}/meminfo", f"Node {node} MemTotal:       {memory}\n"
                                    f"Node {node} MemFree:        1024 kB\n")
    for thread, (package, core) in threads.items():
        system.write(f"{base}/cpu{thread}/topology/core_id", f"{core}\n")
        system.write(f"{base}/cpu{thread}/topology/physical_package_id", f"{package}\n")
    system.write(f"{base}/cpulist", "0-3\n")


class NUMATests(SynchronousTestCase):
    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        # Two sockets, one node each, hyper-threading: siblings n and n+4.
        add_numa_node(self.system, 0, "16318048 kB", {0: (0, 0), 1: (0, 1), 4: (0, 0),
                                                      5: (0, 1)})
        add_numa_node(self.system, 1, "16 GB", {2: (1, 0), 3: (1, 1), 6: (1, 0), 7: (1, 1)})
        self.system.write("sys/devices/system/node/online", "0-1\n")
        self.system.add_interface("ens1f0", "3c:fd:fe:00:00:01", pci_address="0000:3b:00.0")
        self.system.write("sys/devices/pci0000:00/0000:3b:00.0/numa_node", "1\n")
        self.system.add_interface("eth0", "52:54:00:00:00:02", pci_address="0000:00:03.0",
                                  virtio="virtio0")
        self.system.write("sys/devices/pci0000:00/0000:00:03.0/numa_node", "-1\n")
        self.system.add_interface("usb0", "52:54:00:00:00:03", pci_address=None)
        self.system.add_interface("br0", "52:54:00:00:00:04", physical=False)

    def test_topology(self) -> None:
        topology = sysfs.numa_topology(self.system.sys_path)
        assert topology is not None
        self.assertEqual(topology["ram"], [{"numa_node": 0, "size_kb": 16318048},
                                           {"numa_node": 1, "size_kb": 16 * 1024 * 1024}])
        self.assertEqual(topology["cpus"], [
            {"cpu": 0, "numa_node": 0, "thread_siblings": [0, 4]},
            {"cpu": 1, "numa_node": 0, "thread_siblings": [1, 5]},
            {"cpu": 0, "numa_node": 1, "thread_siblings": [2, 6]},
            {"cpu": 1, "numa_node": 1, "thread_siblings": [3, 7]},
        ])
        # The virtio NIC takes its PCI function's node; usb0 has none and is left out.
        self.assertEqual(topology["nics"], [{"name": "ens1f0", "numa_node": 1},
                                            {"name": "eth0", "numa_node": -1}])

    def test_same_core_id_on_two_packages_of_one_node(self) -> None:
        system = FakeSystem(self.mktemp())
        add_numa_node(system, 0, "1024 kB", {0: (0, 0), 1: (1, 0)})
        cpus = sysfs.nodes_cpus(sysfs.numa_node_dirs(system.sys_path) or [])
        self.assertEqual([c["thread_siblings"] for c in cpus], [[0], [1]])

    def test_no_numa(self) -> None:
        self.assertIsNone(sysfs.numa_topology(FakeSystem(self.mktemp()).sys_path))

    def test_bad_meminfo(self) -> None:
        self.system.write("sys/devices/system/node/node1/meminfo", "Node 1 MemFree: 1 kB\n")
        self.assertRaises(IncompatibleNumaFormatError, sysfs.numa_topology,
                          self.system.sys_path)
        self.system.write("sys/devices/system/node/node1/meminfo", "Node 1 MemTotal: 1 PB\n")
        self.assertRaises(IncompatibleNumaFormatError, sysfs.numa_topology,
                          self.system.sys_path)
        os.remove(self.system.path("sys/devices/system/node/node1/meminfo"))
        self.assertRaises(IncompatibleNumaFormatError, sysfs.numa_topology,
                          self.system.sys_path)

    def test_bad_core_id(self) -> None:
        self.system.write("sys/devices/system/node/node0/cpu1/topology/core_id", "x\n")
        self.assertRaises(IncompatibleNumaFormatError, sysfs.numa_topology,
                          self.system.sys_path)

    def test_bad_nic_node(self) -> None:
        self.system.write("sys/devices/pci0000:00/0000:3b:00.0/numa_node", "zero\n")
        self.assertRaises(IncompatibleNumaFormatError, sysfs.numa_topology,
                          self.system.sys_path)

    def test_node_id(self) -> None:
        self.assertEqual(sysfs.numa_node_id("/sys/devices/system/node/node12"), 12)
        self.assertRaises(IncompatibleNumaFormatError, sysfs.numa_node_id, "/x/nodeA")


def disk(name: str, size: int, **extra: object) -> BlockDevice:
    return BlockDevice(name=f"/dev/{name}", model="M", size=size, rotational=False,
                       **extra)  # type: ignore[arg-type]


GiB = 1024 ** 3


class RootDiskTests(SynchronousTestCase):
    def test_smallest_of_at_least_4_gib_then_by_name(self) -> None:
        disks = [disk("sdc", 500 * GiB), disk("sdb", 100 * GiB), disk("sda", 100 * GiB),
                 disk("sdd", 1 * GiB)]
        self.assertEqual(enrich.guess_root_disk(disks), disks[2])

    def test_none_big_enough(self) -> None:
        self.assertIsNone(enrich.guess_root_disk([disk("vda", 2 * GiB)]))
        self.assertIsNone(enrich.guess_root_disk([]))
        self.assertIsNone(enrich.guess_root_disk(None))

    def test_dict_items(self) -> None:
        disks = [{"name": "/dev/sdb", "size": 8 * GiB}, {"name": "/dev/sda", "size": None},
                 {"name": "/dev/sdc", "size": 5 * GiB}]
        self.assertEqual(enrich.guess_root_disk(disks), disks[2])


class BondTests(SynchronousTestCase):
    def test_members_report_their_own_mac(self) -> None:
        system = FakeSystem(self.mktemp())
        system.add_interface("eno1", "aa:bb:cc:00:00:01")
        system.add_interface("eno2", "aa:bb:cc:00:00:01", pci_address="0000:00:1a.0")
        system.write("sys/class/net/eno1/bonding_slave/perm_hwaddr", "AA:BB:CC:00:00:01\n")
        system.write("sys/class/net/eno2/bonding_slave/perm_hwaddr", "aa:bb:cc:00:00:02\n")
        system.add_interface("bond0", "aa:bb:cc:00:00:01", physical=False)
        system.write("sys/class/net/bond0/bonding/slaves", "eno1 eno2\n")
        macs = enrich.permanent_macs(system.sys_path)
        self.assertEqual(macs, {"eno1": "aa:bb:cc:00:00:01", "eno2": "aa:bb:cc:00:00:02"})
        interfaces = [NetworkInterface("eno1", "aa:bb:cc:00:00:01"),
                      NetworkInterface("eno2", "aa:bb:cc:00:00:01"),
                      {"name": "ib0", "mac_address": "f4:52:14:7b:cb:a1"}]
        with capturedLogs() as events:
            fixed = enrich.use_permanent_macs(interfaces, macs)
        self.assertEqual([enrich.field(i, "mac_address") for i in fixed],
                         ["aa:bb:cc:00:00:01", "aa:bb:cc:00:00:02", "f4:52:14:7b:cb:a1"])
        self.assertIs(fixed[0], interfaces[0])
        self.assertEqual(enrich.field(interfaces[1], "mac_address"),
                         "aa:bb:cc:00:00:01")  # not modified
        self.assertEqual([e["name"] for e in events], ["eno2"])

    def test_no_net_class(self) -> None:
        self.assertEqual(enrich.permanent_macs(self.mktemp()), {})


class MultipathTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        for name in ("sda", "sdb", "sdc", "nvme0n1"):
            self.system.add_block_device(name)
        self.system.write("sys/block/dm-0/dm/uuid", "mpath-3600a098038303053453f463045734c34\n")
        self.system.write("sys/block/dm-0/size", str(2 * GiB // 512 * 1000) + "\n")
        for member in ("sdc", "sdb"):
            os.makedirs(self.system.path(f"sys/block/dm-0/slaves/{member}"))
        self.system.write("sys/block/dm-1/dm/uuid", "LVM-abcdef\n")
        os.makedirs(self.system.path("sys/block/dm-1/slaves/nvme0n1"))

    def test_maps(self) -> None:
        self.assertEqual(enrich.multipath_devices(self.system.sys_path),
                         {"dm-0": ["sdb", "sdc"]})

    def test_paths_become_the_map(self) -> None:
        lun = {"wwn": "0x600a098038303053", "serial": "80S3S?F0EsL4", "vendor": "NETAPP",
               "tran": "fc"}
        disks = [disk("sda", 480 * GiB, hctl="0:0:0:0", tran="sata"),
                 disk("sdb", 2000 * GiB, hctl="1:0:0:0", by_path="pci-x-fc-0x1-lun-0", **lun),
                 disk("nvme0n1", 1600 * GiB, tran="nvme"),
                 disk("sdc", 2000 * GiB, hctl="2:0:0:0", **lun)]
        merged = enrich.merge_multipath(disks, enrich.multipath_devices(self.system.sys_path),
                                        self.system.sys_path)
        self.assertEqual([d.name for d in merged], ["/dev/sda", "/dev/dm-0", "/dev/nvme0n1"])
        dm = merged[1]
        self.assertEqual((dm.size, dm.wwn, dm.serial, dm.vendor, dm.hctl, dm.by_path, dm.tran),
                         (2000 * GiB, lun["wwn"], lun["serial"], "NETAPP", None, None, None))

    def test_a_manager_that_lists_the_map_already(self) -> None:
        disks = [disk("dm-0", 2000 * GiB), disk("sdb", 2000 * GiB), disk("sda", 10 * GiB)]
        merged = enrich.merge_multipath(disks, {"dm-0": ["sdb", "sdc"]}, self.system.sys_path)
        self.assertEqual([d.name for d in merged], ["/dev/dm-0", "/dev/sda"])

    def test_complete_inventory_copies(self) -> None:
        disks = [disk("sdb", 5 * GiB), disk("sdc", 5 * GiB)]
        inventory = {"disks": disks, "interfaces": None, "cpu": "kept"}
        completed = enrich.complete_inventory(inventory, self.system.sys_path)
        self.assertEqual([d.name for d in completed["disks"]], ["/dev/dm-0"])
        self.assertEqual(len(disks), 2)
        self.assertEqual((completed["interfaces"], completed["cpu"]), (None, "kept"))

    def test_interfaces_without_mac_are_left_out(self) -> None:
        interfaces = [NetworkInterface("eth0", None), NetworkInterface("eth1", "52:54:00:00:00:01")]
        with capturedLogs() as events:
            completed = enrich.complete_inventory({"interfaces": interfaces},
                                                  self.system.sys_path)
        self.assertEqual([i.name for i in completed["interfaces"]], ["eth1"])
        self.assertEqual([e["name"] for e in events], ["eth0"])
