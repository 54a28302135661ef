"""``twistd ipa``: options and the service maker."""

from __future__ import annotations

import functools
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, Logger)

from ipa_twisted import options as _options
from ipa_twisted.agent import Agent
from ipa_twisted.api.app import AgentAPI
from ipa_twisted.api.site import AgentSite, make_site
from ipa_twisted.config import AgentConfig, ConfigError
from ipa_twisted.context import HardwareContext
from ipa_twisted.extensions import default_extensions
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.process import ProcessRunner
from ipa_twisted.startup.config import ConfigResolution
from ipa_twisted.startup.hardware import ClockSync, HardwareLoading, settle_then_load
from ipa_twisted.startup.inspection import InspectionService
from ipa_twisted.startup.lockdown import LockdownService
from ipa_twisted.startup.tree import AgentTree, ProgramsService
from ipa_twisted.when import When

if TYPE_CHECKING:  # imported where used: a standalone agent never loads them (idle RSS)
    from ipa_twisted.ironic.client import IronicClient
    from ipa_twisted.net.autotls import SwitchableTLSFactory

log = Logger()


class Options(_options.Options):
    """``twistd ipa`` flags; the merged configuration is checked here so that a bad value
    stops start-up with one line naming the option and its source."""

    config: AgentConfig
    config_warnings: list[str]

    def postOptions(self) -> None:
        super().postOptions()
        try:
            self.config, self.config_warnings = _options.config_from_options(self)
            check_startup_config(self.config)
        except ConfigError as e:
            sys.stderr.write(f"ipa: {e}\n")
            raise SystemExit(1) from None


def check_startup_config(config: AgentConfig) -> None:
    """Raise ConfigError for settings the agent cannot start with."""
    if not config.standalone:
        if not config.api_url and not config.inspection_callback_url:
            raise ConfigError("api_url is required unless the agent runs standalone or only "
                              "inspects (--api-url, ipa-api-url= or [DEFAULT] api_url; "
                              "ipa-inspection-callback-url=)")
    if config.listen_tls:
        if not (config.ssl_cert_file and config.ssl_key_file):
            raise ConfigError("listen_tls needs [ssl] cert_file and key_file")
        server_tls_options(config)
    elif config.tls_cipher_suites:
        from ipa_twisted.tls import TLSSettings, check_settings
        try:
            check_settings(TLSSettings.of(config))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _wildcard_or(host: str) -> str:
    """``::`` when IPv6 works here, else ``0.0.0.0`` (a ramdisk may have IPv6 off)."""
    if host != "::":
        return host
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return "0.0.0.0"
    return host


def make_endpoint(reactor: Any, config: AgentConfig) -> Any:
    """The API's server endpoint: TCP (TLS, manual or automatic, is the factory's)."""
    from twisted.internet import endpoints
    host = _wildcard_or(config.listen_host)
    if ":" in host:
        return endpoints.TCP6ServerEndpoint(reactor, config.listen_port, interface=host)
    return endpoints.TCP4ServerEndpoint(reactor, config.listen_port, interface=host)


def server_tls_options(config: AgentConfig,
                       current: Callable[[], AgentConfig] | None = None) -> Any:
    """The API's manual TLS from ``[ssl]`` files (client certificates if ca_file): an
    ``ipa_twisted.tls.ServerTLS`` whose TLS version and ciphers follow ``current()`` (the
    configuration in force; default ``config``). ConfigError when it cannot be used."""
    from ipa_twisted.tls import ServerTLS
    try:
        return ServerTLS(config.ssl_cert_file or "", config.ssl_key_file or "",
                         current or (lambda: config), ca_file=config.ssl_ca_file)
    except Exception as e:
        raise ConfigError(f"Cannot use the API's TLS certificate, key or settings ([ssl], "
                          f"tls_min_version, tls_cipher_suites): {e}") from e


def make_log_observer(options: Options, debug: bool) -> ILogObserver | None:
    """twistd's own observer (stdout, --logfile or --syslog) filtered by level."""
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("logger"):
        return None
    from twisted.scripts._twistd_unix import UnixAppLogger
    base = UnixAppLogger(parent)._getLogObserver()
    level = LogLevel.debug if debug else LogLevel.info
    return FilteringLogObserver(base, [LogLevelFilterPredicate(defaultLogLevel=level)])


def makeService(options: Options) -> IService:
    """The agent's service tree for the merged configuration, on twistd's reactor."""
    from twisted.internet import reactor
    return make_tree(options, reactor)


