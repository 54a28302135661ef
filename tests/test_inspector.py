"""Inspection: collectors on fake machines of several shapes, failures, DHCP waiting, a
whole run posted to both receivers, and a live run on this machine."""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import sys
import time
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipa_twisted.config import AgentConfig
from ipa_twisted.encoding import to_jsonable
from ipa_twisted.errors import InspectionError
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.hardware.interface import HardwareManager, HardwareSupport
from ipa_twisted.context import HardwareContext
from ipa_twisted.hardware.inventory import NetworkInterface
from ipa_twisted.inspector import collectors
from ipa_twisted.inspector.collectors import AccumulatedFailures
from ipa_twisted.inspector.dhcp import normalize_mac, wait_for_dhcp
from ipa_twisted.inspector.inspect import collect, inspect
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.fake_inspector import (DEFAULT_NODE_UUID, DEFAULT_TOKEN,
                                                FakeInspectionReceiver)
from ipa_twisted.testing.fake_process import Answer, Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem
from tests.test_inspector_parsing import (DMIDECODE, add_numa_node, add_pci_device,
                                          usb_machine)

_T = TypeVar("_T")
GiB = 1024 ** 3

# -- recorded outputs ------------------------------------------------------------------------
LSCPU_TWO_SOCKETS = b"""\
Architecture:                    x86_64
CPU op-mode(s):                  32-bit, 64-bit
CPU(s):                          64
Thread(s) per core:              2
Core(s) per socket:              16
Socket(s):                       2
NUMA node(s):                    2
Model name:                      Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz
CPU max MHz:                     3700.0000
CPU min MHz:                     1000.0000
Flags:                           fpu vme de pse tsc msr pae sse4_2 avx2 avx512f
"""

LSCPU_ARM = b"""\
Architecture:                    aarch64
CPU(s):                          80
Model name:                      Neoverse-N1
Socket(s):                       1
CPU max MHz:                     3000.0000
Flags:                           fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
"""

CPUINFO_VM = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
cpu MHz\t\t: 2249.998
physical id\t: 0
flags\t\t: fpu vme de pse

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
cpu MHz\t\t: 2249.998
physical id\t: 0
flags\t\t: fpu vme de pse

"""

DMIDECODE_MEMORY = b"""\
Handle 0x1000, DMI type 16, 23 bytes
Physical Memory Array
\tNumber Of Devices: 16

Handle 0x1100, DMI type 17, 84 bytes
Memory Device
\tSize: 32 GB

Handle 0x1101, DMI type 17, 84 bytes
Memory Device
\tSize: 32768 MB
"""

IPMI_LAN_PRINT = b"""\
IP Address Source       : Static Address
IP Address              : 10.0.0.5
MAC Address             : 38:63:BB:4A:EA:99
"""

IPMI_LAN6_PRINT = b"""\
IPv6/IPv4 Addressing Enables: both
IPv6 Dynamic Address 0:
    Address:        2001:db8::5/64
    Status:         active
