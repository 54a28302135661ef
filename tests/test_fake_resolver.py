"""FakeResolver checked against the reactor's own resolver."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolverSimple
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from ipa_twisted.testing.fake_resolver import FakeResolver
from tests.test_fake_process_reactor import parameters


class FakeResolverContractTests(TestCase):
    def test_both_are_simple_resolvers_with_one_signature(self) -> None:
        fake, real = FakeResolver({}), reactor.resolver  # type: ignore[attr-defined]
        self.assertTrue(verifyObject(IResolverSimple, fake))
        self.assertTrue(IResolverSimple.providedBy(real))
        self.assertEqual(parameters(fake.getHostByName), parameters(real.getHostByName))

    async def test_same_answer_for_a_known_name(self) -> None:
        fake = FakeResolver({"localhost": "127.0.0.1"})
        for resolver in (reactor.resolver, fake):  # type: ignore[attr-defined]
            self.assertEqual(await resolver.getHostByName("localhost"), "127.0.0.1")
        # (The real one is not asked for a missing name: that may wait on DNS servers.)
        with self.assertRaises(DNSLookupError):
            await fake.getHostByName("nowhere.invalid")
        self.assertEqual(fake.asked, ["localhost", "nowhere.invalid"])
