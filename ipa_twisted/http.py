"""The one HTTP client factory: connection pool, connect timeout and client TLS from config.

TLS (outgoing requests only; serving TLS is elsewhere):

- ``insecure``: no certificate or hostname verification (a client certificate is still sent);
- ``cafile``: servers must chain to the CA certificates in that PEM file, and match the host
  name (or IP address) of the URL;
- ``certfile`` + ``keyfile``: a client certificate is presented;
- otherwise: the platform's trust store, with service_identity hostname checks.

The files are read once, when the client is made (start-up), not on the reactor's hot path.

Proxies (image downloads' ``proxies``): ``make_proxy_http_client`` forwards http URLs through
an http:// proxy and tunnels https URLs through it with CONNECT, TLS end to end.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from constantly import NamedConstant
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet._sslverify import IOpenSSLTrustRoot  # not re-exported publicly
from twisted.internet.ssl import Certificate, CertificateOptions
from twisted.internet.ssl import PrivateCertificate, TLSVersion, optionsForClientTLS
from twisted.internet.ssl import trustRootFromCertificates
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ProxyAgent
from twisted.web.client import _HTTP11ClientFactory  # the pool's factory; not public
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from twisted.web.iweb import IResponse
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
    from ipa_twisted.tls import tls_version  # certificate generation: loaded when used
    trust_root = None if config.insecure or not config.cafile else load_trust_root(
        config.cafile)
    client_certificate = None
    if config.certfile and config.keyfile:
        client_certificate = load_client_certificate(config.certfile, config.keyfile)
    return AgentTLSPolicy(verify=not config.insecure, trust_root=trust_root,
                          client_certificate=client_certificate,
                          minimum_version=tls_version(config.tls_min_version))


class _QuietClientFactory(_HTTP11ClientFactory):
    """Twisted's HTTP/1.1 connection factory without its "Starting/Stopping factory" info
    lines: two per request to Ironic or an image server, saying nothing of use."""

    noisy = False


class _QuietPool(HTTPConnectionPool):
    _factory = _QuietClientFactory


def make_pool(reactor: object) -> HTTPConnectionPool:
    """A small persistent connection pool; close it with ``closeCachedConnections()``."""
    pool = _QuietPool(reactor, persistent=True)
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


# -- Proxies ---------------------------------------------------------------------------------

_MAX_CONNECT_RESPONSE = 16 * 1024


class ProxyConnectError(Exception):
    """The proxy refused or botched a CONNECT tunnel."""


class _TunnelProtocol(Protocol):
    """Asks an HTTP proxy for a CONNECT tunnel, then hands the connection to ``inner``."""

    def __init__(self, request: bytes, factory: IProtocolFactory,
                 ready: Deferred[IProtocol]) -> None:
        self._request, self._factory, self._ready = request, factory, ready
        self._buffer = b""
        self._inner: IProtocol | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        head, found, rest = self._buffer.partition(b"\r\n\r\n")
        assert self.transport is not None
        if not found:
            if len(self._buffer) > _MAX_CONNECT_RESPONSE:
                self._fail(ProxyConnectError("oversized CONNECT response"))
            return
        status = head.split(b"\r\n", 1)[0].split(None, 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].startswith(
                b"2"):
            line = head.split(b"\r\n", 1)[0]
            self._fail(ProxyConnectError(f"proxy answered CONNECT with {line!r}"))
            return
        inner = self._factory.buildProtocol(self.transport.getPeer())
        if inner is None:
            self._fail(ProxyConnectError("no protocol for the tunnel"))
            return
        self._inner = inner
        inner.makeConnection(self.transport)
        self._ready.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def _fail(self, error: Exception) -> None:
        if not self._ready.called:
            self._ready.errback(error)
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self._ready.called:
            self._ready.errback(reason)


@implementer(IStreamClientEndpoint)
class ConnectTunnelEndpoint:
    """Connections to ``host:port`` through an HTTP proxy's CONNECT method."""

    def __init__(self, proxy: IStreamClientEndpoint, host: str, port: int) -> None:
        self._proxy, self._host, self._port = proxy, host, port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        host = f"[{self._host}]" if ":" in self._host else self._host
        request = (f"CONNECT {host}:{self._port} HTTP/1.1\r\nHost: {host}:{self._port}\r\n"
                   f"\r\n").encode("ascii")
        ready: Deferred[IProtocol] = Deferred()

        def connected(_: object) -> Deferred[IProtocol]:
            return ready

        connecting = self._proxy.connect(Factory.forProtocol(
            lambda: _TunnelProtocol(request, protocolFactory, ready)))
        connecting.addCallback(connected)
        return connecting


@implementer(IAgentEndpointFactory)
class _TunnelEndpoints:
    def __init__(self, reactor: Any, proxy_host: str, proxy_port: int, policy: AgentTLSPolicy,
                 connect_timeout: float) -> None:
        self._reactor, self._policy = reactor, policy
        self._proxy_host, self._proxy_port = proxy_host, proxy_port
        self._timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        proxy = HostnameEndpoint(self._reactor, self._proxy_host, self._proxy_port,
                                 timeout=self._timeout)
        host = uri.host.decode("idna") if isinstance(uri.host, bytes) else uri.host
        tunnel = ConnectTunnelEndpoint(proxy, host.strip("[]"), uri.port)
        if uri.scheme == b"https":
            endpoint: IStreamClientEndpoint = wrapClientTLS(
                self._policy.creatorForNetloc(uri.host, uri.port), tunnel)
            return endpoint
        return tunnel


@implementer(IAgent)
class _SchemeAgent:
    """http URLs through a forwarding proxy (absolute URIs), https through CONNECT."""

    def __init__(self, http: IAgent, https: IAgent) -> None:
        self._http, self._https = http, https

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        agent = self._https if uri.lower().startswith(b"https:") else self._http
        return agent.request(method, uri, headers, bodyProducer)


def make_proxy_http_client(reactor: Any, config: AgentConfig, proxy_url: str, *,
                           pool: HTTPConnectionPool | None = None,
                           connect_timeout: float = CONNECT_TIMEOUT) -> HTTPClient:
    """A treq client whose requests go through the HTTP proxy ``proxy_url``.

    Plain http URLs are forwarded by the proxy (absolute-URI requests); https URLs go through
    a CONNECT tunnel, with the agent's TLS policy (``tls_policy``) end to end. Only http://
    proxies are supported (not TLS to the proxy itself, nor proxy credentials).
    """
    parts = urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"unsupported proxy {proxy_url!r}: only http:// proxies are")
    host, port = parts.hostname, parts.port or 80
    pool = pool if pool is not None else make_pool(reactor)
    forward = ProxyAgent(HostnameEndpoint(reactor, host, port, timeout=connect_timeout),
                         reactor=reactor, pool=pool)
    tunnel = Agent.usingEndpointFactory(
        reactor, _TunnelEndpoints(reactor, host, port, tls_policy(config), connect_timeout),
        pool=pool)
    return HTTPClient(_SchemeAgent(forward, tunnel))
