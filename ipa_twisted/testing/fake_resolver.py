"""FakeResolver: the reactor's name resolver (``IResolverSimple``) answering from a dict.

A name in ``answers`` resolves to its address; any other fails with ``DNSLookupError`` as
the real resolver does for a name that does not exist. Every name asked is kept in
``asked``. ``tests/test_fake_resolver.py`` checks it against ``reactor.resolver``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolverSimple
from zope.interface import implementer


@implementer(IResolverSimple)
class FakeResolver:
    """Resolves the names of ``answers``; DNSLookupError for any other."""

    def __init__(self, answers: Mapping[str, str]) -> None:
        self.answers = dict(answers)
        self.asked: list[str] = []

    def getHostByName(self, name: str, timeouts: Sequence[int] = ()) -> Deferred[str]:
        """The address of ``name``, or a DNSLookupError."""
        self.asked.append(name)
        if name in self.answers:
            return succeed(self.answers[name])
        return fail(DNSLookupError(name))
