"""The one HTTP client factory: connection pool, connect timeout and client TLS from config.

Client TLS is ``ipa_twisted.tls``'s (``tls_policy``): verification (``insecure``,
``cafile``), a client certificate (``certfile`` + ``keyfile``), and the TLS version and
ciphers (``tls_min_version``, ``tls_cipher_suites``). Given the configuration in force as a
function, a client follows changes to the version and ciphers (Ironic's lookup answer) from
the next connection on, and never reuses a kept-alive connection made under older settings.
The certificate files are read once, when the client is made (start-up), not on the
reactor's hot path.

Proxies (image downloads' ``proxies``): ``make_proxy_http_client`` forwards http URLs through
an http:// proxy and tunnels https URLs through it with CONNECT, TLS end to end.

Addresses. A URL whose host is an IP address (Ironic's and image servers' usually are)
is connected to directly; only host names go through the reactor's resolver
(``HostnameEndpoint``: getaddrinfo in the reactor's thread pool, then happy eyeballs). An
IPv6 address in a URL (``http://[fd00::1]:6385/``) works: treq's URL library would IDNA-encode
it as if it were a host name and fail (hyperlink issues 68 and 188), so ``AgentHTTPClient``
leaves such a host as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any
from urllib.parse import urlsplit

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint,
                                        TCP6ClientEndpoint, wrapClientTLS)
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ProxyAgent
from twisted.web.error import SchemeNotSupported
from twisted.web.client import _HTTP11ClientFactory  # the pool's factory; not public
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer
from twisted.web.iweb import IResponse
from zope.interface import implementer

from ipa_twisted.config import AgentConfig
from ipa_twisted.tls import (AgentTLSPolicy, load_client_certificate,  # noqa: F401 (API)
                             load_trust_root, tls_policy)

CONNECT_TIMEOUT = 30.0
MAX_PERSISTENT_PER_HOST = 2
CACHED_CONNECTION_TIMEOUT = 120

ConfigSource = AgentConfig | Callable[[], AgentConfig]
"""A configuration, or a function returning the one in force (``lambda: agent.config``)."""


def _policy(config: ConfigSource, verify: bool = True) -> AgentTLSPolicy:
    if isinstance(config, AgentConfig):
        return tls_policy(config if verify else config.override(insecure=True))
    if verify:
        return tls_policy(config(), current=config)
    return tls_policy(config().override(insecure=True), current=config)


class _TLSKeyedPool:
    """A view of a connection pool that files HTTPS connections under the TLS settings
    they were made with, so none made under older settings is reused."""

    def __init__(self, pool: HTTPConnectionPool, policy: AgentTLSPolicy) -> None:
        self._pool, self._policy = pool, policy

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        if isinstance(key, tuple) and key and key[0] == b"https":
            key = (key, self._policy.settings)
        connection: Deferred[Any] = self._pool.getConnection(key, endpoint)
        return connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


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


class _LiteralHostURL(EncodedURL):
    """A URL whose host is an IPv6 address: its ``to_uri`` encodes all but the host."""

    def to_uri(self) -> EncodedURL:
        uri: EncodedURL = EncodedURL.to_uri(self.replace(host="ip-literal.invalid"))
        return uri.replace(host=self.host)


class AgentHTTPClient(HTTPClient):
    """treq's client, taking URLs whose host is an IPv6 address too."""

    def request(self, method: str, url: Any, **kwargs: Any) -> Deferred[Any]:
        text = url.decode("ascii") if isinstance(url, bytes) else url
        if isinstance(text, str) and "[" in urlsplit(text).netloc:   # an IPv6 address
            url = _LiteralHostURL.from_text(text)
        return super().request(method, url, **kwargs)