"""


def _lsblk(kname: str, size: int, type_: str = "disk", **extra: Any) -> dict[str, Any]:
    device = {"kname": kname, "model": None, "size": size, "rota": False, "type": type_,
              "uuid": None, "partuuid": None, "serial": None, "wwn": None, "vendor": None,
              "log-sec": 512, "phy-sec": 512, "tran": None}
    device.update(extra)
    return device


_LUN = {"model": "LUN C-Mode", "vendor": "NETAPP  ", "serial": "80S3S?F0EsL4",
        "wwn": "0x600a098038303053453f463045734c34", "tran": "fc"}
LSBLK_STORAGE = json.dumps({"blockdevices": [
    _lsblk("sda", 480103981056, model="INTEL SSDSC2KB48", serial="PHYS8150", tran="sata",
           wwn="0x55cd2e414f5c4a21", children=[_lsblk("sda1", 536870912, "part")]),
    _lsblk("sdb", 2199023255552, **_LUN, children=[_lsblk("dm-0", 2199023255552, "mpath")]),
    _lsblk("sdc", 2199023255552, **_LUN, children=[_lsblk("dm-0", 2199023255552, "mpath")]),
    _lsblk("nvme0n1", 1600321314816, model="Dell Ent NVMe P5600 MU U.2 1.6TB",
           serial="PHAB1234", tran="nvme", **{"phy-sec": 4096, "log-sec": 4096}),
    _lsblk("sr0", 1073741312, "rom"),
]}).encode()

LSBLK_NETWORK = json.dumps({"blockdevices": [
    _lsblk("sda", 240057409536, model="MTFDDAV240TDU", tran="sata", rota=False),
]}).encode()

LSBLK_SMALL_VM = json.dumps({"blockdevices": [
    _lsblk("vda", 2 * GiB, rota=True), _lsblk("loop0", 3 * GiB, "loop"),
]}).encode()


def ip_addr(**addresses: str) -> bytes:
    return json.dumps([{"ifname": name, "addr_info": [
        {"family": "inet", "local": address, "prefixlen": 24, "scope": "global"}]}
        for name, address in addresses.items()]).encode()


# -- machines ---------------------------------------------------------------------------------
class Machine:
    """A fake machine: its trees, recorded outputs, and managers bound to them."""

    def __init__(self, root: str, answers: Mapping[tuple[str, ...], Answer],
                 **config: Any) -> None:
        self.system = FakeSystem(root)
        self.answers = dict(answers)
        self.config_overrides = config
        self.clock = Clock()

    def context(self, **config: Any) -> HardwareContext:
        self.runner = FakeRunner(self.answers, unknown_missing=True)
        settings = dict(self.config_overrides, **config)
        return HardwareContext(self.system.config(**settings), self.runner, self.clock,
                               None)

    def managers(self, context: HardwareContext) -> HardwareManagers:
        manager = GenericHardwareManager(udev=lambda name: {})
        loading = Deferred.fromCoroutine(HardwareManagers.load(context, [manager]))
        result: list[HardwareManagers] = []
        loading.addCallback(result.append)
        assert result, "managers did not load synchronously"
        return result[0]


def storage_server(root: str) -> Machine:
    """UEFI, BMC, two sockets / NUMA nodes, SATA SSD + NVMe + a multipathed FC LUN."""
    machine = Machine(root, {
        ("lscpu",): LSCPU_TWO_SOCKETS,
        ("dmidecode", "--type", "memory"): DMIDECODE_MEMORY,
        ("dmidecode", "-t", "bios", "-t", "processor", "-t", "memory"): DMIDECODE,
        ("lsblk", "-bia", "--json"): LSBLK_STORAGE,
        ("ip", "-j", "addr", "show"): ip_addr(eno1="10.1.0.20"),
        ("ipmitool", "lan", "print", "1"): IPMI_LAN_PRINT,
        ("ipmitool", "lan6", "print", "1"): IPMI_LAN6_PRINT,
    })
    system = machine.system
    system.set_efi()
    system.set_meminfo(65544192)
    system.set_dmi(product_name="PowerEdge R740xd", product_serial="7XK4N53",
                   sys_vendor="Dell Inc.", bios_vendor="Dell Inc.", bios_version="2.12.2",
                   bios_date="07/09/2021")
    system.add_ipmi_device()
    system.set_cmdline("BOOTIF=01-3c-fd-fe-aa-00-01 ipa-inspection-callback-url=x")
    system.add_interface("eno1", "3c:fd:fe:aa:00:01", speed=10000,
                         pci_address="0000:18:00.0", driver="i40e", product="0x1572")
    system.add_interface("eno2", "3c:fd:fe:aa:00:02", carrier=False, speed=-1,
                         pci_address="0000:18:00.1", driver="i40e", product="0x1572")
    system.add_block_device("sda", hctl="0:0:0:0", by_path="pci-0000:00:17.0-ata-1")
    system.add_block_device("sdb", hctl="1:0:0:0",
                            by_path="pci-0000:5e:00.0-fc-0x500a0982891b8dc5-lun-0")
    system.add_block_device("sdc", hctl="2:0:0:0",
                            by_path="pci-0000:5e:00.1-fc-0x500a0983891b8dc5-lun-0")
    system.add_block_device("nvme0n1", by_path="pci-0000:3b:00.0-nvme-1")
    system.write("sys/block/dm-0/dm/uuid", "mpath-3600a098038303053453f463045734c34\n")
    system.write("sys/block/dm-0/size", f"{2199023255552 // 512}\n")
    for member in ("sdb", "sdc"):
        os.makedirs(system.path(f"sys/block/dm-0/slaves/{member}"))
    for address, product in (("0000:18:00.0", "0x1572"), ("0000:18:00.1", "0x1572"),
                             ("0000:3b:00.0", "0x0b60"), ("0000:5e:00.0", "0x2261")):
        add_pci_device(system, address, "0x8086", product, numa_node="0")
    add_numa_node(system, 0, "32772096 kB", {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    add_numa_node(system, 1, "32772096 kB", {4: (1, 0), 5: (1, 1), 6: (1, 0), 7: (1, 1)})
    return machine


def network_node(root: str) -> Machine:
    """BIOS boot, no BMC, two bonded NICs and an InfiniBand port, Arm CPU."""
    machine = Machine(root, {
        ("lscpu",): LSCPU_ARM,
        ("dmidecode", "--type", "memory"): DMIDECODE_MEMORY,
        ("lsblk", "-bia", "--json"): LSBLK_NETWORK,
        ("ip", "-j", "addr", "show"): ip_addr(bond0="10.2.0.5", ib0="10.3.0.5"),
    }, inspection_dhcp_all_interfaces=False)
    system = machine.system
    system.set_meminfo(131072000)
    system.set_dmi(product_name="R281-P90", product_serial="GIG123", sys_vendor="GIGABYTE")
    system.set_cmdline("BOOTIF=01-b8-59-9f-00-00-02")
    bond_mac = "b8:59:9f:00:00:01"
    system.add_interface("eno1", bond_mac, speed=25000, pci_address="0000:01:00.0",
                         driver="mlx5_core", vendor="0x15b3", product="0x1017")
    system.add_interface("eno2", bond_mac, speed=25000, pci_address="0000:01:00.1",
                         driver="mlx5_core", vendor="0x15b3", product="0x1017")
    system.write("sys/class/net/eno1/bonding_slave/perm_hwaddr", "b8:59:9f:00:00:01\n")
    system.write("sys/class/net/eno2/bonding_slave/perm_hwaddr", "b8:59:9f:00:00:02\n")
    system.add_interface("bond0", bond_mac, physical=False)
    system.write("sys/class/net/bond0/bonding/slaves", "eno1 eno2\n")
    system.add_interface("ib0", "80:00:02:08:fe:80:00:00:00:00:00:00:f4:52:14:03:00:7b:cb:a1",
                         link_type=32, pci_address="0000:81:00.0", driver="mlx5_core",
                         vendor="0x15b3", product="0x101b", speed=100000)
    system.add_block_device("sda", hctl="0:0:0:0", by_path="platform-ahci-ata-1")
    return machine


def small_vm(root: str) -> Machine:
    """BIOS boot, no BMC, no DMI, no lscpu nor dmidecode, one 2 GiB virtio disk."""
    machine = Machine(root, {
        ("lsblk", "-bia", "--json"): LSBLK_SMALL_VM,
        ("ip", "-j", "addr", "show"): ip_addr(eth0="192.168.122.10"),
    })
    system = machine.system
    system.set_meminfo(2030000)
    system.set_cpuinfo(CPUINFO_VM)
    system.add_interface("eth0", "52:54:00:6b:3c:58", speed=None, pci_address="0000:00:03.0",
                         driver="virtio_net", vendor="0x1af4", product="0x1041",
                         virtio="virtio2")
    system.add_block_device("vda")
    return machine


class MachineTestCase(SynchronousTestCase):
    def result(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return self.successResultOf(Deferred.fromCoroutine(coroutine))

    def collect(self, machine: Machine, collectors: str = "default",
                **config: Any) -> tuple[dict[str, Any], AccumulatedFailures]:
        context = machine.context(inspection_collectors=collectors, **config)
        managers = machine.managers(context)
        return self.result(collect(context, managers))


# -- the default collector on each shape ----------------------------------------------------
class StorageServerTests(MachineTestCase):
    def test_default(self) -> None:
        data, failures = self.collect(storage_server(self.mktemp()))
        self.assertFalse(failures)
        data = to_jsonable(data)
        self.assertEqual(set(data), {"inventory", "root_disk", "boot_interface",
                                     "configuration", "error"})
        self.assertIsNone(data["error"])
        inventory = data["inventory"]
        self.assertEqual(inventory["cpu"], {
            "model_name": "Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz", "frequency": "3700.0000",
            "count": 64, "architecture": "x86_64", "socket_count": 2,
            "flags": ["fpu", "vme", "de", "pse", "tsc", "msr", "pae", "sse4_2", "avx2",
                      "avx512f"]})
        self.assertEqual(inventory["memory"], {"total": 65544192 * 1024,
                                               "physical_mb": 65536})
        disks = {"/dev/" + os.path.basename(d["name"]): d for d in inventory["disks"]}
        self.assertEqual(list(disks), ["/dev/sda", "/dev/dm-0", "/dev/nvme0n1"])
        sda, dm, nvme = disks.values()
        self.assertEqual((sda["tran"], sda["hctl"], sda["rotational"], sda["size"]),
                         ("sata", "0:0:0:0", False, 480103981056))
        self.assertTrue(sda["by_path"].endswith("/disk/by-path/pci-0000:00:17.0-ata-1"))
        self.assertEqual((dm["size"], dm["wwn"], dm["vendor"], dm["hctl"], dm["by_path"]),
                         (2199023255552, _LUN["wwn"], "NETAPP", None, None))
        self.assertEqual((nvme["tran"], nvme["logical_sectors"], nvme["physical_sectors"]),
                         ("nvme", 4096, 4096))
        self.assertEqual(data["root_disk"], sda)
        self.assertEqual([(i["name"], i["mac_address"], i["ipv4_address"], i["has_carrier"],
                           i["speed_mbps"], i["driver"], i["pci_address"])
                          for i in inventory["interfaces"]],
                         [("eno1", "3c:fd:fe:aa:00:01", "10.1.0.20", True, 10000, "i40e",
                           "0000:18:00.0"),
                          ("eno2", "3c:fd:fe:aa:00:02", None, False, None, "i40e",
                           "0000:18:00.1")])
        self.assertEqual((inventory["bmc_address"], inventory["bmc_v6address"],
                          inventory["bmc_mac"]), ("10.0.0.5", "2001:db8::5",
                                                  "38:63:bb:4a:ea:99"))
        self.assertEqual(inventory["system_vendor"], {
            "product_name": "PowerEdge R740xd", "serial_number": "7XK4N53",
            "manufacturer": "Dell Inc.",
            "firmware": {"vendor": "Dell Inc.", "version": "2.12.2",
                         "build_date": "07/09/2021"}})
        self.assertEqual(inventory["boot"], {"current_boot_mode": "uefi",
                                             "pxe_interface": "3c:fd:fe:aa:00:01"})
        self.assertEqual(data["boot_interface"], "3c:fd:fe:aa:00:01")
        self.assertIsInstance(inventory["hostname"], str)
        self.assertEqual(data["configuration"], {
            "collectors": ["default"],
            "managers": [{"name": "generic_hardware_manager", "version": "1.2"}]})

    def test_every_collector(self) -> None:
        machine = storage_server(self.mktemp())
        data, failures = self.collect(
            machine, "default,pci-devices,dmi-decode,numa-topology,extra-hardware",
            inspection_benchmarks="cpu,mem")
        self.assertEqual(len(failures), 1)
        self.assertIn("the hardware package is not installed", data["error"])
        self.assertEqual([d["bus"] for d in data["pci_devices"]],
                         ["0000:18:00.0", "0000:18:00.1", "0000:3b:00.0", "0000:5e:00.0"])
        self.assertEqual(data["pci_devices"][0]["vendor_id"], "8086")
        self.assertEqual(data["dmi"]["memory"]["Number Of Devices"], 24)
        self.assertEqual(data["numa_topology"]["ram"],
                         [{"numa_node": 0, "size_kb": 32772096},
                          {"numa_node": 1, "size_kb": 32772096}])
        self.assertEqual(len(data["numa_topology"]["cpus"]), 4)
        self.assertEqual(data["numa_topology"]["nics"],
                         [{"name": "eno1", "numa_node": 0}, {"name": "eno2", "numa_node": 0}])
        self.assertEqual(data["configuration"]["collectors"],
                         ["default", "pci-devices", "dmi-decode", "numa-topology",
                          "extra-hardware"])


class NetworkNodeTests(MachineTestCase):
    def test_default(self) -> None:
        machine = network_node(self.mktemp())
        context = machine.context(inspection_collectors="default")
        collecting = Deferred.fromCoroutine(collect(context, machine.managers(context)))
        # eno2 (BOOTIF) has no address of its own (the bond has it): DHCP wait times out.
        machine.clock.pump([2.0] * 29)
        self.assertNoResult(collecting)
        with capturedLogs() as events:
            machine.clock.pump([2.0] * 2)
        data, failures = self.successResultOf(collecting)
        self.assertTrue(any("in {timeout} s" in e["log_format"] and e["missing"] == "eno2"
                            for e in events))
        self.assertFalse(failures)
        inventory = to_jsonable(data["inventory"])
        self.assertEqual([(i["name"], i["mac_address"], i["client_id"], i["ipv4_address"])
                          for i in inventory["interfaces"]], [
            ("eno1", "b8:59:9f:00:00:01", None, None),
            ("eno2", "b8:59:9f:00:00:02", None, None),
            ("ib0", "f4:52:14:7b:cb:a1",
             "ff:00:00:00:00:00:02:00:00:02:c9:00:f4:52:14:03:00:7b:cb:a1", "10.3.0.5")])
        self.assertIsNone(inventory["bmc_address"])
        self.assertIsNone(inventory["bmc_v6address"])
        self.assertNotIn("ipmitool", [argv[0] for argv in machine.runner.argvs])
        self.assertEqual(inventory["boot"], {"current_boot_mode": "bios",
                                             "pxe_interface": "b8:59:9f:00:00:02"})
        self.assertEqual(inventory["cpu"]["architecture"], "aarch64")
        self.assertEqual(inventory["cpu"]["socket_count"], 1)
        self.assertEqual(os.path.basename(data["root_disk"].name), "sda")

    def test_all_interfaces_dhcp(self) -> None:
        machine = network_node(self.mktemp())
        machine.system.set_cmdline("")
        data, failures = self.collect(machine, inspection_dhcp_wait_timeout=0)
        self.assertIn("inventory", data)


class SmallVMTests(MachineTestCase):
    def test_default(self) -> None:
        with capturedLogs() as events:
            data, failures = self.collect(small_vm(self.mktemp()))
        self.assertFalse(failures)
        self.assertNotIn("root_disk", data)
        self.assertTrue(any("No suitable root device" in e["log_format"] for e in events))
        self.assertTrue(any("No PXE boot interface" in e["log_format"] for e in events))
        inventory = to_jsonable(data["inventory"])
        self.assertEqual(inventory["cpu"]["model_name"], "AMD EPYC 7B12")
        self.assertEqual((inventory["cpu"]["count"], inventory["cpu"]["socket_count"]), (2, 1))
        self.assertEqual(inventory["memory"], {"total": 2030000 * 1024, "physical_mb": None})
        self.assertEqual(len(inventory["disks"]), 1)
        self.assertTrue(inventory["disks"][0]["name"].endswith("/vda"))
        self.assertEqual(inventory["system_vendor"], {
            "product_name": None, "serial_number": None, "manufacturer": None,
            "firmware": {"vendor": None, "version": None, "build_date": None}})
        self.assertIsNone(inventory["bmc_address"])
        self.assertEqual(inventory["boot"], {"current_boot_mode": "bios",
                                             "pxe_interface": None})
        self.assertIsNone(data["boot_interface"])
        [eth0] = inventory["interfaces"]
        self.assertEqual((eth0["pci_address"], eth0["driver"], eth0["speed_mbps"]),
                         ("0000:00:03.0", "virtio_net", None))

    def test_missing_tools_are_failures_where_the_reference_says_so(self) -> None:
        data, failures = self.collect(
            small_vm(self.mktemp()), "default,dmi-decode,pci-devices,numa-topology")
        self.assertEqual(len(failures), 2)
        self.assertIn("Failed to run dmidecode", data["error"])
        self.assertIn("Failed to get the list of PCI devices", data["error"])
        self.assertNotIn("numa_topology", data)     # no NUMA tree: a warning only
        self.assertIn("inventory", data)


# -- failures and the other collectors ---------------------------------------------------------
class AccumulatedFailuresTests(SynchronousTestCase):
    def test_accumulates(self) -> None:
        failures = AccumulatedFailures()
        self.assertFalse(failures)
        self.assertIsNone(failures.get_error())
        failures.raise_if_needed()
        with capturedLogs() as events:
            failures.add("collector %s failed: %s", "x", ValueError("boom"))
            failures.add(RuntimeError("plain"))
        self.assertEqual(len(failures), 2)
        self.assertEqual(failures.get_error(), "The following errors were encountered:\n"
                                               "* collector x failed: boom\n* plain")
        self.assertEqual([e["log_level"].name for e in events], ["error", "error"])
        self.assertRaises(InspectionError, failures.raise_if_needed)

    def test_custom_class(self) -> None:
        failures = AccumulatedFailures(KeyError)
        failures.add("x")
        self.assertRaises(KeyError, failures.raise_if_needed)


class CollectorTests(MachineTestCase):
    def test_names_and_order(self) -> None:
        config = AgentConfig(inspection_collectors=" default, ,logs,pci-devices,default")
        self.assertEqual(collectors.collector_names(config), ["default", "logs", "pci-devices"])
        with capturedLogs() as events:
            self.assertEqual(collectors.run_order(["logs", "default", "dmi-decode"]),
                             ["default", "dmi-decode", "logs"])
        self.assertEqual(len(events), 1)
        self.assertEqual(collectors.run_order(["default", "logs"]), ["default", "logs"])

    def test_unknown_collector_and_raising_collector(self) -> None:
        machine = small_vm(self.mktemp())
        context = machine.context(inspection_collectors="nope,lldp,pci-devices")

        async def broken_reader(*args: Any) -> dict[str, Any]:
            raise RuntimeError("socket trouble")

        with capturedLogs() as events:
            data, failures = self.result(collect(context, machine.managers(context),
                                                 lldp_reader=broken_reader))
        self.flushLoggedErrors(RuntimeError)
        # An unknown name is a warning, not an error: Ironic fails inspections with errors.
        [unknown] = [e for e in events if e.get("name") == "nope"]
        self.assertEqual(unknown["log_level"].name, "warn")
        self.assertIn("usb-devices", unknown["known"])
        self.assertEqual(failures.failures, [
            "collector lldp failed: socket trouble",
            "Failed to get the list of PCI devices: [Errno 2] No such file or directory: "
            f"'{machine.system.sys_path}/bus/pci/devices'"])
        self.assertEqual(data["error"], failures.get_error())

    def test_only_unknown_collectors_is_not_an_error(self) -> None:
        machine = small_vm(self.mktemp())
        context = machine.context(inspection_collectors="default,usb-devices-v2")
        with capturedLogs():
            data, failures = self.result(collect(context, machine.managers(context)))
        self.assertEqual((len(failures), data["error"]), (0, None))
        self.assertIn("inventory", data)
        self.assertEqual(data["configuration"]["collectors"], ["default", "usb-devices-v2"])

    def test_usb_devices_from_sysfs(self) -> None:
        machine = small_vm(self.mktemp())
        usb_machine(machine.system)
        context = machine.context(inspection_collectors="usb-devices")
        data, failures = self.result(collect(context, machine.managers(context)))
        self.assertEqual(len(failures), 0)
        self.assertEqual([d["handle"] for d in data["usb_devices"]],
                         ["USB:1:3", "USB:1:5", "USB:2:2"])
        self.assertEqual(data["usb_devices"][1]["product"], "Dell KB216 Wired Keyboard")
        self.assertEqual(json.loads(json.dumps(to_jsonable(data)))["usb_devices"],
                         data["usb_devices"])

    def test_usb_devices_without_usb(self) -> None:
        machine = small_vm(self.mktemp())
        context = machine.context(inspection_collectors="usb-devices")
        data, failures = self.result(collect(context, machine.managers(context)))
        self.assertEqual((data["usb_devices"], len(failures)), ([], 0))

    def test_usb_devices_from_a_manager_that_has_them(self) -> None:
        class USBManager(HardwareManager):
            HARDWARE_MANAGER_NAME = "usb_vendor"

            def evaluate_hardware_support(self) -> int:
                return HardwareSupport.SERVICE_PROVIDER

            def get_usb_devices(self) -> list[dict[str, str]]:
                return [{"product": "Token", "vendor": "ACME", "handle": "USB:9:9"}]

        machine = small_vm(self.mktemp())
        usb_machine(machine.system)
        context = machine.context(inspection_collectors="usb-devices")
        loading = Deferred.fromCoroutine(HardwareManagers.load(
            context, [USBManager(), GenericHardwareManager(udev=lambda name: {})]))
        managers = self.successResultOf(loading)
        data, _ = self.result(collect(context, managers))
        self.assertEqual(data["usb_devices"],
                         [{"product": "Token", "vendor": "ACME", "handle": "USB:9:9"}])

    def test_lldp(self) -> None:
        machine = network_node(self.mktemp())
        context = machine.context(inspection_collectors="lldp", lldp_timeout=7.0)
        calls = []

        async def reader(names: Any, timeout: float, reactor: Any,
                         sys_path: str) -> dict[str, list[tuple[int, str]]]:
            calls.append((list(names), timeout, sys_path))
            return {"eno1": [(1, "04885a92ec5459"), (2, "0545746865726e6574312f33")],
                    "eno2": [], "ib0": []}

        data, failures = self.result(collect(context, machine.managers(context),
                                             lldp_reader=reader))
        self.assertFalse(failures)
        self.assertEqual(calls, [(["eno1", "eno2", "ib0"], 7.0, machine.system.sys_path)])
        self.assertEqual(json.loads(json.dumps(data["lldp_raw"])), {
            "eno1": [[1, "04885a92ec5459"], [2, "0545746865726e6574312f33"]],
            "eno2": [], "ib0": []})

    def test_lldp_without_lldp_support(self) -> None:
        machine = small_vm(self.mktemp())
        context = machine.context(inspection_collectors="lldp")
        saved = {name: sys.modules.get(name) for name in ("ipa_twisted.net.lldp",)}
        sys.modules["ipa_twisted.net.lldp"] = None  # type: ignore[assignment]
        try:
            data, failures = self.result(collect(context, machine.managers(context)))
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
        self.assertIn("LLDP support (ipa_twisted.net.lldp) is not available", data["error"])
        self.assertNotIn("lldp_raw", data)

    def test_extra_hardware(self) -> None:
        machine = small_vm(self.mktemp())
        facts = [["cpu", "logical", "number", 2], ["memory", "total", "size", 2078720000]]
        machine.answers[("hardware-detect",)] = json.dumps(facts).encode()
        with capturedLogs() as events:
            data, failures = self.collect(machine, "extra-hardware",
                                          inspection_benchmarks="cpu, gpu,mem,cpu")
        self.assertFalse(failures)
        self.assertEqual(data["data"], facts)
        self.assertEqual([c for c in machine.runner.calls if c.argv[0] == "hardware-detect"][0]
                         .argv, ("hardware-detect", "--benchmark", "cpu", "mem"))
        self.assertTrue(any(e.get("name") == "gpu" for e in events))

    def test_extra_hardware_bad_output_and_failure(self) -> None:
        machine = small_vm(self.mktemp())
        machine.answers[("hardware-detect",)] = b"not json"
        data, failures = self.collect(machine, "extra-hardware")
        self.assertIn("JSON returned from hardware-detect cannot be decoded", data["error"])
        machine.answers[("hardware-detect",)] = Exit(1, b"", b"Traceback ...")
        data, failures = self.collect(machine, "extra-hardware")
        self.assertIn("Failed to run the hardware-detect utility", data["error"])

    def test_numa_bad_data_is_a_warning(self) -> None:
        machine = storage_server(self.mktemp())
        machine.system.write("sys/devices/system/node/node1/meminfo", "garbage\n")
        with capturedLogs() as events:
            data, failures = self.collect(machine, "numa-topology")
        self.assertFalse(failures)
        self.assertNotIn("numa_topology", data)
        self.assertTrue(any("NUMA topology" in e["log_format"] for e in events))


class LogsCollectorTests(TestCase):
    """The logs collector builds its archive in the reactor's thread pool: a real reactor."""

    async def test_logs_last_and_encoded(self) -> None:
        from twisted.internet import reactor
        machine = small_vm(self.mktemp())
        context = machine.context(inspection_collectors="logs,pci-devices")
        context = HardwareContext(context.config, context.runner, reactor, reactor)
        with capturedLogs():
            data, failures = await collect(context, machine.managers(context))
        self.assertEqual(list(data)[-2:], ["logs", "error"])   # logs ran last
        archive = gzip.decompress(base64.b64decode(data["logs"]))
        self.assertGreater(len(archive), 0)
        self.assertEqual(len(failures), 1)                     # pci-devices only


