"""The heartbeater's schedule, on a Clock."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.errors import HeartbeatConnectionError
from ipa_twisted.ironic.heartbeat import Heartbeater
from ipa_twisted.when import When


def sequence(*values: float) -> Callable[[], float]:
    it: Iterator[float] = iter(values)
    return lambda: next(it)


class Beats:
    """A beat that records its start times; ``slow`` beats wait for ``finish()``."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.times = clock, []  # type: list[float]
        self.slow = False
        self.fail_with: Exception | None = None
        self.waiting: list[Deferred[None]] = []
        self.cancelled = 0

    async def __call__(self) -> None:
        self.times.append(self.clock.seconds())
        if self.slow:
            def cancel(_: object) -> None:
                self.cancelled += 1
            d: Deferred[None] = Deferred(cancel)
            self.waiting.append(d)
            await d
        if self.fail_with is not None:
            raise self.fail_with

    def finish(self) -> None:
        self.waiting.pop(0).callback(None)


class HeartbeaterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.beats = Beats(self.clock)
        self.timeout = 100.0

    def make(self, **kwargs: Any) -> Heartbeater:
        kwargs.setdefault("jitter", lambda: 0.5)
        kwargs.setdefault("retry_delay", lambda: 7.0)
        heartbeater = Heartbeater(self.beats, lambda: self.timeout, self.clock, **kwargs)
        with capturedLogs():
            heartbeater.startService()
        self.addCleanup(lambda: heartbeater.running and heartbeater.stopService())
        return heartbeater

    def run_for(self, seconds: float, step: float = 0.5) -> list[Any]:
        with capturedLogs() as events:
            self.clock.pump([step] * int(seconds / step))
        return list(events)

    def test_first_beat_is_immediate(self) -> None:
        self.make()
        self.assertEqual(self.beats.times, [0])

    def test_intervals_are_timeout_times_drawn_jitter(self) -> None:
        self.make(jitter=sequence(0.3, 0.6, 0.45, 0.5))
        events = self.run_for(140)
        self.assertEqual(self.beats.times, [0, 30, 90, 135])
        beat_logs = [e for e in events if "delay" in e]
        self.assertEqual([e["delay"] for e in beat_logs], [60, 45, 50])
        self.assertEqual(beat_logs[0]["log_level"].name, "info")

    def test_default_jitter_keeps_intervals_within_bounds(self) -> None:
        rng = random.Random(7)
        self.make(jitter=lambda: rng.uniform(0.3, 0.6))
        self.run_for(2000, step=0.25)
        waits = [b - a for a, b in zip(self.beats.times, self.beats.times[1:])]
        self.assertGreater(len(waits), 30)
        for wait in waits:
            self.assertTrue(30 <= wait <= 60, wait)
        self.assertGreater(len(set(waits)), 10)

    def test_timeout_changes_are_picked_up(self) -> None:
        self.make()
        self.timeout = 10
        self.run_for(61)
        self.assertEqual(self.beats.times, [0, 50, 55, 60])

    def test_failures_are_retried_after_the_retry_delay(self) -> None:
        self.beats.fail_with = HeartbeatConnectionError("refused")
        with capturedLogs() as first:
            self.make(retry_delay=sequence(5, 10, 6))
        events = first + self.run_for(15)
        self.assertEqual(self.beats.times, [0, 5, 15])
        failures = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(failures), 3)
        self.assertNotIn("log_failure", failures[0])
        self.assertEqual(failures[0]["delay"], 5)
        self.assertIn("HeartbeatConnectionError", failures[0]["error"])
        self.assertIn("refused", failures[0]["error"])
        self.beats.fail_with = None
        self.run_for(21)
        self.assertEqual(self.beats.times, [0, 5, 15, 21])  # 15 + 6
        self.run_for(50)
        self.assertEqual(self.beats.times, [0, 5, 15, 21, 71])

    def test_forced_beats_are_coalesced_and_spaced(self) -> None:
        heartbeater = self.make()
        self.clock.advance(1)
        for _ in range(3):
            heartbeater.force()
        self.run_for(4)
        self.assertEqual(self.beats.times, [0, 5])
        self.run_for(15)
        heartbeater.force()  # 15 s after the last beat: at once (on the next reactor turn)
        with capturedLogs():
            self.clock.advance(0)
        self.assertEqual(self.beats.times, [0, 5, 20])
        self.clock.advance(1)
        heartbeater.force()
        heartbeater.force()
        self.run_for(10)
        self.assertEqual(self.beats.times, [0, 5, 20, 25])
        self.assertEqual(heartbeater.next_due, 75)

    def test_force_never_delays_an_earlier_beat(self) -> None:
        heartbeater = self.make(jitter=sequence(0.5, 0.02, 0.5), min_forced_interval=5)
        self.run_for(50)  # beat at 50, next due at 52
        heartbeater.force()
        self.assertEqual(heartbeater.next_due, 52)

    def test_slow_beats_never_overlap(self) -> None:
        self.beats.slow = True
        heartbeater = self.make()
        self.run_for(200)
        self.assertEqual(self.beats.times, [0])
        self.assertIsNone(heartbeater.next_due)
        heartbeater.force()  # during the beat: another one after it
        self.beats.finish()  # ends at 200
        self.run_for(5)
        self.assertEqual(self.beats.times, [0, 205])
        self.beats.finish()
        self.assertEqual(heartbeater.next_due, 255)

    def test_stop_waits_for_the_beat_in_flight(self) -> None:
        self.beats.slow = True
        heartbeater = self.make()
        with capturedLogs():
            stopped = heartbeater.stopService()
        self.assertNoResult(stopped)
        self.beats.finish()
        self.successResultOf(stopped)
        self.run_for(500)
        self.assertEqual(self.beats.times, [0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_a_beat_that_takes_too_long(self) -> None:
        self.beats.slow = True
        heartbeater = self.make(stop_timeout=30)
        with capturedLogs() as events:
            stopped = heartbeater.stopService()
            self.clock.advance(30)
        self.successResultOf(stopped)
        self.assertEqual(self.beats.cancelled, 1)
        self.assertIn(CancelledError.__name__, events[-1]["error"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_between_beats(self) -> None:
        heartbeater = self.make()
        self.successResultOf(heartbeater.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        heartbeater.force()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_broken_schedule_keeps_beating(self) -> None:
        def jitter() -> float:
            raise ValueError("broken jitter")
        self.make(jitter=jitter, min_forced_interval=5)
        self.run_for(10)
        self.assertEqual(self.beats.times, [0, 5, 10])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 3)


class AfterTests(SynchronousTestCase):
    """A heartbeater handed ``after`` beats only once that has happened."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.beats = Beats(self.clock)
        self.ready: When[str] = When()
        self.heartbeater = Heartbeater(self.beats, lambda: 100.0, self.clock,
                                       jitter=lambda: 0.5, after=self.ready)
        self.heartbeater.startService()

    def test_first_beat_once_ready_and_force_ignored_before(self) -> None:
        self.heartbeater.force()
        self.clock.advance(60)
        self.assertEqual(self.beats.times, [])
        self.ready.fire("advertised")
        self.assertEqual(self.beats.times, [60])
        self.clock.advance(50)
        self.assertEqual(self.beats.times, [60, 110])
        self.successResultOf(self.heartbeater.stopService())

    def test_stop_before_ready_never_beats(self) -> None:
        self.successResultOf(self.heartbeater.stopService())
        self.ready.fire("advertised")
        self.clock.advance(600)
        self.assertEqual(self.beats.times, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
