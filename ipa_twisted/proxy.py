"""HTTP(S) proxies for image downloads (their ``proxies``): plain http URLs forwarded by an
http:// proxy, https URLs tunnelled through it with CONNECT, TLS end to end.

A proxy client is the agent's HTTP client (``ipa_twisted.http``: pool, connect timeout,
client TLS from the configuration) with its connections made through the proxy. Its own
module: only an image download through a proxy loads it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ProxyAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from ipa_twisted.http import (CONNECT_TIMEOUT, AgentHTTPClient, ConfigSource, TLSKeyedPool,
                              client_policy, make_pool, tcp_endpoint)
from ipa_twisted.tls import AgentTLSPolicy

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
    policy = client_policy(config)
    forward = ProxyAgent(tcp_endpoint(reactor, host, port, connect_timeout),
                         reactor=reactor, pool=pool)
    tunnel = Agent.usingEndpointFactory(
        reactor, _TunnelEndpoints(reactor, host, port, policy, connect_timeout),
        pool=TLSKeyedPool(pool, policy))
    return AgentHTTPClient(_SchemeAgent(forward, tunnel))
