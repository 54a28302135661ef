"""Tests for ipa_twisted.hardware.generic on fake trees and recorded outputs."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions import default_extensions
from ipa_twisted.encoding import to_jsonable
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.hardware.interface import HardwareSupport
from ipa_twisted.context import HardwareContext
from ipa_twisted.hardware.inventory import (CPU, BlockDevice, BootInfo, Memory,
                                            NetworkInterface, SystemFirmware,
                                            SystemVendorInfo)
from ipa_twisted.process import (CommandNotFoundError, ProcessRunner,
                                 ProcessTimeoutError)
from ipa_twisted.testing.fake_process import Answer, Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem

_T = TypeVar("_T")

LSCPU = b"""\
Architecture:                    x86_64
CPU op-mode(s):                  32-bit, 64-bit
Byte Order:                      Little Endian
CPU(s):                          16
On-line CPU(s) list:             0-15
Vendor ID:                       GenuineIntel
BIOS Vendor ID:                  Intel(R) Corporation
Model name:                      Intel(R) Xeon(R) Silver 4110 CPU @ 2.10GHz
BIOS Model name:                 Intel(R) Xeon(R) Silver 4110 CPU @ 2.10GHz
Thread(s) per core:              2
Core(s) per socket:              8
Socket(s):                       1
CPU max MHz:                     3000.0000
CPU min MHz:                     800.0000
NUMA node0 CPU(s):               0-15
Flags:                           fpu vme de pse tsc msr
"""

CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2620 v4 @ 2.10GHz
cpu MHz\t\t: 2099.998
physical id\t: 0
flags\t\t: fpu vme sse sse2

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2620 v4 @ 2.10GHz
cpu MHz\t\t: 2099.998
physical id\t: 1
flags\t\t: fpu vme sse sse2

"""

DMIDECODE_MEMORY = b"""\
# dmidecode 3.3
Getting SMBIOS data from sysfs.
SMBIOS 3.0.0 present.

Handle 0x1000, DMI type 16, 23 bytes
Physical Memory Array
\tLocation: System Board Or Motherboard
\tMaximum Capacity: 768 GB
\tNumber Of Devices: 4

Handle 0x1100, DMI type 17, 40 bytes
Memory Device
\tArray Handle: 0x1000
\tSize: 16 GB
\tVolatile Size: 16 GB
\tLocator: DIMM A1

Handle 0x1101, DMI type 17, 40 bytes
Memory Device
\tSize: 8192 MB
\tLocator: DIMM A2

Handle 0x1102, DMI type 17, 40 bytes
Memory Device
\tSize: No Module Installed
\tLocator: DIMM A3

Handle 0x1300, DMI type 19, 31 bytes
Memory Array Mapped Address
\tRange Size: 24 GB
"""

DMIDECODE_SYSTEM = b"""\
# dmidecode 3.3
Getting SMBIOS data from sysfs.
SMBIOS 2.8 present.

Handle 0x0000, DMI type 0, 24 bytes
BIOS Information
\tVendor: SeaBIOS
\tVersion: 1.15.0-1
\tRelease Date: 04/01/2014
\tCharacteristics:
\t\tBIOS characteristics not supported

Handle 0x0100, DMI type 1, 27 bytes
System Information
\tManufacturer: QEMU
\tProduct Name: Standard PC (Q35 + ICH9, 2009)
\tVersion: pc-q35-6.2
\tSerial Number: SN-42
"""


def _lsblk_device(kname: str, size: int, type_: str, **extra: Any) -> dict[str, Any]:
    device = {"kname": kname, "model": None, "size": size, "rota": False, "type": type_,
              "uuid": None, "partuuid": None, "serial": None, "wwn": None, "vendor": None,
              "log-sec": 512, "phy-sec": 512, "tran": None}
    device.update(extra)
    return device


LSBLK_JSON = json.dumps({"blockdevices": [
    _lsblk_device("loop0", 1048576, "loop"),
    _lsblk_device("sda", 1000204886016, "disk", model="ST1000NM0033   ", rota=True,
                  serial="Z1W4", wwn="0x5000c500a1b2c3d4", vendor="ATA     ", tran="sata",
                  **{"phy-sec": 4096}, children=[
                      _lsblk_device("sda1", 536870912, "part", uuid="ABCD-1234",
                                    partuuid="0a1b2c3d-01")]),
    _lsblk_device("nvme0n1", 512110190592, "disk", model="Samsung SSD 970", tran="nvme"),
    _lsblk_device("sr0", 1073741312, "rom"),
    _lsblk_device("fd0", 4096, "disk"),
    _lsblk_device("zram0", 8589934592, "disk"),
    _lsblk_device("sdb", 0, "disk"),
]}).encode()

LSBLK_PAIRS = (b'KNAME="sda" MODEL="Old Disk" SIZE="2000000" ROTA="1" TYPE="disk" UUID="" '
               b'PARTUUID="" SERIAL="S1" WWN="" VENDOR="ACME\\x20" LOG_SEC="512" '
               b'PHY_SEC="4096" TRAN="sas"\n'
               b'KNAME="loop0" MODEL="" SIZE="100" ROTA="0" TYPE="loop" UUID="" PARTUUID="" '
               b'SERIAL="" WWN="" VENDOR="" LOG-SEC="512" PHY-SEC="512" TRAN=""\n')

