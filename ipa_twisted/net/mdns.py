"""Finding Ironic (and its inspection endpoint) with multicast DNS, on the reactor.

Ironic publishes its API as the DNS-SD instance ``baremetal._openstack._tcp.local.``
(inspection: ``baremetal-introspection._openstack._tcp.local.``): an SRV record (host and
port), A/AAAA records of that host, and a TXT record whose properties are

- ``protocol``: the URL scheme, present unless it follows from the port (80 is ``http``,
  anything else ``https``);
- ``path``: the URL path, present unless empty;
- ``ipa_*``: configuration for the agent (``ipa_debug=true``), from Ironic's
  ``[mdns] params``.

``discover`` asks for those records with twisted.names DNS messages over multicast UDP,
224.0.0.251:5353 and, best effort, [ff02::fb]:5353, on every interface that is up and
multicast-capable (looked at again before each query, as links come up), from port 5353
shared with any other mDNS user (answers come back by multicast) or, if that cannot be
bound, from an ephemeral port (RFC 6762 legacy unicast). Queries are repeated 1, 2, 4, 8,
8, ... seconds apart until every record is known or ``timeout`` has passed, then
ServiceLookupFailure is raised. Unsolicited announcements are used as well.

The URL is built from them (``ipa_twisted.net.dnssd``, the records' side): a host name that is not under ``.local.`` is used as is (the
catalog named a host); otherwise the address, IPv4 first, then global IPv6, never a loopback
(unless allowed) or an IPv6 link-local one. ``apply_overrides`` applies the ``ipa_*``
properties to the configuration, limited to the ``[mdns] allowed_overrides`` option
(default, as the reference agent: ``inspection_callback_url`` and ``ntp_server``) within
``ALLOWED_OVERRIDES``; the others are logged and ignored. ``resolve_mdns_urls`` does it all for the ``api_url`` and
``inspection_callback_url`` options set to ``mdns``.

``python -m ipa_twisted.net.mdns --service baremetal --timeout 30`` prints
``{"url": ..., "params": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from ipa_twisted.config import OPTIONS, AgentConfig, ConfigError
from ipa_twisted.net.dnssd import ServiceResolver, build_query, service_name
from ipa_twisted.retry import Backoff
from ipa_twisted.errors import RESTError

log = Logger()

IRONIC_SERVICE = "baremetal"
INSPECTOR_SERVICE = "baremetal-introspection"
INSPECTION_PATH = "/v1/continue"
"""Appended to the inspection service's URL, as the reference agent does."""

MDNS_PORT = 5353
MDNS_GROUP_IPV4 = "224.0.0.251"
MDNS_GROUP_IPV6 = "ff02::fb"
DEFAULT_TIMEOUT = 30.0
FIRST_QUERY_INTERVAL = 1.0
MAX_QUERY_INTERVAL = 8.0
MULTICAST_HOPS = 255

IFF_UP = 0x1
IFF_MULTICAST = 0x1000
IP_MULTICAST_IF = getattr(socket, "IP_MULTICAST_IF", 32)
IP_ADD_MEMBERSHIP = getattr(socket, "IP_ADD_MEMBERSHIP", 35)
IP_MULTICAST_TTL = getattr(socket, "IP_MULTICAST_TTL", 33)
IPV6_MULTICAST_IF = getattr(socket, "IPV6_MULTICAST_IF", 17)
IPV6_MULTICAST_HOPS = getattr(socket, "IPV6_MULTICAST_HOPS", 18)
IPV6_JOIN_GROUP = getattr(socket, "IPV6_JOIN_GROUP", 20)

