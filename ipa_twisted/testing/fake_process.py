"""FakeRunner: a ProcessRunner stand-in answering from recorded outputs.

Answers are keyed by argv tuple; a key may also be a prefix of the argv (the longest
matching key wins). An answer is one of:

- ``bytes`` or ``str``: stdout (stderr empty, exit 0);
- a ``(stdout, stderr)`` tuple;
- ``Exit(code, stdout, stderr)``: checked like ProcessRunner does with ``check_exit_code``;
- an exception instance, raised (``ProcessTimeoutError(...)``, ``ProcessExecutionError(...)``);
- a callable taking the argv tuple and returning one of the above.

A program listed in ``missing`` (or, with ``unknown_missing=True``, one that no key names)
raises CommandNotFoundError and ``which`` gives None for it. An argv of a known program with
no answer fails like a program exiting 1. With ``hold=True`` every call waits until
``release()`` (or ``release_one()``), to observe what runs concurrently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError


@dataclass(frozen=True)
class Exit:
    """A program that exits with ``code``."""

    code: int
    stdout: bytes = b""
    stderr: bytes = b""


Answer = Union[bytes, str, tuple[bytes, bytes], Exit, BaseException,
               Callable[[tuple[str, ...]], Any]]


@dataclass
class RecordedCall:
    """One ``execute`` call: its argv and keyword arguments."""

    argv: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


class FakeRunner:
    """Answers ``execute`` from ``answers`` and records every call in ``calls``."""

    def __init__(self, answers: Mapping[tuple[str, ...], Answer] | None = None, *,
                 missing: Iterable[str] = (), unknown_missing: bool = False,
                 hold: bool = False) -> None:
        self.answers: dict[tuple[str, ...], Answer] = dict(answers or {})
        self.missing = set(missing)
        self.unknown_missing = unknown_missing
        self.hold = hold
        self.calls: list[RecordedCall] = []
        self._held: list[tuple[Deferred[tuple[bytes, bytes]], Callable[[], Any]]] = []

    @property
    def argvs(self) -> list[tuple[str, ...]]:
        """The argv of every call so far, in order."""
        return [call.argv for call in self.calls]

    @property
    def pending(self) -> int:
        """How many held calls are waiting for ``release``."""
        return len(self._held)

    def _installed(self, program: str) -> bool:
        if program in self.missing:
            return False
        if self.unknown_missing:
            return any(key and key[0] == program for key in self.answers)
        return True

    def which(self, name: str) -> str | None:
        """``/usr/bin/<name>`` for an installed program, else None."""
        return f"/usr/bin/{name}" if self._installed(name) else None

    def _answer(self, argv: tuple[str, ...]) -> Answer | None:
        if argv in self.answers:
            return self.answers[argv]
        prefixes = [key for key in self.answers if argv[:len(key)] == key]
        return self.answers[max(prefixes, key=len)] if prefixes else None

    def _outcome(self, argv: tuple[str, ...],
                 check_exit_code: bool | Iterable[int]) -> tuple[bytes, bytes]:
        if not argv:
            raise ValueError("execute() needs a program to run")
        if not self._installed(argv[0]):
            raise CommandNotFoundError(argv)
        answer: Any = self._answer(argv)
        if callable(answer) and not isinstance(answer, BaseException):
            answer = answer(argv)
        if answer is None:
            answer = Exit(1, b"", f"FakeRunner: no answer recorded for {argv}".encode())
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, str):
            return answer.encode(), b""
        if isinstance(answer, bytes):
            return answer, b""
        if isinstance(answer, Exit):
            if check_exit_code is True:
                ok = answer.code == 0
            elif check_exit_code is False:
                ok = True
            else:
                ok = answer.code in set(check_exit_code)
            if not ok:
                raise ProcessExecutionError(argv, answer.code, answer.stdout, answer.stderr)
            return answer.stdout, answer.stderr
        out, err = answer
        return out, err

    def execute(self, *argv: str, timeout: float | None = 60.0,
                check_exit_code: bool | Iterable[int] = True,
                **kwargs: Any) -> Deferred[tuple[bytes, bytes]]:
        """Record the call and answer it (now, or at ``release`` when holding)."""
        self.calls.append(RecordedCall(tuple(argv), dict(kwargs, timeout=timeout,
                                                         check_exit_code=check_exit_code)))

        def outcome() -> Deferred[tuple[bytes, bytes]]:
            try:
                return succeed(self._outcome(tuple(argv), check_exit_code))
            except BaseException:
                return fail(Failure())

        if not self.hold:
            return outcome()
        waiting: Deferred[tuple[bytes, bytes]] = Deferred()
        self._held.append((waiting, outcome))
        return waiting

    def release_one(self) -> None:
        """Answer the oldest held call."""
        waiting, outcome = self._held.pop(0)
        outcome().chainDeferred(waiting)

    def release(self) -> None:
        """Answer every held call, including ones made while releasing."""
        while self._held:
            self.release_one()

    async def try_execute(self, *argv: str, **kwargs: Any) -> tuple[bytes, bytes] | None:
        """Like ``execute`` but None instead of a ProcessExecutionError."""
        try:
            return await self.execute(*argv, **kwargs)
        except ProcessExecutionError:
            return None
