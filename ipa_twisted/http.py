"""The one HTTP client factory: connection pool, connect timeout and client TLS from config.

Client TLS is ``ipa_twisted.tls``'s (``tls_policy``): verification (``insecure``,
``cafile``), a client certificate (``certfile`` + ``keyfile``), and the TLS version and
ciphers (``tls_min_version``, ``tls_cipher_suites``). Given the configuration in force as a
function, a client follows changes to the version and ciphers (Ironic's lookup answer) from
the next connection on, and never reuses a kept-alive connection made under older settings.
The certificate files are read once, when the client is made (start-up), not on the
reactor's hot path.

Proxies (image downloads' ``proxies``) are ``ipa_twisted.proxy``'s: a client made as this one
is, whose connections go through the proxy.

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
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.client import _HTTP11ClientFactory  # the pool's factory; not public
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from ipa_twisted.config import AgentConfig
from ipa_twisted.tls import (AgentTLSPolicy, load_client_certificate,  # noqa: F401 (API)
                             load_trust_root, tls_policy)

CONNECT_TIMEOUT = 30.0
MAX_PERSISTENT_PER_HOST = 2
CACHED_CONNECTION_TIMEOUT = 120

ConfigSource = AgentConfig | Callable[[], AgentConfig]
"""A configuration, or a function returning the one in force (``lambda: agent.config``)."""


def client_policy(config: ConfigSource, verify: bool = True) -> AgentTLSPolicy:
    if isinstance(config, AgentConfig):
        return tls_policy(config if verify else config.override(insecure=True))
    if verify:
        return tls_policy(config(), current=config)
    return tls_policy(config().override(insecure=True), current=config)


class TLSKeyedPool:
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
    policy = client_policy(config, verify)
    pool = pool if pool is not None else make_pool(reactor)
    agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, policy, connect_timeout),
                                       pool=TLSKeyedPool(pool, policy))
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
