"""mDNS discovery: messages, Ironic's URL rules and overrides (twisted.names messages, a fake
multicast reactor on a Clock), then against a real zeroconf publisher across namespaces."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import LogLevel, capturedLogs
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted.config import AgentConfig
from ipa_twisted.net import mdns
from ipa_twisted.net.dnssd import ServiceResolver, build_query, parse_txt
from ipa_twisted.net.mdns import (ServiceLookupFailure, apply_overrides, discover,
                                  resolve_mdns_urls)
from ipa_twisted.testing.fake_multicast_reactor import FakeMulticastReactor
from tests import netns

IRONIC = "baremetal._openstack._tcp.local"
INSPECTOR = "baremetal-introspection._openstack._tcp.local"


def record(name: str, payload: Any, ttl: int = 120, cache_flush: bool = True) -> dns.RRHeader:
    return dns.RRHeader(name.encode(), payload.TYPE, dns.IN | (0x8000 if cache_flush else 0),
                        ttl, payload)


def response(*answers: dns.RRHeader, additional: Sequence[dns.RRHeader] = ()) -> bytes:
    message = dns.Message(id=0, answer=1, auth=1)
    message.answers.extend(answers)
    message.additional.extend(additional)
    data: bytes = message.toStr()
    return data


def announcement(name: str = IRONIC, port: int = 6385, txt: Sequence[bytes] = (),
                 addresses: Sequence[str] = ("192.0.2.1",), target: str | None = None,
                 ttl: int = 120) -> bytes:
    """What zeroconf sends for a service published the way Ironic publishes it."""
    target = target or name
    records = [record(name, dns.Record_SRV(0, 0, port, target.encode()), ttl),
               record(name, dns.Record_TXT(*(txt or [b""])), ttl)]
    extra = [record(target, dns.Record_AAAA(a) if ":" in a else dns.Record_A(a), ttl)
             for a in addresses]
    return response(*records, additional=extra)


class MessageTests(SynchronousTestCase):
    def test_query(self) -> None:
        message = dns.Message()
        message.fromStr(build_query([(IRONIC + ".", dns.SRV), (IRONIC, dns.TXT)]))
        self.assertEqual((message.id, message.answer, message.recDes), (0, 0, 0))
        self.assertEqual([(q.name.name, q.type, q.cls) for q in message.queries],
                         [(IRONIC.encode(), dns.SRV, dns.IN), (IRONIC.encode(), dns.TXT,
                                                                dns.IN)])

    def test_txt_properties(self) -> None:
        self.assertEqual(parse_txt([b"a=1", b"b", b"a=2", b"c==x", b"\xff=1", b"=v"]),
                         {"a": "1", "b": "", "c": "=x"})


class ResolverTests(SynchronousTestCase):
    def resolve(self, *datagrams: bytes, skip_loopback: bool = True,
                service: str = "baremetal") -> tuple[str, dict[str, str]] | None:
        resolver = ServiceResolver(service, skip_loopback=skip_loopback)
        for datagram in datagrams:
            resolver.add_datagram(datagram)
        return resolver.endpoint()

    def test_ironic_rules_for_protocol_and_path(self) -> None:
        cases = [
            (dict(port=6385, txt=[b"protocol=http", b"path=/baremetal"]),
             "http://192.0.2.1:6385/baremetal"),
            (dict(port=80), "http://192.0.2.1:80"),
            (dict(port=443), "https://192.0.2.1:443"),
            (dict(port=6385), "https://192.0.2.1:6385"),
            (dict(port=8443, txt=[b"protocol=https"]), "https://192.0.2.1:8443"),
        ]
        for kwargs, url in cases:
            with self.subTest(url):
                self.assertEqual(self.resolve(announcement(**kwargs)), (url, {}))

    def test_other_properties_are_returned(self) -> None:
        found = self.resolve(announcement(port=80, txt=[b"ipa_debug=1", b"path=/v",
                                                        b"ipa_lldp_timeout=5"]))
        self.assertEqual(found, ("http://192.0.2.1:80/v",
                                 {"ipa_debug": "1", "ipa_lldp_timeout": "5"}))

    def test_address_choice(self) -> None:
        cases = [
            (("2001:db8::1", "192.0.2.1"), "192.0.2.1"),
            (("fe80::1", "2001:db8::1"), "[2001:db8::1]"),
            (("127.0.0.1", "169.254.1.1"), "169.254.1.1"),
            (("127.0.0.1", "::1", "fe80::1"), None),
        ]
        for addresses, host in cases:
            with self.subTest(addresses):
                found = self.resolve(announcement(port=80, addresses=addresses))
                self.assertEqual(found and found[0], host and f"http://{host}:80")
        self.assertEqual(self.resolve(announcement(port=80, addresses=["127.0.0.1"]),
                                      skip_loopback=False), ("http://127.0.0.1:80", {}))

    def test_a_catalog_host_name_is_used_as_is(self) -> None:
        found = self.resolve(announcement(port=443, addresses=(),
                                          target="ironic.example.com"))
        self.assertEqual(found, ("https://ironic.example.com:443", {}))

    def test_records_may_come_in_pieces_and_any_case(self) -> None:
        resolver = ServiceResolver("baremetal")
        self.assertEqual(resolver.questions(), [(IRONIC + ".", dns.SRV),
                                                (IRONIC + ".", dns.TXT)])
        resolver.add_datagram(response(record(IRONIC.upper(), dns.Record_SRV(
            0, 0, 80, b"Host.local"))))
        self.assertEqual(resolver.questions(), [(IRONIC + ".", dns.TXT),
                                                ("host.local", dns.A), ("host.local", dns.AAAA)])
        resolver.add_datagram(response(record("host.LOCAL", dns.Record_A("192.0.2.9"))))
        self.assertIsNone(resolver.endpoint())
        resolver.add_datagram(response(record(IRONIC, dns.Record_TXT(b"path=/x"))))
        self.assertEqual(resolver.questions(), [])
        self.assertEqual(resolver.endpoint(), ("http://192.0.2.9:80/x", {}))

    def test_goodbyes_queries_and_garbage(self) -> None:
        with capturedLogs() as events:
            self.assertIsNone(self.resolve(announcement(), announcement(ttl=0)))
            query = dns.Message(id=0, answer=0)
            query.answers.append(record(IRONIC, dns.Record_SRV(0, 0, 80, IRONIC.encode())))
            self.assertIsNone(self.resolve(query.toStr(), b"\x00\x01garbage"))
            self.assertIsNone(self.resolve(announcement(name=INSPECTOR)))
        self.assertEqual([e["log_level"] for e in events], [LogLevel.debug])


def interfaces(*names: str) -> Callable[[], list[tuple[str, int]]]:
    return lambda: [(name, index) for index, name in enumerate(names, start=2)]


class DiscoverTests(SynchronousTestCase):
    def test_queries_repeat_then_time_out_cleanly(self) -> None:
        reactor = FakeMulticastReactor()
        finding = Deferred.fromCoroutine(discover(
            reactor=reactor, timeout=20, interfaces=interfaces("eth0", "eth1")))
        reactor.pump([0.5] * 50)
        error = self.failureResultOf(finding, ServiceLookupFailure).value
        self.assertIn("no complete answer within 20 s (asked on: eth0, eth1)", str(error))
        self.assertIn(IRONIC, str(error))
        self.assertEqual(error.serialize()["type"], "ServiceLookupFailure")
        ipv4, ipv6 = reactor.ports
        self.assertEqual((ipv4.number, ipv4.interface, ipv4.shared), (5353, "", True))
        self.assertEqual((ipv6.number, ipv6.interface, ipv6.shared), (5353, "::", True))
        self.assertEqual(sorted({t for t, _, _ in ipv4.sent}), [0, 1, 3, 7, 15])
        self.assertEqual({a for _, _, a in ipv4.sent}, {("224.0.0.251", 5353)})
        self.assertEqual({a for _, _, a in ipv6.sent}, {("ff02::fb", 5353)})
        self.assertEqual(len(ipv4.sent), 10)                 # 5 rounds x 2 interfaces
        joins = [o for o in ipv4.handle.options if o[1] == mdns.IP_ADD_MEMBERSHIP]
        self.assertEqual(len(joins), 2)                      # once per interface
        self.assertTrue(ipv4.stopped and ipv6.stopped)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_an_answer_ends_the_search(self) -> None:
        reactor = FakeMulticastReactor(answers={IRONIC: announcement(
            port=6385, txt=[b"protocol=http", b"ipa_debug=true"])})
        finding = Deferred.fromCoroutine(discover(reactor=reactor,
                                                  interfaces=interfaces("eth0")))
        reactor.advance(0.05)
        self.assertEqual(self.successResultOf(finding),
                         ("http://192.0.2.1:6385", {"ipa_debug": "true"}))
        self.assertTrue(all(port.stopped for port in reactor.ports))
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_interfaces_that_come_up_later_are_used(self) -> None:
        reactor = FakeMulticastReactor()
        up = ["eth0"]
        finding = Deferred.fromCoroutine(discover(
            reactor=reactor, timeout=5,
            interfaces=lambda: [(n, i) for i, n in enumerate(up, start=2)]))
        up.append("eth1")
        reactor.pump([1] * 6)
        self.assertIn("asked on: eth0, eth1", str(self.failureResultOf(finding).value))

    def test_no_interface_at_all(self) -> None:
        reactor = FakeMulticastReactor()
        finding = Deferred.fromCoroutine(discover(reactor=reactor, timeout=3,
                                                  interfaces=interfaces()))
        reactor.pump([1] * 4)
        self.assertIn("asked on: no interface up with multicast",
                      str(self.failureResultOf(finding).value))

    def test_port_fallbacks(self) -> None:
        reactor = FakeMulticastReactor(refuse=[("", 5353), ("::", 5353), ("::", 0)])
        finding = Deferred.fromCoroutine(discover(reactor=reactor, timeout=1,
                                                  interfaces=interfaces("eth0")))
        (port,) = reactor.ports
        self.assertEqual((port.number, port.interface, port.shared), (0, "", False))
        finding.cancel()
        self.failureResultOf(finding, CancelledError)
        self.assertTrue(port.stopped)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_no_socket_at_all(self) -> None:
        reactor = FakeMulticastReactor(refuse=[("", 5353), ("", 0), ("::", 5353), ("::", 0)])
        finding = Deferred.fromCoroutine(discover(reactor=reactor, timeout=1,
                                                  interfaces=interfaces("eth0")))
        self.assertIn("cannot open a UDP socket",
                      str(self.failureResultOf(finding, ServiceLookupFailure).value))


EVERY_OVERRIDE = AgentConfig(mdns_allowed_overrides=tuple(sorted(mdns.ALLOWED_OVERRIDES)))
"""A configuration whose ``[mdns] allowed_overrides`` names every option mDNS may set."""


class OverrideTests(SynchronousTestCase):
    def test_allowed_options_are_converted(self) -> None:
        config = apply_overrides(EVERY_OVERRIDE, {
            "ipa_debug": "true", "ipa_lldp_timeout": "5", "ipa_collect_lldp": "1",
            "ipa_disk_wait_attempts": "3", "ipa_enable_vlan_interfaces": "all",
            "ipa_inspection_callback_url": "http://192.0.2.1:5050/v1/continue",
            "ipa_network_interface": ""})
        self.assertEqual((config.debug, config.lldp_timeout, config.collect_lldp,
                          config.disk_wait_attempts, config.enable_vlan_interfaces,
                          config.inspection_callback_url, config.network_interface),
                         (True, 5.0, True, 3, "all", "http://192.0.2.1:5050/v1/continue",
                          None))

    def test_by_default_as_the_reference_only_callback_url_and_ntp_server(self) -> None:
        with capturedLogs() as events:
            config = apply_overrides(AgentConfig(), {
                "ipa_debug": "true", "ipa_ntp_server": "192.0.2.123",
                "ipa_inspection_callback_url": "http://192.0.2.1:5050/v1/continue"})
        self.assertEqual((config.debug, config.ntp_server, config.inspection_callback_url),
                         (False, "192.0.2.123", "http://192.0.2.1:5050/v1/continue"))
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["name"], "debug")
        self.assertIn("allowed_overrides", warning["log_format"])

    def test_allowed_overrides_cannot_open_the_fixed_list(self) -> None:
        base = AgentConfig().merged({"mdns_allowed_overrides": "agent_token,debug"}, "test")
        with capturedLogs():
            config = apply_overrides(base, {"ipa_agent_token": "stolen", "ipa_debug": "1",
                                            "ipa_ntp_server": "192.0.2.123"})
        self.assertEqual((config.agent_token, config.debug, config.ntp_server),
                         (None, True, None))

    def test_others_are_logged_and_ignored(self) -> None:
        base = EVERY_OVERRIDE.override(agent_token="kept")
        with capturedLogs() as events:
            config = apply_overrides(base, {
                "ipa_api_url": "http://evil:6385", "ipa_agent_token": "stolen",
                "ipa_listen_port": "1", "ipa_sys_path": "/tmp", "debug": "true",
                "ipa_nonsense": "1", "ipa_lldp_timeout": "soon", "ipa_disk_wait_attempts":
                "-1", "ipa_inspection_callback_url": "ftp://x", "ipa_debug": "maybe"})
        self.assertIs(config, base)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 10)
        self.assertEqual(mdns.ALLOWED_OVERRIDES - set(mdns._OPTION_NAMES), set())


class ResolveTests(SynchronousTestCase):
    def test_both_urls(self) -> None:
        reactor = FakeMulticastReactor(answers={
            IRONIC: announcement(port=6385, txt=[b"protocol=http", b"ipa_debug=1"]),
            INSPECTOR: announcement(name=INSPECTOR, port=5050, addresses=["192.0.2.7"],
                                    txt=[b"protocol=http", b"ipa_lldp_timeout=7"])})
        config = EVERY_OVERRIDE.override(api_url="mdns", inspection_callback_url="mdns")
        resolving = Deferred.fromCoroutine(resolve_mdns_urls(config, reactor,
                                                             interfaces=interfaces("eth0")))
        reactor.pump([0.05] * 4)
        resolved = self.successResultOf(resolving)
        self.assertEqual((resolved.api_url, resolved.inspection_callback_url, resolved.debug,
                          resolved.lldp_timeout),
                         ("http://192.0.2.1:6385", "http://192.0.2.7:5050/v1/continue", True,
                          7.0))

    def test_nothing_to_resolve(self) -> None:
        reactor = FakeMulticastReactor()
        config = AgentConfig(api_url="http://192.0.2.1:6385")
        self.assertIs(self.successResultOf(Deferred.fromCoroutine(
            resolve_mdns_urls(config, reactor))), config)
        self.assertEqual(reactor.ports, [])


class ZeroconfTests(TestCase):
    """The agent's side in one namespace, zeroconf publishing in another, over a veth."""

    skip = netns.skip_reason(modules=["zeroconf"])
    timeout = 120

    async def _network(self) -> tuple[str, str]:
        agent, ironic = await netns.make_namespace(self), await netns.make_namespace(self)
        ours, theirs = await netns.make_veth(self, agent, ironic)
        for namespace, device, suffix in ((ironic, theirs, 1), (agent, ours, 2)):
            await netns.ip("-n", namespace, "addr", "add", f"192.0.2.{suffix}/24", "dev",
                           device)
            await netns.ip("-n", namespace, "addr", "add", f"2001:db8::{suffix}/64", "dev",
                           device, "nodad")
        return agent, ironic

    async def _publish(self, namespace: str, *args: str) -> None:
        publisher = netns.python_in(namespace, "tests.mdns_publisher", *args)
        self.addCleanup(publisher.stop)
        await publisher.wait_for(rb"published", timeout=30)

    async def _agent(self, namespace: str, *args: str) -> tuple[int | None, Any]:
        child = netns.python_in(namespace, "ipa_twisted.net.mdns", *args)
        code = await netns.run_to_end(child, self)
        return code, (netns.json_line(child) if code == 0 else child.output)

    async def test_ironic_published_like_ironic_does(self) -> None:
        agent, ironic = await self._network()
        await self._publish(ironic, "--endpoint", "http://192.0.2.1:6385/baremetal",
                            "--param", "ipa_debug=true", "--param", "ipa_lldp_timeout=5",
                            "--param", "ipa_agent_token=stolen")
        code, found = await self._agent(agent, "--timeout", "30")
        self.assertEqual(code, 0, found)
        self.assertEqual(found, {"url": "http://192.0.2.1:6385/baremetal", "params": {
            "ipa_debug": "true", "ipa_lldp_timeout": "5", "ipa_agent_token": "stolen"}})
        config = apply_overrides(EVERY_OVERRIDE, found["params"])
        self.assertEqual((config.debug, config.lldp_timeout, config.agent_token),
                         (True, 5.0, None))

    async def test_both_services_resolved_into_the_configuration(self) -> None:
        agent, ironic = await self._network()
        await self._publish(ironic, "--endpoint", "https://[2001:db8::1]:443",
                            "--param", "ipa_collect_lldp=1")
        await self._publish(ironic, "--service", "baremetal-introspection", "--endpoint",
                            "http://192.0.2.1:5050", "--param", "ipa_inspection_collectors="
                            "default,pci-devices")
        code, found = await self._agent(agent, "--resolve", "--inspection", "--timeout", "30",
                                        "--allowed-overrides",
                                        "collect_lldp,inspection_collectors")
        self.assertEqual(code, 0, found)
        self.assertEqual(found["config"], {
            "api_url": "https://[2001:db8::1]:443", "collect_lldp": True,
            "inspection_callback_url": "http://192.0.2.1:5050/v1/continue",
            "inspection_collectors": "default,pci-devices"})

    async def test_nobody_answers(self) -> None:
        agent, _ = await self._network()
        started = time.monotonic()
        code, output = await self._agent(agent, "--timeout", "2")
        self.assertEqual(code, 1)
        self.assertLess(time.monotonic() - started, 20)
        self.assertIn(b"Cannot find a service with multicast DNS: baremetal._openstack._tcp"
                      b".local.: no complete answer within 2.0 s (asked on: ", output)