# -- DHCP ----------------------------------------------------------------------------------
class FakeInterfaces:
    """``dispatch_to_managers("list_network_interfaces")`` from a script of answers."""

    def __init__(self, *answers: list[NetworkInterface] | Exception) -> None:
        self.answers, self.calls = list(answers), 0

    async def dispatch_to_managers(self, method: str, *args: Any, **kwargs: Any) -> Any:
        assert method == "list_network_interfaces"
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def nic(name: str, mac: str, ipv4: str | None) -> NetworkInterface:
    return NetworkInterface(name=name, mac_address=mac, ipv4_address=ipv4)


class WaitForDHCPTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        self.system.set_cmdline("BOOTIF=01-52-54-00-00-00-01")
        self.clock = Clock()

    def wait(self, source: FakeInterfaces, **config: Any) -> Deferred[bool]:
        return Deferred.fromCoroutine(wait_for_dhcp(source, self.system.config(**config),
                                                    self.clock))

    def test_pxe_interface_only(self) -> None:
        source = FakeInterfaces(
            [nic("eth0", "52:54:00:00:00:01", None), nic("eth1", "52:54:00:00:00:02", None)],
            [nic("eth0", "52:54:00:00:00:01", "10.0.0.2"),
             nic("eth1", "52:54:00:00:00:02", None)])
        waiting = self.wait(source)
        self.assertNoResult(waiting)
        self.clock.advance(2)
        self.assertTrue(self.successResultOf(waiting))
        self.assertEqual(source.calls, 2)

    def test_all_interfaces_until_the_timeout(self) -> None:
        source = FakeInterfaces(
            [nic("eth0", "52:54:00:00:00:01", "10.0.0.2"),
             nic("eth1", "52:54:00:00:00:02", None)])
        waiting = self.wait(source, inspection_dhcp_all_interfaces=True,
                            inspection_dhcp_wait_timeout=5)
        with capturedLogs() as events:
            self.clock.pump([2, 2, 1])
        self.assertFalse(self.successResultOf(waiting))
        self.assertEqual(source.calls, 4)      # at 0, 2, 4 and 5
        [warning] = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual((warning["missing"], warning["timeout"]), ("eth1", 5))

    def test_no_bootif(self) -> None:
        self.system.set_cmdline("quiet")
        source = FakeInterfaces([])
        self.assertFalse(self.successResultOf(self.wait(source)))
        self.assertEqual(source.calls, 0)

    def test_disabled(self) -> None:
        source = FakeInterfaces([])
        self.assertTrue(self.successResultOf(self.wait(source, inspection_dhcp_wait_timeout=0)))
        self.assertEqual(source.calls, 0)

    def test_listing_errors_are_retried(self) -> None:
        source = FakeInterfaces(RuntimeError("ip crashed"),
                                [nic("eth0", "52:54:00:00:00:01", "10.0.0.2")])
        waiting = self.wait(source)
        self.clock.advance(2)
        self.assertTrue(self.successResultOf(waiting))

    def test_mac_forms(self) -> None:
        self.assertEqual(normalize_mac("01-AA-BB-CC-DD-EE-FF"), "aa:bb:cc:dd:ee:ff")
        self.assertEqual(normalize_mac("aa:bb:cc:dd:ee:ff"), "aa:bb:cc:dd:ee:ff")
        self.assertIsNone(normalize_mac("aa:bb"))


