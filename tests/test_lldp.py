"""LLDP: the frame parser on recorded frames, the reactor reader on socket pairs, and the
whole listener against a real lldpd across a veth pair between network namespaces."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted.net import lldp
from ipa_twisted.net.lldp import MalformedFrame, get_lldp_info, parse_frame
from ipa_twisted.net.vlan import vlan_ids_from_lldp
from tests import netns
from tests.processes import poll

# Captured from lldpd 1.0.16 (Debian 12) on a veth: system name "switch-test", a custom
# 802.1 VLAN Name TLV (VLAN 100, "vlan100") and a Port VLAN ID TLV (42).
RECORDED = bytes.fromhex(
    "0180c200000eae0e7803bd1988cc020704ae0e7803bd19040703ae0e7803bd19060200040a0b73776974"
    "63682d746573740c5544656269616e20474e552f4c696e75782031322028626f6f6b776f726d29204c69"
    "6e757820362e31382e34342d66632d7634343520233120534d5020505245454d50545f44594e414d4943"
    "204030207838365f36340e04009c000410181102fe80000000000000ac0e78fffe03bd19020000000500"
    "080465786230fe0900120f030100000000fe0900120f010080000036fe0e0080c203006407766c616e31"
    "3030fe060080c201002a0000")
HEADER_LENGTH = 14


def frame(*tlvs: tuple[int, bytes], header: bytes = RECORDED[:HEADER_LENGTH]) -> bytes:
    body = b"".join(((kind << 9) | len(value)).to_bytes(2, "big") + value
                    for kind, value in tlvs)
    return header + body


MINIMAL = frame((1, b"\x04\x00\x11\x22\x33\x44\x55"), (2, b"\x05eth0"), (3, b"\x00\x78"),
                (0, b""))


class ParserTests(SynchronousTestCase):
    def test_recorded_lldpd_frame(self) -> None:
        tlvs = parse_frame(RECORDED)
        self.assertEqual(tlvs[:4], [(1, "04ae0e7803bd19"), (2, "03ae0e7803bd19"),
                                    (3, "0004"), (5, b"switch-test".hex())])
        self.assertIn((4, b"exb0".hex()), tlvs)
        self.assertEqual(tlvs[-3:], [(127, "0080c203006407766c616e313030"),
                                     (127, "0080c201002a"), (0, "")])
        self.assertEqual(len(tlvs), 13)

    def test_vlan_tags_are_skipped(self) -> None:
        tagged = RECORDED[:12] + bytes.fromhex("81000064") + RECORDED[12:]
        self.assertEqual(parse_frame(tagged), parse_frame(RECORDED))
        double = RECORDED[:12] + bytes.fromhex("88a8000a81000064") + RECORDED[12:]
        self.assertEqual(parse_frame(double), parse_frame(RECORDED))

    def test_padding_after_the_end_tlv_is_ignored(self) -> None:
        self.assertEqual(parse_frame(MINIMAL + bytes(20)), parse_frame(MINIMAL))
        self.assertEqual(parse_frame(MINIMAL)[-1], (0, ""))

    def test_a_frame_without_end_tlv_is_taken_as_is(self) -> None:
        self.assertEqual(parse_frame(MINIMAL[:-2]), parse_frame(MINIMAL)[:-1])

    def test_malformed_frames(self) -> None:
        ipv4 = RECORDED[:12] + b"\x08\x00" + RECORDED[14:]
        cases = {
            "not LLDP": ipv4,
            "too short": RECORDED[:13],
            "truncated TLV": RECORDED[:40],
            "dangling byte": MINIMAL[:-2] + b"\x00",
            "no chassis first": frame((5, b"switch"), (1, b"\x04abcdef"), (2, b"\x05p"),
                                      (3, b"\x00\x78")),
            "no TTL": frame((1, b"\x04abcdef"), (2, b"\x05p"), (0, b"")),
            "tag only": RECORDED[:12] + b"\x81\x00",
        }
        for name, data in cases.items():
            with self.subTest(name):
                self.assertRaises(MalformedFrame, parse_frame, data)

    def test_every_truncation_fails_or_is_a_prefix(self) -> None:
        full = parse_frame(RECORDED)
        for length in range(len(RECORDED)):
            try:
                tlvs = parse_frame(RECORDED[:length])
            except MalformedFrame:
                continue
            self.assertEqual(tlvs, full[:len(tlvs)], f"cut at {length}")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_garbage_never_raises_anything_else(self, data: bytes) -> None:
        for candidate in (data, RECORDED[:HEADER_LENGTH] + data):
            try:
                tlvs = parse_frame(candidate)
            except MalformedFrame:
                continue
            self.assertTrue(all(isinstance(k, int) and isinstance(v, str) for k, v in tlvs))


class FakeSys:
    """A sysfs with ``class/net/<name>/carrier`` files."""

    def __init__(self, test: TestCase, carriers: dict[str, str | None]) -> None:
        self.path = test.mktemp()
        for name, carrier in carriers.items():
            directory = os.path.join(self.path, "class", "net", name)
            os.makedirs(directory)
            if carrier is not None:
                with open(os.path.join(directory, "carrier"), "w") as f:
                    f.write(carrier + "\n")


class SocketPairs:
    """Stands in for ``open_lldp_socket``: datagram socket pairs, frames queued up front."""

    def __init__(self, test: TestCase, frames: dict[str, list[bytes]],
                 fail: dict[str, OSError] | None = None) -> None:
        self.frames, self.fail = frames, fail or {}
        self.opened: dict[str, socket.socket] = {}
        self.peers: dict[str, socket.socket] = {}
        self._test = test

    def __call__(self, name: str) -> socket.socket:
        if name in self.fail:
            raise self.fail[name]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._test.addCleanup(theirs.close)
        self._test.addCleanup(ours.close)
        ours.setblocking(False)
        for data in self.frames.get(name, []):
            theirs.send(data)
        self.opened[name], self.peers[name] = ours, theirs
        return ours


class ReaderTests(TestCase):
    """The listener on the real reactor, fed through socket pairs (no root needed)."""

    async def test_first_valid_frame_per_interface_then_return(self) -> None:
        fake_sys = FakeSys(self, {"eth0": "1", "eth1": "1"})
        sockets = SocketPairs(self, {"eth0": [RECORDED[:40], b"junk", RECORDED, MINIMAL],
                                     "eth1": [MINIMAL]})
        started = time.monotonic()
        with capturedLogs() as events:
            info = await get_lldp_info(["eth0", "eth1"], 30, reactor, fake_sys.path,
                                       open_socket=sockets)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(info, {"eth0": parse_frame(RECORDED), "eth1": parse_frame(MINIMAL)})
        skipped = [e for e in events if "malformed" in e.get("log_format", "")]
        self.assertEqual(len(skipped), 2)
        self.assertTrue(all(e["log_level"] == LogLevel.debug for e in skipped))
        self.assertEqual([s.fileno() for s in sockets.opened.values()], [-1, -1])

    async def test_no_carrier_is_skipped_without_listening(self) -> None:
        fake_sys = FakeSys(self, {"eth0": "0", "eth1": None, "eth2": "1"})
        sockets = SocketPairs(self, {"eth2": [MINIMAL]})
        started = time.monotonic()
        info = await get_lldp_info(["eth0", "eth1", "eth2", "gone"], 30, reactor,
                                   fake_sys.path, open_socket=sockets)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(info, {"eth0": [], "eth1": [], "eth2": parse_frame(MINIMAL),
                                "gone": []})
        self.assertEqual(list(sockets.opened), ["eth2"])

    async def test_nothing_to_listen_on_returns_at_once(self) -> None:
        fake_sys = FakeSys(self, {"eth0": "0"})
        info = await get_lldp_info(None, 3600, reactor, fake_sys.path,
                                   open_socket=SocketPairs(self, {}))
        self.assertEqual(info, {"eth0": []})

    async def test_silence_until_the_timeout(self) -> None:
        fake_sys = FakeSys(self, {"eth0": "1", "eth1": "1"})
        sockets = SocketPairs(self, {"eth1": [MINIMAL]})
        started = time.monotonic()
        info = await get_lldp_info(["eth0", "eth1"], 0.3, reactor, fake_sys.path,
                                   open_socket=sockets)
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        self.assertEqual(info, {"eth0": [], "eth1": parse_frame(MINIMAL)})
        self.assertEqual(sockets.opened["eth0"].fileno(), -1)
        self.assertEqual([r for r in reactor.getReaders()
                          if isinstance(r, lldp._FrameReader)], [])

    async def test_an_interface_that_cannot_be_opened_is_logged(self) -> None:
        fake_sys = FakeSys(self, {"eth0": "1", "eth1": "1"})
        sockets = SocketPairs(self, {"eth1": [MINIMAL]},
                              fail={"eth0": PermissionError(1, "Operation not permitted")})
        with capturedLogs() as events:
            info = await get_lldp_info(["eth0", "eth1"], 30, reactor, fake_sys.path,
                                       open_socket=sockets)
        self.assertEqual(info["eth0"], [])
        warned = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["interface"] for e in warned], ["eth0"])
        self.assertIn("Operation not permitted", warned[0]["error"])

    async def test_cancelling_closes_the_sockets(self) -> None:
        fake_sys = FakeSys(self, {"eth0": "1"})
        sockets = SocketPairs(self, {})
        listening = Deferred.fromCoroutine(get_lldp_info(["eth0"], 3600, reactor,
                                                         fake_sys.path, open_socket=sockets))
        await poll(lambda: "eth0" in sockets.opened)
        listening.cancel()
        with self.assertRaises(CancelledError):
            await listening
        self.assertEqual(sockets.opened["eth0"].fileno(), -1)
        self.assertEqual([r for r in reactor.getReaders()
                          if isinstance(r, lldp._FrameReader)], [])

    def test_the_real_socket_fails_cleanly(self) -> None:
        # Without CAP_NET_RAW: PermissionError; with it: no such device.
        self.assertRaises(OSError, lldp.open_lldp_socket, netns.unique("nosuch"))


def _promiscuity(link: dict[str, Any]) -> int:
    return int(link.get("promiscuity", 0))


class LLDPdTests(TestCase):
    """Our listener in one namespace, lldpd in another, across veth pairs."""

    skip = netns.skip_reason("lldpd", "lldpcli")
    timeout = 120

    async def _show_link(self, namespace: str, name: str) -> dict[str, Any]:
        links = json.loads(await netns.ip("-n", namespace, "-d", "-j", "link", "show", name))
        link: dict[str, Any] = links[0]
        return link

    async def test_tlvs_match_what_lldpd_announces(self) -> None:
        agent, switch = await netns.make_namespace(self), await netns.make_namespace(self)
        ours1, theirs1 = await netns.make_veth(self, agent, switch)
        ours2, theirs2 = await netns.make_veth(self, agent, switch)
        name = netns.unique("sw-")
        peer = netns.LLDPPeer(self, switch, [theirs1, theirs2], name, vlans=[100])
        await peer.start()
        started = time.monotonic()
        child = netns.python_in(agent, "ipa_twisted.net.lldp", "--interfaces",
                                f"{ours1},{ours2}", "--timeout", "60")
        self.assertEqual(await netns.run_to_end(child, self), 0, child.output)
        self.assertLess(time.monotonic() - started, 30, "did not return on the last frame")
        info = netns.json_line(child)
        self.assertEqual(sorted(info), sorted([ours1, ours2]))

        chassis = json.loads(await peer.lldpcli("-f", "json", "show", "chassis"))
        (announced_name, details), = chassis["local-chassis"]["chassis"].items()
        self.assertEqual(announced_name, name)
        self.assertEqual(details["id"]["type"], "mac")
        chassis_mac = details["id"]["value"].replace(":", "")
        for ours, theirs in ((ours1, theirs1), (ours2, theirs2)):
            tlvs = [tuple(tlv) for tlv in info[ours]]
            port_mac = (await self._show_link(switch, theirs))["address"].replace(":", "")
            self.assertEqual(tlvs[0], (1, "04" + chassis_mac))     # chassis ID: MAC
            self.assertEqual(tlvs[1], (2, "03" + port_mac))        # port ID: MAC
            self.assertEqual(tlvs[2][0], 3)                        # TTL
            self.assertIn((4, theirs.encode().hex()), tlvs)        # port description
            self.assertIn((5, name.encode().hex()), tlvs)          # system name
            self.assertEqual(tlvs[-1], (0, ""))
            if ours == ours1:
                self.assertEqual(vlan_ids_from_lldp(tlvs), [100])
                if not peer.real_vlans:   # else lldpd names it after the VLAN interface
                    self.assertIn((127, "0080c2030064" + "07" + b"vlan100".hex()), tlvs)
            else:
                self.assertEqual(vlan_ids_from_lldp(tlvs), [])

    async def test_silent_and_down_interfaces_and_promiscuity_restored(self) -> None:
        agent, switch = await netns.make_namespace(self), await netns.make_namespace(self)
        talking, theirs = await netns.make_veth(self, agent, switch)
        silent, _ = await netns.make_veth(self, agent, switch)
        down, _ = await netns.make_veth(self, agent, switch)
        await netns.ip("-n", agent, "link", "set", down, "down")
        peer = netns.LLDPPeer(self, switch, [theirs], netns.unique("sw-"))
        await peer.start()
        started = time.monotonic()
        child = netns.python_in(agent, "ipa_twisted.net.lldp", "--interfaces",
                                f"{talking},{silent},{down}", "--timeout", "4")
        self.addCleanup(child.stop, "KILL")

        async def promiscuous() -> bool:
            return _promiscuity(await self._show_link(agent, silent)) == 1

        await poll(promiscuous, timeout=20)
        self.assertEqual(_promiscuity(await self._show_link(agent, down)), 0)
        self.assertEqual(await netns.run_to_end(child, self), 0, child.output)
        self.assertGreaterEqual(time.monotonic() - started, 3.5)
        info = netns.json_line(child)
        self.assertEqual(info[silent], [])
        self.assertEqual(info[down], [])
        self.assertEqual(info[talking][0][0], 1)
        for name in (talking, silent, down):
            self.assertEqual(_promiscuity(await self._show_link(agent, name)), 0, name)