def make_tree(options: Options, reactor: Any, *, runner: ProcessRunner | None = None,
              http_client: Callable[[], Any] | None = None,
              load_managers: Callable[[HardwareContext], Awaitable[HardwareManagers]]
              | None = None,
              resolve_mdns: Callable[[AgentConfig], Awaitable[AgentConfig]] | None = None
              ) -> IService:
    """The service tree: the API listens at once; each start-up stage is a child service
    handed the event it waits for, so the order below is the order of start-up (see
    ``ipa_twisted.startup``). ``runner``, ``http_client``, ``load_managers`` and
    ``resolve_mdns`` are where the tree meets the machine and the network (tests replace
    them)."""
    config = options.config
    for warning in options.config_warnings:
        log.warn("Configuration: {warning}", warning=warning)
    runner = runner or ProcessRunner(reactor, reactor)
    http_client = http_client or _http_clients(reactor, lambda: agent.config)
    agent = Agent(config, reactor, runner, reactor=reactor, http_client=http_client,
                  extensions=default_extensions())
    load = load_managers or settle_then_load

    def fatal(failure: object) -> None:      # a half-started agent serves no one
        reactor.stop()
    agent.stop_wanted.wait().addCallback(lambda _: reactor.stop())

    site, api_tls, api = api_service(config, agent, reactor)
    tree = AgentTree(agent, site, make_log_observer(options, config.debug))
    ProgramsService(runner).setServiceParent(tree)
    resolved = ConfigResolution(agent, runner, reactor, functools.partial(
        _options.config_from_options, options), fatal, resolve_mdns=resolve_mdns)
    managers = HardwareLoading(agent, lambda: load(agent.context), resolved.done, reactor,
                               fatal)
    clock = ClockSync(agent, managers.done, fatal)
    reachable: list[IService] = [api, resolved, managers, clock]
    ready: When[Any] = clock.done
    if config.inspection_callback_url:
        inspection = InspectionService(agent, http_client, clock.done)
        reachable.append(inspection)
        ready = inspection.done
    if config.standalone:
        log.info("Standalone mode: no lookup, no heartbeats")
    elif not config.api_url:
        # As the reference: Ironic's managed inspection (not fast track) hands the ramdisk
        # only the inspection callback; it powers the machine off once the data is in.
        log.info("No api_url: inspection only, no lookup, no heartbeats")
    else:
        from ipa_twisted.startup.heartbeat import AdvertiseService, heartbeats
        from ipa_twisted.startup.lookup import LookupService
        ironic, find_address = connect(agent, runner, reactor, http_client)
        lookup = LookupService(agent, ironic, ready, reactor)
        advertise = AdvertiseService(agent, ironic, find_address, api_tls, lookup.done,
                                     reactor, fatal)
        reachable += [lookup, advertise, heartbeats(agent, ironic, advertise.done, reactor)]
    for service in reachable:
        service.setServiceParent(tree)
    LockdownService(agent, site, reachable).setServiceParent(tree)
    return tree


def _http_clients(reactor: Any, config: Callable[[], AgentConfig]) -> Callable[..., Any]:
    """The agent's HTTP clients (``http.HTTPClients.client``: ``verify=False`` gives the
    unverified twin), whose TLS follows the configuration in force (lookup may change it);
    made on first use, so that a standalone agent never loads them."""
    made: list[Any] = []

    def client(*, verify: bool = True) -> Any:
        if not made:
            from ipa_twisted.http import HTTPClients
            made.append(HTTPClients(reactor, config))
        return made[0].client(verify=verify)
    return client


def api_service(config: AgentConfig, agent: Agent, reactor: Any
                ) -> tuple[AgentSite, SwitchableTLSFactory | None, IService]:
    """The API's site, the factory that switches it to TLS (None when it never will) and
    the service listening with them; twistd exits at once if it cannot listen."""
    site = make_site(AgentAPI(agent))
    api_tls = None
    if config.listen_tls or not config.standalone:
        # Manual TLS from the start, its version and ciphers following the config in force;
        # else plain HTTP until automatic TLS (or mDNS enabling it) switches new connections.
        from ipa_twisted.net.autotls import SwitchableTLSFactory
        api_tls = SwitchableTLSFactory(site)
        if config.listen_tls:
            api_tls.start_tls(server_tls_options(config, lambda: agent.config))
    api = StreamServerEndpointService(make_endpoint(reactor, config), api_tls or site)
    api._raiseSynchronously = True
    return site, api_tls, api


def connect(agent: Agent, runner: ProcessRunner, reactor: Any, http_client: Callable[[], Any]
            ) -> tuple[Callable[[], IronicClient], Callable[[], Awaitable[str]]]:
    """The Ironic client (made on first use, from the configuration then in force: mDNS
    may have found the URL) and the advertise-address finder."""
    from ipa_twisted.ironic.address import find_advertise_address
    from ipa_twisted.ironic.client import IronicClient

    @functools.cache
    def ironic() -> IronicClient:
        config = agent.config
        assert config.api_url is not None
        return IronicClient(config.api_url, http_client(), reactor, agent.version,
                            config.global_request_id,
                            request_timeout=config.http_request_timeout,
                            api_version=config.ironic_api_version)

    async def find_address() -> str:
        config = agent.config
        return await find_advertise_address(   # the URL that answered first
            runner, ironic().api_urls, attempts=config.ip_lookup_attempts,
            delay=config.ip_lookup_sleep, clock=reactor,
            network_interface=config.network_interface, sys_path=config.sys_path,
            resolver=getattr(reactor, "resolver", None))
    return ironic, find_address