ALLOWED_OVERRIDES: frozenset[str] = frozenset({
    "debug", "insecure", "enable_auto_tls",
    "collect_lldp", "lldp_timeout", "enable_vlan_interfaces",
    "lookup_timeout", "lookup_interval", "ip_lookup_attempts", "ip_lookup_sleep",
    "network_interface",
    "inspection_callback_url", "inspection_collectors", "inspection_dhcp_wait_timeout",
    "inspection_dhcp_all_interfaces", "inspection_benchmarks",
    "ntp_server", "fail_if_clock_not_set", "disk_wait_attempts", "disk_wait_delay",
    "image_download_connection_timeout", "image_download_connection_retries",
    "image_download_connection_retry_interval",
})
"""Options that TXT properties ``ipa_<option>`` may ever set, whatever ``[mdns]
allowed_overrides`` says. Never: where the agent listens and what it advertises, its
identity and secrets (``api_url``, ``agent_token``, ``standalone``), file paths and
commands."""


class ServiceLookupFailure(RESTError):
    """No complete answer for an mDNS service in time."""

    message = "Cannot find a service with multicast DNS"

    def __init__(self, service: str, details: str) -> None:
        super().__init__(f"{service_name(service)}: {details}")
        self.service = service


def multicast_interfaces(sys_path: str = "/sys") -> list[tuple[str, int]]:
    """``(name, index)`` of the interfaces that are up and multicast-capable."""
    found = []
    for index, name in socket.if_nameindex():
        try:
            with open(os.path.join(sys_path, "class", "net", name, "flags")) as f:
                flags = int(f.read().strip(), 16)
        except (OSError, ValueError):
            continue
        if flags & IFF_UP and flags & IFF_MULTICAST:
            found.append((name, index))
    return found


class _Link:
    """One UDP port (IPv4 or IPv6) that joins the mDNS group and sends queries."""

    def __init__(self, port: Any, ipv6: bool) -> None:
        self.port, self.ipv6 = port, ipv6
        self.group = MDNS_GROUP_IPV6 if ipv6 else MDNS_GROUP_IPV4
        self._joined: set[int] = set()
        handle = port.getHandle()
        if ipv6:
            handle.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_HOPS,
                              struct.pack("i", MULTICAST_HOPS))
        else:
            handle.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_TTL,
                              struct.pack("i", MULTICAST_HOPS))

    def _join(self, name: str, index: int) -> None:
        if index in self._joined:
            return
        handle = self.port.getHandle()
        try:
            if self.ipv6:
                handle.setsockopt(socket.IPPROTO_IPV6, IPV6_JOIN_GROUP, struct.pack(
                    "16sI", socket.inet_pton(socket.AF_INET6, self.group), index))
            else:
                handle.setsockopt(socket.IPPROTO_IP, IP_ADD_MEMBERSHIP, struct.pack(
                    "4s4si", socket.inet_aton(self.group), bytes(4), index))
        except OSError as e:
            log.debug("Cannot join {group} on {interface}: {error}", group=self.group,
                      interface=name, error=str(e))
            return
        self._joined.add(index)

    def send(self, query: bytes, name: str, index: int) -> None:
        self._join(name, index)
        handle = self.port.getHandle()
        try:
            if self.ipv6:
                handle.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_IF,
                                  struct.pack("i", index))
            else:
                handle.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_IF,
                                  struct.pack("4s4si", bytes(4), bytes(4), index))
            self.port.write(query, (self.group, MDNS_PORT))
        except Exception as e:   # OSError, or Twisted's for a port gone
            log.debug("Cannot send an mDNS query to {group} on {interface}: {error}",
                      group=self.group, interface=name, error=str(e))


class _Receiver(DatagramProtocol):
    noisy = False

    def __init__(self, resolver: ServiceResolver, complete: Callable[[], None]) -> None:
        self._resolver, self._complete = resolver, complete

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._resolver.add_datagram(datagram)
        if self._resolver.endpoint() is not None:
            self._complete()


def _open_links(reactor: Any, protocol: Callable[[], DatagramProtocol]) -> list[_Link]:
    links = []
    for ipv6, interface in ((False, ""), (True, "::")):
        port = None
        for number, shared in ((MDNS_PORT, True), (0, False)):
            try:
                port = reactor.listenMulticast(number, protocol(), interface=interface,
                                               listenMultiple=shared)
                break
            except (CannotListenError, OSError) as e:
                log.debug("Cannot listen for mDNS on [{interface}]:{port}: {error}",
                          interface=interface, port=number, error=str(e))
        if port is None:
            continue
        try:
            links.append(_Link(port, ipv6))
        except OSError as e:
            log.debug("Cannot set up mDNS over {family}: {error}",
                      family="IPv6" if ipv6 else "IPv4", error=str(e))
            port.stopListening()
    return links


