"""The agent's one TLS module: versions, ciphers, server and client contexts, certificates.

Settings. ``tls_min_version`` (``1.2`` or ``1.3``) is the lowest TLS version of the API and
of outgoing HTTPS. With ``1.2``, TLS 1.2 connections use the OpenSSL cipher list
``tls_cipher_suites``, or the reference agent's default list ``DEFAULT_TLS12_CIPHERS``
(ECDHE with AES-GCM); TLS 1.3 suites are OpenSSL's, and with ``1.3`` the cipher list has
nothing to act on, as with the reference agent. Ironic's lookup answer may change both while
the agent runs: the server (``ServerTLS``) and the client (``AgentTLSPolicy``) read them from
the configuration in force at each new connection, so a TLS 1.2 client is refused from the
moment lookup says ``1.3``. A cipher list OpenSSL cannot use is logged and replaced by the
default list (at start-up, the configured one stops the agent instead: ``check_settings``).

Server. ``ServerTLS`` serves the API: manual TLS (``listen_tls`` with ``[ssl]`` files) and
automatic TLS (``generate_tls_certificate``) alike. ``server_context_from`` is its fixed
counterpart (one version and cipher list) for callers that need a plain CertificateOptions.

Client. ``tls_policy`` is the policy of the agent's HTTP client (``ipa_twisted.http``):

- ``insecure``: no certificate or hostname verification (a client certificate is still sent);
- ``cafile``: servers must chain to the CA certificates in that PEM file, and match the host
  name (or IP address) of the URL;
- ``certfile`` + ``keyfile``: a client certificate is presented;
- otherwise: the platform's trust store, with service_identity hostname checks.

Certificates. ``generate_tls_certificate`` (``ipa_twisted.certificates``, re-exported here)
makes what automatic TLS serves and sends to Ironic as ``agent_verify_ca``.

PEM files are read when a server or policy is made (start-up, or automatic TLS's switch),
not per connection.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from constantly import NamedConstant
from OpenSSL import SSL
from twisted.internet._sslverify import IOpenSSLTrustRoot  # not re-exported publicly
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (IOpenSSLClientConnectionCreator,
                                         IOpenSSLServerConnectionCreator)
from twisted.internet.ssl import (AcceptableCiphers, Certificate, CertificateOptions,
                                  PrivateCertificate, TLSVersion, optionsForClientTLS,
                                  trustRootFromCertificates)
from twisted.logger import Logger
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

if TYPE_CHECKING:
    from ipa_twisted.config import AgentConfig

from ipa_twisted.certificates import CLOCK_SKEW as CLOCK_SKEW  # re-exported, as before
from ipa_twisted.certificates import CURVES as CURVES
from ipa_twisted.certificates import DEFAULT_VALIDITY_DAYS as DEFAULT_VALIDITY_DAYS
from ipa_twisted.certificates import TlsCertificate as TlsCertificate
from ipa_twisted.certificates import generate_tls_certificate as generate_tls_certificate

log = Logger()

TLS_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
"""The ``tls_min_version`` values (Ironic's spelling), as Twisted's TLSVersion."""

DEFAULT_TLS12_CIPHERS = ("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:"
                         "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256")
"""TLS 1.2 suites when ``tls_cipher_suites`` is not set (the reference agent's defaults)."""

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class TLSSettings(NamedTuple):
    """What the configuration says about TLS connections: the lowest version, and the
    OpenSSL cipher list for TLS 1.2 (None: ``DEFAULT_TLS12_CIPHERS``)."""

    minimum_version: str = "1.2"
    cipher_suites: str | None = None

    @classmethod
    def of(cls, config: AgentConfig) -> TLSSettings:
        """The settings of ``config`` (``tls_min_version``, ``tls_cipher_suites``)."""
        return cls(config.tls_min_version, config.tls_cipher_suites or None)


def tls_version(name: str) -> NamedConstant:
    """The TLSVersion of ``1.2`` or ``1.3`` (also ``TLSv1.2``, ``TLSv1.3``), else ValueError."""
    try:
        version: NamedConstant = TLS_VERSIONS[name.removeprefix("TLSv")]
    except KeyError:
        raise ValueError(f"Unknown TLS version {name!r}: use one of "
                         f"{', '.join(TLS_VERSIONS)}") from None
    return version


@lru_cache(maxsize=8)
def _ciphers(cipher_string: str) -> AcceptableCiphers:
    """The TLS 1.2 ciphers of an OpenSSL cipher list; ValueError when none is usable."""
    try:
        ciphers: AcceptableCiphers = AcceptableCiphers.fromOpenSSLCipherString(cipher_string)
        CertificateOptions(acceptableCiphers=ciphers)    # raises when none is usable here
    except (SSL.Error, UnicodeError, ValueError):
        raise ValueError(f"tls_cipher_suites {cipher_string!r} names no TLS 1.2 cipher "
                         f"OpenSSL has") from None
    return ciphers


def tls_options(settings: TLSSettings) -> dict[str, Any]:
    """CertificateOptions arguments for ``settings``: the lowest version and, when TLS 1.2
    is allowed, its ciphers. ValueError for an unknown version or an unusable cipher list."""
    options: dict[str, Any] = {"raiseMinimumTo": tls_version(settings.minimum_version)}
    if options["raiseMinimumTo"] == TLSVersion.TLSv1_2:
        options["acceptableCiphers"] = _ciphers(settings.cipher_suites
                                                or DEFAULT_TLS12_CIPHERS)
    return options


def check_settings(settings: TLSSettings) -> None:
    """Raise ValueError, naming the option, for settings no connection could use."""
    tls_options(settings)


def usable_settings(settings: TLSSettings) -> TLSSettings:
    """``settings``, or the same version with the default ciphers when OpenSSL cannot use
    the configured cipher list (logged: Ironic's lookup must not cut the agent off)."""
    try:
        tls_options(settings)
    except ValueError as e:
        if settings.cipher_suites is None:
            raise
        _log_unusable(settings.cipher_suites, str(e))
        return settings._replace(cipher_suites=None)
    return settings


@lru_cache(maxsize=8)
def _log_unusable(cipher_suites: str, error: str) -> None:
    log.error("Ignoring tls_cipher_suites ({error}); using the default TLS 1.2 ciphers "
              "{default}", error=error, default=DEFAULT_TLS12_CIPHERS)


# -- Files ---------------------------------------------------------------------------------

def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_trust_root(cafile: str) -> IOpenSSLTrustRoot:
    """Every certificate of a PEM bundle, as a trust root."""
    blocks = _PEM_CERTIFICATE.findall(_read(cafile))
    if not blocks:
        raise ValueError(f"No PEM certificate in {cafile}")
    root: IOpenSSLTrustRoot = trustRootFromCertificates(
        [Certificate.loadPEM(block) for block in blocks])
    return root


def load_client_certificate(certfile: str, keyfile: str) -> PrivateCertificate:
    """The client certificate and its key, from PEM files (they may be the same file)."""
    loaded: PrivateCertificate = PrivateCertificate.loadPEM(
        _read(certfile) + b"\n" + _read(keyfile))
    return loaded


class _ServerIdentity(NamedTuple):
    key: Any
    certificate: Any
    chain: list[Any] | None
    trust_root: IOpenSSLTrustRoot | None


def _load_server_identity(cert_file: str, key_file: str,
                          ca_file: str | None) -> _ServerIdentity:
    chain = _PEM_CERTIFICATE.findall(_read(cert_file))
    if not chain:
        raise ValueError(f"No PEM certificate in {cert_file}")
    loaded = PrivateCertificate.loadPEM(chain[0] + b"\n" + _read(key_file))
    extra = [Certificate.loadPEM(block).original for block in chain[1:]]
    return _ServerIdentity(loaded.privateKey.original, loaded.original, extra or None,
                           load_trust_root(ca_file) if ca_file else None)


def _server_options(identity: _ServerIdentity, settings: TLSSettings) -> CertificateOptions:
    options = tls_options(settings)
    if identity.trust_root is not None:
        options["trustRoot"] = identity.trust_root  # implies: a client certificate required
    return CertificateOptions(privateKey=identity.key, certificate=identity.certificate,
                              extraCertChain=identity.chain, **options)


# -- Server --------------------------------------------------------------------------------

def server_context_from(cert_file: str, key_file: str, *, ca_file: str | None = None,
                        minimum_version: str = "1.2",
                        cipher_suites: str | None = None) -> CertificateOptions:
    """Fixed server TLS settings from PEM files.

    ``cert_file`` holds the certificate, optionally followed by its chain; ``key_file``
    its unencrypted key (may be the same file). With ``ca_file``, clients must present a
    certificate that chains to one of its certificates. Raises OSError or ValueError (and
    OpenSSL errors) for unreadable or invalid files or settings.
    """
    return _server_options(_load_server_identity(cert_file, key_file, ca_file),
                           TLSSettings(minimum_version, cipher_suites))


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The API's server TLS: a certificate read once, and the TLS version and ciphers of
    the configuration in force when each connection arrives (see the module docstring).

    ``config`` returns that configuration. Raises like ``server_context_from`` for bad
    files or settings, checked at once, before anything listens; with ``load_now=False``
    (a certificate the agent has just made) the files are read and the OpenSSL context
    made when the first connection arrives: an agent that Ironic does not call keeps none
    of the memory (0.7 MiB of OpenSSL's code and data) that takes.
    """

    def __init__(self, cert_file: str, key_file: str, config: Callable[[], AgentConfig], *,
                 ca_file: str | None = None, load_now: bool = True) -> None:
        self._files = (cert_file, key_file, ca_file)
        self._identity: _ServerIdentity | None = None
        self._options: CertificateOptions | None = None
        self._config = config
        self._settings = TLSSettings.of(config())
        if load_now:
            self._current_options().getContext()
        self._connections: weakref.WeakKeyDictionary[Any, TLSSettings] = (
            weakref.WeakKeyDictionary())

    def _current_options(self) -> CertificateOptions:
        if self._options is None:
            if self._identity is None:
                self._identity = _load_server_identity(*self._files)
            self._options = _server_options(self._identity, self._settings)
        return self._options

    @property
    def settings(self) -> TLSSettings:
        """The settings new connections get (the configuration's, when usable)."""
        wanted = TLSSettings.of(self._config())
        if wanted != self._settings:
            usable = usable_settings(wanted)
            if usable != self._settings:
                self._options = None   # made again, with these settings, when next wanted
                log.info("API TLS from now on: TLS {version} or later, TLS 1.2 ciphers "
                         "{ciphers}", version=usable.minimum_version,
                         ciphers=usable.cipher_suites or "default")
            self._settings = wanted if usable == wanted else usable
        return self._settings

    def options(self) -> CertificateOptions:
        """The CertificateOptions a new connection gets now."""
        self.settings  # noqa: B018 - brings the options up to date
        return self._current_options()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A server-side OpenSSL connection with the settings in force now."""
        settings = self.settings
        try:
            context = self._current_options().getContext()
        except Exception as e:
            log.error("Cannot serve TLS with certificate {cert}: {error}",
                      cert=self._files[0], error=e)
            raise
        connection = SSL.Connection(context, None)
        self._connections[tlsProtocol] = settings
        return connection

    def close_outdated(self) -> int:
        """Close the open connections made under settings no longer in force (a TLS 1.2
        keep-alive connection once lookup says 1.3); how many were closed."""
        current, closed = self.settings, 0
        for protocol, settings in list(self._connections.items()):
            if settings != current and getattr(protocol, "transport", None) is not None:
                protocol.transport.loseConnection()
                closed += 1
        if closed:
            log.info("Closed {count} API connection(s) made under older TLS settings",
                     count=closed)
        return closed


# -- Client --------------------------------------------------------------------------------

@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Client TLS that accepts any server certificate (``insecure``); still sends SNI."""

    def __init__(self, options: CertificateOptions, hostname: str) -> None:
        self._options, self._hostname = options, hostname

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if not (isIPAddress(self._hostname) or isIPv6Address(self._hostname)):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection


@implementer(IPolicyForHTTPS)
class AgentTLSPolicy:
    """The agent's client TLS policy (see the module docstring).

    The TLS version and ciphers are ``settings()`` at each new connection when given (the
    configuration in force), else ``minimum_version`` and ``cipher_suites``.
    """

    def __init__(self, *, verify: bool = True, trust_root: IOpenSSLTrustRoot | None = None,
                 client_certificate: PrivateCertificate | None = None,
                 minimum_version: str = "1.2", cipher_suites: str | None = None,
                 settings: Callable[[], TLSSettings] | None = None) -> None:
        self.verify, self.trust_root = verify, trust_root
        self.client_certificate = client_certificate
        fixed = TLSSettings(minimum_version, cipher_suites)
        if settings is None:
            check_settings(fixed)      # else usable_settings decides, connection by connection
        self._settings = settings or (lambda: fixed)

    @property
    def settings(self) -> TLSSettings:
        """The settings a new connection gets now (usable ones: see ``usable_settings``)."""
        return usable_settings(self._settings())

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii").strip("[]")
        options = tls_options(self.settings)
        if not self.verify:
            key = cert = None
            if self.client_certificate is not None:
                key = self.client_certificate.privateKey.original
                cert = self.client_certificate.original
            return _UnverifiedClientTLS(
                CertificateOptions(verify=False, privateKey=key, certificate=cert, **options),
                host)
        creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
            host, trustRoot=self.trust_root, clientCertificate=self.client_certificate,
            extraCertificateOptions=options)
        return creator


def tls_policy(config: AgentConfig,
               current: Callable[[], AgentConfig] | None = None) -> AgentTLSPolicy:
    """The client TLS policy ``config`` asks for; reads cafile/certfile/keyfile now.

    With ``current`` (the configuration in force), the TLS version and ciphers follow it
    from one connection to the next; else they are ``config``'s.
    """
    trust_root = None if config.insecure or not config.cafile else load_trust_root(
        config.cafile)
    client_certificate = None
    if config.certfile and config.keyfile:
        client_certificate = load_client_certificate(config.certfile, config.keyfile)
    fixed = TLSSettings.of(config)
    return AgentTLSPolicy(
        verify=not config.insecure, trust_root=trust_root,
        client_certificate=client_certificate, minimum_version=fixed.minimum_version,
        cipher_suites=fixed.cipher_suites,
        settings=None if current is None else lambda: TLSSettings.of(current()))
