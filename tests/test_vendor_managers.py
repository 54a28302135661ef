"""Tests for the vendor hardware managers (ipa_twisted.hardware.vendors) on fake /sys trees."""

from __future__ import annotations

import json
import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ipa_twisted.errors import IncompatibleHardwareMethodError
from ipa_twisted.hardware.dispatch import HardwareManagers, discover_managers
from ipa_twisted.hardware.interface import HardwareSupport, IHardwareManager
from ipa_twisted.context import HardwareContext
from ipa_twisted.hardware.vendors.intel_cna import IntelCnaHardwareManager
from ipa_twisted.hardware.vendors.mellanox import (MellanoxDeviceHardwareManager,
                                                   generate_client_id,
                                                   infiniband_address_to_mac)
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem

IB_ADDRESS = "a0:00:00:27:fe:80:00:00:00:00:00:00:7c:fe:90:03:00:29:26:52"
IP_JSON = json.dumps([{"ifname": "ib0", "addr_info": [
    {"family": "inet6", "local": "fe80::7efe:9003:29:2652", "scope": "link"},
    {"family": "inet", "local": "192.168.0.10", "scope": "global"},
    {"family": "inet6", "local": "2001:db8::10", "scope": "global"}]}])


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake = FakeSystem(self.mktemp())
        self.runner = FakeRunner({("ip", "-j", "addr", "show", "dev", "ib0"): IP_JSON})

    def context(self, **config: object) -> HardwareContext:
        clock = Clock()
        return HardwareContext(self.fake.config(**config), self.runner, clock, clock)


class MellanoxTests(Base):
    def manager(self) -> MellanoxDeviceHardwareManager:
        manager = MellanoxDeviceHardwareManager()
        manager.bind(self.context())
        return manager

    def test_conversions(self) -> None:
        self.assertEqual(infiniband_address_to_mac(IB_ADDRESS), "7c:fe:90:29:26:52")
        self.assertEqual(generate_client_id(IB_ADDRESS),
                         "ff:00:00:00:00:00:02:00:00:02:c9:00:7c:fe:90:03:00:29:26:52")

    def test_support(self) -> None:
        manager = self.manager()
        self.assertTrue(verifyObject(IHardwareManager, manager))
        self.fake.add_interface("eth0", "52:54:00:12:34:56")
        self.assertEqual(manager.evaluate_hardware_support(), HardwareSupport.NONE)
        self.fake.add_interface("ib0", IB_ADDRESS, vendor="0x15b3", driver="mlx5_core",
                                link_type=32, pci_address="0000:03:00.0")
        self.assertEqual(manager.evaluate_hardware_support(), HardwareSupport.MAINLINE)
        self.assertEqual(manager.HARDWARE_MANAGER_NAME, "MellanoxDeviceHardwareManager")
        self.assertEqual(manager.HARDWARE_MANAGER_VERSION, "1")

    def test_no_sysfs(self) -> None:
        manager = MellanoxDeviceHardwareManager()
        manager.bind(self.context(sys_path=os.path.join(self.fake.root, "nowhere")))
        self.assertEqual(manager.evaluate_hardware_support(), HardwareSupport.NONE)

    def test_interface_info(self) -> None:
        self.fake.add_interface("ib0", IB_ADDRESS.upper(), vendor="0x15b3",
                                product="0x1017", link_type=32, pci_address="0000:03:00.0")
        info = self.successResultOf(Deferred.fromCoroutine(
            self.manager().get_interface_info("ib0")))
        self.assertEqual((info.name, info.mac_address, info.client_id), (
            "ib0", "7c:fe:90:29:26:52",
            "ff:00:00:00:00:00:02:00:00:02:c9:00:7c:fe:90:03:00:29:26:52"))
        self.assertEqual((info.ipv4_address, info.ipv6_address),
                         ("192.168.0.10", "2001:db8::10"))
        self.assertEqual((info.vendor, info.product, info.has_carrier),
                         ("0x15b3", "0x1017", True))

    def test_addresses_are_optional(self) -> None:
        self.fake.add_interface("ib0", IB_ADDRESS, vendor="0x15b3", link_type=32)
        self.runner.answers[("ip",)] = Exit(1)
        self.runner.answers.pop(("ip", "-j", "addr", "show", "dev", "ib0"))
        info = self.successResultOf(Deferred.fromCoroutine(
            self.manager().get_interface_info("ib0")))
        self.assertIsNone(info.ipv4_address)

    def test_other_interfaces_are_not_ours(self) -> None:
        self.fake.add_interface("eth0", "52:54:00:12:34:56", vendor="0x15b3")
        self.fake.add_interface("ib1", IB_ADDRESS, vendor="0x8086", link_type=32,
                                pci_address="0000:04:00.0")
        manager = self.manager()
        for name in ("eth0", "ib1", "missing0"):
            self.failureResultOf(Deferred.fromCoroutine(manager.get_interface_info(name)),
                                 IncompatibleHardwareMethodError)

    def test_dispatch_falls_through_for_other_interfaces(self) -> None:
        self.fake.add_interface("eth0", "52:54:00:12:34:56", vendor="0x15b3")

        class Generic:
            HARDWARE_MANAGER_NAME = "generic"

            def evaluate_hardware_support(self) -> int:
                return 1

            def get_interface_info(self, interface_name: str) -> str:
                return "generic"

        managers = HardwareManagers([(self.manager(), 2), (Generic(), 1)])
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(
            managers.dispatch_to_managers("get_interface_info", "eth0"))), "generic")


