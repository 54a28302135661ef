"""FakeMulticastReactor: a Clock with the reactor's multicast UDP ports, for mDNS tests.

``listenMulticast`` gives a ``FakePort`` that records what is written to it (with the
clock's time), the socket options set on its handle, and whether it stopped listening;
``refuse`` makes given ``(interface, port)`` pairs fail as a port in use does, and
``answers`` maps a DNS-SD instance name to the datagram delivered 50 ms after a query for
it. The methods have the signatures of the real ones (``IReactorMulticast``, the UDP
``Port``); ``tests/test_fake_multicast_reactor.py`` checks that against the real reactor.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.names import dns


class FakeHandle:
    """A socket that records ``setsockopt`` calls."""

    def __init__(self) -> None:
        self.options: list[tuple[int, int, bytes]] = []

    def setsockopt(self, level: int, name: int, value: bytes) -> None:
        """Record the option."""
        self.options.append((level, name, value))


class FakePort:
    """A multicast UDP port: what was written to it, and when."""

    def __init__(self, reactor: FakeMulticastReactor, number: int,
                 protocol: DatagramProtocol, interface: str, shared: bool) -> None:
        self.reactor, self.number, self.protocol = reactor, number, protocol
        self.interface, self.shared = interface, shared
        self.handle = FakeHandle()
        self.sent: list[tuple[float, bytes, tuple[str, int]]] = []
        self.stopped = False

    def getHandle(self) -> FakeHandle:
        """The port's socket."""
        return self.handle

    def write(self, datagram: bytes, addr: tuple[str, int]) -> None:
        """Record the datagram (and let the reactor answer it)."""
        assert not self.stopped
        self.sent.append((self.reactor.seconds(), datagram, addr))
        self.reactor.sent(self, datagram)

    def stopListening(self) -> None:
        """Mark the port stopped (writing to it afterwards is a test failure)."""
        self.stopped = True

    def queried(self) -> list[tuple[str, int]]:
        """The (name, type) questions of the last datagram written."""
        message = dns.Message()
        message.fromStr(self.sent[-1][1])
        return [(q.name.name.decode(), q.type) for q in message.queries]


class FakeMulticastReactor(Clock):
    """A Clock with multicast UDP ports that record what is sent; ``answers`` maps an
    instance name to the datagram delivered (after 50 ms) when it is asked for."""

    def __init__(self, refuse: Sequence[tuple[str, int]] = (),
                 answers: dict[str, bytes] | None = None) -> None:
        super().__init__()
        self.refuse, self.answers = set(refuse), answers or {}
        self.ports: list[FakePort] = []

    def listenMulticast(self, port: int, protocol: DatagramProtocol, interface: str = "",
                        maxPacketSize: int = 8192, listenMultiple: bool = False) -> FakePort:
        """A FakePort, or CannotListenError for a refused (interface, port)."""
        if (interface, port) in self.refuse:
            raise CannotListenError(interface, port, OSError(98, "Address in use"))
        made = FakePort(self, port, protocol, interface, listenMultiple)
        self.ports.append(made)
        return made

    def sent(self, port: FakePort, data: bytes) -> None:
        """Schedule the recorded answer to each question of ``data``."""
        for name, _ in port.queried():
            answer = self.answers.get(name)
            if answer is not None:
                self.callLater(0.05, port.protocol.datagramReceived, answer,
                               ("192.0.2.1", 5353))