async def discover(service: str = IRONIC_SERVICE, *, reactor: Any,
                   timeout: float = DEFAULT_TIMEOUT, sys_path: str = "/sys",
                   interfaces: Callable[[], Sequence[tuple[str, int]]] | None = None,
                   skip_loopback: bool = True) -> tuple[str, dict[str, str]]:
    """The URL of ``service`` and its other TXT properties (``ipa_*``), from mDNS.

    ``reactor`` provides IReactorMulticast and IReactorTime. ``interfaces`` gives the
    ``(name, index)`` pairs to query on (default: ``multicast_interfaces(sys_path)``).
    Raises ServiceLookupFailure when nothing complete arrived within ``timeout`` seconds.
    Cancelling stops the queries and closes the sockets.
    """
    list_interfaces = interfaces or (lambda: multicast_interfaces(sys_path))
    resolver = ServiceResolver(service, skip_loopback=skip_loopback)
    done: Deferred[bool] = Deferred()

    def complete() -> None:
        if not done.called:
            done.callback(True)

    links = _open_links(reactor, lambda: _Receiver(resolver, complete))
    if not links:
        raise ServiceLookupFailure(service, "cannot open a UDP socket for mDNS")
    deadline = reactor.seconds() + timeout
    schedule = Backoff(initial=FIRST_QUERY_INTERVAL, factor=2.0, cap=MAX_QUERY_INTERVAL)
    sent = 0
    queried: set[str] = set()
    next_query: Any = None

    def query() -> None:
        nonlocal sent, next_query
        now = reactor.seconds()
        if now >= deadline:
            if not done.called:
                done.callback(False)
            return
        message = build_query(resolver.questions())
        for name, index in list_interfaces():
            queried.add(name)
            for link in links:
                link.send(message, name, index)
        sent += 1
        next_query = reactor.callLater(min(schedule.delay(sent), deadline - now), query)

    log.info("Looking for {name} with mDNS for up to {timeout} s",
             name=resolver.instance, timeout=timeout)
    try:
        query()
        found = await done
    finally:
        if next_query is not None and next_query.active():
            next_query.cancel()
        for link in links:
            stopping = link.port.stopListening()
            if isinstance(stopping, Deferred):
                await stopping
    endpoint = resolver.endpoint()
    if not found or endpoint is None:
        where = ", ".join(sorted(queried)) or "no interface up with multicast"
        raise ServiceLookupFailure(service, f"no complete answer within {timeout} s "
                                   f"(asked on: {where})")
    log.info("Found {name} at {url} with mDNS", name=resolver.instance, url=endpoint[0])
    return endpoint


_OPTION_NAMES = frozenset(option.name for option in OPTIONS)


def apply_overrides(config: AgentConfig, params: Mapping[str, str]) -> AgentConfig:
    """``config`` with the allowed ``ipa_<option>`` properties applied (``config.merged``:
    coerced and checked as the configuration files' values are).

    Allowed: the options of ``config.mdns_allowed_overrides`` that are also in
    ALLOWED_OVERRIDES. Other keys, other options and invalid values are logged as
    warnings and ignored.
    """
    allowed = ALLOWED_OVERRIDES & set(config.mdns_allowed_overrides)
    updated, changed = config, []
    for key, raw in params.items():
        name = key[4:] if key.startswith("ipa_") else None
        if name is None or name not in _OPTION_NAMES:
            log.warn("Ignoring mDNS property {key}: not an ipa_<option> property",
                     key=key)
            continue
        if name not in ALLOWED_OVERRIDES:
            log.warn("Ignoring mDNS property {key}: {name} may not be set over mDNS",
                     key=key, name=name)
            continue
        if name not in allowed:
            log.warn("Ignoring mDNS property {key}: {name} is not in [mdns] "
                     "allowed_overrides", key=key, name=name)
            continue
        try:
            updated = updated.merged({name: raw}, f"mDNS property {key}")
        except ConfigError as e:
            log.warn("Ignoring mDNS property {key}={value!r}: {error}", key=key,
                     value=raw, error=str(e))
            continue
        changed.append(name)
    if not changed:
        return config
    log.info("Configuration from mDNS: {changes}",
             changes={name: getattr(updated, name) for name in changed})
    return updated


