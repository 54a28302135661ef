"""Lockdown (``system.lockdown``): the agent made unreachable for good."""

from __future__ import annotations

import os
from collections.abc import Iterable

from twisted.application.service import IService, Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ipa_twisted.agent import Agent
from ipa_twisted.api.site import AgentSite

LOCKDOWN_MARKER = ".ipa-locked-down"
"""Written under ``etc_path`` at lockdown: the ramdisk's init never restarts the agent
once it exists (``ramdisk/init``)."""


class LockdownService(Service):
    """Locks the agent down when it asks for it (``Agent.lockdown_wanted``): ``closes``
    (the API listener, the start-up stages, the heartbeater) are stopped and taken out of
    the tree, then ``site``'s connections closed and the interfaces taken down."""

    log = Logger()

    def __init__(self, agent: Agent, site: AgentSite | None,
                 closes: Iterable[IService]) -> None:
        self._agent, self._site, self._closes = agent, site, list(closes)
        self._asked: Deferred[None] | None = None
        self.lockdown: Deferred[None] | None = None
        """Set once lockdown begins; fires when it is complete."""

    def startService(self) -> None:
        super().startService()
        self._asked = self._agent.lockdown_wanted.wait()
        self._asked.addCallback(lambda _: self.lock_down_once())
        self._asked.addErrback(lambda failure: failure.trap(CancelledError) and None)

    def stopService(self) -> None:
        super().stopService()
        if self._asked is not None:
            self._asked.cancel()

    def lock_down_once(self) -> None:
        """Start the lockdown unless it has begun (``lockdown`` fires when complete)."""
        if self.lockdown is None:
            self.lockdown = Deferred.fromCoroutine(self.lock_down())
            self.lockdown.addErrback(self._incomplete)

    def _incomplete(self, failure: Failure) -> None:
        self.log.failure("Lockdown did not complete", failure)

    async def lock_down(self) -> None:
        """Make the agent unreachable for good, in this order: no start-up step and no
        heartbeat any more, a marker for the ramdisk's init (see ``LOCKDOWN_MARKER``), the
        API port closed, every open connection closed (keep-alive ones included), then the
        machine's interfaces taken down (``ipa_twisted.net.lockdown``). The process keeps
        running, answering no one, so that nothing restarts it into an open API."""
        self.log.info("Locking down: closing the API for good, stopping heartbeats and "
                      "taking the network interfaces down")
        self._agent.locked_down = True
        self._write_marker()
        stopping = [maybeDeferred(service.disownServiceParent)
                    for service in self._closes if service.parent is not None]
        await gatherResults(stopping, consumeErrors=True)
        if self._site is not None:
            await self._site.close_connections(self._agent.clock)
        from ipa_twisted.net.lockdown import take_interfaces_down
        down = await take_interfaces_down(self._agent.runner, self._agent.config.sys_path)
        self.log.info("Locked down: the API is closed, heartbeats stopped, interfaces down: "
                      "{interfaces}; the agent keeps running and answers no one",
                      interfaces=", ".join(down) or "none")

    def _write_marker(self) -> None:
        path = os.path.join(self._agent.config.etc_path, LOCKDOWN_MARKER)
        try:
            with open(path, "w") as f:
                f.write(f"{self._agent.clock.seconds():.0f}\n")
        except OSError as e:
            self.log.warn("Cannot write the lockdown marker {path} (the ramdisk's init may "
                          "restart the agent if it ever stops): {error}", path=path,
                          error=str(e))
