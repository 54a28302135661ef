"""The HTTP site serving the API: access log without query strings, idle timeouts, a time
limit on each request's arrival, and a request body limit enforced before the body is
read."""

from __future__ import annotations

import io
import json

from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from ipa_twisted.api.app import AgentAPI

DEFAULT_MAX_REQUEST_BODY = 1048576
CLOSE_GRACE = 5.0
"""Seconds ``close_connections`` lets a connection finish sending before aborting it."""
log = Logger()


class AgentRequest(Request):
    """A Request that answers 413 and closes the connection once its body is known to be
    above the site's ``max_request_body``: at once from Content-Length, else as chunks
    arrive. The body is never buffered past the limit and the resource is never called."""

    _rejected = False
    _received = 0

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_request_body", DEFAULT_MAX_REQUEST_BODY))

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._reject()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._reject()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:  # the 413 went out already; the connection is closing
            return
        super().requestReceived(command, path, version)

    def _reject(self) -> None:
        self._rejected = True
        self.content = io.BytesIO()  # drop whatever was buffered
        # No "100 Continue" after our answer (the channel sends it after gotLength).
        self.requestHeaders.removeHeader(b"Expect")
        body = json.dumps({"faultcode": "Client", "faultstring":
                           f"Request body larger than {self._limit()} bytes"}).encode()
        transport = self.channel.transport
        if transport is not None:
            transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\n"
                            b"Content-Type: application/json\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                            + body)
            self.channel.loseConnection()


class AgentChannel(HTTPChannel):
    """An HTTP/1.1 channel that also limits how long one request may take to arrive.

    The idle timeout alone lets a client that sends a byte now and then (slowloris) hold
    its connection for ever; here a request must have arrived whole (line, headers, body)
    within the site's ``request_timeout`` of its first byte, else the connection is closed
    as the idle timeout closes it. Time spent answering does not count.
    """

    _arrival: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        site = getattr(self, "site", None)
        if isinstance(site, AgentSite):
            site.channel_opened(self)

    def dataReceived(self, data: bytes) -> None:
        if self._arrival is None and not self._handlingRequest:
            limit = getattr(getattr(self, "site", None), "request_timeout", None)
            if limit:
                self._arrival = self.callLater(limit, lambda: self._too_slow(limit))
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stop_arrival()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_arrival()
        super().connectionLost(reason)
        site = getattr(self, "site", None)
        if isinstance(site, AgentSite):
            site.channel_closed(self)

    def _stop_arrival(self) -> None:
        if self._arrival is not None:
            if self._arrival.active():
                self._arrival.cancel()
            self._arrival = None

    def _too_slow(self, limit: float) -> None:
        self._arrival = None
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info("Closing the connection from {client}: its request did not arrive within "
                 "{limit} s", client=getattr(peer, "host", "-"), limit=limit)
        self.setTimeout(None)  # one way of closing at a time
        self.timeoutConnection()


class AgentSite(Site):
    """A Site whose access log never shows query strings (they carry the agent token).

    ``idle_timeout``: seconds a connection may stay silent (keep-alive between requests,
    or a client that stops sending mid-request) before it is closed; a reactor serves the
    others meanwhile. ``request_timeout`` (default: ``idle_timeout``): seconds from a
    request's first byte until it has arrived whole. ``max_request_body``: bytes; larger
    bodies get a 413.
    The site knows its open connections: ``close_connections`` (lockdown) closes them all,
    keep-alive ones included, and refuses any further one.
    ``access_log``: whether to emit the access log's debug events at all (only with debug
    logging on: building and filtering one event per request costs ~7% of throughput).
    """

    access_logger = Logger(namespace="ipa_twisted.api.access")
    displayTracebacks = False
    requestFactory = AgentRequest
    # HTTP/1.1 channels (no HTTP/2 negotiation: Ironic and its clients speak 1.1).
    protocol = AgentChannel  # type: ignore[assignment]

    def __init__(self, resource: IResource, idle_timeout: float = 60.0,
                 max_request_body: int = DEFAULT_MAX_REQUEST_BODY,
                 access_log: bool = True, request_timeout: float | None = None,
                 reactor: IReactorTCP | Any = None) -> None:
        super().__init__(resource, timeout=idle_timeout, reactor=reactor)
        self.max_request_body = max_request_body
        self.access_log = access_log
        self.request_timeout = idle_timeout if request_timeout is None else request_timeout
        self._channels: dict[HTTPChannel, list[Deferred[None]]] = {}
        self.closed = False
        """Set by ``close_connections``: no connection is served any more."""

    def channel_opened(self, channel: HTTPChannel) -> None:
        """Count ``channel`` among the open connections (its connectionMade); once closed,
        a connection that still arrives is aborted at once."""
        if self.closed:
            _abort(channel)
            return
        self._channels.setdefault(channel, [])

    def channel_closed(self, channel: HTTPChannel) -> None:
        """``channel``'s connection is gone (its connectionLost)."""
        for waiter in self._channels.pop(channel, []):
            waiter.callback(None)

    @property
    def open_connections(self) -> int:
        """How many connections are open now."""
        return len(self._channels)

    async def close_connections(self, clock: IReactorTime, grace: float = CLOSE_GRACE
                                ) -> None:
        """Close every open connection and refuse new ones, for good (lockdown).

        Each connection is closed once what was already written to it has gone out (an
        answer being sent is finished); one still open ``grace`` seconds later (a client
        that reads nothing) is aborted. Returns when all are gone.
        """
        self.closed = True
        channels = list(self._channels)
        if not channels:
            return
        log.info("Closing {count} open API connection(s)", count=len(channels))
        gone: list[Deferred[None]] = []
        for channel in channels:
            waiter: Deferred[None] = Deferred()
            self._channels[channel].append(waiter)
            gone.append(waiter)
            channel.setTimeout(None)
            channel.loseConnection()

        def abort() -> None:
            for channel in list(self._channels):
                log.info("Aborting an API connection that did not close within {grace} s",
                         grace=grace)
                _abort(channel)
        deadline = clock.callLater(grace, abort)
        try:
            await gatherResults(gone)
        finally:
            if deadline.active():
                deadline.cancel()

    def log(self, request: Request) -> None:  # type: ignore[override]
        """One debug event per request: client, method, path (no query), status, size."""
        if not self.access_log:
            return
        client = request.getClientAddress()
        self.access_logger.debug(
            "{client} {method} {path} {code} {length}",
            client=getattr(client, "host", "-"),
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            code=request.code, length=request.sentLength)


def _abort(channel: HTTPChannel) -> None:
    """Close ``channel``'s connection at once, dropping what was not sent."""
    transport: Any = channel.transport
    if transport is not None:
        transport.abortConnection()


def make_site(api: AgentAPI, idle_timeout: float = 60.0) -> AgentSite:
    """The Site for ``api``, with the body limit and debug flag of its agent's config."""
    config = getattr(api.agent, "config", None)
    limit = getattr(config, "max_request_body", DEFAULT_MAX_REQUEST_BODY)
    return AgentSite(api.app.resource(), idle_timeout, limit,
                     access_log=bool(getattr(config, "debug", True)))
