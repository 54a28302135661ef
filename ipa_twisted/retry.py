"""The one way the agent retries: an operation, attempts or a deadline, backoff on a clock.

Delays come from ``twisted.application.internet.backoffPolicy`` (initial delay, factor, cap);
a ``jitter`` function then spreads each delay (many agents coming back after an outage must
not knock at once). Waits are on the clock given, so tests drive them with ``Clock``.
Cancelling the Deferred of a retry (``retrying``, or the coroutine awaiting ``retry``) stops
it at once, during an attempt or a wait.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel

T = TypeVar("T")

_log = Logger()


def no_jitter(delay: float) -> float:
    """The delay unchanged."""
    return delay


def spread(low: float, high: float,
           uniform: Callable[[float, float], float] = random.uniform
           ) -> Callable[[float], float]:
    """Jitter multiplying each delay by a factor drawn from ``[low, high]``."""
    return lambda delay: delay * uniform(low, high)


def full_jitter(floor: float, uniform: Callable[[float, float], float] = random.uniform
                ) -> Callable[[float], float]:
    """Jitter drawing each delay from ``[floor, delay]`` (AWS's "full jitter", floored)."""
    return lambda delay: uniform(min(floor, delay), delay)


@dataclass(frozen=True)
class Backoff:
    """How long to wait after the n-th failed attempt: ``initial * factor**(n-1)``, at most
    ``cap``, passed through ``jitter``."""

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    jitter: Callable[[float], float] = no_jitter

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failed attempts (1, 2, ...)."""
        policy = backoffPolicy(initialDelay=self.initial, maxDelay=self.cap,
                               factor=self.factor, jitter=lambda: 0.0)
        return max(0.0, self.jitter(policy(max(failures - 1, 0))))


def fixed(delay: float) -> Backoff:
    """The same wait after every failed attempt."""
    return Backoff(initial=delay, factor=1.0, cap=delay)


class GaveUp(Exception):
    """Every attempt failed (or the deadline passed); ``last`` is the last attempt's error."""

    def __init__(self, what: str, attempts: int, last: BaseException) -> None:
        self.what, self.attempts, self.last = what, attempts, last
        super().__init__(f"{what} failed {attempts} time(s); last: {describe(last)}")


def describe(error: BaseException) -> str:
    """An error as one line for logs: its message, or its type when it has none."""
    return str(error) or type(error).__name__


RetryOn = type[BaseException] | tuple[type[BaseException], ...] | \
    Callable[[BaseException], bool]


def _retryable(retry_on: RetryOn, error: BaseException) -> bool:
    if isinstance(retry_on, (type, tuple)):
        return isinstance(error, retry_on)
    return retry_on(error)


async def retry(operation: Callable[[], Awaitable[T]], clock: IReactorTime, what: str, *,
                backoff: Backoff | None = None, attempts: int | None = None,
                deadline: float | None = None, retry_on: RetryOn = Exception,
                log: Logger | None = None, level: LogLevel = LogLevel.warn,
                fields: Mapping[str, Any] | Callable[[BaseException], Mapping[str, Any]]
                | None = None,
                describe: Callable[[BaseException], str] = describe,
                wait_for: Callable[[BaseException, float], float] | None = None,
                progressed: Callable[[BaseException], bool] | None = None,
                sleep: Callable[[float], Awaitable[Any]] | None = None) -> T:
    """The result of ``operation()``, called again after each retryable failure.

    ``what`` names the operation in logs ("Lookup of node at {url}": a log format, its
    fields from ``fields``, a mapping or a function of the error). Stops after ``attempts``
    attempts (None: no limit) or once ``deadline`` seconds have passed since the first
    attempt (waits end at the deadline, where one last attempt is made), then raises
    ``GaveUp`` from the last error. An error ``retry_on`` rejects (exception types or a
    predicate) is raised at once, as is ``CancelledError``. Each failed attempt is logged
    once at ``level`` with the fields ``attempt``, ``attempts``, ``error``, ``delay`` and
    ``fields``. ``wait_for(error, delay)`` may change one wait (a 409 waits
    longer); a failure for which ``progressed(error)`` is true starts the count of
    attempts again (a download that moved on is not a dead link). ``sleep(seconds)``
    replaces the wait on ``clock`` (a wait another party may cut short).
    """
    backoff = backoff or Backoff()
    log = log or _log
    started = clock.seconds()
    end = None if deadline is None else started + deadline
    failures = 0
    while True:
        try:
            return await operation()
        except CancelledError:
            raise
        except Exception as e:
            if not _retryable(retry_on, e):
                raise
            error: Exception = e
        failures = 1 if progressed is not None and progressed(error) else failures + 1
        now = clock.seconds()
        last = (attempts is not None and failures >= attempts) or \
            (end is not None and now >= end)
        delay = 0.0 if last else backoff.delay(failures)
        if not last and wait_for is not None:
            delay = wait_for(error, delay)
        if not last and end is not None:
            delay = min(delay, end - now)
        extra = dict((fields(error) if callable(fields) else fields) or {})
        log.emit(level, what + " failed (attempt {attempt}{of}): {error}; "
                 + ("giving up" if last else "retrying in {delay:.1f} s"),
                 attempt=failures, attempts=attempts,
                 of=f" of {attempts}" if attempts is not None else "",
                 error=describe(error), delay=delay, **extra)
        if last:
            try:
                named = what.format_map(extra)
            except (KeyError, IndexError, ValueError, AttributeError):
                named = what
            raise GaveUp(named, failures, error) from error
        await (sleep(delay) if sleep is not None else deferLater(clock, delay))


def retrying(operation: Callable[[], Awaitable[T]], clock: IReactorTime, what: str,
             **settings: Any) -> Deferred[T]:
    """``retry`` as a Deferred: cancelling it stops the attempt or the wait in progress."""
    return Deferred.fromCoroutine(retry(operation, clock, what, **settings))
