"""The process runner: exit codes, timeouts that kill, environment, stdin, real children."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted.process import (CommandNotFoundError, ProcessExecutionError, ProcessRunner,
                                 ProcessTimeoutError, descendants)
from ipa_twisted.testing.fake_process_reactor import FakeProcessReactor


class ProcessRunnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake, self.clock = FakeProcessReactor(), Clock()
        self.runner = ProcessRunner(self.fake, self.clock,  # type: ignore[arg-type]
                                    base_env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})

    def test_success_gives_output(self) -> None:
        done = self.runner.execute("true")
        child = self.fake.children[0]
        child.childDataReceived(1, b"out")
        child.childDataReceived(2, b"err")
        child.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(done), (b"out", b"err"))
        self.assertEqual(self.fake.stdin_closed, 1)

    def test_bad_exit_carries_argv_code_and_output(self) -> None:
        failed = self.runner.execute("false", "--flag")
        child = self.fake.children[0]
        child.childDataReceived(1, b"partial")
        child.childDataReceived(2, b"nope")
        child.processEnded(Failure(ProcessTerminated(exitCode=3)))
        error = self.failureResultOf(failed, ProcessExecutionError).value
        self.assertEqual((error.argv, error.exit_code, error.stdout, error.stderr),
                         (("false", "--flag"), 3, b"partial", b"nope"))
        self.assertIn("exit code 3", str(error))

    def test_accepted_exit_codes(self) -> None:
        done = self.runner.execute("false", check_exit_code=[0, 3])
        self.fake.children[0].processEnded(Failure(ProcessTerminated(exitCode=3)))
        self.successResultOf(done)
        anything = self.runner.execute("false", check_exit_code=False)
        self.fake.children[1].processEnded(Failure(ProcessTerminated(exitCode=9)))
        self.successResultOf(anything)

    def test_timeout_kills(self) -> None:
        hung = self.runner.execute("sleep", "9", timeout=5)
        self.clock.advance(4.9)
        self.assertNoResult(hung)
        self.clock.advance(0.1)
        self.assertEqual(self.fake.signals, ["KILL"])
        self.assertNoResult(hung)  # waits for the child to be reaped
        self.fake.children[0].processEnded(Failure(ProcessTerminated(signal=9)))
        error = self.failureResultOf(hung, ProcessTimeoutError).value
        self.assertIn("timed out after 5", str(error))

    def test_unkillable_child_gives_up_after_grace(self) -> None:
        hung = self.runner.execute("sleep", "9", timeout=5)
        self.clock.advance(5)
        self.assertNoResult(hung)
        self.clock.advance(10)
        self.failureResultOf(hung, ProcessTimeoutError)

    def test_cancel_kills(self) -> None:
        running = self.runner.execute("sleep", "9")
        running.cancel()
        self.assertEqual(self.fake.signals, ["KILL"])
        self.failureResultOf(running)

    def test_missing_program(self) -> None:
        failure = self.failureResultOf(self.runner.execute("no-such-program-xyz"),
                                       CommandNotFoundError)
        self.assertIn("no-such-program-xyz not found", str(failure.value))
        self.assertEqual(self.fake.children, [])

    def test_environment_is_explicit(self) -> None:
        self.runner.execute("true", env={"EXTRA": "1"})
        _, argv, env = self.fake.spawned[0]
        self.assertEqual(env, {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "EXTRA": "1"})
        self.assertEqual(argv, ("true",))

    def test_stdin_bytes(self) -> None:
        self.runner.execute("cat", stdin=b"data")
        self.assertEqual((self.fake.stdin, self.fake.stdin_closed), ([b"data"], 1))

    def test_logs_argv_and_exit_code_at_debug(self) -> None:
        with capturedLogs() as events:
            done = self.runner.execute("true", "x")
            self.fake.children[0].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(done)
        ran = [e for e in events if e.get("code") == 0]
        self.assertEqual(ran[0]["argv"], ("true", "x"))
        self.assertEqual(ran[0]["log_level"].name, "debug")

    def test_log_argv_hides_secrets(self) -> None:
        with capturedLogs() as events:
            failed = self.runner.execute("true", "s3cret", log_argv=["true", "***"])
            self.fake.children[0].processEnded(Failure(ProcessTerminated(exitCode=1)))
        error = self.failureResultOf(failed, ProcessExecutionError).value
        self.assertNotIn("s3cret", str(error) + repr(events))

    def test_stop_kills_what_runs_and_waits_for_it(self) -> None:
        done = self.runner.execute("true")
        self.fake.children[0].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(done)
        first, second = self.runner.execute("sleep", "9"), self.runner.execute("cat")
        with capturedLogs() as events:
            stopped = self.runner.stop()
        self.assertEqual(self.fake.signals, ["KILL", "KILL"])
        self.assertEqual(events[0]["argvs"], [("sleep", "9"), ("cat",)])
        self.fake.children[1].processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertNoResult(stopped)
        self.fake.children[2].processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(stopped)
        error = self.failureResultOf(first, ProcessExecutionError).value
        self.assertIn("killed: the agent is stopping", str(error))
        self.failureResultOf(second, ProcessExecutionError)
        self.successResultOf(self.runner.stop())  # nothing left to kill
        self.assertEqual(len(self.fake.signals), 2)

    def test_stop_gives_up_on_a_child_that_will_not_die(self) -> None:
        self.runner.execute("sleep", "9")
        stopped = self.runner.stop(timeout=5)
        self.clock.advance(4.9)
        self.assertNoResult(stopped)
        with capturedLogs() as events:
            self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual([(e["log_level"].name, e["argvs"]) for e in events],
                         [("warn", [("sleep", "9")])])


async def poll_gone(pid: int, timeout: float = 5.0) -> None:
    """Wait until ``pid`` no longer runs (gone, or a zombie of someone else's)."""
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        await deferLater(reactor, 0.05)
    os.kill(pid, 9)  # leave nothing behind, then fail
    raise AssertionError(f"process {pid} still ran")


async def poll_file(path: str, timeout: float = 5.0) -> None:
    """Wait until ``path`` exists and is not empty."""
    deadline = reactor.seconds() + timeout
    while not (os.path.exists(path) and os.path.getsize(path)):
        if reactor.seconds() > deadline:
            raise AssertionError(f"{path} not written")
        await deferLater(reactor, 0.05)


class RealProcessTests(TestCase):
    """Real children on this machine's reactor."""

    def setUp(self) -> None:
        self.runner = ProcessRunner(reactor, reactor)

    async def test_output_and_exit(self) -> None:
        out, err = await self.runner.execute(
            sys.executable, "-c", "import sys; print('hi'); sys.stderr.write('e')")
        self.assertEqual((out, err), (b"hi\n", b"e"))
        with self.assertRaises(ProcessExecutionError) as caught:
            await self.runner.execute(sys.executable, "-c", "raise SystemExit(4)")
        self.assertEqual(caught.exception.exit_code, 4)

    async def test_timeout_kills_real_child(self) -> None:
        with self.assertRaises(ProcessTimeoutError):
            await self.runner.execute(sys.executable, "-c", "import time; time.sleep(60)",
                                      timeout=0.5)

    async def test_timeout_kills_the_programs_a_child_started(self) -> None:
        pidfile = os.path.abspath(self.mktemp())
        started = reactor.seconds()
        with self.assertRaises(ProcessTimeoutError) as caught:
            # The grandchild keeps the output pipes open: left alive, it would hold the
            # command until KILL_GRACE and outlive it.
            await self.runner.execute("/bin/sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait",
                                      timeout=0.5)
        self.assertEqual(caught.exception.reason, "timed out after 0.5 s")
        self.assertLess(reactor.seconds() - started, 5)
        with open(pidfile) as f:
            grandchild = int(f.read())
        await poll_gone(grandchild)

    async def test_stop_kills_the_programs_a_child_started(self) -> None:
        pidfile = os.path.abspath(self.mktemp())
        running = self.runner.execute("/bin/sh", "-c",
                                      f"sleep 300 & echo $! > {pidfile}; wait")
        await poll_file(pidfile)
        await self.runner.stop()
        with self.assertRaises(ProcessExecutionError):
            await running
        with open(pidfile) as f:
            await poll_gone(int(f.read()))

    def test_descendants_from_a_proc_tree(self) -> None:
        proc = self.mktemp()
        # 10 → 11 → 13, 10 → 12; 20 is unrelated; comm with spaces and parentheses.
        for pid, comm, ppid in [(10, "sh", 1), (11, "a (b) c", 10), (12, "x", 10),
                                (13, "y", 11), (20, "z", 1)]:
            os.makedirs(os.path.join(proc, str(pid)))
            with open(os.path.join(proc, str(pid), "stat"), "w") as f:
                f.write(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1\n")
        os.makedirs(os.path.join(proc, "self"))
        self.assertEqual(sorted(descendants(10, proc)), [11, 12, 13])
        self.assertEqual(descendants(13, proc), [])
        self.assertEqual(descendants(10, proc + "-missing"), [])

    async def test_stop_kills_real_children(self) -> None:
        running = self.runner.execute(sys.executable, "-c", "import time; time.sleep(60)")
        await self.runner.stop()
        with self.assertRaises(ProcessExecutionError):
            await running

    async def test_large_stdin_stream_with_backpressure(self) -> None:
        chunk = b"x" * 65536

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(256):  # 16 MiB through a 64 KiB pipe
                yield chunk

        out, _ = await self.runner.execute(
            sys.executable, "-c",
            "import sys; n=0\nwhile True:\n b=sys.stdin.buffer.read(1<<20)\n"
            " if not b: break\n n+=len(b)\nprint(n)", stdin=chunks(), timeout=60)
        self.assertEqual(int(out), 256 * 65536)

    async def test_no_environment_leaks(self) -> None:
        out, _ = await self.runner.execute(sys.executable, "-c",
                                           "import os; print(sorted(os.environ))")
        self.assertEqual(out.strip(), b"['LANG', 'LC_ALL', 'PATH']")


class StreamTests(SynchronousTestCase):
    """ProcessRunner.stream: stdout handed on as it comes, paused while the consumer is busy."""

    def setUp(self) -> None:
        self.fake, self.clock = FakeProcessReactor(), Clock()
        self.runner = ProcessRunner(self.fake, self.clock,  # type: ignore[arg-type]
                                    base_env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})

    def test_busy_consumer_pauses_the_pipe(self) -> None:
        got: list[bytes] = []
        busy: list[Deferred[None]] = []

        def consume(data: bytes) -> Deferred[None] | None:
            got.append(data)
            if data == b"slow":
                busy.append(Deferred())
                return busy[-1]
            return None

        done = self.runner.stream("cat", on_stdout=consume)
        child = self.fake.children[0]
        child.childDataReceived(1, b"fast")
        child.childDataReceived(1, b"slow")
        self.assertEqual(self.fake.flow, ["pause"])
        busy[0].callback(None)
        self.assertEqual(self.fake.flow, ["pause", "resume"])
        child.childDataReceived(2, b"warning")
        child.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(done), b"warning")
        self.assertEqual(got, [b"fast", b"slow"])

    def test_consumer_error_kills_the_child(self) -> None:
        def consume(data: bytes) -> None:
            raise ValueError("disk full")

        done = self.runner.stream("cat", on_stdout=consume)
        child = self.fake.children[0]
        child.childDataReceived(1, b"data")
        self.assertEqual(self.fake.signals, ["KILL"])
        child.childDataReceived(1, b"more")  # dropped
        child.processEnded(Failure(ProcessTerminated(signal=9)))
        self.failureResultOf(done, ValueError)

    def test_bad_exit_is_an_execution_error(self) -> None:
        done = self.runner.stream("zstd", "-dc", on_stdout=lambda data: None)
        child = self.fake.children[0]
        child.childDataReceived(2, b"zstd: corrupted block")
        child.processEnded(Failure(ProcessTerminated(exitCode=1)))
        error = self.failureResultOf(done, ProcessExecutionError).value
        self.assertEqual((error.exit_code, error.stderr), (1, b"zstd: corrupted block"))


