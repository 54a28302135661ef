"""The top of the service tree, and what every start-up stage shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from ipa_twisted.agent import Agent
from ipa_twisted.api.site import AgentSite
from ipa_twisted.process import ProcessRunner
from ipa_twisted.when import When

T = TypeVar("T")


class AgentTree(MultiService):
    """The agent's services. Under twistd, gives the Application the agent's
    level-filtered log observer, so that ``--debug`` decides whether debug events are
    written."""

    def __init__(self, agent: Agent, site: AgentSite,
                 log_observer: ILogObserver | None = None) -> None:
        super().__init__()
        self.agent, self.site = agent, site
        """The agent the tree serves and its API site (for tests and tools)."""
        self._log_observer = log_observer

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self._log_observer is not None and hasattr(parent, "setComponent"):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self._log_observer)


class ProgramsService(Service):
    """No program the agent started outlives it: stopping kills them and waits, and a
    command waiting on one fails, saying why (in its result and the log)."""

    def __init__(self, runner: ProcessRunner) -> None:
        self._runner = runner

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._runner.stop()


class Stage(Service, Generic[T]):
    """One start-up step: once started it waits for what it needs, does its work and
    announces the result in ``done``. Stopping the service cancels the step.

    A step that fails calls ``fatal`` (the process stops: a half-started agent serves no
    one); only waits that may last for ever (lookup) retry.
    """

    log = Logger()

    def __init__(self, fatal: Callable[[Failure], object] | None = None) -> None:
        self.done: When[T] = When()
        self._fatal = fatal
        self._running: Deferred[None] | None = None

    async def run(self) -> T:
        """The step's work; its result is announced in ``done``."""
        raise NotImplementedError

    async def _run(self) -> None:
        self.done.fire(await self.run())

    def startService(self) -> None:
        super().startService()
        self._running = Deferred.fromCoroutine(self._run())
        self._running.addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        self.log.failure("Agent start-up failed ({stage}); stopping", failure,
                         stage=type(self).__name__)
        if self._fatal is not None:
            self._fatal(failure)

    def stopService(self) -> None:
        super().stopService()
        if self._running is not None:
            self._running.cancel()
