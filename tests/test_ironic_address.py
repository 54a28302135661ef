"""find_advertise_address: the route's source address, an interface's address, retries."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.errors import LookupAgentIPError
from ipa_twisted.ironic.address import find_advertise_address
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_resolver import FakeResolver


def route(dst: str, src: str, dev: str = "eth0") -> bytes:
    return json.dumps([{"dst": dst, "gateway": "10.0.0.254", "dev": dev, "prefsrc": src,
                        "flags": [], "uid": 0, "cache": []}]).encode()


def addresses(*infos: tuple[str, str, str]) -> bytes:
    return json.dumps([{"ifindex": 2, "ifname": "eth0", "addr_info": [
        {"family": family, "local": local, "prefixlen": 24, "scope": scope}
        for family, local, scope in infos]}]).encode()


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def find(self, runner: FakeRunner, api_url: str | list[str],
             **kwargs: Any) -> Deferred[str]:
        kwargs.setdefault("attempts", 3)
        kwargs.setdefault("delay", 10)
        return Deferred.fromCoroutine(find_advertise_address(
            runner, api_url, clock=self.clock, **kwargs))


class RouteSourceTests(_Base):
    def test_source_of_the_route_to_ironic(self) -> None:
        runner = FakeRunner({("ip", "-j", "route", "get", "10.1.2.3"):
                             route("10.1.2.3", "10.0.0.5")})
        with capturedLogs() as events:
            found = self.successResultOf(self.find(runner, "http://10.1.2.3:6385/"))
        self.assertEqual(found, "10.0.0.5")
        self.assertEqual(events[-1]["address"], "10.0.0.5")

    def test_ipv6_ironic(self) -> None:
        runner = FakeRunner({("ip", "-j", "route", "get", "fd00::1"): route("fd00::1",
                                                                          "fd00::5")})
        self.assertEqual(self.successResultOf(self.find(runner, "https://[fd00::1]:6385")),
                         "fd00::5")

    def test_plain_text_output(self) -> None:
        runner = FakeRunner({("ip",): b"10.1.2.3 via 10.0.0.254 dev eth0 src 10.0.0.7 uid 0\n"
                                      b"    cache\n"})
        self.assertEqual(self.successResultOf(self.find(runner, "http://10.1.2.3:6385")),
                         "10.0.0.7")

    def test_loopback_ironic_is_reached_from_loopback(self) -> None:
        runner = FakeRunner()
        self.assertEqual(self.successResultOf(self.find(runner, "http://127.0.0.1:6385")),
                         "127.0.0.1")
        self.assertEqual(self.successResultOf(self.find(runner, "http://[::1]:6385")), "::1")
        self.assertEqual(runner.calls, [])

    def test_names_are_resolved(self) -> None:
        runner = FakeRunner({("ip", "-j", "route", "get", "10.1.2.3"):
                             route("10.1.2.3", "10.0.0.5")})
        resolver = FakeResolver({"ironic.test": "10.1.2.3"})
        found = self.find(runner, "http://ironic.test:6385", resolver=resolver)
        self.assertEqual(self.successResultOf(found), "10.0.0.5")
        self.assertEqual(resolver.asked, ["ironic.test"])

    def test_unresolvable_names_are_retried_then_fail(self) -> None:
        resolver = FakeResolver({})
        with capturedLogs() as events:
            found = self.find(FakeRunner(), "http://ironic.test:6385", resolver=resolver,
                              attempts=2, delay=5)
            self.clock.advance(5)
        self.failureResultOf(found, LookupAgentIPError)
        self.assertEqual(len(resolver.asked), 2)
        self.assertIn("cannot resolve ironic.test", events[0]["error"])

    def test_retries_until_a_route_appears(self) -> None:
        outputs: list[Any] = [Exit(2, b"", b"RTNETLINK answers: Network is unreachable"),
                              route("10.1.2.3", "fe80::1"),  # link-local: not advertised
                              route("10.1.2.3", "10.0.0.5")]
        runner = FakeRunner({("ip",): lambda argv: outputs.pop(0)})
        with capturedLogs() as events:
            found = self.find(runner, "http://10.1.2.3:6385", attempts=3, delay=10)
            self.clock.advance(10)
            self.assertNoResult(found)
            self.clock.advance(10)
        self.assertEqual(self.successResultOf(found), "10.0.0.5")
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual([e["attempt"] for e in warnings], [1, 2])
        self.assertIn("Network is unreachable", warnings[0]["error"])
        self.assertIn("unusable source fe80::1", warnings[1]["error"])
        self.assertEqual(runner.calls[0].kwargs["timeout"], 10.0)

    def test_gives_up_after_the_attempts(self) -> None:
        runner = FakeRunner({("ip",): Exit(2)})
        with capturedLogs():
            found = self.find(runner, "http://10.1.2.3:6385", attempts=3, delay=5)
            self.clock.pump([5, 4.9])
            self.assertNoResult(found)
            self.clock.advance(0.1)
        error = self.failureResultOf(found, LookupAgentIPError).value
        self.assertEqual(error.details, "Agent could not find a valid IP address.")
        self.assertEqual(len(runner.calls), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SeveralURLsTests(_Base):
    def test_first_host_with_a_route_wins(self) -> None:
        runner = FakeRunner({
            ("ip", "-j", "route", "get", "10.9.9.9"): Exit(2, b"", b"Network is unreachable"),
            ("ip", "-j", "route", "get", "10.1.2.3"): route("10.1.2.3", "10.0.0.5")})
        with capturedLogs():
            found = self.successResultOf(self.find(
                runner, "http://10.9.9.9:6385,https://10.1.2.3:6385"))
        self.assertEqual(found, "10.0.0.5")
        self.assertEqual([call[-1] for call in runner.argvs], ["10.9.9.9", "10.1.2.3"])

    def test_a_sequence_in_the_order_given(self) -> None:
        runner = FakeRunner({("ip",): lambda argv: route(argv[-1], "10.0.0.7")})
        found = self.successResultOf(self.find(
            runner, ["http://10.1.2.3:6385", "http://10.9.9.9:6385"]))
        self.assertEqual(found, "10.0.0.7")
        self.assertEqual(runner.argvs, [("ip", "-j", "route", "get", "10.1.2.3")])

    def test_a_url_without_host_is_named(self) -> None:
        error = self.failureResultOf(self.find(FakeRunner({}), "http://10.1.2.3,http://"),
                                     LookupAgentIPError).value
        self.assertIn("'http://'", error.details)


class InterfaceAddressTests(_Base):
    def sys_with(self, *interfaces: str) -> str:
        root = self.mktemp()
        for name in interfaces:
            os.makedirs(os.path.join(root, "class", "net", name))
        return root

    def test_first_global_address_ipv4_preferred(self) -> None:
        runner = FakeRunner({("ip", "-j", "addr", "show", "dev", "eth0"): addresses(
            ("inet6", "fe80::5", "link"), ("inet6", "fd00::5", "global"),
            ("inet", "10.0.0.5", "global"), ("inet", "10.0.0.6", "global"))})
        found = self.find(runner, "http://10.1.2.3:6385", network_interface="eth0",
                          sys_path=self.sys_with("eth0"))
        self.assertEqual(self.successResultOf(found), "10.0.0.5")

    def test_global_ipv6_when_no_ipv4(self) -> None:
        runner = FakeRunner({("ip",): addresses(("inet6", "fe80::5", "link"),
                                                ("inet6", "fd00::5", "global"))})
        found = self.find(runner, "http://10.1.2.3:6385", network_interface="eth0",
                          sys_path=self.sys_with("eth0"))
        self.assertEqual(self.successResultOf(found), "fd00::5")

    def test_plain_text_addresses(self) -> None:
        runner = FakeRunner({("ip",): b"2: eth0: <UP> mtu 1500\n"
                                      b"    inet6 fe80::5/64 scope link\n"
                                      b"    inet 10.0.0.9/24 brd 10.0.0.255 scope global eth0\n"})
        found = self.find(runner, "http://10.1.2.3:6385", network_interface="eth0",
                          sys_path=self.sys_with("eth0"))
        self.assertEqual(self.successResultOf(found), "10.0.0.9")

    def test_interface_that_never_appears_or_has_no_address(self) -> None:
        for root, answer in [(self.sys_with(), addresses(("inet", "10.0.0.5", "global"))),
                             (self.sys_with("eth0"), addresses(("inet6", "fe80::5", "link")))]:
            runner = FakeRunner({("ip",): answer})
            with capturedLogs() as events:
                found = self.find(runner, "http://10.1.2.3:6385", network_interface="eth0",
                                  sys_path=root, attempts=2, delay=1)
                self.clock.advance(1)
            self.failureResultOf(found, LookupAgentIPError)
            self.assertEqual(len([e for e in events if "attempt" in e]), 2)