# -- a whole run, posted to both receivers -------------------------------------------------
class InspectTests(MachineTestCase):
    def setUp(self) -> None:
        self.machine = storage_server(self.mktemp())
        self.receiver = FakeInspectionReceiver()
        self.receiver.add_node(macs=["3c:fd:fe:aa:00:02"])
        self.http = StubTreq(self.receiver.app.resource())

    def inspect(self, requested: bool = False, **config: Any
                ) -> Deferred[tuple[str | None, dict[str, Any] | None]]:
        context = self.machine.context(**config)
        return Deferred.fromCoroutine(inspect(context, self.machine.managers(context), None,
                                              self.http, requested=requested))

    def test_to_ironic_inspector(self) -> None:
        uuid, lookup = self.successResultOf(self.inspect(
            inspection_callback_url="http://inspector:5050/v1/continue"))
        self.assertEqual((uuid, lookup), (DEFAULT_NODE_UUID, None))
        [received] = self.receiver.posts
        self.assertEqual(received.path, "/v1/continue")
        self.assertEqual(received.data["root_disk"]["name"],
                         self.machine.system.path("dev/sda"))
        self.assertEqual([i["mac_address"] for i in received.data["inventory"]["interfaces"]],
                         ["3c:fd:fe:aa:00:01", "3c:fd:fe:aa:00:02"])
        self.assertIsNone(received.data["error"])

    def test_to_ironic_derived_from_api_url(self) -> None:
        uuid, lookup = self.successResultOf(self.inspect(requested=True,
                                                         api_url="http://ironic:6385"))
        self.assertEqual(uuid, DEFAULT_NODE_UUID)
        assert lookup is not None
        self.assertEqual(lookup["config"]["agent_token"], DEFAULT_TOKEN)
        self.assertEqual(self.receiver.posts[0].path, "/v1/continue_inspection")

    def test_disabled(self) -> None:
        with capturedLogs() as events:
            result = self.successResultOf(self.inspect(api_url="http://ironic:6385"))
        self.assertEqual(result, (None, None))
        self.assertEqual(self.receiver.posts, [])
        self.assertEqual(self.machine.runner.calls, [])
        self.assertTrue(any("disabled" in e["log_format"] for e in events))

    def test_failures_are_posted_not_raised(self) -> None:
        with capturedLogs() as events:
            uuid, _ = self.successResultOf(self.inspect(
                inspection_callback_url="http://inspector:5050/v1/continue",
                inspection_collectors="default,extra-hardware"))
        self.assertEqual(uuid, DEFAULT_NODE_UUID)
        self.assertIn("hardware package is not installed", self.receiver.posts[0].data["error"])
        self.assertTrue(any("finished with errors" in e["log_format"] for e in events))

    def test_refusal_raises(self) -> None:
        self.receiver.nodes.clear()
        failure = self.failureResultOf(self.inspect(
            inspection_callback_url="http://ironic:6385/v1/continue_inspection"),
            InspectionError)
        self.assertIn("status 404", str(failure.value))

    def test_mdns(self) -> None:
        resolved = []

        async def resolver(config: AgentConfig, reactor: Any) -> AgentConfig:
            resolved.append(config.inspection_callback_url)
            return config.override(inspection_callback_url="http://10.0.0.1:5050/v1/continue",
                                   inspection_collectors="default,pci-devices")

        context = self.machine.context(inspection_callback_url="mdns")
        uuid, _ = self.successResultOf(Deferred.fromCoroutine(inspect(
            context, self.machine.managers(context), None, self.http,
            mdns_resolver=resolver)))
        self.assertEqual((uuid, resolved), (DEFAULT_NODE_UUID, ["mdns"]))
        data = self.receiver.posts[0].data
        self.assertEqual(data["configuration"]["collectors"], ["default", "pci-devices"])
        self.assertIn("pci_devices", data)

    def test_mdns_without_support(self) -> None:
        saved = sys.modules.get("ipa_twisted.net.mdns")
        sys.modules["ipa_twisted.net.mdns"] = None  # type: ignore[assignment]
        try:
            failure = self.failureResultOf(self.inspect(inspection_callback_url="mdns"),
                                           InspectionError)
        finally:
            if saved is None:
                sys.modules.pop("ipa_twisted.net.mdns", None)
            else:
                sys.modules["ipa_twisted.net.mdns"] = saved
        self.assertIn("mDNS discovery is not available", str(failure.value))
        self.assertEqual(self.receiver.posts, [])


