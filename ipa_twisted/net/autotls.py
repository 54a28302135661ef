"""Automatic TLS for the agent's API (``enable_auto_tls``, on by default).

When Ironic's API supports version 1.68, the agent makes a self-signed certificate for the
address it advertises, serves its API over HTTPS with it and sends the certificate to Ironic
as ``agent_verify_ca`` in every heartbeat; Ironic then verifies the agent with it. Manual TLS
(``listen_tls`` with ``[ssl]`` files) or ``advertise_protocol = https`` (TLS set up some
other way) turn it off, and so does standalone mode (no Ironic to ask).

The port problem, and the choice made: the API port is bound when the service starts
(twistd fails at once, with a clear line, when it cannot listen, and the API answers while
hardware managers load), but whether to use TLS, and for which address, is only known after
Ironic's version and the advertise address are. The port is therefore bound at start as
plain TCP with a ``SwitchableTLSFactory`` in front of the site. It serves plain HTTP until
``start_tls(context)``; from then on every new connection is TLS (a ``TLSMemoryBIOFactory``
around the same site) and the plain connections still open are closed, so nothing keeps
talking plain HTTP after the switch. The switch happens before the first heartbeat, so
Ironic only ever learns the HTTPS URL. Binding lazily instead would have lost the early
"cannot listen" failure and the API during start-up; re-binding the port would have left a
window with nothing listening.

Wiring (``service.py``): after the advertise address ``host`` is known and before the first
heartbeat, ``tls = await prepare_api_tls(config, ironic, host)``; if ``tls.context`` is
not None, ``api_factory.start_tls(tls.context)``; heartbeat with
``callback_url(host, port, tls.protocol)`` and ``agent_verify_ca=tls.agent_verify_ca``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from ipa_twisted.certificates import TlsCertificate, generate_in_child, generate_tls_certificate
from ipa_twisted.config import AgentConfig
from ipa_twisted.process import ProcessExecutionError, ProcessRunner
from ipa_twisted.tls import ServerTLS

log = Logger()


class _SupportsAutoTLS(Protocol):
    """What is needed of ``ipa_twisted.ironic.client.IronicClient``."""

    async def supports_auto_tls(self) -> bool: ...


class ApiTLS(NamedTuple):
    """What automatic TLS decided: the server context to switch to (None: stay as is), the
    certificate text for heartbeats' ``agent_verify_ca`` (None: send none), and the protocol
    to advertise."""

    context: Any
    agent_verify_ca: str | None
    protocol: str
    certificate: TlsCertificate | None = None


def auto_tls_possible(config: AgentConfig) -> bool:
    """Whether automatic TLS may be used with ``config`` (Ironic's version still decides)."""
    return (config.enable_auto_tls and not config.listen_tls and not config.standalone
            and config.advertise_protocol != "https")


async def prepare_api_tls(config: AgentConfig, ironic: _SupportsAutoTLS | None,
                          advertise_host: str, *, clock: IReactorTime | None = None,
                          directory: str | None = None,
                          current: Callable[[], AgentConfig] | None = None,
                          runner: ProcessRunner | None = None) -> ApiTLS:
    """Decide on automatic TLS and, when used, generate its certificate and context.

    ``ironic`` is asked whether it supports API 1.68 (its answer is cached by the client).
    ``clock`` and ``directory`` go to ``generate_tls_certificate``, with the
    ``tls_certificate_curve`` and ``auto_tls_allowed_clock_skew`` options; with a
    ``runner``, it runs in a child process (``generate_in_child``: the agent keeps none of
    the memory it takes), and here only if the child fails. The context's TLS version and
    ciphers follow ``current()``, the configuration in force (default: ``config``),
    connection by connection.
    """
    unchanged = ApiTLS(None, None, config.advertise_protocol)
    if ironic is None or not auto_tls_possible(config):
        return unchanged
    if not await ironic.supports_auto_tls():
        log.info("Ironic does not support automatic TLS (API 1.68); serving the API over "
                 "{protocol}", protocol=config.advertise_protocol)
        return unchanged
    certificate = await _certificate(config, advertise_host, clock, directory, runner)
    # Loaded on the first connection: an idle agent keeps none of OpenSSL's memory.
    context = ServerTLS(certificate.path, certificate.private_key_path,
                        current or (lambda: config), load_now=False)
    log.info("Automatic TLS: serving the API over HTTPS with a self-signed certificate for "
             "{host} (TLS {version} or later)", host=advertise_host,
             version=context.settings.minimum_version)
    return ApiTLS(context, certificate.text, "https", certificate)


async def _certificate(config: AgentConfig, host: str, clock: IReactorTime | None,
                       directory: str | None, runner: ProcessRunner | None) -> TlsCertificate:
    curve, skew = config.tls_certificate_curve, config.auto_tls_allowed_clock_skew
    if runner is not None:
        # One private directory for the child's files or, if it fails, the agent's own.
        directory = directory or tempfile.mkdtemp(prefix="ipa-tls-")
        try:
            return await generate_in_child(runner, host, clock=clock, directory=directory,
                                           curve=curve, clock_skew=skew)
        except (ProcessExecutionError, OSError) as e:
            log.warn("Could not make the automatic TLS certificate in a child process "
                     "({error}); making it in the agent", error=e)
    return generate_tls_certificate(host, clock=clock, directory=directory, curve=curve,
                                    clock_skew=skew)


class SwitchableTLSFactory(WrappingFactory):
    """A server factory that serves ``wrappedFactory`` in the clear until ``start_tls``,
    then over TLS; see the module docstring."""

    def __init__(self, wrappedFactory: IProtocolFactory) -> None:
        super().__init__(wrappedFactory)
        self._tls: TLSMemoryBIOFactory | None = None
        self._context: Any = None

    @property
    def tls_active(self) -> bool:
        return self._tls is not None

    def start_tls(self, context: Any, *, close_plain: bool = True) -> None:
        """Serve new connections over TLS with ``context`` (CertificateOptions or any
        IOpenSSLServerConnectionCreator); close the plain ones unless told not to."""
        self._tls = TLSMemoryBIOFactory(context, False, self.wrappedFactory)
        self._context = context
        if close_plain:
            for wrapper in list(self.protocols):
                if wrapper.transport is not None:
                    wrapper.transport.loseConnection()

    def close_outdated(self) -> None:
        """Close the TLS connections made under settings no longer in force (the context
        is a ``ServerTLS``, whose settings follow the configuration)."""
        if isinstance(self._context, ServerTLS):
            self._context.close_outdated()

    def buildProtocol(self, addr: IAddress | None) -> ProtocolWrapper:
        if self._tls is None:
            return super().buildProtocol(addr)
        protocol: ProtocolWrapper = self._tls.buildProtocol(addr)
        return protocol
