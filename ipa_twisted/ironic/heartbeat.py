"""The heartbeater: tells Ironic, again and again, that the agent is alive and where it is.

Scheduling rules (the reference agent's, on a clock instead of a thread):

- the first beat goes out as soon as the service starts (given ``after``, as soon as that
  has happened: the node is known and its API advertised);
- after a beat that succeeded, the next is due ``timeout() * jitter()`` seconds after it
  *ended*; ``timeout`` is read and ``jitter`` drawn anew each time, so a heartbeat timeout
  learnt later (lookup) is picked up at the next scheduling;
- after a beat that failed (any exception), the next is due ``retry_delay()`` seconds after
  it ended; the failure is logged as one warning line, never a traceback, and the loop goes on;
- ``force()`` asks for a beat as soon as possible, but no sooner than ``min_forced_interval``
  seconds after the previous beat ended; any number of ``force()`` calls before that beat
  make one beat. A ``force()`` during a beat asks for another beat after it (the beat in
  flight may have been sent before whatever prompted the call);
- beats never overlap: the next one is scheduled only when the previous one has ended.

Scheduling uses ``callLater`` on the given clock (one pending call at a time) rather than a
ticking ``LoopingCall``: due times are exact, which keeps the jitter what it says.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ipa_twisted.when import When


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Heartbeater(Service):
    """Calls ``beat`` on the reference agent's schedule while the service runs.

    ``stopService`` cancels the pending beat and waits for a beat in flight to end (its
    request has its own timeout); after ``stop_timeout`` seconds the beat is cancelled.
    """

    log = Logger()

    def __init__(self, beat: Callable[[], Awaitable[None]], timeout: Callable[[], float],
                 clock: IReactorTime,
                 jitter: Callable[[], float] = lambda: random.uniform(0.3, 0.6),
                 retry_delay: Callable[[], float] = lambda: random.uniform(5, 10),
                 min_forced_interval: float = 5.0, stop_timeout: float = 30.0,
                 after: When[Any] | None = None) -> None:
        self._beat, self._timeout, self._clock = beat, timeout, clock
        self._jitter, self._retry_delay = jitter, retry_delay
        self._min_forced_interval, self._stop_timeout = min_forced_interval, stop_timeout
        self._pending: IDelayedCall | None = None
        self._in_flight: Deferred[None] | None = None
        self._forced_during_beat = False
        self._last_end: float | None = None
        self._after = after
        self._waiting: Deferred[Any] | None = None
        self._beating = False
        self.beats = 0
        """Beats started so far (for status and tests)."""

    @property
    def next_due(self) -> float | None:
        """Clock time of the next scheduled beat; None while one is in flight or stopped."""
        return self._pending.getTime() if self._pending is not None else None

    def startService(self) -> None:
        super().startService()
        if self._after is None:
            self._begin()
            return
        waiting = self._waiting = self._after.wait()
        waiting.addCallback(lambda _: self._begin())
        waiting.addErrback(lambda failure: failure.trap(CancelledError) and None)

    def _begin(self) -> None:
        self._waiting = None
        self._beating = True
        self.log.info("Starting heartbeats")
        self._fire()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._beating = False
        if self._waiting is not None:
            self._waiting.cancel()
        self._cancel_pending()
        beat = self._in_flight
        if beat is None:
            return succeed(None)
        self.log.info("Stopping heartbeats: waiting for the beat in flight")
        done: Deferred[None] = Deferred()
        give_up = self._clock.callLater(self._stop_timeout, beat.cancel)

        def ended(result: object) -> None:
            if give_up.active():
                give_up.cancel()
            done.callback(None)

        beat.addBoth(ended)
        return done

    def force(self) -> None:
        """Beat as soon as allowed: at least ``min_forced_interval`` after the last beat."""
        if not self._beating:
            return
        if self._in_flight is not None:
            self._forced_during_beat = True
            return
        now = self._clock.seconds()
        at = now if self._last_end is None else max(now,
                                                    self._last_end + self._min_forced_interval)
        if self._pending is not None and self._pending.getTime() <= at:
            return  # a beat is already due by then: coalesce
        self.log.debug("Heartbeat forced, due in {delay:.1f} s", delay=at - now)
        self._schedule(at - now)

    def _cancel_pending(self) -> None:
        if self._pending is not None:
            if self._pending.active():
                self._pending.cancel()
            self._pending = None

    def _schedule(self, delay: float) -> None:
        self._cancel_pending()
        self._pending = self._clock.callLater(max(delay, 0.0), self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._forced_during_beat = False
        self.beats += 1
        beat = Deferred.fromCoroutine(self._beat_once())
        beat.addErrback(self._loop_broken)
        if not beat.called:
            self._in_flight = beat

    async def _beat_once(self) -> None:
        started = self._clock.seconds()
        error: Exception | None = None
        try:
            await self._beat()
        except Exception as e:  # CancelledError too: stopService gave up waiting
            error = e
        finally:
            self._in_flight = None
        end = self._clock.seconds()
        self._last_end = end
        if not self.running:
            if error is not None:
                self.log.info("Last heartbeat ended with {error}", error=_describe(error))
            return
        if error is None:
            timeout = self._timeout()
            delay = timeout * self._jitter()
            self.log.info("Heartbeat sent in {elapsed:.3f} s; next in {delay:.1f} s "
                          "(timeout {timeout} s)", elapsed=end - started, delay=delay,
                          timeout=timeout)
        else:
            delay = self._retry_delay()
            self.log.warn("Heartbeat failed: {error}; retrying in {delay:.1f} s",
                          error=_describe(error), delay=delay)
        if self._forced_during_beat:
            self._forced_during_beat = False
            delay = min(delay, self._min_forced_interval)
        self._schedule(delay)

    def _loop_broken(self, failure: Failure) -> None:
        # Only a raising timeout/jitter/retry_delay gets here: keep beating, slowly.
        self.log.failure("Heartbeat scheduling failed", failure)
        if self.running and self._pending is None:
            self._schedule(self._min_forced_interval)
