"""The one way the agent runs external programs: argv lists on the reactor, never a shell."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.process import Process
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAX_ERROR_OUTPUT = 4096
KILL_GRACE = 10.0
STOP_GRACE = 5.0
"""Seconds ``ProcessRunner.stop`` waits for the programs it killed to end."""


def descendants(pid: int, proc_path: str = "/proc") -> list[int]:
    """The processes below ``pid`` (children, theirs, ...), read from ``proc_path``.

    Scans ``<proc>/<pid>/stat`` for parent links (kernels without CONFIG_PROC_CHILDREN have
    no ``children`` files); a few hundred tiny procfs reads in a ramdisk.
    """
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir(proc_path)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc_path, entry, "stat"), "rb") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and fields[1].isdigit():
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                   "NO_PROXY")


def proxy_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The proxy variables of the agent's environment (``os.environ`` by default), to pass
    as ``env`` to a program that fetches (a container runtime): children of the runner get
    a minimal environment."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in PROXY_VARIABLES if environ.get(name)}


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= _MAX_ERROR_OUTPUT else "..." + text[-_MAX_ERROR_OUTPUT:]


class ProcessExecutionError(Exception):
    """A program failed: it exited badly, was killed, timed out or could not be found."""

    def __init__(self, argv: Iterable[str], exit_code: int | None, stdout: bytes,
                 stderr: bytes, reason: str = "") -> None:
        self.argv = tuple(argv)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason or (f"exit code {exit_code}" if exit_code is not None
                                 else "killed by a signal")
        super().__init__(self.argv, exit_code, stderr)

    @property
    def stdout_text(self) -> str:
        """stdout decoded (UTF-8, undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        """stderr decoded (UTF-8, undecodable bytes replaced)."""
        return self.stderr.decode("utf-8", "replace")

    def __str__(self) -> str:
        return (f"Command {' '.join(self.argv)!r} failed ({self.reason}). "
                f"stdout: {_tail(self.stdout)!r}; stderr: {_tail(self.stderr)!r}")


class CommandNotFoundError(ProcessExecutionError):
    """The program is not installed (not on PATH)."""

    def __init__(self, argv: Iterable[str]) -> None:
        argv = tuple(argv)
        super().__init__(argv, None, b"", b"", reason=f"{argv[0]} not found on PATH")


class ProcessTimeoutError(ProcessExecutionError):
    """The program ran past its timeout and was killed."""


@contextmanager
def failures_as(error: Callable[[str], BaseException] | None = None, message: str = "", *,
                make: Callable[[ProcessExecutionError], BaseException] | None = None
                ) -> Iterator[None]:
    """Inside the block, a ProcessExecutionError is raised as the agent's error instead,
    chained to it (``raise ... from``).

    ``error(text)`` builds that error (``errors.CleaningError``, ...) from ``message``: the
    program's failure replaces ``{error}`` in it, or follows it after ": ". ``make(e)``
    builds it from the failure itself instead (errors taking the exit code and output).
    Any other exception passes through unchanged.
    """
    if (error is None) == (make is None):
        raise TypeError("failures_as() takes an error class or make=, not both")
    try:
        yield
    except ProcessExecutionError as e:
        if make is not None:
            raise make(e) from e
        assert error is not None
        text = message.replace("{error}", str(e)) if "{error}" in message else \
            f"{message}: {e}" if message else str(e)
        raise error(text) from e


@implementer(IPushProducer)
class _Collector(ProcessProtocol):
    """Gathers a child's output and feeds its stdin, honouring the pipe's backpressure."""

    def __init__(self, ended: Deferred[tuple[int | None, bytes, bytes]]) -> None:
        self._ended = ended
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._writable: Deferred[None] | None = None
        self.finished = False
        self.failure: Failure | None = None
        """Why the run must fail whatever the exit code (stdin source or consumer error)."""
        self.exited = False
        self.stopped = False
        """Killed because the runner stopped (the agent is stopping)."""
        self._exit_waiters: list[Deferred[None]] = []

    def kill(self) -> None:
        """KILL the child, and the programs it started, unless it has ended.

        A program's own children (a script's commands) hold its output pipes open: left
        alive, they would outlive their command and keep it waiting for its end."""
        if self.exited or self.transport is None:
            return
        pid = getattr(self.transport, "pid", None)
        # Only a real child of this machine's reactor has a tree to read from /proc.
        below = descendants(pid) if isinstance(self.transport, Process) and pid else []
        try:
            self.transport.signalProcess("KILL")
        except Exception:  # already gone
            pass
        for other in below:
            try:
                os.kill(other, signal.SIGKILL)
            except OSError:  # already gone
                pass

    def when_exited(self) -> Deferred[None]:
        """Fires once the child has ended and its pipes are closed."""
        waiter: Deferred[None] = Deferred(self._exit_waiters.remove)
        if self.exited:
            waiter.callback(None)
        else:
            self._exit_waiters.append(waiter)
        return waiter

    def fail(self, failure: Failure) -> None:
        """Record ``failure`` (the first one wins) and kill the child."""
        if self.failure is None:
            self.failure = failure
        if not self.finished:
            self.kill()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        (self._out if childFD == 1 else self._err).append(data)

    def processEnded(self, reason: Failure) -> None:
        self.finished = True
        if self._writable is not None:
            waiting, self._writable = self._writable, None
            waiting.callback(None)
        if isinstance(reason.value, (ProcessDone, ProcessTerminated)):
            code = reason.value.exitCode
        else:  # pragma: no cover - Twisted only delivers the two above
            code = None
        self.exited = True
        if not self._ended.called:
            self._ended.callback((code, b"".join(self._out), b"".join(self._err)))
        waiters, self._exit_waiters = self._exit_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # IPushProducer, registered on the child's stdin pipe while we stream into it.
    def pauseProducing(self) -> None:
        if self._writable is None:
            self._writable = Deferred()

    def resumeProducing(self) -> None:
        if self._writable is not None:
            waiting, self._writable = self._writable, None
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.finished = True
        self.resumeProducing()

    async def feed(self, chunks: AsyncIterable[bytes]) -> None:
        """Write ``chunks`` to the child's stdin, waiting while its pipe is full."""
        assert self.transport is not None
        stdin = getattr(self.transport, "pipes", {}).get(0)
        if stdin is not None:
            stdin.registerProducer(self, True)
        try:
            async for chunk in chunks:
                if self.finished:
                    break
                self.transport.write(chunk)
                if self._writable is not None:
                    await self._writable
        finally:
            if stdin is not None and not self.finished:
                stdin.unregisterProducer()
            if not self.finished:
                self.transport.closeStdin()


_MAX_STREAM_STDERR = 64 * 1024


class _Streamer(_Collector):
    """Hands a child's stdout to a consumer as it comes, pausing the pipe while it is busy.

    ``on_stdout(data)`` may return a Deferred: the child's output pipes are not read until it
    fires, so a slow consumer stalls the child (the kernel pipe fills) instead of memory
    growing. stderr is kept (its last 64 KiB) for errors.
    """

    def __init__(self, ended: Deferred[tuple[int | None, bytes, bytes]],
                 on_stdout: Callable[[bytes], Deferred[Any] | None]) -> None:
        super().__init__(ended)
        self._on_stdout = on_stdout
        self._err_size = 0
        self.busy: Deferred[Any] | None = None
        self.dropping = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != 1:
            self._err.append(data)
            self._err_size += len(data)
            while self._err_size > _MAX_STREAM_STDERR and len(self._err) > 1:
                self._err_size -= len(self._err.pop(0))
            return
        if self.dropping or self.failure is not None:
            return
        try:
            result = self._on_stdout(data)
        except Exception:
            self.fail(Failure())
            return
        if isinstance(result, Deferred):
            if result.called:
                result.addErrback(self.fail)
                return
            assert self.transport is not None
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            self.busy = result
            result.addCallbacks(self._consumed, self._consumer_failed)

    def _consumed(self, _: object) -> None:
        self.busy = None
        if not self.finished and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _consumer_failed(self, failure: Failure) -> None:
        self.busy = None
        self.fail(failure)

    def fail(self, failure: Failure) -> None:
        super().fail(failure)
        self.release()

    def kill(self) -> None:
        super().kill()
        self.release()

    def release(self) -> None:
        """Read (and drop) the rest of the output, so a killed child's pipes reach EOF."""
        self.dropping = True
        if not self.finished and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]