class IntelCnaTests(Base):
    def manager(self, collect_lldp: bool = False) -> IntelCnaHardwareManager:
        manager = IntelCnaHardwareManager()
        manager.bind(self.context(collect_lldp=collect_lldp))
        return manager

    def command_file(self, address: str) -> str:
        return self.fake.write(f"sys/kernel/debug/i40e/{address}/command", "")

    def test_no_cna_card(self) -> None:
        self.fake.add_interface("eth0", "52:54:00:12:34:56", driver="e1000e")
        self.fake.add_interface("veth0", "52:54:00:12:34:57", physical=False)
        command = self.command_file("0000:00:19.0")
        manager = self.manager(collect_lldp=True)
        self.assertTrue(verifyObject(IHardwareManager, manager))
        self.assertEqual(manager.evaluate_hardware_support(), HardwareSupport.NONE)
        with open(command) as f:
            self.assertEqual(f.read(), "")

    def test_cna_card_without_lldp(self) -> None:
        self.fake.add_interface("eth0", "3c:fd:fe:00:00:01", driver="i40e")
        command = self.command_file("0000:00:19.0")
        self.assertEqual(self.manager().evaluate_hardware_support(),
                         HardwareSupport.MAINLINE)
        with open(command) as f:
            self.assertEqual(f.read(), "")

    def test_cna_card_with_lldp_stops_the_embedded_agent(self) -> None:
        self.fake.add_interface("eth0", "3c:fd:fe:00:00:01", driver="i40e",
                                pci_address="0000:3b:00.0")
        first, second = self.command_file("0000:3b:00.0"), self.command_file("0000:3b:00.1")
        os.makedirs(self.fake.path("sys/kernel/debug/i40e/0000:3b:00.2/command"))
        with capturedLogs() as events:
            self.assertEqual(self.manager(collect_lldp=True).evaluate_hardware_support(),
                             HardwareSupport.MAINLINE)
        for path in (first, second):
            with open(path) as f:
                self.assertEqual(f.read(), "lldp stop")
        warnings = [e for e in events if "addresses" in e]
        self.assertEqual(warnings[0]["addresses"], "0000:3b:00.2")

    def test_debugfs_missing_is_a_warning(self) -> None:
        self.fake.add_interface("eth0", "3c:fd:fe:00:00:01", driver="i40e")
        with capturedLogs() as events:
            self.assertEqual(self.manager(collect_lldp=True).evaluate_hardware_support(),
                             HardwareSupport.MAINLINE)
        self.assertTrue(any("not loaded properly" in e["log_format"] for e in events))


class PluginTests(SynchronousTestCase):
    def test_found_as_plugins(self) -> None:
        kinds = {type(manager) for manager in discover_managers()}
        self.assertIn(MellanoxDeviceHardwareManager, kinds)
        self.assertIn(IntelCnaHardwareManager, kinds)
