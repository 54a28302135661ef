"""FakeProcessReactor checked against the real reactor and a real child's transport."""

from __future__ import annotations

import inspect
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ipa_twisted.testing.fake_process_reactor import FakeProcessReactor

# IProcessTransport's, and the pipes' pause/resume the runner's stream() uses.
TRANSPORT = ("signalProcess", "write", "closeStdin", "pauseProducing", "resumeProducing")


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


def parameters(method: object) -> list[str]:
    """A method's parameter names (a fake's must be the real one's)."""
    return [name for name in inspect.signature(method).parameters  # type: ignore[arg-type]
            if name != "self"]


class FakeProcessReactorContractTests(TestCase):
    def test_spawn_process_takes_the_real_parameters(self) -> None:
        self.assertTrue(IReactorProcess.providedBy(reactor))
        self.assertEqual(parameters(FakeProcessReactor().spawnProcess),
                         parameters(reactor.spawnProcess))

    async def test_transport_methods_are_the_real_childs(self) -> None:
        protocol = _Ended()
        child = reactor.spawnProcess(
            protocol, sys.executable, [sys.executable, "-c", "import sys; sys.stdin.read()"],
            env={})
        try:
            self.assertTrue(IProcessTransport.providedBy(child))
            fake = FakeProcessReactor()
            for name in TRANSPORT:
                self.assertEqual(parameters(getattr(fake, name)),
                                 parameters(getattr(child, name)), name)
            child.write(b"x")
            child.pauseProducing()  # type: ignore[attr-defined]
            child.resumeProducing()  # type: ignore[attr-defined]
        finally:
            child.closeStdin()
            await protocol.ended

    def test_fake_records_what_the_runner_did(self) -> None:
        fake, protocol = FakeProcessReactor(), _Ended()
        transport = fake.spawnProcess(protocol, "/bin/cat", ["cat"], env={"LC_ALL": "C"})
        self.assertIs(protocol.transport, transport)
        transport.write(b"data")
        transport.closeStdin()
        transport.pauseProducing()
        transport.resumeProducing()
        transport.signalProcess("KILL")
        self.assertEqual((fake.spawned, fake.stdin, fake.stdin_closed, fake.flow, fake.signals),
                         ([("/bin/cat", ("cat",), {"LC_ALL": "C"})], [b"data"], 1,
                          ["pause", "resume"], ["KILL"]))