class ProcessRunner:
    """Runs programs as reactor children and gives their output as Deferreds."""

    log = Logger()

    def __init__(self, reactor: IReactorProcess, clock: IReactorTime,
                 base_env: Mapping[str, str] | None = None) -> None:
        self._reactor, self._clock = reactor, clock
        # With no env, spawnProcess gives the child an EMPTY environment on POSIX.
        self._env = dict(base_env) if base_env is not None else {
            "PATH": os.environ.get("PATH") or DEFAULT_PATH, "LC_ALL": "C", "LANG": "C"}
        self._running: dict[_Collector, tuple[str, ...]] = {}
        """The children that have not ended, with their argv as logged."""

    def which(self, name: str) -> str | None:
        """The full path of ``name`` on the runner's PATH, or None."""
        if os.sep in name:
            return name if os.access(name, os.X_OK) else None
        return shutil.which(name, path=self._env.get("PATH", DEFAULT_PATH))

    def execute(self, *argv: str, timeout: float | None = 60.0,
                env: Mapping[str, str] | None = None,
                stdin: bytes | AsyncIterable[bytes] | None = None,
                check_exit_code: bool | Iterable[int] = True,
                log_argv: Iterable[str] | None = None) -> Deferred[tuple[bytes, bytes]]:
        """Run ``argv`` and fire with ``(stdout, stderr)``.

        ``timeout`` (seconds, None for none) kills the child and fails with
        ProcessTimeoutError. ``env`` is added to the base environment. ``stdin`` is written to
        the child and then closed (else it is closed at once). ``check_exit_code`` is True
        (only 0 is success), False (any exit is success) or the accepted codes. ``log_argv``
        replaces argv in logs and errors when argv holds a secret.
        """
        return Deferred.fromCoroutine(self._execute(
            tuple(argv), timeout, env, stdin, check_exit_code,
            tuple(log_argv) if log_argv is not None else None))

    async def _execute(self, argv: tuple[str, ...], timeout: float | None,
                       env: Mapping[str, str] | None,
                       stdin: bytes | AsyncIterable[bytes] | None,
                       check_exit_code: bool | Iterable[int],
                       log_argv: tuple[str, ...] | None,
                       on_stdout: Callable[[bytes], Deferred[Any] | None] | None = None,
                       ) -> tuple[bytes, bytes]:
        shown = log_argv or argv
        if not argv:
            raise ValueError("execute() needs a program to run")
        executable = self.which(argv[0])
        if executable is None:
            self.log.debug("Not running {argv}: {program} not found", argv=shown,
                           program=argv[0])
            raise CommandNotFoundError(shown)
        child_env = dict(self._env)
        if env:
            child_env.update(env)
        started = self._clock.seconds()
        timed_out = False
        grace: list[Any] = []

        # Cancelling (the caller gave up) kills the child; the timeout kills it and then
        # waits a little for it to be reaped, so no child outlives its command.
        ended: Deferred[tuple[int | None, bytes, bytes]] = Deferred(
            lambda _: collector.kill())
        collector = _Collector(ended) if on_stdout is None else _Streamer(ended, on_stdout)
        self.log.debug("Running {argv}", argv=shown)
        process = self._reactor.spawnProcess(collector, executable, argv, child_env)
        self._running[collector] = shown
        collector.when_exited().addCallback(lambda _: self._running.pop(collector, None))
        feeding: Deferred[None] | None = None
        if stdin is None:
            process.closeStdin()
        elif isinstance(stdin, bytes):
            process.write(stdin)
            process.closeStdin()
        else:
            feeding = Deferred.fromCoroutine(collector.feed(stdin))
            feeding.addErrback(lambda f: None if f.check(CancelledError) else collector.fail(f))

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            collector.kill()
            # A child stuck in the kernel may not die: stop waiting for it after a grace.
            grace.append(self._clock.callLater(
                KILL_GRACE, lambda: None if ended.called else ended.cancel()))

        expiry = self._clock.callLater(timeout, expire) if timeout is not None else None
        try:
            code, out, err = await ended
        except CancelledError:
            if timed_out:
                raise ProcessTimeoutError(shown, None, b"", b"",
                                          reason=f"timed out after {timeout} s; the "
                                          f"child did not die within {KILL_GRACE} s")
            raise
        finally:
            for call in [expiry, *grace]:
                if call is not None and call.active():
                    call.cancel()
            if feeding is not None and not feeding.called:
                feeding.cancel()
        if isinstance(collector, _Streamer) and collector.busy is not None:
            await collector.busy  # the consumer's last piece (a failure lands in .failure)
        if collector.failure is not None:
            self.log.debug("{argv} stopped: {error}", argv=shown,
                           error=collector.failure.getErrorMessage())
            collector.failure.raiseException()
        if timed_out:
            self.log.debug("Killed {argv} after {timeout}s", argv=shown, timeout=timeout)
            raise ProcessTimeoutError(shown, code, out, err, reason=f"timed out after {timeout} s")
        if collector.stopped and code is None:
            raise ProcessExecutionError(shown, code, out, err,
                                        reason="killed: the agent is stopping")
        self.log.debug("Ran {argv}: exit {code} in {elapsed:.3f}s", argv=shown, code=code,
                       elapsed=self._clock.seconds() - started)
        if check_exit_code is True:
            ok = code == 0
        elif check_exit_code is False:
            ok = True
        else:
            ok = code in set(check_exit_code)
        if not ok:
            raise ProcessExecutionError(shown, code, out, err)
        return out, err

    def stream(self, *argv: str, on_stdout: Callable[[bytes], Deferred[Any] | None],
               stdin: bytes | AsyncIterable[bytes] | None = None,
               timeout: float | None = None, env: Mapping[str, str] | None = None,
               check_exit_code: bool | Iterable[int] = True,
               log_argv: Iterable[str] | None = None) -> Deferred[bytes]:
        """Run ``argv``, handing its stdout to ``on_stdout`` as it comes; fire with stderr.

        ``on_stdout(data)`` may return a Deferred: the child's output is not read until it
        fires (the child blocks on a full pipe), so memory stays bounded whatever the output
        size. If it raises or its Deferred fails, the child is killed and that error is
        raised; likewise an error from an ``AsyncIterable`` ``stdin``. The other arguments are
        those of ``execute``; ``timeout`` defaults to none, as streams may be long.
        """
        async def run() -> bytes:
            _, err = await self._execute(
                tuple(argv), timeout, env, stdin, check_exit_code,
                tuple(log_argv) if log_argv is not None else None, on_stdout)
            return err
        return Deferred.fromCoroutine(run())

    def stop(self, timeout: float = STOP_GRACE) -> Deferred[None]:
        """Kill every program still running (the agent is stopping); fire once they have
        all ended, or after ``timeout`` seconds if one will not (stuck in the kernel, or a
        program it started still holds its output pipes). Their ``execute`` calls fail
        with ProcessExecutionError. Programs started later are not affected."""
        return Deferred.fromCoroutine(self._stop(timeout))

    async def _stop(self, timeout: float) -> None:
        running = dict(self._running)
        if not running:
            return
        self.log.info("Stopping: killing {count} running program(s): {argvs}",
                      count=len(running), argvs=list(running.values()))
        exits = [collector.when_exited() for collector in running]
        for collector in running:
            collector.stopped = True
            collector.kill()
        ended = DeferredList(exits, consumeErrors=True)
        ended.addTimeout(timeout, self._clock)  # cancels the waits, not the children
        try:
            await ended
        except TimeoutError:
            pass
        left = [argv for collector, argv in running.items() if not collector.exited]
        if left:
            self.log.warn("Stopping: {argvs} not ended {timeout}s after KILL", argvs=left,
                          timeout=timeout)

    async def try_execute(self, *argv: str, **kwargs: Any) -> tuple[bytes, bytes] | None:
        """Like ``execute`` but None (logged at debug) instead of an error."""
        try:
            return await self.execute(*argv, **kwargs)
        except ProcessExecutionError as e:
            self.log.debug("{argv} failed: {error}", argv=argv, error=str(e))
            return None