class RealStreamTests(TestCase):
    """stream() with real children: large outputs through a slow consumer."""

    def setUp(self) -> None:
        self.runner = ProcessRunner(reactor, reactor)

    async def test_slow_consumer_gets_everything_in_order(self) -> None:
        chunk = bytes(range(256)) * 256  # 64 KiB

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(128):  # 8 MiB through cat, both pipes with backpressure
                yield bytes([i]) + chunk[1:]

        got: list[bytes] = []
        pending: list[Deferred[None]] = []
        overlaps = 0

        def consume(data: bytes) -> Deferred[None]:
            nonlocal overlaps
            if pending and not pending[-1].called:
                overlaps += 1  # data while we said we were busy
            got.append(data)
            d: Deferred[None] = Deferred()
            reactor.callLater(0, d.callback, None)
            pending.append(d)
            return d

        await self.runner.stream("cat", stdin=chunks(), on_stdout=consume, timeout=60)
        out = b"".join(got)
        self.assertEqual(len(out), 128 * 65536)
        self.assertEqual([out[i * 65536] for i in range(128)], list(range(128)))
        self.assertEqual(overlaps, 0)

    async def test_consumer_failure_stops_an_endless_child(self) -> None:
        calls = 0

        def consume(data: bytes) -> Deferred[None]:
            nonlocal calls
            calls += 1
            d: Deferred[None] = Deferred()
            if calls == 3:
                reactor.callLater(0, d.errback, RuntimeError("write failed"))
            else:
                reactor.callLater(0, d.callback, None)
            return d

        with self.assertRaises(RuntimeError):
            await self.runner.stream(sys.executable, "-c",
                                     "import sys\nwhile True: sys.stdout.buffer.write(b'x' * 65536)",
                                     on_stdout=consume, timeout=30)
        self.assertEqual(calls, 3)

    async def test_stdin_source_failure_kills_the_child(self) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"some"
            raise OSError("download failed")

        with self.assertRaises(OSError):
            await self.runner.stream("cat", stdin=chunks(), on_stdout=lambda d: None,
                                     timeout=30)
