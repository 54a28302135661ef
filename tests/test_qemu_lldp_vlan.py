"""LLDP and VLANs inside the VM, where this machine's kernel has no 802.1Q.

Our ramdisk boots in QEMU with a second NIC on a tap device. QEMU opens the tap in this
machine's namespace (it exists there down, without addresses, for the moment it takes to
move it), then the test moves it into a network namespace of its own, where ``lldpd``
announces a system name and two VLANs on it (as 802.1 VLAN Name TLVs: custom TLVs when the
host kernel cannot make VLAN interfaces, see tests/netns.py). The agent runs with
``ipa-collect-lldp=1`` and ``ipa-enable-vlan-interfaces=all``: its inventory, asked for over
REST (``poll.get_hardware_info``), shows the TLVs on the second NIC and the VLAN interfaces
the agent brought up inside the guest (whose Debian kernel has 802.1Q), which the guest's
``ip -d link`` confirms. The namespace (and the tap with it) goes when the test ends.
"""

from __future__ import annotations

import json
import os

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from ipa_twisted.net.vlan import vlan_ids_from_lldp
from tests import netns, qemu
from tests.processes import poll

log = Logger()
MAC = "52:54:00:1d:d0:01"
VLANS = [100, 200]
TLV_SYSTEM_NAME = 5


class LLDPAndVLANInVMTests(TestCase):
    """lldpd on a tap in a test namespace; the agent in the VM hears it and makes VLANs."""

    timeout = 900

    def setUp(self) -> None:
        reason = qemu.unavailable() or netns.skip_reason("lldpd", "lldpcli")
        if reason is not None:
            raise SkipTest(reason)
        if not os.path.exists("/dev/net/tun"):
            raise SkipTest("no /dev/net/tun: QEMU cannot make a tap device here")

    async def test_lldp_tlvs_and_vlan_interfaces(self) -> None:
        ramdisk = await qemu.build_ramdisk()
        switch = await netns.make_namespace(self)
        tap = netns.unique("tp")
        system_name = netns.unique("sw-")
        vm = qemu.VirtualMachine(
            ramdisk, [], memory_mb=768, probe=True,
            kernel_args="ipa-standalone=1 ipa-collect-lldp=1 ipa-lldp-timeout=20 "
                        "ipa-enable-vlan-interfaces=all",
            extra_args=["-netdev", f"tap,id=lldp,ifname={tap},script=no,downscript=no",
                        "-device", f"virtio-net-pci,netdev=lldp,mac={MAC}"])
        self.addCleanup(vm.stop)
        booted = Deferred.fromCoroutine(vm.start(timeout=400))
        # QEMU made the tap here (down, no address): straight into the test's namespace.
        await poll(lambda: os.path.exists(f"/sys/class/net/{tap}")
                   or (vm.child is not None and vm.child.ended.called), timeout=60)
        self.assertTrue(os.path.exists(f"/sys/class/net/{tap}"), vm.console[-3000:])
        await netns.ip("link", "set", tap, "netns", switch)
        await netns.ip("-n", switch, "link", "set", tap, "up")
        peer = netns.LLDPPeer(self, switch, [tap], system_name, VLANS)
        await peer.start()
        await booted

        result = await vm.post("poll.get_hardware_info", {}, timeout=300)
        self.assertEqual(result["command_status"], "SUCCEEDED", result)
        interfaces = {i["name"]: i for i in result["command_result"]["interfaces"]}
        # the second NIC (its VLAN interfaces have its MAC too)
        [second] = [i for i in interfaces.values()
                    if i["mac_address"] == MAC and i["pci_address"] is not None]
        name = second["name"]
        tlvs = second["lldp"]
        self.assertTrue(tlvs, f"no LLDP heard on {name}: {interfaces}")
        self.assertIn([TLV_SYSTEM_NAME, system_name.encode().hex()], tlvs)
        self.assertEqual(vlan_ids_from_lldp(tlvs), VLANS, tlvs)
        for vlan in VLANS:
            self.assertIn(f"{name}.{vlan}", interfaces, sorted(interfaces))
            self.assertEqual(interfaces[f"{name}.{vlan}"]["mac_address"], MAC)
        log.info("LLDP on {name}: {count} TLVs, VLANs {vlans}; interfaces {names}",
                 name=name, count=len(tlvs), vlans=vlan_ids_from_lldp(tlvs),
                 names=sorted(interfaces))
        # ... and they are real VLAN interfaces, up, in the guest.
        code, out = await vm.run_in_guest(["ip", "-d", "-j", "link", "show"], timeout=120)
        self.assertEqual(code, 0, out)
        links = {link["ifname"]: link for link in json.loads(out)}
        for vlan in VLANS:
            link = links[f"{name}.{vlan}"]
            self.assertIn("UP", link["flags"], link)
            self.assertEqual((link["linkinfo"]["info_kind"],
                              link["linkinfo"]["info_data"]["id"]), ("vlan", vlan), link)