def make_http_client(reactor: object, config: ConfigSource, *,
                     pool: HTTPConnectionPool | None = None,
                     connect_timeout: float = CONNECT_TIMEOUT,
                     verify: bool = True) -> HTTPClient:
    """The treq client every outgoing request of the agent goes through.

    ``config`` is the configuration, or a function returning the one in force (its TLS
    version and ciphers then apply from the next connection on). Pass a ``pool``
    (``make_pool``) to close its connections on shutdown; without one a new pool is made.
    ``verify=False`` accepts any server certificate (whatever ``insecure`` says): give it
    a pool of its own. Request timeouts are the caller's (``Deferred.addTimeout``).
    """
    policy = _policy(config, verify)
    pool = pool if pool is not None else make_pool(reactor)
    agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, policy, connect_timeout),
                                       pool=_TLSKeyedPool(pool, policy))
    return AgentHTTPClient(agent)


def tcp_endpoint(reactor: Any, host: str, port: int,
                 timeout: float) -> IStreamClientEndpoint:
    """A TCP client endpoint for ``host`` (brackets around an IPv6 address allowed): an IP
    address is connected to as it is, a host name is resolved first."""
    address = host.strip("[]")
    if isIPAddress(address):
        return TCP4ClientEndpoint(reactor, address, port, timeout=timeout)
    if isIPv6Address(address):
        return TCP6ClientEndpoint(reactor, address, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """The endpoints of an Agent's URLs: ``tcp_endpoint``, wrapped in TLS for https."""

    def __init__(self, reactor: Any, policy: AgentTLSPolicy, connect_timeout: float) -> None:
        self._reactor, self._policy, self._timeout = reactor, policy, connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"The host of {uri.toBytes()!r} is not ASCII; encode it with "
                             "IDNA first") from None
        endpoint = tcp_endpoint(self._reactor, host, uri.port, self._timeout)
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            return wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")


class HTTPClients:
    """The agent's HTTP clients, each made once on first use: the verifying one (the
    configuration's TLS), its twin that accepts any server certificate (``inject_files``
    with ``verify_ca: false``), each with its own connection pool (no connection made
    without verification is ever reused by the verifying client)."""

    def __init__(self, reactor: object, config: ConfigSource, *,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self._reactor, self._config, self._timeout = reactor, config, connect_timeout
        self._clients: dict[bool, tuple[HTTPClient, HTTPConnectionPool]] = {}

    def client(self, *, verify: bool = True) -> HTTPClient:
        """The client for every request (``verify=False``: the unverified twin)."""
        if verify not in self._clients:
            pool = make_pool(self._reactor)
            self._clients[verify] = (make_http_client(
                self._reactor, self._config, pool=pool, connect_timeout=self._timeout,
                verify=verify), pool)
        return self._clients[verify][0]

    async def close(self) -> None:
        """Close the clients' cached connections (the agent is stopping)."""
        for _, pool in self._clients.values():
            await pool.closeCachedConnections()


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
        proxy = tcp_endpoint(self._reactor, self._proxy_host, self._proxy_port,
                             self._timeout)
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


def make_proxy_http_client(reactor: Any, config: ConfigSource, proxy_url: str, *,
                           pool: HTTPConnectionPool | None = None,
                           connect_timeout: float = CONNECT_TIMEOUT) -> HTTPClient:
    """A treq client whose requests go through the HTTP proxy ``proxy_url``.

    Plain http URLs are forwarded by the proxy (absolute-URI requests); https URLs go through
    a CONNECT tunnel, with the agent's TLS policy (``ipa_twisted.tls.tls_policy``) end to
    end; ``config`` as for ``make_http_client``. Only http:// proxies are supported (not
    TLS to the proxy itself, nor proxy credentials).
    """
    parts = urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"unsupported proxy {proxy_url!r}: only http:// proxies are")
    host, port = parts.hostname, parts.port or 80
    pool = pool if pool is not None else make_pool(reactor)
    policy = _policy(config)
    forward = ProxyAgent(tcp_endpoint(reactor, host, port, connect_timeout),
                         reactor=reactor, pool=pool)
    tunnel = Agent.usingEndpointFactory(
        reactor, _TunnelEndpoints(reactor, host, port, policy, connect_timeout),
        pool=_TLSKeyedPool(pool, policy))
    return AgentHTTPClient(_SchemeAgent(forward, tunnel))
