"""The one HTTP client factory: connection pool, connect timeout and client TLS from config.

TLS (outgoing requests only; serving TLS is elsewhere):

- ``insecure``: no certificate or hostname verification (a client certificate is still sent);
- ``cafile``: servers must chain to the CA certificates in that PEM file, and match the host
  name (or IP address) of the URL;
- ``certfile`` + ``keyfile``: a client certificate is presented;
- otherwise: the platform's trust store, with service_identity hostname checks.

The files are read once, when the client is made (start-up), not on the reactor's hot path.
"""

from __future__ import annotations

import re

from constantly import NamedConstant
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet._sslverify import IOpenSSLTrustRoot  # not re-exported publicly
from twisted.internet.ssl import Certificate, CertificateOptions
from twisted.internet.ssl import PrivateCertificate, TLSVersion, optionsForClientTLS
from twisted.internet.ssl import trustRootFromCertificates
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from ipa_twisted.config import AgentConfig

CONNECT_TIMEOUT = 30.0
MAX_PERSISTENT_PER_HOST = 2
CACHED_CONNECTION_TIMEOUT = 120

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def load_trust_root(cafile: str) -> IOpenSSLTrustRoot:
    """Every certificate of a PEM bundle, as a trust root."""
    with open(cafile, "rb") as f:
        blocks = _PEM_CERTIFICATE.findall(f.read())
    if not blocks:
        raise ValueError(f"No PEM certificate in {cafile}")
    root: IOpenSSLTrustRoot = trustRootFromCertificates(
        [Certificate.loadPEM(block) for block in blocks])
    return root


def load_client_certificate(certfile: str, keyfile: str) -> PrivateCertificate:
    """The client certificate and its key, from PEM files (they may be the same file)."""
    with open(certfile, "rb") as f:
        certificate = f.read()
    with open(keyfile, "rb") as f:
        key = f.read()
    loaded: PrivateCertificate = PrivateCertificate.loadPEM(certificate + b"\n" + key)
    return loaded


def _tls_version(name: str) -> NamedConstant:
    version: NamedConstant = TLSVersion.TLSv1_3 if name == "TLSv1.3" else TLSVersion.TLSv1_2
    return version


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
    """The agent's client TLS policy (see the module docstring)."""

    def __init__(self, *, verify: bool = True, trust_root: IOpenSSLTrustRoot | None = None,
                 client_certificate: PrivateCertificate | None = None,
                 minimum_version: NamedConstant = TLSVersion.TLSv1_2) -> None:
        self.verify, self.trust_root = verify, trust_root
        self.client_certificate, self.minimum_version = client_certificate, minimum_version

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii").strip("[]")
        if not self.verify:
            key = cert = None
            if self.client_certificate is not None:
                key = self.client_certificate.privateKey.original
                cert = self.client_certificate.original
            return _UnverifiedClientTLS(
                CertificateOptions(verify=False, privateKey=key, certificate=cert,
                                   raiseMinimumTo=self.minimum_version), host)
        creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
            host, trustRoot=self.trust_root, clientCertificate=self.client_certificate,
            extraCertificateOptions={"raiseMinimumTo": self.minimum_version})
        return creator


def tls_policy(config: AgentConfig) -> AgentTLSPolicy:
    """The client TLS policy ``config`` asks for; reads cafile/certfile/keyfile."""
    trust_root = None if config.insecure or not config.cafile else load_trust_root(
        config.cafile)
    client_certificate = None
    if config.certfile and config.keyfile:
        client_certificate = load_client_certificate(config.certfile, config.keyfile)
    return AgentTLSPolicy(verify=not config.insecure, trust_root=trust_root,
                          client_certificate=client_certificate,
                          minimum_version=_tls_version(config.tls_minimum_version))


def make_pool(reactor: object) -> HTTPConnectionPool:
    """A small persistent connection pool; close it with ``closeCachedConnections()``."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
    return pool


def make_http_client(reactor: object, config: AgentConfig, *,
                     pool: HTTPConnectionPool | None = None,
                     connect_timeout: float = CONNECT_TIMEOUT) -> HTTPClient:
    """The treq client every outgoing request of the agent goes through.

    Pass a ``pool`` (``make_pool``) to close its connections on shutdown; without one a new
    pool is made. Request timeouts are the caller's (``Deferred.addTimeout``).
    """
    agent = Agent(reactor, contextFactory=tls_policy(config),
                  connectTimeout=connect_timeout,
                  pool=pool if pool is not None else make_pool(reactor))
    return HTTPClient(agent)
