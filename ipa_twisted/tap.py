"""``twistd ipa``: options and the service maker."""

from __future__ import annotations

import functools
import socket
import sys
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
    """The API's server endpoint: TCP, or TLS with [ssl] files when listen_tls."""
    from twisted.internet import endpoints
    host = _wildcard_or(config.listen_host)
    ipv6 = ":" in host
    if config.listen_tls:
        context = server_tls_options(config)
        if ipv6:
            return _SSL6ServerEndpoint(reactor, config.listen_port, context, host)
        return endpoints.SSL4ServerEndpoint(reactor, config.listen_port, context,
                                            interface=host)
    if ipv6:
        return endpoints.TCP6ServerEndpoint(reactor, config.listen_port, interface=host)
    return endpoints.TCP4ServerEndpoint(reactor, config.listen_port, interface=host)


def server_tls_options(config: AgentConfig) -> Any:
    """TLS settings for the API from ``[ssl]`` files (client certificates if ca_file)."""
    from twisted.internet import ssl
    try:
        with open(config.ssl_key_file or "", "rb") as f:
            key = f.read()
        with open(config.ssl_cert_file or "", "rb") as f:
            cert = f.read()
        certificate = ssl.PrivateCertificate.loadPEM(key + b"\n" + cert)
        trust = None
        if config.ssl_ca_file:
            with open(config.ssl_ca_file, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
    except (OSError, ValueError, Exception) as e:
        raise ConfigError(f"Cannot load the API's TLS certificate or key ([ssl]): {e}") from e
    from ipa_twisted.tls import tls_version
    minimum = tls_version(config.tls_min_version)
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original, certificate=certificate.original,
        trustRoot=trust, requireCertificate=trust is not None, raiseMinimumTo=minimum)


class _SSL6ServerEndpoint:
    """TLS over an IPv6 (or dual-stack) listening socket."""

    def __init__(self, reactor: Any, port: int, context: Any, interface: str) -> None:
        self._reactor, self._port, self._context, self._interface = (
            reactor, port, context, interface)

    def listen(self, factory: Any) -> Any:
        from twisted.internet.defer import execute
        return execute(self._reactor.listenSSL, self._port, factory, self._context,
                       interface=self._interface)


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
    from ipa_twisted.hardware.interface import HardwareContext
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
        return make_http_client(reactor, config)

    context = HardwareContext(config, runner, reactor, reactor, http_client=http_client,
                              report_progress=agent.report_progress)
    agent.context = context
    site = make_site(AgentAPI(agent))
    api_tls = None
    if not config.standalone and not config.listen_tls:
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
