"""FakeProcessReactor: a reactor's ``spawnProcess`` where the test plays the child.

``spawnProcess`` connects the protocol to the fake itself (which is also the child's
transport) and records what was spawned; the test then feeds the protocol
(``childDataReceived``, ``processEnded``) as the kernel would. What the process runner does
to the child (signals, stdin, pausing its output pipes) is recorded in ``signals``,
``stdin``, ``stdin_closed`` and ``flow``.

Every transport method here has the signature of the real one
(``twisted.internet.process.Process``); ``tests/test_fake_process_reactor.py`` checks that
against a real child.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.protocol import ProcessProtocol


class FakeProcessReactor:
    """``spawnProcess`` records the child; the test plays it (see module doc)."""

    def __init__(self) -> None:
        self.children: list[ProcessProtocol] = []
        self.spawned: list[tuple[str, tuple[str, ...], dict[str, str]]] = []
        self.signals: list[str] = []
        self.stdin: list[bytes] = []
        self.stdin_closed = 0
        self.flow: list[str] = []

    # -- IReactorProcess ---------------------------------------------------------------------
    def spawnProcess(self, processProtocol: ProcessProtocol, executable: str,
                     args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                     path: str | None = None, uid: int | None = None, gid: int | None = None,
                     usePTY: bool = False, childFDs: Any = None) -> FakeProcessReactor:
        """Connect ``processProtocol`` to this fake child and record the spawn."""
        processProtocol.makeConnection(self)
        self.children.append(processProtocol)
        self.spawned.append((executable, tuple(args), dict(env or {})))
        return self

    # -- the child's transport (IProcessTransport, IProducer) --------------------------------
    def signalProcess(self, signalID: str | int) -> None:
        """Record the signal sent to the child."""
        self.signals.append(str(signalID))

    def write(self, data: bytes) -> None:
        """Record bytes written to the child's standard input."""
        self.stdin.append(data)

    def closeStdin(self) -> None:
        """Count closings of the child's standard input."""
        self.stdin_closed += 1

    def pauseProducing(self) -> None:
        """Record that the child's output pipes were paused."""
        self.flow.append("pause")

    def resumeProducing(self) -> None:
        """Record that the child's output pipes were resumed."""
        self.flow.append("resume")
