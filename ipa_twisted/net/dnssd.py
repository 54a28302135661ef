"""DNS-SD records as Ironic publishes them: the query, TXT properties, and the resolver
that assembles one service's SRV, TXT and address records into its URL.

The transport (multicast UDP on the reactor) is ``ipa_twisted.net.mdns``'s.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.logger import Logger
from twisted.names import dns

log = Logger()

SERVICE_TYPE = "_openstack._tcp.local."


def service_name(service: str) -> str:
    """The DNS-SD instance name Ironic publishes ``service`` under."""
    return f"{service}.{SERVICE_TYPE}"


def _key(name: bytes | str | dns.Name) -> str:
    if isinstance(name, dns.Name):
        name = name.name
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name.lower().rstrip(".")


def build_query(questions: Iterable[tuple[str, int]]) -> bytes:
    """An mDNS query message (ID 0, no recursion) for ``(name, record type)`` pairs."""
    message = dns.Message(id=0, answer=0, recDes=0)
    for name, kind in questions:
        message.queries.append(dns.Query(name.rstrip(".").encode("utf-8"), kind, dns.IN))
    data: bytes = message.toStr()
    return data


def parse_txt(strings: Sequence[bytes]) -> dict[str, str]:
    """TXT strings as DNS-SD properties: ``key=value``; a bare key has ``""``; the first
    occurrence of a key wins (RFC 6763 6.4); undecodable strings are skipped."""
    properties: dict[str, str] = {}
    for raw in strings:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            log.debug("Skipping a TXT string that is not UTF-8: {raw!r}", raw=raw)
            continue
        key, _, value = text.partition("=")
        if key and key not in properties:
            properties[key] = value
    return properties


@dataclasses.dataclass
class _Service:
    target: str | None = None
    port: int | None = None
    properties: dict[str, str] | None = None


class ServiceResolver:
    """Gathers one service's SRV, TXT and address records from mDNS messages."""

    def __init__(self, service: str, *, skip_loopback: bool = True) -> None:
        self.service = service
        self.instance = service_name(service)
        self._key = _key(self.instance)
        self._skip_loopback = skip_loopback
        self._found = _Service()
        self._addresses: dict[str, dict[str, None]] = {}

    # -- input ------------------------------------------------------------------------------
    def add_datagram(self, data: bytes) -> None:
        """Take the records of one datagram; queries and garbage are ignored."""
        message = dns.Message()
        try:
            message.fromStr(data)
        except Exception as e:   # twisted.names raises assorted errors on garbage
            log.debug("Skipping an undecodable mDNS datagram: {error}", error=repr(e))
            return
        if message.answer:
            self.add_message(message)

    def add_message(self, message: dns.Message) -> None:
        for record in [*message.answers, *message.authority, *message.additional]:
            self._add_record(record)

    def _add_record(self, record: dns.RRHeader) -> None:
        payload: Any = record.payload
        name, gone = _key(record.name), record.ttl == 0
        if record.type == dns.SRV and name == self._key:
            if gone:
                self._found.target = self._found.port = None
            else:
                self._found.target = _key(payload.target)
                self._found.port = int(payload.port)
        elif record.type == dns.TXT and name == self._key:
            self._found.properties = None if gone else parse_txt(payload.data)
        elif record.type in (dns.A, dns.AAAA):
            family = socket.AF_INET if record.type == dns.A else socket.AF_INET6
            try:
                address = socket.inet_ntop(family, payload.address)
            except (ValueError, OSError):
                return
            known = self._addresses.setdefault(name, {})
            if gone:
                known.pop(address, None)
            else:
                known[address] = None

    # -- output -----------------------------------------------------------------------------
    def questions(self) -> list[tuple[str, int]]:
        """What is still unknown, as ``(name, record type)`` questions."""
        found = self._found
        asked: list[tuple[str, int]] = []
        if found.target is None:
            asked.append((self.instance, dns.SRV))
        if found.properties is None:
            asked.append((self.instance, dns.TXT))
        if found.target is not None and self._local(found.target) and self._host() is None:
            asked += [(found.target, dns.A), (found.target, dns.AAAA)]
        return asked

    @staticmethod
    def _local(target: str) -> bool:
        return target == "local" or target.endswith(".local")

    def _host(self) -> str | None:
        assert self._found.target is not None
        candidates: list[tuple[int, str]] = []
        for text in self._addresses.get(self._found.target, {}):
            address = ipaddress.ip_address(text)
            if address.is_unspecified or address.is_multicast:
                continue
            if address.is_loopback:
                rank = 4 if not self._skip_loopback else -1
            elif address.version == 6 and address.is_link_local:
                rank = -1                      # unusable in a URL without its scope
            elif address.version == 4:
                rank = 1 if address.is_link_local else 0
            else:
                rank = 2
            if rank >= 0:
                candidates.append((rank, text))
        if not candidates:
            return None
        host = min(candidates, key=lambda c: c[0])[1]
        return f"[{host}]" if ":" in host else host

    def endpoint(self) -> tuple[str, dict[str, str]] | None:
        """``(url, other TXT properties)`` once everything is known, else None."""
        found = self._found
        if found.target is None or found.port is None or found.properties is None:
            return None
        host = self._host() if self._local(found.target) else found.target
        if host is None:
            return None
        params = dict(found.properties)
        path = params.pop("path", "")
        protocol = params.pop("protocol", "") or ("http" if found.port == 80 else "https")
        return f"{protocol}://{host}:{found.port}{path}", params
