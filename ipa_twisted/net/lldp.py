"""LLDP: listen on every interface at once for the switch's announcement, on the reactor.

One ``AF_PACKET`` raw socket per interface, bound to the LLDP ethertype (0x88cc) and put in
promiscuous mode with a ``PACKET_MR_PROMISC`` membership (the kernel counts memberships and
drops ours when the socket closes, so the interface's promiscuity is restored however the
listening ends). The sockets are non-blocking and read by the reactor (``addReader``): no
thread, no blocking ``recv``. An interface is done at its first valid LLDPDU and its socket
closed at once; ``get_lldp_info`` returns when every interface is done or at the timeout.

Interfaces without carrier (``/sys/class/net/<if>/carrier`` is not ``1``) are not listened
on: nothing can arrive there. Frames that are not valid LLDPDUs are skipped with a debug log.

The result has the reference agent's shape: ``{interface: [(tlv_type, hex_value), ...]}``,
every TLV of the frame in order, the End TLV included, ``[]`` where nothing arrived.

``python -m ipa_twisted.net.lldp --interfaces eth0,eth1 --timeout 30`` prints that as JSON
(tests run it inside network namespaces with ``ip netns exec``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

ETH_P_LLDP = 0x88CC
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
"""pkttype of frames this host sends (AF_PACKET sockets see them too)."""

TLV_END = 0
TLV_CHASSIS_ID = 1
TLV_PORT_ID = 2
TLV_TTL = 3
TLV_PORT_DESCRIPTION = 4
TLV_SYSTEM_NAME = 5
TLV_SYSTEM_DESCRIPTION = 6
TLV_ORGANIZATIONALLY_SPECIFIC = 127

MAX_FRAME = 65536
_READS_PER_EVENT = 64

LLDPInfo = dict[str, list[tuple[int, str]]]
"""``{interface: [(tlv_type, hex_value), ...]}``."""


class MalformedFrame(ValueError):
    """Bytes that are not a valid LLDPDU in an Ethernet frame."""


def parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """The TLVs of an LLDPDU, up to and including the End TLV.

    Each TLV is a 16-bit header (7-bit type, 9-bit length) and its value. Raises
    MalformedFrame for a TLV running past the data, a dangling byte, or an LLDPDU that does
    not start with the mandatory Chassis ID, Port ID and TTL TLVs (IEEE 802.1AB: such
    LLDPDUs are discarded). Bytes after the End TLV (Ethernet padding) are ignored.
    """
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 2:
            raise MalformedFrame(f"dangling byte at offset {offset}")
        (header,) = struct.unpack_from("!H", data, offset)
        kind, length = header >> 9, header & 0x1FF
        offset += 2
        if offset + length > len(data):
            raise MalformedFrame(f"TLV type {kind} of length {length} runs past the end "
                                 f"({len(data) - offset} bytes left)")
        tlvs.append((kind, data[offset:offset + length]))
        offset += length
        if kind == TLV_END:
            break
    kinds = [kind for kind, _ in tlvs[:3]]
    if kinds != [TLV_CHASSIS_ID, TLV_PORT_ID, TLV_TTL]:
        raise MalformedFrame(f"LLDPDU starts with TLV types {kinds}, not Chassis ID, "
                             f"Port ID and TTL")
    return tlvs


def parse_frame(frame: bytes) -> list[tuple[int, str]]:
    """The TLVs of an Ethernet frame carrying an LLDPDU, values in hex.

    An 802.1Q or 802.1ad tag before the ethertype is skipped (kernels usually strip it).
    Raises MalformedFrame for anything else than LLDP.
    """
    offset = 12
    while True:
        if len(frame) < offset + 2:
            raise MalformedFrame(f"frame of {len(frame)} bytes is too short")
        (ethertype,) = struct.unpack_from("!H", frame, offset)
        if ethertype not in (ETH_P_8021Q, ETH_P_8021AD):
            break
        offset += 4
    if ethertype != ETH_P_LLDP:
        raise MalformedFrame(f"ethertype 0x{ethertype:04x} is not LLDP")
    return [(kind, value.hex()) for kind, value in parse_tlvs(frame[offset + 2:])]


def has_carrier(sys_path: str, interface: str) -> bool:
    """Whether ``interface`` has a link (an interface that is down reads as no carrier)."""
    try:
        with open(os.path.join(sys_path, "class", "net", interface, "carrier")) as f:
            return f.read().strip() == "1"
    except (OSError, ValueError):
        return False


def list_interfaces(sys_path: str) -> list[str]:
    """Every interface in sysfs but the loopback, sorted."""
    try:
        names = os.listdir(os.path.join(sys_path, "class", "net"))
    except OSError:
        return []
    return sorted(name for name in names if name != "lo")


def open_lldp_socket(interface: str) -> socket.socket:
    """A non-blocking raw socket receiving LLDP frames of ``interface``, promiscuous.

    Raises OSError (e.g. PermissionError without CAP_NET_RAW, or a missing interface).
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_LLDP))
    try:
        sock.bind((interface, ETH_P_LLDP))
        index = socket.if_nametoindex(interface)
        # struct packet_mreq { int mr_ifindex; unsigned short mr_type, mr_alen;
        #                      unsigned char mr_address[8]; }
        membership = struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b"")
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, membership)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(IReadDescriptor)
class _FrameReader:
    """Reads one interface's socket on the reactor until a valid LLDPDU arrives."""

    def __init__(self, interface: str, sock: socket.socket,
                 received: Callable[[_FrameReader, list[tuple[int, str]]], None]) -> None:
        self.interface, self._socket, self._received = interface, sock, received
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self._socket.fileno()

    def logPrefix(self) -> str:
        return f"LLDP {self.interface}"

    def doRead(self) -> Failure | None:
        for _ in range(_READS_PER_EVENT):
            if self.closed:
                return None
            try:
                frame, address = self._socket.recvfrom(MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                log.warn("Reading LLDP frames on {interface} failed: {error}",
                         interface=self.interface, error=str(e))
                self._received(self, [])
                return None
            if isinstance(address, tuple) and len(address) > 2:
                if address[2] == PACKET_OUTGOING:
                    continue
            try:
                tlvs = parse_frame(frame)
            except MalformedFrame as e:
                log.debug("Skipping a malformed LLDP frame on {interface}: {error}",
                          interface=self.interface, error=str(e))
                continue
            self._received(self, tlvs)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._socket.close()   # drops the promiscuous membership


async def get_lldp_info(interface_names: Sequence[str] | None, timeout: float, reactor: Any,
                        sys_path: str = "/sys", *,
                        open_socket: Callable[[str], socket.socket] = open_lldp_socket,
                        ) -> LLDPInfo:
    """LLDP TLVs heard on each interface within ``timeout`` seconds.

    ``interface_names`` None means every interface but the loopback. ``reactor`` provides
    IReactorFDSet and IReactorTime. Every name is a key of the result; an interface without
    carrier, that cannot be listened on (logged), or that heard nothing has ``[]``. Returns
    as soon as every listened interface has its frame. Cancelling closes every socket.
    """
    names = list(interface_names) if interface_names is not None else list_interfaces(
        sys_path)
    result: LLDPInfo = {name: [] for name in names}
    readers: list[_FrameReader] = []
    waiting: set[str] = set()
    finished: Deferred[None] = Deferred()

    def received(reader: _FrameReader, tlvs: list[tuple[int, str]]) -> None:
        reactor.removeReader(reader)
        reader.close()
        if tlvs:
            log.debug("LLDP on {interface}: {count} TLVs", interface=reader.interface,
                      count=len(tlvs))
        result[reader.interface] = tlvs
        waiting.discard(reader.interface)
        if not waiting and not finished.called:
            finished.callback(None)

    for name in dict.fromkeys(names):
        if not has_carrier(sys_path, name):
            log.debug("Not listening for LLDP on {interface}: no carrier", interface=name)
            continue
        try:
            sock = open_socket(name)
        except OSError as e:
            log.warn("Cannot listen for LLDP on {interface}: {error}", interface=name,
                     error=str(e))
            continue
        reader = _FrameReader(name, sock, received)
        readers.append(reader)
        waiting.add(name)
    if not readers:
        return result
    log.info("Listening for LLDP on {interfaces} for up to {timeout} s",
             interfaces=sorted(waiting), timeout=timeout)
    timer = reactor.callLater(timeout, lambda: None if finished.called
                              else finished.callback(None))
    try:
        for reader in readers:
            reactor.addReader(reader)
        await finished
    finally:
        if timer.active():
            timer.cancel()
        for reader in readers:
            if not reader.closed:
                reactor.removeReader(reader)
                reader.close()
    if waiting:
        log.info("No LLDP frame within {timeout} s on {interfaces}", timeout=timeout,
                 interfaces=sorted(waiting))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ipa_twisted.net.lldp``: print the LLDP TLVs heard, as JSON."""
    from twisted.internet.task import react

    parser = argparse.ArgumentParser(prog="python -m ipa_twisted.net.lldp",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--interfaces", default=None,
                        help="comma-separated interface names (default: all but lo)")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--sys-path", default="/sys")
    parser.add_argument("--debug", action="store_true", help="log to stderr")
    options = parser.parse_args(argv)
    log_to_stderr(options.debug)
    names = options.interfaces.split(",") if options.interfaces else None

    async def run(reactor: Any) -> None:
        info = await get_lldp_info(names, options.timeout, reactor, options.sys_path)
        print(json.dumps(info, sort_keys=True), flush=True)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


def log_to_stderr(debug: bool) -> None:
    """Log to stderr (warnings, or everything with ``debug``) for the command-line tools."""
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)
    level = LogLevel.debug if debug else LogLevel.warn
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr),
                              [LogLevelFilterPredicate(defaultLogLevel=level)])],
        redirectStandardIO=False)


if __name__ == "__main__":
    main()
