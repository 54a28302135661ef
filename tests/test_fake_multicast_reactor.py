"""FakeMulticastReactor checked against the real reactor's multicast ports."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorMulticast
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from ipa_twisted.testing.fake_multicast_reactor import FakeMulticastReactor
from tests.test_fake_process_reactor import parameters


class FakeMulticastReactorContractTests(TestCase):
    def test_listen_multicast_takes_the_real_parameters(self) -> None:
        self.assertTrue(IReactorMulticast.providedBy(reactor))
        real = reactor.listenMulticast  # type: ignore[attr-defined]
        self.assertEqual(parameters(FakeMulticastReactor().listenMulticast), parameters(real))

    async def test_port_methods_are_the_real_ports(self) -> None:
        real = reactor.listenMulticast(  # type: ignore[attr-defined]
            0, DatagramProtocol(), interface="127.0.0.1", listenMultiple=True)
        try:
            fake = FakeMulticastReactor().listenMulticast(5353, DatagramProtocol())
            for name in ("write", "getHandle", "stopListening"):
                self.assertEqual(parameters(getattr(fake, name)),
                                 parameters(getattr(real, name)), name)
            self.assertTrue(callable(real.getHandle().setsockopt))
            self.assertEqual(parameters(fake.getHandle().setsockopt)[:2],
                             ["level", "name"])
        finally:
            await real.stopListening()