# -- this machine ----------------------------------------------------------------------------
class LiveInspectionTests(TestCase):
    """The default collector (and friends) on the machine running the tests."""

    timeout = 300

    async def test_this_machine(self) -> None:
        for tool in ("lsblk", "ip"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} is not installed on this machine")
        from twisted.internet import reactor
        runner = ProcessRunner(reactor, reactor)
        config = AgentConfig(inspection_dhcp_wait_timeout=0, disk_wait_attempts=1,
                             inspection_collectors="default,pci-devices,numa-topology")
        context = HardwareContext(config, runner, reactor, reactor)
        managers = await HardwareManagers.load(context, [GenericHardwareManager()])
        started = time.monotonic()
        data, failures = await collect(context, managers)
        collection = time.monotonic() - started
        data = to_jsonable(data)

        out, _ = await runner.execute("lsblk", "-dbn", "-o", "NAME,TYPE,SIZE")
        expected_disks = set()
        for line in out.decode().splitlines():
            name, type_, size = line.split()
            if (type_ == "disk" and int(size) > 0
                    and not name.startswith(("fd", "ram", "zram"))):
                expected_disks.add(f"/dev/{name}")
        self.assertEqual({d["name"] for d in data["inventory"]["disks"]}, expected_disks)

        net = "/sys/class/net"
        expected_nics = {name for name in os.listdir(net) if name != "lo"
                         and os.path.lexists(os.path.join(net, name, "device"))}
        interfaces = data["inventory"]["interfaces"]
        self.assertEqual({i["name"] for i in interfaces}, expected_nics)
        for interface in interfaces:
            with open(os.path.join(net, interface["name"], "address")) as f:
                address = f.read().strip().lower()
            if len(address.split(":")) == 6:
                self.assertEqual(interface["mac_address"], address)
        self.assertIsNone(data["error"], data["error"])
        self.assertEqual(len(data["pci_devices"]), len(os.listdir("/sys/bus/pci/devices")))

        timings = []
        for _ in range(5):
            started = time.monotonic()
            await managers.list_hardware_info(use_cache=False)
            timings.append(time.monotonic() - started)
        print(f"\n  inspection collection (default, pci-devices, numa-topology): "
              f"{collection:.3f} s; inventory (list_hardware_info): "
              f"mean {sum(timings) / len(timings):.3f} s, min {min(timings):.3f} s over "
              f"{len(timings)} calls", file=sys.__stdout__)