async def resolve_mdns_urls(config: AgentConfig, reactor: Any, *,
                            timeout: float = DEFAULT_TIMEOUT,
                            interfaces: Callable[[], Sequence[tuple[str, int]]] | None = None,
                            ) -> AgentConfig:
    """``config`` with ``api_url`` and ``inspection_callback_url`` set to ``mdns`` resolved.

    Ironic's ``baremetal`` service gives ``api_url``; ``baremetal-introspection`` gives
    ``inspection_callback_url`` (its URL + ``/v1/continue``). Each service's allowed
    ``ipa_*`` properties are applied. Raises ServiceLookupFailure.
    """
    if config.api_url == "mdns":
        url, params = await discover(IRONIC_SERVICE, reactor=reactor, timeout=timeout,
                                     sys_path=config.sys_path, interfaces=interfaces)
        config = apply_overrides(config, params).override(api_url=url)
    if config.inspection_callback_url == "mdns":
        url, params = await discover(INSPECTOR_SERVICE, reactor=reactor, timeout=timeout,
                                     sys_path=config.sys_path, interfaces=interfaces)
        config = apply_overrides(config, params)
        config = config.override(inspection_callback_url=url.rstrip("/") + INSPECTION_PATH)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ipa_twisted.net.mdns``: print what mDNS gives, as JSON.

    By default the URL and properties of ``--service``; with ``--resolve``, the options
    ``resolve_mdns_urls`` changes in a configuration whose ``api_url`` (and with
    ``--inspection``, ``inspection_callback_url``) is ``mdns``. Exits 1 when nothing is
    found.
    """
    from twisted.internet.task import react

    from ipa_twisted.net.lldp import log_to_stderr

    parser = argparse.ArgumentParser(prog="python -m ipa_twisted.net.mdns")
    parser.add_argument("--service", default=IRONIC_SERVICE)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--allow-loopback", action="store_true")
    parser.add_argument("--resolve", action="store_true")
    parser.add_argument("--inspection", action="store_true")
    parser.add_argument("--sys-path", default="/sys")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--allowed-overrides", default=None,
                        help="[mdns] allowed_overrides for --resolve (comma-separated)")
    options = parser.parse_args(argv)
    log_to_stderr(options.debug)

    async def find(reactor: Any) -> dict[str, Any]:
        if not options.resolve:
            url, params = await discover(options.service, reactor=reactor,
                                         timeout=options.timeout, sys_path=options.sys_path,
                                         skip_loopback=not options.allow_loopback)
            return {"url": url, "params": params}
        config = AgentConfig(api_url="mdns", sys_path=options.sys_path,
                             inspection_callback_url="mdns" if options.inspection else None)
        if options.allowed_overrides is not None:
            config = config.merged({"mdns_allowed_overrides": options.allowed_overrides},
                                   "--allowed-overrides")
        resolved = await resolve_mdns_urls(config, reactor, timeout=options.timeout)
        return {"config": {option.name: getattr(resolved, option.name) for option in OPTIONS
                           if getattr(resolved, option.name) != getattr(config, option.name)}}

    async def run(reactor: Any) -> None:
        try:
            found = await find(reactor)
        except ServiceLookupFailure as e:
            print(str(e), file=sys.stderr, flush=True)
            raise SystemExit(1)
        print(json.dumps(found, sort_keys=True), flush=True)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
