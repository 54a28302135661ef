"""The address the agent advertises to Ironic in heartbeats (when not configured).

Without ``network_interface``: the source address the kernel would use to reach Ironic's
API host (``ip -j route get <ip>``, its ``prefsrc``), the reference agent's rule; with several
API URLs, to the first host that has such a route. With
``network_interface``: that interface's first global address, IPv4 preferred. Link-local
sources are not advertised. A loopback Ironic (127.0.0.1, ::1) is reached from the same
loopback address.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime, IResolverSimple
from twisted.logger import Logger

from ipa_twisted.config import split_urls
from ipa_twisted.errors import LookupAgentIPError
from ipa_twisted.retry import GaveUp, fixed, retry

log = Logger()

COMMAND_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 10.0


class CommandRunner(Protocol):
    """What is needed of ``ProcessRunner`` (a fake runner in tests)."""

    def execute(self, *argv: str, timeout: float | None = ...) -> Deferred[tuple[bytes, bytes]]:
        ...


class _NotFound(Exception):
    """This attempt found no address (yet)."""


async def find_advertise_address(runner: CommandRunner, api_url: str | Sequence[str], *,
                                 attempts: int,
                                 delay: float, clock: IReactorTime,
                                 network_interface: str | None = None,
                                 sys_path: str = "/sys",
                                 resolver: IResolverSimple | None = None) -> str:
    """The address to advertise to the Ironic at ``api_url`` (one URL, several
    comma-separated, or a sequence: their hosts are tried in order).

    Tries ``attempts`` times, ``delay`` seconds apart on ``clock`` (interfaces and routes
    may still be coming up), then raises LookupAgentIPError. A host name in ``api_url``
    is resolved with ``resolver`` (``reactor.resolver`` in production); IP literals need
    none.
    """
    urls = split_urls(api_url) if isinstance(api_url, str) else list(api_url)
    hosts = []
    for url in urls:
        host = urlsplit(url).hostname
        if not host:
            raise LookupAgentIPError(f"No host in the Ironic API URL {url!r}")
        hosts.append(host)
    if not hosts:
        raise LookupAgentIPError(f"No Ironic API URL in {api_url!r}")
    candidates = hosts[:1] if network_interface else hosts

    async def find() -> str:
        for index, host in enumerate(candidates):
            try:
                if network_interface:
                    return await _interface_address(runner, network_interface, sys_path)
                return await _route_source(runner, await _resolve(host, resolver, clock))
            except _NotFound as e:
                if index == len(candidates) - 1:
                    raise
                log.warn("No advertise address towards {host}, trying the next API host: "
                         "{error}", host=host, error=str(e))
        raise AssertionError("unreachable: there is always a host")

    try:
        address = await retry(find, clock, "Finding an advertise address",
                              backoff=fixed(delay), attempts=max(attempts, 1),
                              retry_on=_NotFound, log=log)
    except GaveUp:
        raise LookupAgentIPError("Agent could not find a valid IP address.") from None
    log.info("Advertising address {address} to Ironic", address=address)
    return address


async def _resolve(host: str, resolver: IResolverSimple | None, clock: IReactorTime) -> str:
    if isIPAddress(host) or isIPv6Address(host):
        return host
    if resolver is None:
        raise _NotFound(f"cannot resolve {host}: no resolver given")
    try:
        resolved = resolver.getHostByName(host)
        address: str = await resolved.addTimeout(RESOLVE_TIMEOUT, clock)
    except CancelledError:
        raise
    except Exception as e:
        raise _NotFound(f"cannot resolve {host}: {e}") from e
    return address


async def _run(runner: CommandRunner, *argv: str) -> str:
    try:
        out, _ = await runner.execute(*argv, timeout=COMMAND_TIMEOUT)
    except CancelledError:
        raise
    except Exception as e:
        raise _NotFound(str(e)) from e
    return out.decode("utf-8", "replace")


def _usable(address: str) -> bool:
    try:
        return not ipaddress.ip_address(address).is_link_local
    except ValueError:
        return False


async def _route_source(runner: CommandRunner, destination: str) -> str:
    try:
        if ipaddress.ip_address(destination).is_loopback:
            return destination
    except ValueError as e:
        raise _NotFound(f"not an IP address: {destination!r}") from e
    out = await _run(runner, "ip", "-j", "route", "get", destination)
    source: str | None = None
    try:
        routes: Any = json.loads(out)
    except ValueError:  # an ip without JSON output: "... src 10.0.0.5 uid 0"
        words = out.split()
        if "src" in words[:-1]:
            source = words[words.index("src") + 1]
    else:
        if isinstance(routes, list) and routes and isinstance(routes[0], dict):
            source = routes[0].get("prefsrc")
    if not source:
        raise _NotFound(f"no route to {destination}: {out.strip()!r}")
    if not _usable(source):
        raise _NotFound(f"route to {destination} has unusable source {source}")
    return source


async def _interface_address(runner: CommandRunner, interface: str, sys_path: str) -> str:
    # A stat on sysfs: instant, no need to leave the reactor thread.
    if not os.path.exists(os.path.join(sys_path, "class", "net", interface)):
        raise _NotFound(f"interface {interface} is not present")
    out = await _run(runner, "ip", "-j", "addr", "show", "dev", interface)
    found: list[tuple[str, str]] = []  # (family, address) of global addresses
    try:
        links: Any = json.loads(out)
    except ValueError:  # "    inet 10.0.0.5/24 brd ... scope global eth0"
        for line in out.splitlines():
            words = line.split()
            if words and words[0] in ("inet", "inet6") and "global" in words:
                found.append((words[0], words[1].split("/")[0]))
    else:
        for link in links if isinstance(links, list) else []:
            for info in link.get("addr_info", []) if isinstance(link, dict) else []:
                if info.get("scope") == "global" and info.get("local"):
                    found.append((info.get("family", ""), info["local"]))
    usable = [(family, address) for family, address in found if _usable(address)]
    for wanted in ("inet", "inet6"):
        for family, address in usable:
            if family == wanted:
                return address
    raise _NotFound(f"interface {interface} has no global address")
