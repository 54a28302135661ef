"""The agent's service tree: the API listener, then lookup, then the heartbeater."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import CancelledError, Deferred, gatherResults, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger

from typing import TYPE_CHECKING

from ipa_twisted import errors
from ipa_twisted.agent import Agent
from ipa_twisted.clock_sync import sync_clock
from ipa_twisted.config import AgentConfig
from ipa_twisted.process import ProcessRunner

if TYPE_CHECKING:  # imported when used: a standalone agent never loads them (idle RSS)
    from ipa_twisted.api.site import AgentSite
    from ipa_twisted.hardware.dispatch import HardwareManagers
    from ipa_twisted.ironic.client import IronicClient
    from ipa_twisted.ironic.heartbeat import Heartbeater
    from ipa_twisted.net.autotls import SwitchableTLSFactory

LOOKUP_RETRY_PAUSE = 10.0
LOCKDOWN_MARKER = ".ipa-locked-down"
"""Written under ``etc_path`` at lockdown: the ramdisk's init never restarts the agent
once it exists (``ramdisk/init``)."""


class AgentService(MultiService):
    """Starts the agent in the reference agent's order, every wait on the reactor.

    The API port is bound with the service tree (twistd fails at once, with a clear line,
    if it cannot listen) and answers while the hardware managers load; commands that need
    them wait for them. Unless standalone, the node is then looked up (retried for as long
    as it takes: an Ironic outage never stops the agent) and heartbeats begin.
    """

    log = Logger()

    def __init__(self, agent: Agent, api_service: IService,
                 load_managers: Callable[[], Awaitable[HardwareManagers]],
                 ironic: IronicClient | None,
                 find_address: Callable[[], Awaitable[str]] | None = None,
                 log_observer: ILogObserver | None = None,
                 stop_process: Callable[[], None] | None = None,
                 inspect: Callable[[HardwareManagers],
                                   Awaitable[tuple[str | None, Any]]] | None = None,
                 resolve_config: Callable[[AgentConfig], Awaitable[AgentConfig]] | None = None,
                 connect: Callable[[AgentConfig], tuple[IronicClient,
                                                        Callable[[], Awaitable[str]]]]
                 | None = None,
                 api_tls: SwitchableTLSFactory | None = None,
                 vmedia_config: Callable[[AgentConfig], Awaitable[AgentConfig]] | None = None,
                 api_site: AgentSite | None = None
                 ) -> None:
        super().__init__()
        self.agent = agent
        self._api_service = api_service
        self._load_managers = load_managers
        self._ironic = ironic
        self._find_address = find_address
        self._log_observer = log_observer
        self._startup: Deferred[None] = Deferred()
        self.heartbeater: Heartbeater | None = None
        api_service.setServiceParent(self)
        agent.lockdown_requested = self._lock_down
        self._stop_process = stop_process
        self._inspect = inspect
        self._resolve_config = resolve_config
        self._connect = connect
        self._api_tls = api_tls
        self._vmedia_config = vmedia_config
        self._api_site = api_site
        self.lockdown: Deferred[None] | None = None
        """Set once lockdown begins; fires when it is complete."""
        if stop_process is not None:
            agent.stop_requested = stop_process

    def _lock_down(self) -> None:
        if self.lockdown is None:
            self.lockdown = Deferred.fromCoroutine(self.lock_down())
            self.lockdown.addErrback(lambda failure: self.log.failure(
                "Lockdown did not complete", failure))

    async def lock_down(self) -> None:
        """Make the agent unreachable for good (``system.lockdown``), in this order: no
        start-up step and no heartbeat any more, a marker for the ramdisk's init (see
        ``LOCKDOWN_MARKER``), the API port closed, every open connection closed (keep-alive
        ones included), then the machine's interfaces taken down
        (``ipa_twisted.net.lockdown``). The process keeps running, answering no one, so that
        nothing restarts it into an open API."""
        self.log.info("Locking down: closing the API for good, stopping heartbeats and "
                      "taking the network interfaces down")
        self.agent.locked_down = True
        self._startup.cancel()
        self.agent.heartbeat_requested = lambda: None
        self._write_lockdown_marker()
        stopping = [maybeDeferred(service.disownServiceParent)
                    for service in (self._api_service, self.heartbeater)
                    if service is not None and service.parent is self]
        await gatherResults(stopping, consumeErrors=True)
        if self._api_site is not None:
            await self._api_site.close_connections(self.agent.clock)
        from ipa_twisted.net.lockdown import take_interfaces_down
        down = await take_interfaces_down(self.agent.runner, self.agent.config.sys_path)
        self.log.info("Locked down: the API is closed, heartbeats stopped, interfaces down: "
                      "{interfaces}; the agent keeps running and answers no one",
                      interfaces=", ".join(down) or "none")

    def _write_lockdown_marker(self) -> None:
        path = os.path.join(self.agent.config.etc_path, LOCKDOWN_MARKER)
        try:
            with open(path, "w") as f:
                f.write(f"{self.agent.clock.seconds():.0f}\n")
        except OSError as e:
            self.log.warn("Cannot write the lockdown marker {path} (the ramdisk's init may "
                          "restart the agent if it ever stops): {error}", path=path,
                          error=str(e))

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        # Under twistd the parent is the Application: give it our level-filtered observer
        # so that --debug decides whether debug events are written.
        if self._log_observer is not None and hasattr(parent, "setComponent"):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self._log_observer)

    def startService(self) -> None:
        super().startService()
        self._startup = Deferred.fromCoroutine(self._start())
        self._startup.addErrback(self._startup_failed)

    def _startup_failed(self, failure: Any) -> None:
        if failure.check(CancelledError):
            return None
        # Lookup retries forever, so what fails here is fatal (no hardware manager, the
        # clock with fail_if_clock_not_set): stop rather than serve a half-started agent.
        self.log.failure("Agent start-up failed; stopping", failure)
        if self._stop_process is not None:
            self._stop_process()
        return None

    async def _start(self) -> None:
        clock = self.agent.clock
        if self._vmedia_config is not None:
            # Booted from virtual media: its parameters rank above the kernel command line.
            self.agent.config = await self._vmedia_config(self.agent.config)
        if self._resolve_config is not None:
            # mDNS first: it says where Ironic is and may override settings.
            self.agent.config = await self._resolve_config(self.agent.config)
        config = self.agent.config
        if self._connect is not None and self._ironic is None and not config.standalone:
            self._ironic, self._find_address = self._connect(config)
        if config.hardware_initialization_delay > 0:
            self.log.info("Waiting {delay}s for hardware to initialise",
                          delay=config.hardware_initialization_delay)
            await deferLater(clock, config.hardware_initialization_delay, lambda: None)
        managers = await self._load_managers()
        self.agent.set_managers(managers)
        self.log.info("Hardware managers: {managers}",
                      managers=managers.get_current_versions())
        if config.ntp_server:
            await sync_clock(self.agent.runner, config,
                             ignore_errors=not config.fail_if_clock_not_set)
        node_uuid, lookup = await self._run_inspection(managers)
        if config.standalone or self._ironic is None:
            self.log.info("Standalone mode: no lookup, no heartbeats")
            return
        if lookup is not None:
            # Ironic's continue_inspection answers like lookup does: no lookup needed.
            self.agent.process_lookup_data(lookup)
        else:
            await self._look_up(node_uuid)
        host = config.advertise_host
        if not host:
            assert self._find_address is not None
            host = await self._find_address()
        from ipa_twisted.ironic.client import callback_url
        from ipa_twisted.ironic.heartbeat import Heartbeater
        from ipa_twisted.net.autotls import prepare_api_tls
        ironic = self._ironic
        protocol, verify_ca = config.advertise_protocol, None
        if self._api_tls is not None:
            # Manual TLS follows lookup's tls_min_version/tls_cipher_suites from the next
            # connection on; those made before under other settings end here.
            self._api_tls.close_outdated()
            tls = await prepare_api_tls(config, ironic, host, clock=clock,
                                        current=lambda: self.agent.config)
            if tls.context is not None:
                self._api_tls.start_tls(tls.context)
            protocol, verify_ca = tls.protocol, tls.agent_verify_ca
        url = callback_url(host, config.advertise_port, protocol)
        self.log.info("Advertising {url} to Ironic", url=url)

        async def beat() -> None:
            await ironic.heartbeat(self.agent.get_node_uuid(), url, self.agent.agent_token,
                                   agent_verify_ca=verify_ca)

        self.heartbeater = Heartbeater(beat, lambda: self.agent.heartbeat_timeout, clock)
        self.agent.heartbeat_requested = self.heartbeater.force
        self.heartbeater.setServiceParent(self)

    async def _run_inspection(self, managers: HardwareManagers
                              ) -> tuple[str | None, Any]:
        """Inspect and post the data if configured: (node UUID, lookup content)."""
        if self._inspect is None:
            return None, None
        try:
            return await self._inspect(managers)
        except CancelledError:
            raise
        except Exception as e:
            self.log.error("Inspection failed ({error}); going on with lookup", error=str(e))
            return None, None

    async def _look_up(self, node_uuid: str | None = None) -> None:
        assert self._ironic is not None
        managers = await self.agent.get_managers()
        config = self.agent.config
        while True:
            try:
                interfaces = await managers.dispatch_to_managers(
                    "list_network_interfaces")
                macs = [i.mac_address for i in interfaces if getattr(i, "mac_address", None)]
                content = await self._ironic.lookup(
                    macs, node_uuid, timeout=config.lookup_timeout,
                    interval=config.lookup_interval)
            except CancelledError:
                raise
            except errors.LookupNodeError as e:
                self.log.error("Lookup failed for {timeout}s ({error}); still trying",
                               timeout=config.lookup_timeout, error=str(e))
            except Exception:
                self.log.failure("Lookup failed unexpectedly; retrying")
            else:
                self.agent.process_lookup_data(content)
                return
            await deferLater(self.agent.clock, LOOKUP_RETRY_PAUSE, lambda: None)

    def stopService(self) -> Deferred[None]:
        self._startup.cancel()
        # No program the agent started outlives it: they are killed as the services stop,
        # and a command waiting on one fails, saying why (in its result and the log).
        stopping = []
        if isinstance(self.agent.runner, ProcessRunner):
            stopping.append(self.agent.runner.stop())
        stopping.append(super().stopService())
        stopped: Deferred[None] = gatherResults(stopping, consumeErrors=True).addCallback(
            lambda _: None)
        return stopped
