"""The retry helper: backoff on a Clock, attempts, deadline, which errors retry, logs,
cancellation."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.retry import Backoff, GaveUp, fixed, full_jitter, retrying, spread


class _Flaky:
    """Fails with the given errors in turn, then answers ``result``."""

    def __init__(self, errors: list[Exception], result: Any = "done") -> None:
        self.errors, self.result, self.calls = list(errors), result, 0

    def __call__(self) -> Deferred[Any]:
        self.calls += 1
        if self.errors:
            error = self.errors.pop(0)
            d: Deferred[Any] = Deferred()
            d.errback(error)
            return d
        return succeed(self.result)


class _Events:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.log = Logger(observer=self.events.append)


class BackoffTests(SynchronousTestCase):
    def test_exponential_capped(self) -> None:
        backoff = Backoff(initial=1.0, factor=2.0, cap=5.0)
        self.assertEqual([backoff.delay(n) for n in range(1, 6)], [1.0, 2.0, 4.0, 5.0, 5.0])

    def test_fixed(self) -> None:
        self.assertEqual({fixed(3.0).delay(n) for n in range(1, 10)}, {3.0})

    def test_spread_multiplies(self) -> None:
        drawn: list[tuple[float, float]] = []

        def uniform(low: float, high: float) -> float:
            drawn.append((low, high))
            return high

        backoff = Backoff(initial=1.0, factor=2.7, cap=1200.0,
                          jitter=spread(0.5, 1.5, uniform))
        self.assertAlmostEqual(backoff.delay(2), 2.7 * 1.5)
        self.assertEqual(drawn, [(0.5, 1.5)])

    def test_full_jitter_floor(self) -> None:
        backoff = Backoff(initial=2.0, factor=2.0, cap=30.0,
                          jitter=full_jitter(2.0, lambda low, high: low))
        self.assertEqual([backoff.delay(n) for n in (1, 3, 9)], [2.0, 2.0, 2.0])
        high = Backoff(initial=2.0, factor=2.0, cap=30.0,
                       jitter=full_jitter(2.0, lambda low, high: high))
        self.assertEqual([high.delay(n) for n in (1, 3, 9)], [2.0, 8.0, 30.0])

    def test_huge_attempt_numbers_stay_capped(self) -> None:
        self.assertEqual(Backoff(initial=1.0, factor=2.0, cap=60.0).delay(10_000), 60.0)


class RetryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = _Events()

    def test_succeeds_after_failures_waiting_on_clock(self) -> None:
        op = _Flaky([ValueError("a"), ValueError("b")])
        d = retrying(op, self.clock, "Fetching", backoff=Backoff(1.0, 2.0, 10.0),
                     attempts=5, log=self.events.log)
        self.assertEqual(op.calls, 1)
        self.assertNoResult(d)
        self.clock.advance(0.99)
        self.assertEqual(op.calls, 1)
        self.clock.advance(0.01)
        self.assertEqual(op.calls, 2)
        self.clock.advance(1.99)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(op.calls, 3)
        self.assertEqual([(e["attempt"], e["error"], e["delay"], e["log_level"])
                          for e in self.events.events],
                         [(1, "a", 1.0, LogLevel.warn), (2, "b", 2.0, LogLevel.warn)])
        self.assertEqual(formatEvent(self.events.events[0]),
                         "Fetching failed (attempt 1 of 5): a; retrying in 1.0 s")

    def test_gives_up_after_attempts(self) -> None:
        op = _Flaky([ValueError(str(n)) for n in range(10)])
        d = retrying(op, self.clock, "Fetching {url}", backoff=fixed(1.0), attempts=3,
                     log=self.events.log, fields={"url": "http://x"})
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        failure = self.failureResultOf(d, GaveUp)
        self.assertEqual((failure.value.attempts, str(failure.value.last)), (3, "2"))
        self.assertIsInstance(failure.value.__cause__, ValueError)
        self.assertEqual(op.calls, 3)
        self.assertEqual(len(self.events.events), 3)
        self.assertEqual(self.events.events[-1]["url"], "http://x")
        self.assertEqual(formatEvent(self.events.events[-1]),
                         "Fetching http://x failed (attempt 3 of 3): 2; giving up")
        self.assertEqual(str(failure.value), "Fetching http://x failed 3 time(s); last: 2")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_retried_error_raised_at_once(self) -> None:
        op = _Flaky([KeyError("k")])
        d = retrying(op, self.clock, "Fetching", retry_on=ValueError, log=self.events.log)
        self.failureResultOf(d, KeyError)
        self.assertEqual((op.calls, self.events.events), (1, []))

    def test_predicate_decides(self) -> None:
        op = _Flaky([ValueError("retry me"), ValueError("final")])
        d = retrying(op, self.clock, "Fetching", backoff=fixed(1.0),
                     retry_on=lambda e: str(e) == "retry me", log=self.events.log)
        self.clock.advance(1.0)
        self.assertEqual(str(self.failureResultOf(d, ValueError).value), "final")

    def test_deadline_last_attempt_at_deadline(self) -> None:
        op = _Flaky([ValueError("x")] * 10)
        d = retrying(op, self.clock, "Lookup", backoff=fixed(4.0), deadline=10.0,
                     log=self.events.log)
        self.clock.pump([4.0, 4.0])
        self.assertEqual(op.calls, 3)
        self.assertEqual(self.events.events[-1]["delay"], 2.0)  # cut to the deadline
        self.clock.advance(2.0)
        self.failureResultOf(d, GaveUp)
        self.assertEqual(op.calls, 4)
        self.assertEqual(self.clock.seconds(), 10.0)

    def test_wait_for_changes_one_wait(self) -> None:
        op = _Flaky([ValueError("busy"), ValueError("other")])
        d = retrying(op, self.clock, "Lookup", backoff=fixed(1.0), log=self.events.log,
                     wait_for=lambda e, delay: 30.0 if str(e) == "busy" else delay)
        self.clock.advance(29.0)
        self.assertEqual(op.calls, 1)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), "done")

    def test_progress_restarts_count(self) -> None:
        op = _Flaky([ValueError("no"), ValueError("moved"), ValueError("no"),
                     ValueError("no")])
        d = retrying(op, self.clock, "Download", backoff=fixed(1.0), attempts=2,
                     progressed=lambda e: str(e) == "moved", log=self.events.log)
        self.clock.pump([1.0, 1.0])
        self.failureResultOf(d, GaveUp)
        self.assertEqual(op.calls, 3)  # without the progress, two attempts only
        self.assertEqual([e["attempt"] for e in self.events.events], [1, 1, 2])

    def test_cancel_during_wait(self) -> None:
        op = _Flaky([ValueError("x")] * 3)
        d = retrying(op, self.clock, "Fetching", backoff=fixed(5.0), log=self.events.log)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(op.calls, 1)

    def test_cancel_during_attempt(self) -> None:
        cancelled: list[bool] = []

        def op() -> Deferred[str]:
            return Deferred(lambda _: cancelled.append(True))

        d = retrying(op, self.clock, "Fetching", log=self.events.log)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual((cancelled, self.events.events), ([True], []))

    def test_fields_from_the_error(self) -> None:
        op = _Flaky([ValueError("x")])
        d = retrying(op, self.clock, "Lookup at {url}", backoff=fixed(1.0),
                     fields=lambda e: {"url": f"http://{e}", "status": 500},
                     log=self.events.log)
        self.clock.advance(1.0)
        self.successResultOf(d)
        self.assertEqual(formatEvent(self.events.events[0]),
                         "Lookup at http://x failed (attempt 1): x; retrying in 1.0 s")
        self.assertEqual(self.events.events[0]["status"], 500)

    def test_sleep_replaces_clock_wait(self) -> None:
        waits: list[float] = []
        op = _Flaky([ValueError("x")])

        def sleep(seconds: float) -> Deferred[None]:
            waits.append(seconds)
            return succeed(None)

        d = retrying(op, self.clock, "Fetching", backoff=fixed(7.0), sleep=sleep,
                     log=self.events.log)
        self.assertEqual((self.successResultOf(d), waits), ("done", [7.0]))

    def test_level_and_attempts_in_log(self) -> None:
        op = _Flaky([ValueError("x")])
        d = retrying(op, self.clock, "Probe", backoff=fixed(1.0), attempts=4,
                     level=LogLevel.debug, log=self.events.log)
        self.clock.advance(1.0)
        self.successResultOf(d)
        event = self.events.events[0]
        self.assertEqual((event["log_level"], event["attempts"], event["of"]),
                         (LogLevel.debug, 4, " of 4"))
