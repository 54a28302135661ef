"""Events one part of the agent announces and others wait for, so that dependencies point
one way: whoever announces knows nothing of who listens.

``When`` is a one-time event ("config resolved", "node known", "lockdown asked for"): each
waiter gets a Deferred of its own, so one waiter cancelling (a service stopping) leaves the
others waiting. ``Observers`` is a repeated one ("an async command finished").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, succeed

T = TypeVar("T")


class When(Generic[T]):
    """Something that happens once; ``wait()`` gives a Deferred firing with its value."""

    def __init__(self) -> None:
        self._waiting: list[Deferred[T]] = []
        self._fired = False
        self._value: T | None = None

    @property
    def fired(self) -> bool:
        """Whether it has happened."""
        return self._fired

    @property
    def value(self) -> T:
        """The value it happened with; RuntimeError before."""
        if not self._fired:
            raise RuntimeError("not happened yet")
        return self._value  # type: ignore[return-value]

    def wait(self) -> Deferred[T]:
        """A Deferred of this waiter's own; cancelling it affects no other waiter."""
        if self._fired:
            return succeed(self._value)  # type: ignore[arg-type]
        waiter: Deferred[T] = Deferred(self._waiting.remove)
        self._waiting.append(waiter)
        return waiter

    def fire(self, value: T) -> None:
        """It happened (again: ignored, the first value stays)."""
        if self._fired:
            return
        self._fired, self._value = True, value
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(value)


class Observers(Generic[T]):
    """Something that happens again and again; each observer is called every time."""

    def __init__(self) -> None:
        self._observers: list[Callable[[T], object]] = []

    def subscribe(self, observer: Callable[[T], object]) -> Callable[[], None]:
        """Call ``observer(value)`` on each ``notify``; gives a function that unsubscribes."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers \
            else None

    def notify(self, value: T) -> None:
        """Tell every observer, in the order they subscribed."""
        for observer in list(self._observers):
            observer(value)