IP_ADDR = json.dumps([
    {"ifindex": 1, "ifname": "lo", "addr_info": [
        {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]},
    {"ifindex": 2, "ifname": "eth0", "addr_info": [
        {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"},
        {"family": "inet", "local": "192.0.2.10", "prefixlen": 24, "scope": "global"},
        {"family": "inet6", "local": "2001:db8::10", "prefixlen": 64, "scope": "global"}]},
    {"ifindex": 3, "ifname": "eth1", "addr_info": [
        {"family": "inet6", "local": "fe80::2", "prefixlen": 64, "scope": "link"}]},
    {},
]).encode()

IPMI_LAN_PRINT = b"""\
Set in Progress         : Set Complete
Auth Type Support       : NONE MD2 MD5 PASSWORD
IP Address Source       : Static Address
IP Address              : 10.0.0.5
Subnet Mask             : 255.255.255.0
MAC Address             : 38:63:BB:4A:EA:99
Default Gateway IP      : 10.0.0.1
"""

IPMI_LAN_PRINT_UNCONFIGURED = b"""\
IP Address Source       : DHCP Address
IP Address              : 0.0.0.0
MAC Address             : 38:63:bb:4a:ea:98
"""

IPMI_LAN6_PRINT = b"""\
IPv6/IPv4 Support:     IPv6 only: no
                       IPv4 and IPv6: yes
IPv6/IPv4 Addressing Enables: both
IPv6 Header Static Hop Limit: 64
IPv6 Static Address 0:
    Enabled:        no
    Address:        ::/64
    Status:         disabled
IPv6 Dynamic Address 0:
    Source/Type:    SLAAC
    Address:        fe80::3a63:bbff:fe4a:ea99/64
    Status:         active
IPv6 Dynamic Address 1:
    Source/Type:    DHCPv6
    Address:        2001:db8::5/64
    Status:         active
"""

IPMI_LAN6_PRINT_V4_ONLY = b"""\
IPv6/IPv4 Addressing Enables: ipv4
IPv6 Static Address 0:
    Address:        2001:db8::99/64
    Status:         active
"""

BASE_ANSWERS: dict[tuple[str, ...], Answer] = {
    ("lscpu",): LSCPU,
    ("dmidecode", "--type", "memory"): DMIDECODE_MEMORY,
    ("lsblk", "-bia", "--json"): LSBLK_JSON,
    ("ip", "-j", "addr", "show"): IP_ADDR,
    ("biosdevname", "-i", "eth0"): b"em1\n",
    ("biosdevname", "-i", "eth1"): Exit(4, b"", b"running in a virtual machine"),
    ("ipmitool", "lan", "print", "1"): IPMI_LAN_PRINT,
    ("ipmitool", "lan6", "print", "1"): IPMI_LAN6_PRINT,
}

UDEV = {"sda": {"ID_WWN": "0x5000c500a1b2c3d4", "ID_WWN_WITH_EXTENSION": "0x5000c500a1b2c3d4",
                "ID_WWN_VENDOR_EXTENSION": "0x0001", "ID_SERIAL_SHORT": "udev-serial",
                "ID_MODEL": "udev model"},
        "nvme0n1": {"ID_SERIAL_SHORT": "S4EWNX0N"}}

# The fields the spec's "Hardware Inventory" section lists for every inventory.
SPEC_FIELDS = {
    "cpu": {"model_name", "frequency", "count", "architecture", "flags"},
    "memory": {"total", "physical_mb"},
    "disks": {"name", "model", "size", "rotational", "wwn", "serial", "vendor",
              "wwn_with_extension", "wwn_vendor_extension", "hctl", "by_path"},
    "interfaces": {"name", "mac_address", "ipv4_address", "lldp", "vendor", "product",
                   "biosdevname"},
    "system_vendor": {"product_name", "serial_number", "manufacturer"},
    "boot": {"current_boot_mode", "pxe_interface"},
}
SPEC_TOP_LEVEL = set(SPEC_FIELDS) | {"bmc_address", "bmc_v6address", "hostname"}


class GenericTestCase(SynchronousTestCase):
    """A fake machine: two NICs, one virtual interface, two disks, DMI files, a BMC."""

    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        self.system.add_interface("eth0", "52:54:00:12:34:56")
        self.system.add_interface("eth1", "52:54:00:AB:CD:EF", carrier=None, speed=-1,
                                  pci_address="0000:00:03.0", driver="virtio_net",
                                  vendor="0x1af4", product="0x0001", virtio="virtio2")
        self.system.add_interface("br0", "52:54:00:00:00:01", physical=False)
        self.system.add_interface("lo", "00:00:00:00:00:00", physical=False)
        self.system.add_block_device("sda", hctl="0:0:0:0",
                                     by_path="pci-0000:00:1f.2-ata-1")
        self.system.add_block_device("nvme0n1", by_path="pci-0000:01:00.0-nvme-1")
        self.system.set_meminfo(16318048)
        self.system.set_cpuinfo(CPUINFO)
        self.system.set_dmi(product_name="PowerEdge R640", product_serial="ABC123",
                            sys_vendor="Dell Inc.", bios_vendor="Dell Inc.",
                            bios_version="2.10.0", bios_date="01/15/2021")
        self.system.add_ipmi_device()
        self.system.set_cmdline("console=ttyS0 BOOTIF=01-52-54-00-12-34-56 ipa-debug=1")
        self.clock = Clock()

    def manager(self, answers: Mapping[tuple[str, ...], Answer] | None = None,
                udev: Mapping[str, Mapping[str, str]] | None = None,
                lldp: Any = None, **runner_options: Any) -> GenericHardwareManager:
        self.runner = FakeRunner(BASE_ANSWERS if answers is None else answers,
                                 **runner_options)
        udev_db = UDEV if udev is None else udev
        manager = GenericHardwareManager(udev=lambda name: udev_db.get(name, {}), lldp=lldp)
        manager.bind(HardwareContext(self.system.config(), self.runner, self.clock, None))
        return manager

    def answers(self, **changes: Answer | None) -> dict[tuple[str, ...], Answer]:
        """BASE_ANSWERS with entries replaced or (None) removed; keys are argv joined by _."""
        answers = dict(BASE_ANSWERS)
        for joined, answer in changes.items():
            key = tuple(joined.split("_"))
            if answer is None:
                answers.pop(key, None)
            else:
                answers[key] = answer
        return answers

    def result(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return self.successResultOf(Deferred.fromCoroutine(coroutine))


class ManagerBasicsTests(GenericTestCase):
    def test_identity_and_support(self) -> None:
        manager = self.manager()
        self.assertEqual(manager.get_version(),
                         {"name": "generic_hardware_manager", "version": "1.2"})
        self.assertEqual(manager.evaluate_hardware_support(), HardwareSupport.GENERIC)

    def test_steps(self) -> None:
        BURNIN = ["burnin_cpu", "burnin_gpu", "burnin_disk", "burnin_memory", "burnin_network"]
        manager = self.manager()
        self.assertEqual([(s["step"], s["priority"], s["interface"])
                          for s in manager.get_clean_steps({}, [])],
                         [("erase_devices_metadata", 99, "deploy"),
                          ("erase_devices", 10, "deploy"),
                          ("erase_devices_express", 0, "deploy"),
                          ("erase_pstore", 0, "deploy"), ("clean_uefi_nvram", 0, "deploy"),
                          ("delete_configuration", 0, "raid"),
                          ("create_configuration", 0, "raid"),
                          *[(name, 0, "deploy") for name in BURNIN]])
        self.assertEqual([(s["step"], s["priority"], s["interface"])
                          for s in manager.get_deploy_steps({}, [])],
                         [("write_image", 0, "deploy"), ("erase_devices_metadata", 0, "deploy"),
                          ("clean_uefi_nvram", 0, "deploy"),
                          ("inject_files", 0, "deploy"), ("apply_configuration", 0, "raid"),
                          ("execute_bootc_install", 0, "deploy")])
        service = manager.get_service_steps({}, [])
        self.assertEqual([(s["step"], s["priority"], s["interface"]) for s in service],
                         [("delete_configuration", 0, "raid"),
                          ("apply_configuration", 0, "raid"),
                          ("create_configuration", 0, "raid"),
                          ("write_image", 0, "deploy"), ("inject_files", 0, "deploy"),
                          ("execute_bootc_install", 0, "deploy"),
                          *[(name, 0, "deploy") for name in BURNIN if name != "burnin_disk"]])
        by_name = {s["step"]: s for s in service}
        # Ironic refuses a service step's arguments that its argsinfo does not list.
        self.assertEqual(set(by_name["write_image"]["argsinfo"]), {"image_info", "configdrive"})
        self.assertEqual(set(by_name["inject_files"]["argsinfo"]), {"files", "verify_ca"})
        self.assertIn("raid_config", by_name["apply_configuration"]["argsinfo"])
        self.assertFalse(any(s["step"].startswith("erase") for s in service))

    def test_service_steps_run_through_the_service_extension(self) -> None:
        """Advertised, listed under the manager with its version, and run after the version
        check; a clean-only step is refused."""
        from ipa_twisted.agent import Agent
        manager = self.manager()
        managers = HardwareManagers([(manager, HardwareSupport.GENERIC)])
        agent = Agent(self.system.config(), self.clock, self.runner, managers=managers,
                      extensions=default_extensions())
        node = {"uuid": "n-1", "properties": {}}

        def run(name: str, **params: Any) -> Any:
            result = self.result(agent.execute_command(name, params))
            self.successResultOf(result.wait())
            return result

        listed = run("service.get_service_steps", node=node, ports=[]).command_result
        self.assertEqual(listed["hardware_manager_version"],
                         {"generic_hardware_manager": "1.2"})
        self.assertIn("inject_files", [s["step"] for s in
                                       listed["service_steps"]["generic_hardware_manager"]])
        injected: list[Any] = []

        async def inject_files(node: Any, ports: Any, files: Any = None,
                               verify_ca: Any = True) -> str:
            injected.append(files)
            return "injected"
        manager.inject_files = inject_files  # type: ignore[method-assign]
        step = {"step": "inject_files", "interface": "deploy", "priority": 0,
                "args": {"files": [{"path": "/etc/motd", "content": "aGk="}]}}
        done = run("service.execute_service_step", step=step, node=node, ports=[],
                   service_version={"generic_hardware_manager": "1.2"})
        self.assertEqual(done.command_status.value, "SUCCEEDED", done.command_error)
        self.assertEqual(done.command_result, {"service_result": "injected",
                                               "service_step": step})
        self.assertEqual(injected, [[{"path": "/etc/motd", "content": "aGk="}]])
        stale = run("service.execute_service_step", step=step, node=node, ports=[],
                    service_version={"generic_hardware_manager": "1.0"})
        self.assertEqual(stale.command_error.type, "VersionMismatch")
        erase = run("service.execute_service_step", step={"step": "erase_devices_metadata"},
                    node=node, ports=[])
        self.assertEqual(erase.command_error.type, "ServicingError")
        self.assertIn("no hardware manager offers it", erase.command_error.details)
        self.assertEqual(len(injected), 1)


class CPUTests(GenericTestCase):
    def test_from_lscpu(self) -> None:
        cpu = self.result(self.manager().get_cpus())
        self.assertEqual(cpu, CPU(model_name="Intel(R) Xeon(R) Silver 4110 CPU @ 2.10GHz",
                                  frequency="3000.0000", count=16, architecture="x86_64",
                                  flags=["fpu", "vme", "de", "pse", "tsc", "msr"],
                                  socket_count=1))

    def test_cpuinfo_fills_what_lscpu_lacks(self) -> None:
        lscpu = b"Architecture: aarch64\nCPU(s): 2\nModel name: Cortex-A72\n"
        cpu = self.result(self.manager(self.answers(lscpu=lscpu)).get_cpus())
        self.assertEqual((cpu.model_name, cpu.frequency, cpu.count, cpu.architecture),
                         ("Cortex-A72", "2099.998", 2, "aarch64"))
        self.assertEqual((cpu.flags, cpu.socket_count), (["fpu", "vme", "sse", "sse2"], 2))

    def test_cpuinfo_without_lscpu(self) -> None:
        cpu = self.result(self.manager(self.answers(lscpu=None), unknown_missing=True)
                          .get_cpus())
        self.assertEqual((cpu.model_name, cpu.count, cpu.socket_count),
                         ("Intel(R) Xeon(R) CPU E5-2620 v4 @ 2.10GHz", 2, 2))
        self.assertTrue(cpu.architecture)

    def test_nothing_at_all(self) -> None:
        self.system.set_cpuinfo("")
        manager = self.manager(self.answers(lscpu=Exit(1)))
        self.failureResultOf(Deferred.fromCoroutine(manager.get_cpus()), RuntimeError)


class MemoryTests(GenericTestCase):
    def test_total_and_physical(self) -> None:
        memory = self.result(self.manager().get_memory())
        self.assertEqual(memory, Memory(total=16318048 * 1024, physical_mb=16384 + 8192))

    def test_without_dmidecode(self) -> None:
        manager = self.manager(self.answers(**{"dmidecode_--type_memory": None}),
                               missing=["dmidecode"])
        self.assertEqual(self.result(manager.get_memory()),
                         Memory(total=16318048 * 1024, physical_mb=None))

    def test_dmidecode_without_devices(self) -> None:
        manager = self.manager(self.answers(**{"dmidecode_--type_memory": b"# empty\n"}))
        self.assertIsNone(self.result(manager.get_memory()).physical_mb)


class BlockDeviceTests(GenericTestCase):
    def test_disks(self) -> None:
        dev = self.system.dev_path
        disks = self.result(self.manager().list_block_devices())
        self.assertEqual(disks, [
            BlockDevice(name=f"{dev}/sda", model="ST1000NM0033", size=1000204886016,
                        rotational=True, wwn="0x5000c500a1b2c3d4", serial="Z1W4",
                        vendor="ATA", wwn_with_extension="0x5000c500a1b2c3d4",
                        wwn_vendor_extension="0x0001", hctl="0:0:0:0",
                        by_path=f"{dev}/disk/by-path/pci-0000:00:1f.2-ata-1", uuid=None,
                        partuuid=None, logical_sectors=512, physical_sectors=4096,
                        tran="sata"),
            BlockDevice(name=f"{dev}/nvme0n1", model="Samsung SSD 970", size=512110190592,
                        rotational=False, serial="S4EWNX0N", hctl=None,
                        by_path=f"{dev}/disk/by-path/pci-0000:01:00.0-nvme-1",
                        logical_sectors=512, physical_sectors=512, tran="nvme"),
        ])
        self.assertEqual(self.runner.argvs, [(
            "lsblk", "-bia", "--json", "-o",
            "KNAME,MODEL,SIZE,ROTA,TYPE,UUID,PARTUUID,SERIAL,WWN,VENDOR,LOG-SEC,PHY-SEC,TRAN")])

    def test_partitions_when_asked(self) -> None:
        devices = self.result(self.manager().list_block_devices(include_partitions=True))
        names = [d.name.rsplit("/", 1)[1] for d in devices]
        self.assertEqual(names, ["sda", "sda1", "nvme0n1"])
        self.assertEqual((devices[1].uuid, devices[1].partuuid), ("ABCD-1234", "0a1b2c3d-01"))

    def test_without_udev_data(self) -> None:
        disks = self.result(self.manager(udev={}).list_block_devices())
        self.assertEqual((disks[0].serial, disks[0].wwn_with_extension), ("Z1W4", None))
        self.assertIsNone(disks[1].serial)

    def test_older_lsblk_without_json(self) -> None:
        answers = self.answers(**{"lsblk_-bia_--json": Exit(1, b"", b"unrecognized option"),
                                  "lsblk_-Pbia": LSBLK_PAIRS})
        disks = self.result(self.manager(answers, udev={}).list_block_devices())
        self.assertEqual(disks, [BlockDevice(
            name=f"{self.system.dev_path}/sda", model="Old Disk", size=2000000,
            rotational=True, serial="S1", vendor="ACME", hctl="0:0:0:0",
            by_path=f"{self.system.dev_path}/disk/by-path/pci-0000:00:1f.2-ata-1",
            logical_sectors=512, physical_sectors=4096, tran="sas")])

    def test_lsblk_garbage_falls_back(self) -> None:
        answers = self.answers(**{"lsblk_-bia_--json": b"not json",
                                  "lsblk_-Pbia": LSBLK_PAIRS})
        disks = self.result(self.manager(answers).list_block_devices())
        self.assertEqual(len(disks), 1)

    def test_missing_lsblk_raises(self) -> None:
        manager = self.manager(missing=["lsblk"])
        self.failureResultOf(Deferred.fromCoroutine(manager.list_block_devices()),
                             CommandNotFoundError)
        self.assertEqual(len(self.runner.calls), 1)


class WaitForDisksTests(GenericTestCase):
    def test_waits_until_a_disk_appears(self) -> None:
        empty = json.dumps({"blockdevices": []}).encode()
        outputs = [empty, empty, LSBLK_JSON]
        manager = self.manager(self.answers(**{"lsblk_-bia_--json":
                                               lambda argv: outputs.pop(0)}))
        waiting = Deferred.fromCoroutine(manager.wait_for_disks())
        self.assertEqual(len(self.runner.calls), 1)
        self.clock.advance(3)
        self.assertNoResult(waiting)
        self.clock.advance(3)
        self.successResultOf(waiting)
        self.assertEqual(len(self.runner.calls), 3)

    def test_gives_up_without_error(self) -> None:
        empty = json.dumps({"blockdevices": []}).encode()
        manager = self.manager(self.answers(**{"lsblk_-bia_--json": empty}))
        config = self.system.config(disk_wait_attempts=4, disk_wait_delay=2.5)
        manager.bind(HardwareContext(config, self.runner, self.clock, None))
        with capturedLogs() as events:
            waiting = Deferred.fromCoroutine(manager.wait_for_disks())
            self.clock.pump([2.5] * 3)
        self.successResultOf(waiting)
        self.assertEqual(len(self.runner.calls), 4)
        self.assertIn(4, [event.get("attempts") for event in events
                          if "appeared" in event.get("log_format", "")])

    def test_listing_errors_are_retried(self) -> None:
        manager = self.manager(missing=["lsblk"])
        waiting = Deferred.fromCoroutine(manager.wait_for_disks())
        self.clock.pump([3] * 9)
        self.successResultOf(waiting)
        self.assertEqual(len(self.runner.calls), 10)


class NetworkInterfaceTests(GenericTestCase):
    def test_physical_interfaces(self) -> None:
        interfaces = self.result(self.manager().list_network_interfaces())
        self.assertEqual(interfaces, [
            NetworkInterface(name="eth0", mac_address="52:54:00:12:34:56",
                             ipv4_address="192.0.2.10", ipv6_address="2001:db8::10",
                             has_carrier=True, lldp=None, vendor="0x8086", product="0x1502",
                             biosdevname="em1", speed_mbps=1000, pci_address="0000:00:19.0",
                             driver="e1000e"),
            NetworkInterface(name="eth1", mac_address="52:54:00:ab:cd:ef",
                             ipv4_address=None, ipv6_address="fe80::2", has_carrier=False,
                             vendor="0x1af4", product="0x0001", biosdevname=None,
                             speed_mbps=None, pci_address="0000:00:03.0",
                             driver="virtio_net"),
        ])

    def test_without_ip(self) -> None:
        manager = self.manager(missing=["ip"])
        interfaces = self.result(manager.list_network_interfaces())
        self.assertEqual([(i.name, i.mac_address, i.ipv4_address) for i in interfaces],
                         [("eth0", "52:54:00:12:34:56", None),
                          ("eth1", "52:54:00:ab:cd:ef", None)])

    def test_odd_ip_output(self) -> None:
        manager = self.manager(self.answers(**{"ip_-j_addr_show": b'{"not": "a list"}'}))
        interfaces = self.result(manager.list_network_interfaces())
        self.assertEqual([i.ipv4_address for i in interfaces], [None, None])

    def test_biosdevname_not_installed_is_never_run(self) -> None:
        manager = self.manager(missing=["biosdevname"])
        with capturedLogs() as events:
            interfaces = self.result(manager.list_network_interfaces())
            self.result(manager.list_network_interfaces())
        self.assertEqual([i.biosdevname for i in interfaces], [None, None])
        self.assertNotIn("biosdevname", [argv[0] for argv in self.runner.argvs])
        self.assertEqual({e["log_level"].name for e in events
                          if "biosdevname" in e["log_format"]}, {"debug"})

    def test_biosdevname_vanishing_is_not_retried(self) -> None:
        answers = self.answers(biosdevname=CommandNotFoundError(("biosdevname",)))
        del answers[("biosdevname", "-i", "eth0")], answers[("biosdevname", "-i", "eth1")]
        manager = self.manager(answers)
        self.result(manager.list_network_interfaces())
        runs = len([a for a in self.runner.argvs if a[0] == "biosdevname"])
        self.result(manager.list_network_interfaces())
        self.assertEqual(len([a for a in self.runner.argvs if a[0] == "biosdevname"]), runs)

    def test_infiniband(self) -> None:
        self.system.add_interface(
            "ib0", "80:00:02:08:fe:80:00:00:00:00:00:00:f4:52:14:03:00:7b:cb:a1",
            link_type=32, pci_address="0000:81:00.0", driver="mlx4_core")
        interfaces = self.result(self.manager().list_network_interfaces())
        ib0 = [i for i in interfaces if i.name == "ib0"][0]
        self.assertEqual(ib0.mac_address, "f4:52:14:7b:cb:a1")
        self.assertEqual(ib0.client_id, "ff:00:00:00:00:00:02:00:00:02:c9:00:"
                                        "f4:52:14:03:00:7b:cb:a1")


class BMCTests(GenericTestCase):
    def test_address_and_mac(self) -> None:
        manager = self.manager()
        self.assertEqual(self.result(manager.get_bmc_address()), "10.0.0.5")
        self.assertEqual(self.result(manager.get_bmc_mac()), "38:63:bb:4a:ea:99")
        self.assertEqual(self.runner.calls[0].kwargs["timeout"], 10.0)

    def test_concurrent_address_and_mac_share_the_scan(self) -> None:
        manager = self.manager(hold=True)
        address = Deferred.fromCoroutine(manager.get_bmc_address())
        mac = Deferred.fromCoroutine(manager.get_bmc_mac())
        self.runner.release()
        self.assertEqual(self.successResultOf(address), "10.0.0.5")
        self.assertEqual(self.successResultOf(mac), "38:63:bb:4a:ea:99")
        self.assertEqual(self.runner.argvs, [("ipmitool", "lan", "print", "1")])

    def test_scans_channels_until_one_is_configured(self) -> None:
        answers = self.answers(**{"ipmitool_lan_print_1": Exit(1, b"", b"Invalid channel"),
                                  "ipmitool_lan_print_2": IPMI_LAN_PRINT_UNCONFIGURED,
                                  "ipmitool_lan_print_3": IPMI_LAN_PRINT})
        manager = self.manager(answers)
        self.assertEqual(self.result(manager.get_bmc_address()), "10.0.0.5")
        self.assertEqual(len(self.runner.calls), 3)

    def test_unconfigured(self) -> None:
        answers = self.answers(**{"ipmitool_lan_print_1": IPMI_LAN_PRINT_UNCONFIGURED,
                                  "ipmitool_lan6_print_1": IPMI_LAN6_PRINT_V4_ONLY})
        manager = self.manager(answers)
        self.assertEqual(self.result(manager.get_bmc_address()), "0.0.0.0")
        self.assertIsNone(self.result(manager.get_bmc_mac()))
        self.assertEqual(self.result(manager.get_bmc_v6address()), "::/0")
        self.assertEqual(len([a for a in self.runner.argvs if a[1] == "lan"]), 11 * 2)

    def test_no_ipmi_device(self) -> None:
        self.system = FakeSystem(self.mktemp())
        manager = self.manager()
        self.assertIsNone(self.result(manager.get_bmc_address()))
        self.assertIsNone(self.result(manager.get_bmc_v6address()))
        self.assertIsNone(self.result(manager.get_bmc_mac()))
        self.assertEqual(self.runner.calls, [])

    def test_other_ipmi_device_names(self) -> None:
        self.system = FakeSystem(self.mktemp())
        self.system.add_ipmi_device("ipmidev/0")
        self.assertEqual(self.result(self.manager().get_bmc_address()), "10.0.0.5")

    def test_ipmitool_missing(self) -> None:
        manager = self.manager(missing=["ipmitool"])
        self.assertIsNone(self.result(manager.get_bmc_address()))
        self.assertIsNone(self.result(manager.get_bmc_v6address()))
        self.assertEqual(len(self.runner.calls), 2)

    def test_hung_bmc_stops_the_scan(self) -> None:
        hung = ProcessTimeoutError(("ipmitool",), None, b"", b"", reason="timed out")
        manager = self.manager(self.answers(ipmitool=hung, ipmitool_lan_print_1=None,
                                            ipmitool_lan6_print_1=None))
        self.assertIsNone(self.result(manager.get_bmc_address()))
        self.assertIsNone(self.result(manager.get_bmc_v6address()))
        self.assertEqual(len(self.runner.calls), 2)

    def test_v6_prefers_global_active_address(self) -> None:
        self.assertEqual(self.result(self.manager().get_bmc_v6address()), "2001:db8::5")


class SystemAndBootTests(GenericTestCase):
    def test_vendor_from_sysfs(self) -> None:
        info = self.result(self.manager().get_system_vendor_info())
        self.assertEqual(info, SystemVendorInfo(
            product_name="PowerEdge R640", serial_number="ABC123", manufacturer="Dell Inc.",
            firmware=SystemFirmware(vendor="Dell Inc.", version="2.10.0",
                                    build_date="01/15/2021")))
        self.assertEqual(self.runner.calls, [])

    def test_unreadable_dmi_file_is_none(self) -> None:
        self.system.set_dmi(product_serial="")
        info = self.result(self.manager().get_system_vendor_info())
        self.assertIsNone(info.serial_number)

    def test_vendor_from_dmidecode(self) -> None:
        self.system = FakeSystem(self.mktemp())
        answers = self.answers(**{"dmidecode_--type_bios_--type_system": DMIDECODE_SYSTEM})
        info = self.result(self.manager(answers).get_system_vendor_info())
        self.assertEqual(info, SystemVendorInfo(
            product_name="Standard PC (Q35 + ICH9, 2009)", serial_number="SN-42",
            manufacturer="QEMU", firmware=SystemFirmware(
                vendor="SeaBIOS", version="1.15.0-1", build_date="04/01/2014")))

    def test_vendor_unknown(self) -> None:
        self.system = FakeSystem(self.mktemp())
        info = self.result(self.manager(missing=["dmidecode"]).get_system_vendor_info())
        self.assertEqual(info, SystemVendorInfo(None, None, None))
        self.assertEqual(to_jsonable(info)["firmware"],
                         {"vendor": None, "version": None, "build_date": None})

    def test_boot_info(self) -> None:
        manager = self.manager()
        self.assertEqual(manager.get_boot_info(), BootInfo("bios", "52:54:00:12:34:56"))
        self.system.set_efi()
        self.system.set_cmdline("BOOTIF=52:54:00:AA:BB:CC")
        self.assertEqual(manager.get_boot_info(), BootInfo("uefi", "52:54:00:aa:bb:cc"))
        self.system.set_cmdline("root=/dev/sda1 BOOTIF=garbage")
        self.assertEqual(manager.get_boot_info(), BootInfo("uefi", None))
        self.system.set_cmdline("quiet")
        self.assertIsNone(manager.get_boot_info().pxe_interface)


class FullSyncTests(GenericTestCase):
    """``full_sync`` (``standby.sync``): sync, drop the caches, flush every disk."""

    def setUp(self) -> None:
        super().setUp()
        self.drop_caches = self.system.write("proc/sys/vm/drop_caches", "")

    def sync_answers(self, changes: Mapping[tuple[str, ...], Answer] | None = None
                     ) -> dict[tuple[str, ...], Answer]:
        return {**BASE_ANSWERS, ("sync",): Exit(0), ("blockdev",): Exit(0), **(changes or {})}

    def test_sync_then_caches_then_each_disk(self) -> None:
        def blockdev(argv: tuple[str, ...]) -> Exit:
            with open(self.drop_caches) as f:      # the caches went before the disks
                self.assertEqual(f.read(), "3")
            return Exit(0)
        manager = self.manager(self.sync_answers({("blockdev",): blockdev}))
        self.result(manager.full_sync())
        dev = self.system.dev_path
        self.assertEqual([a for a in self.runner.argvs if a[0] in ("sync", "blockdev")],
                         [("sync",), ("blockdev", "--flushbufs", f"{dev}/sda"),
                          ("blockdev", "--flushbufs", f"{dev}/nvme0n1")])
        self.assertEqual(self.runner.argvs[0], ("sync",))

    def test_sync_failure_fails_before_anything_else(self) -> None:
        manager = self.manager(self.sync_answers({("sync",): Exit(1, stderr=b"I/O error")}))
        failure = self.failureResultOf(Deferred.fromCoroutine(manager.full_sync()))
        self.assertIn("Flushing file system buffers failed", str(failure.value))
        self.assertIn("I/O error", str(failure.value))
        self.assertEqual(self.runner.argvs, [("sync",)])
        with open(self.drop_caches) as f:
            self.assertEqual(f.read(), "")

    def test_caches_and_a_disk_that_cannot_be_flushed_are_logged(self) -> None:
        import os
        os.remove(self.drop_caches)
        dev = self.system.dev_path
        manager = self.manager(self.sync_answers({
            ("blockdev", "--flushbufs", f"{dev}/sda"): Exit(1, stderr=b"Permission denied")}))
        with capturedLogs() as events:
            self.result(manager.full_sync())
        self.assertFalse(os.path.exists(self.drop_caches), "procfs files are never created")
        self.assertIn(("blockdev", "--flushbufs", f"{dev}/nvme0n1"), self.runner.argvs)
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("drop_caches", warnings[0]["path"])
        self.assertEqual(warnings[1]["device"], f"{dev}/sda")

    def test_standby_sync_runs_every_full_sync(self) -> None:
        from ipa_twisted.agent import Agent
        manager = self.manager(self.sync_answers())
        agent = Agent(self.system.config(), self.clock, self.runner,
                      managers=HardwareManagers([(manager, HardwareSupport.GENERIC)]),
                      extensions=default_extensions())
        result = self.result(agent.execute_command("standby.sync", {}))
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.command_error)
        self.assertEqual(len([a for a in self.runner.argvs if a[0] == "blockdev"]), 2)
        with open(self.drop_caches) as f:
            self.assertEqual(f.read(), "3")


class InventoryTests(GenericTestCase):
    def test_every_spec_field(self) -> None:
        inventory = to_jsonable(self.result(self.manager().list_hardware_info()))
        self.assertLessEqual(SPEC_TOP_LEVEL, set(inventory))
        for key, fields in SPEC_FIELDS.items():
            items = inventory[key] if isinstance(inventory[key], list) else [inventory[key]]
            self.assertTrue(items, key)
            for item in items:
                self.assertLessEqual(fields, set(item), key)
        self.assertEqual(inventory["bmc_address"], "10.0.0.5")
        self.assertEqual(inventory["bmc_v6address"], "2001:db8::5")
        self.assertEqual(inventory["bmc_mac"], "38:63:bb:4a:ea:99")
        self.assertEqual(inventory["boot"], {"current_boot_mode": "bios",
                                             "pxe_interface": "52:54:00:12:34:56"})
        self.assertEqual(inventory["system_vendor"]["firmware"],
                         {"vendor": "Dell Inc.", "version": "2.10.0",
                          "build_date": "01/15/2021"})
        self.assertIsInstance(inventory["hostname"], str)

    def test_reference_json_field_order(self) -> None:
        self.assertEqual(BlockDevice.serializable_fields(), (
            "name", "model", "size", "rotational", "wwn", "serial", "vendor",
            "wwn_with_extension", "wwn_vendor_extension", "hctl", "by_path", "uuid",
            "partuuid", "logical_sectors", "physical_sectors", "tran"))
        self.assertEqual(NetworkInterface.serializable_fields(), (
            "name", "mac_address", "ipv4_address", "ipv6_address", "has_carrier", "lldp",
            "vendor", "product", "client_id", "biosdevname", "speed_mbps", "pci_address",
            "driver"))
        self.assertEqual(CPU.serializable_fields(), (
            "model_name", "frequency", "count", "architecture", "flags", "socket_count"))

    def test_missing_tools_degrade_fields_not_the_inventory(self) -> None:
        self.system.set_cpuinfo("")
        manager = self.manager({}, unknown_missing=True)
        with capturedLogs() as events:
            inventory = to_jsonable(self.result(manager.list_hardware_info()))
        self.assertIsNone(inventory["cpu"])
        self.assertIsNone(inventory["disks"])
        self.assertIsNone(inventory["bmc_address"])
        self.assertIsNone(inventory["bmc_mac"])
        self.assertEqual(inventory["memory"], {"total": 16318048 * 1024, "physical_mb": None})
        self.assertEqual([i["mac_address"] for i in inventory["interfaces"]],
                         ["52:54:00:12:34:56", "52:54:00:ab:cd:ef"])
        self.assertEqual(inventory["system_vendor"]["product_name"], "PowerEdge R640")
        degraded = {e["field"] for e in events if "left empty" in e.get("log_format", "")}
        self.assertEqual(degraded, {"cpu", "disks"})

    def test_all_commands_start_before_any_completes(self) -> None:
        manager = self.manager(hold=True)
        collecting = Deferred.fromCoroutine(manager.list_hardware_info())
        started = set(self.runner.argvs)
        for argv in [("lscpu",), ("dmidecode", "--type", "memory"),
                     ("ip", "-j", "addr", "show"), ("biosdevname", "-i", "eth0"),
                     ("biosdevname", "-i", "eth1"), ("ipmitool", "lan", "print", "1"),
                     ("ipmitool", "lan6", "print", "1")]:
            self.assertIn(argv, started)
        self.assertTrue(any(argv[0] == "lsblk" for argv in started))
        self.assertEqual(self.runner.pending, len(self.runner.calls))
        self.assertNoResult(collecting)
        self.runner.release()
        inventory = self.successResultOf(collecting)
        self.assertEqual(inventory["cpu"].count, 16)
        self.assertEqual(len(inventory["disks"]), 2)

    def test_skip_bmc_detect_runs_no_ipmitool(self) -> None:
        manager = self.manager()
        manager.context.config = manager.context.config.merged(
            {"skip_bmc_detect": True}, "Ironic's lookup answer")
        with capturedLogs() as events:
            inventory = to_jsonable(self.result(manager.list_hardware_info()))
        self.assertEqual([argv for argv in self.runner.argvs if argv[0] == "ipmitool"], [])
        self.assertIsNone(inventory["bmc_address"])
        self.assertIsNone(inventory["bmc_v6address"])
        self.assertNotIn("bmc_mac", inventory)
        self.assertEqual(list(inventory)[4:6], ["bmc_address", "bmc_v6address"])  # in place
        self.assertEqual(inventory["memory"]["total"], 16318048 * 1024)
        self.assertTrue(any("agent_skip_bmc_detect" in formatEvent(e) for e in events))
        # The policy is read at each collection: back on, ipmitool is asked again.
        manager.context.config = manager.context.config.override(skip_bmc_detect=False)
        inventory = to_jsonable(self.result(manager.list_hardware_info()))
        self.assertEqual(inventory["bmc_address"], "10.0.0.5")
        self.assertIn(("ipmitool", "lan", "print", "1"), self.runner.argvs)

    def test_through_the_dispatcher(self) -> None:
        manager = self.manager()
        managers = self.result(HardwareManagers.load(manager.context, [manager]))
        inventory = self.result(managers.list_hardware_info())
        self.assertEqual(inventory["memory"].total, 16318048 * 1024)


class RealMachineSmokeTests(TestCase):
    """The inventory of the machine running the tests, with real programs."""

    async def test_inventory_of_this_machine(self) -> None:
        for tool in ("lsblk", "ip"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} is not installed on this machine")
        from twisted.internet import reactor
        context = HardwareContext(AgentConfig(), ProcessRunner(reactor, reactor), reactor,
                                  reactor)
        managers = await HardwareManagers.load(context, [GenericHardwareManager()])
        inventory = to_jsonable(await managers.list_hardware_info())
        for key in ("cpu", "memory", "interfaces"):
            self.assertIsNotNone(inventory.get(key), key)
        self.assertGreater(inventory["memory"]["total"], 0)
        self.assertIsInstance(inventory["disks"], list)
        for interface in inventory["interfaces"]:
            if re.match(r"^(eth|en)", interface["name"]):
                self.assertRegex(interface["mac_address"], r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class LLDPAndVLANInventoryTests(GenericTestCase):
    """collect_lldp fills interfaces' lldp; enable_vlan_interfaces adds VLAN interfaces."""

    LLDP = {"eth0": [(1, "04525400123456"), (127, "0080c203006407766c616e313030"),
                     (0, "")]}

    def lldp_manager(self, **config: Any) -> GenericHardwareManager:
        def add_vlan(argv: tuple[str, ...]) -> bytes:
            # What the kernel would do: the VLAN interface appears in sysfs.
            self.system.add_interface("eth0.100", "52:54:00:12:34:56", physical=False)
            return b""

        lldp = self.LLDP

        async def fake_lldp(names: list[str]) -> dict[str, Any]:
            self.asked = names
            return dict(lldp)

        manager = self.manager(self.answers(**{
            "ip_link_add_link_eth0_name_eth0.100_type_vlan_id_100": add_vlan,
            "ip_link_set_dev_eth0.100_up": b""}), lldp=fake_lldp)
        manager.bind(HardwareContext(self.system.config(**config), self.runner, self.clock,
                                     None))
        return manager

    def test_lldp_collected_per_interface(self) -> None:
        manager = self.lldp_manager(collect_lldp=True)
        interfaces = {i.name: i for i in self.result(manager.list_network_interfaces())}
        self.assertEqual(interfaces["eth0"].lldp,
                         [[1, "04525400123456"], [127, "0080c203006407766c616e313030"],
                          [0, ""]])
        self.assertEqual(interfaces["eth1"].lldp, [])
        self.assertEqual(self.asked, ["eth0", "eth1"])

    def test_no_lldp_unless_asked(self) -> None:
        interfaces = self.result(self.lldp_manager().list_network_interfaces())
        self.assertTrue(all(i.lldp is None for i in interfaces))

    def test_vlan_from_lldp_is_brought_up_and_listed(self) -> None:
        manager = self.lldp_manager(collect_lldp=True, enable_vlan_interfaces="eth0")
        names = [i.name for i in self.result(manager.list_network_interfaces())]
        self.assertIn(("ip", "link", "add", "link", "eth0", "name", "eth0.100", "type", "vlan",
                       "id", "100"), self.runner.argvs)
        self.assertEqual(names[-1], "eth0.100")
