"""``twistd ipa``: options and the service maker."""

from __future__ import annotations

import functools
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, Logger)

from ipa_twisted import options as _options
from ipa_twisted.config import AgentConfig, ConfigError

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
        if not config.api_url:
            raise ConfigError("api_url is required unless the agent runs standalone "
                              "(--api-url, ipa-api-url= or [DEFAULT] api_url)")
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
    """The agent's service tree for the merged configuration."""
    from twisted.internet import reactor

    from ipa_twisted.agent import Agent
    from ipa_twisted.api.app import AgentAPI
    from ipa_twisted.api.site import make_site
    from ipa_twisted.hardware.dispatch import HardwareManagers
    from ipa_twisted.context import HardwareContext
    from ipa_twisted.process import ProcessRunner
    from ipa_twisted.service import AgentService

    config = options.config
    for warning in options.config_warnings:
        log.warn("Configuration: {warning}", warning=warning)
    runner = ProcessRunner(reactor, reactor)
    agent = Agent(config, reactor, runner, reactor=reactor)

    @functools.cache
    def http_client() -> Any:
        from ipa_twisted.http import make_http_client
        return make_http_client(reactor, lambda: agent.config)   # lookup may change TLS

    context = HardwareContext(config, runner, reactor, reactor, http_client=http_client,
                              report_progress=agent.report_progress)
    agent.context = context
    site = make_site(AgentAPI(agent))
    api_tls = None
    if config.listen_tls:
        # Manual TLS from the start; its version and ciphers follow the config in force.
        from ipa_twisted.net.autotls import SwitchableTLSFactory
        api_tls = SwitchableTLSFactory(site)
        api_tls.start_tls(server_tls_options(config, lambda: agent.config))
    elif not config.standalone:
        # Plain HTTP until automatic TLS (or mDNS enabling it) switches new connections.
        from ipa_twisted.net.autotls import SwitchableTLSFactory
        api_tls = SwitchableTLSFactory(site)
    api_service = StreamServerEndpointService(make_endpoint(reactor, config),
                                              api_tls or site)
    api_service._raiseSynchronously = True  # twistd exits at once if it cannot listen

    async def load_managers() -> HardwareManagers:
        managers = await HardwareManagers.load(context)
        context.dispatch = managers.dispatch_to_managers
        return managers

    def connect(config: AgentConfig) -> tuple[Any, Any]:
        """The Ironic client and advertise-address finder for the (resolved) config."""
        from ipa_twisted.ironic.address import find_advertise_address
        from ipa_twisted.ironic.client import IronicClient
        assert config.api_url is not None
        ironic = IronicClient(config.api_url, http_client(), reactor, agent.version,
                              config.global_request_id,
                              request_timeout=config.http_request_timeout,
                              api_version=config.ironic_api_version)

        async def find_address() -> str:
            return await find_advertise_address(   # the URL that answered first
                runner, ironic.api_urls, attempts=config.ip_lookup_attempts,
                delay=config.ip_lookup_sleep, clock=reactor,
                network_interface=config.network_interface, sys_path=config.sys_path,
                resolver=getattr(reactor, "resolver", None))
        return ironic, find_address

    resolve_config = None
    if "mdns" in (config.api_url, config.inspection_callback_url):
        async def resolve_config(config: AgentConfig) -> AgentConfig:
            from ipa_twisted.net.mdns import resolve_mdns_urls
            return await resolve_mdns_urls(config, reactor)

    inspect = None
    if config.inspection_callback_url:
        async def inspect(managers: HardwareManagers) -> tuple[str | None, Any]:
            from ipa_twisted.inspector.inspect import inspect as run_inspection
            return await run_inspection(context, managers, agent.config, http_client())

    async def vmedia_config(config: AgentConfig) -> AgentConfig:
        from ipa_twisted.vmedia import get_vmedia_params
        params = await get_vmedia_params(runner, config)
        if not params:
            return config
        log.info("Virtual media parameters: {names}", names=sorted(params))
        merged, warnings = _options.config_from_options(options, vmedia_params=params)
        for warning in warnings:
            log.warn("Configuration: {warning}", warning=warning)
        return merged

    return AgentService(agent, api_service, load_managers, None, None,
                        make_log_observer(options, config.debug), stop_process=reactor.stop,
                        inspect=inspect, resolve_config=resolve_config, connect=connect,
                        api_tls=api_tls, vmedia_config=vmedia_config, api_site=site)
