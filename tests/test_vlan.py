"""VLAN bring-up: the setting, VLAN IDs from LLDP TLVs, the ``ip`` commands (FakeRunner),
and, in network namespaces, the VLANs a real lldpd announces brought up."""

from __future__ import annotations

import json
import os

from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted.net.vlan import (bring_up_vlan_interfaces, parse_vlan_setting,
                                  vlan_ids_from_lldp, wanted_vlans)
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from tests import netns

CHASSIS = (1, "0400112233445566")


def vlan_name(vlan: int, name: str = "") -> tuple[int, str]:
    name = name or f"vlan{vlan}"
    return 127, "0080c203" + vlan.to_bytes(2, "big").hex() + f"{len(name):02x}" + \
        name.encode().hex()


def port_vlan(vlan: int) -> tuple[int, str]:
    return 127, "0080c201" + vlan.to_bytes(2, "big").hex()


LLDP = {
    "eth0": [CHASSIS, vlan_name(100), vlan_name(200), port_vlan(42), (0, "")],
    "eth1": [CHASSIS, vlan_name(300), (0, "")],
    "eth2": [],
}


class SettingTests(SynchronousTestCase):
    def test_items(self) -> None:
        self.assertEqual(parse_vlan_setting(" eth0.100, all ,,eth1 "),
                         ["eth0.100", "all", "eth1"])
        self.assertEqual(parse_vlan_setting(""), [])
        self.assertEqual(parse_vlan_setting(None), [])

    def test_vlan_ids_from_lldp(self) -> None:
        tlvs = LLDP["eth0"] + [vlan_name(100), [127, vlan_name(7)[1]]]
        self.assertEqual(vlan_ids_from_lldp(tlvs), [100, 200, 7])
        self.assertEqual(vlan_ids_from_lldp(tlvs, include_port_vlan=True), [100, 200, 42, 7])

    def test_odd_tlvs_are_skipped(self) -> None:
        tlvs = [(127, "0080c203"), (127, "zz"), (127, "00120f030064"), (126, "0080c2030064"),
                (127, "0080c2030000"), (127, "0080c2030fff"), ("x", "y"), (127,),
                vlan_name(4094)]
        self.assertEqual(vlan_ids_from_lldp(tlvs), [4094])


class WantedTests(SynchronousTestCase):
    interfaces = ["eth0", "eth1", "eth2"]

    def test_explicit_items_need_no_lldp(self) -> None:
        self.assertEqual(wanted_vlans(self.interfaces, None, "eth0.5,eth2.4094,eth0.5"),
                         [("eth0", 5), ("eth2", 4094)])

    def test_interface_and_all_use_lldp(self) -> None:
        self.assertEqual(wanted_vlans(self.interfaces, LLDP, "eth1"), [("eth1", 300)])
        self.assertEqual(wanted_vlans(self.interfaces, LLDP, "all,eth0.9"),
                         [("eth0", 100), ("eth0", 200), ("eth1", 300), ("eth0", 9)])

    def test_problems_are_logged_and_skipped(self) -> None:
        with capturedLogs() as events:
            wanted = wanted_vlans(self.interfaces, None,
                                  "eth9.5,eth0.0,eth0.4095,eth0.x,eth0,all,eth0.7")
        self.assertEqual(wanted, [("eth0", 7)])
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["item"] for e in warnings],
                         ["eth9.5", "eth0.0", "eth0.4095", "eth0.x", "eth0", "all"])
        self.assertIn("collect_lldp", warnings[-1]["log_format"])
        with capturedLogs() as events:
            self.assertEqual(wanted_vlans(self.interfaces, LLDP, "eth7"), [])
        self.assertEqual(events[0]["item"], "eth7")


class BringUpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sys_path = self.mktemp()
        os.makedirs(os.path.join(self.sys_path, "class", "net", "eth0.200"))

    def test_ip_commands(self) -> None:
        runner = FakeRunner({("ip",): b""})
        added = self.successResultOf(bring_up_vlan_interfaces(
            runner, ["eth0", "eth1"], LLDP, "eth0,eth1.5", sys_path=self.sys_path))
        # eth0.200 exists already: reported, not created again.
        self.assertEqual(added, ["eth0.100", "eth0.200", "eth1.5"])
        self.assertEqual(runner.argvs, [
            ("ip", "link", "add", "link", "eth0", "name", "eth0.100", "type", "vlan",
             "id", "100"),
            ("ip", "link", "set", "dev", "eth0.100", "up"),
            ("ip", "link", "add", "link", "eth1", "name", "eth1.5", "type", "vlan",
             "id", "5"),
            ("ip", "link", "set", "dev", "eth1.5", "up"),
        ])

    def test_failures_are_logged_and_left_out(self) -> None:
        runner = FakeRunner({
            ("ip", "link", "add", "link", "eth0", "name", "eth0.100"):
                Exit(2, b"", b"Error: Unknown device type.\n"),
            ("ip",): b""})
        with capturedLogs() as events:
            added = self.successResultOf(bring_up_vlan_interfaces(
                runner, ["eth0"], LLDP, "all", sys_path=self.sys_path))
        self.assertEqual(added, ["eth0.200"])
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warnings[0]["name"], "eth0.100")
        self.assertIn("Unknown device type", warnings[0]["error"])

    def test_names_too_long_for_linux(self) -> None:
        runner = FakeRunner({("ip",): b""})
        with capturedLogs() as events:
            added = self.successResultOf(bring_up_vlan_interfaces(
                runner, ["enx001122334455"], None, "enx001122334455.100",
                sys_path=self.sys_path))
        self.assertEqual((added, runner.argvs), ([], []))
        self.assertEqual(events[0]["name"], "enx001122334455.100")

    def test_nothing_asked(self) -> None:
        runner = FakeRunner()
        self.assertEqual(self.successResultOf(bring_up_vlan_interfaces(
            runner, ["eth0"], LLDP, "", sys_path=self.sys_path)), [])
        self.assertEqual(runner.argvs, [])

    def test_other_errors_propagate(self) -> None:
        runner = FakeRunner({("ip",): ValueError("bug")})
        self.failureResultOf(bring_up_vlan_interfaces(
            runner, ["eth0"], None, "eth0.5", sys_path=self.sys_path), ValueError)


class NamespaceTests(TestCase):
    """LLDP from lldpd in one namespace; VLANs brought up in the other."""

    skip = netns.skip_reason("lldpd", "lldpcli")
    timeout = 120

    async def _peer(self, vlans: list[int]) -> tuple[str, str]:
        agent, switch = await netns.make_namespace(self), await netns.make_namespace(self)
        ours, theirs = await netns.make_veth(self, agent, switch)
        await netns.LLDPPeer(self, switch, [theirs], netns.unique("sw-"), vlans).start()
        return agent, ours

    async def _run_vlan(self, agent: str, *args: str) -> dict[str, object]:
        child = netns.python_in(agent, "ipa_twisted.net.vlan", *args)
        self.assertEqual(await netns.run_to_end(child, self), 0, child.output)
        result: dict[str, object] = netns.json_line(child)
        return result

    async def test_vlans_announced_by_lldpd_are_found(self) -> None:
        agent, ours = await self._peer([100, 200])
        result = await self._run_vlan(agent, "--interfaces", ours, "--enable-vlan-interfaces",
                                 f"{ours}.4095", "--timeout", "30")
        lldp = result["lldp"]
        assert isinstance(lldp, dict)
        self.assertEqual(vlan_ids_from_lldp(lldp[ours]), [100, 200])
        self.assertEqual(result["vlan_interfaces"], [])    # 4095 is not a VLAN ID

    async def test_vlan_interfaces_are_brought_up(self) -> None:
        agent, ours = await self._peer([100])
        if not await netns.vlan_supported(agent, ours):
            raise self.skipTest("this kernel has no 802.1Q VLAN support (CONFIG_VLAN_8021Q)")
        result = await self._run_vlan(agent, "--interfaces", ours, "--enable-vlan-interfaces",
                                 f"{ours},{ours}.7", "--timeout", "30")
        self.assertEqual(result["vlan_interfaces"], [f"{ours}.100", f"{ours}.7"])
        for vlan in (100, 7):
            (link,) = json.loads(await netns.ip("-n", agent, "-d", "-j", "link", "show",
                                                f"{ours}.{vlan}"))
            self.assertIn("UP", link["flags"])
            self.assertEqual(link["linkinfo"]["info_data"]["id"], vlan)
        # Again: the interfaces exist, they are reported and not created twice.
        again = await self._run_vlan(agent, "--interfaces", ours, "--enable-vlan-interfaces",
                                f"{ours}.7", "--no-lldp")
        self.assertEqual(again["vlan_interfaces"], [f"{ours}.7"])
