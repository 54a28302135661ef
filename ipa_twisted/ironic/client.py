"""The Ironic API client: version negotiation, node lookup and heartbeats, over treq.

The client is given its HTTP client (``make_http_client`` in production, ``StubTreq`` in
tests) and its clock; every request has a timeout on that clock, and every wait between
lookup attempts is a Deferred on it.

Ironic may be given as several API URLs (``ipa-api-url=https://a:6385,https://b:6385``), as
the reference agent allows: each request tries them in order until one answers; a
connection error or timeout moves on to the next URL, an HTTP answer (even an error) ends
the round. The URL that answered is tried first from then on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import quote

import treq
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionClosed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import RequestTransmissionFailed, ResponseFailed
from twisted.web.client import ResponseNeverReceived

from ipa_twisted import encoding
from ipa_twisted.config import split_urls
from ipa_twisted.errors import HeartbeatConflictError, HeartbeatConnectionError
from ipa_twisted.errors import HeartbeatError, LookupNodeError
from ipa_twisted.retry import Backoff, GaveUp, full_jitter, retry

MIN_IRONIC_VERSION = (1, 31)
AGENT_VERSION_IRONIC_VERSION = (1, 36)
AGENT_TOKEN_IRONIC_VERSION = (1, 62)
AGENT_VERIFY_CA_IRONIC_VERSION = (1, 68)
MAX_KNOWN_VERSION = AGENT_VERIFY_CA_IRONIC_VERSION
"""The highest API version whose features we use: the version header never asks more."""

REQUEST_TIMEOUT = 30.0
VERSION_HEADER = "X-OpenStack-Ironic-API-Version"
REQUEST_ID_HEADER = "X-OpenStack-Request-Id"

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectError, ConnectingCancelledError, DNSLookupError, ConnectionClosed, TimeoutError,
    ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed, OSError)
"""Failures that mean "Ironic could not be reached", as opposed to a bad answer."""

_MAX_ERROR_TEXT = 512


class HTTPClientLike(Protocol):
    """What the client needs of treq's ``HTTPClient`` (``StubTreq`` has it too)."""

    def request(self, method: str, url: str, *, params: Any = ..., headers: Any = ...,
                data: Any = ...) -> Deferred[Any]: ...


def callback_url(host: str, port: int, protocol: str = "http") -> str:
    """The URL Ironic calls the agent back on; IPv6 literals are bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{protocol}://{host}:{port}"


def format_version(version: tuple[int, int]) -> str:
    return "%d.%d" % version


def error_message(body: bytes) -> str:
    """The faultstring of an Ironic error answer, or the body's text.

    Ironic answers ``{"error_message": "<JSON string with faultstring>"}``; a plain
    ``{"faultstring": ...}`` and ``{"error_message": {...}}`` are read too.
    """
    text = body.decode("utf-8", "replace").strip()
    try:
        doc: Any = json.loads(text)
    except ValueError:
        return text[:_MAX_ERROR_TEXT] or "(empty body)"
    if isinstance(doc, dict):
        inner = doc.get("error_message", doc)
        if isinstance(inner, str):
            try:
                inner = json.loads(inner)
            except ValueError:
                pass
        if isinstance(inner, dict) and inner.get("faultstring") is not None:
            return str(inner["faultstring"])
        if isinstance(inner, str):
            return inner[:_MAX_ERROR_TEXT]
    return text[:_MAX_ERROR_TEXT]


def _parse_version(text: str | None) -> tuple[int, int] | None:
    """``"1.68"`` as (1, 68); None for None, and (logged) for anything else."""
    if text is None:
        return None
    major, dot, minor = text.strip().partition(".")
    if dot and major.isdigit() and minor.isdigit():
        return int(major), int(minor)
    IronicClient.log.warn("ironic_api_version {value!r} is not MAJOR.MINOR; asking Ironic "
                          "for its version instead", value=text)
    return None


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _RetryableLookupError(Exception):
    """One lookup attempt failed; ``status`` is the HTTP code when there was an answer."""

    def __init__(self, error: str, status: int | None = None, url: str = "") -> None:
        super().__init__(error)
        self.error, self.status, self.url = error, status, url


class IronicClient:
    """Talks to the Ironic API for the agent: lookup and heartbeat.

    ``api_url`` is one URL, several comma-separated, or a sequence of them. ``http`` is a
    treq ``HTTPClient`` (or ``StubTreq``); ``clock`` times out requests (each URL tried
    gets ``request_timeout``: the ``http_request_timeout`` option) and spaces lookup
    attempts. ``api_version`` ("1.68", the ``ironic_api_version`` option) is used instead
    of asking Ironic. ``uniform`` draws the jittered lookup waits (tests fix it).
    """

    log = Logger()

    def __init__(self, api_url: str | Sequence[str], http: HTTPClientLike,
                 clock: IReactorTime, agent_version: str,
                 global_request_id: str | None = None, *,
                 request_timeout: float = REQUEST_TIMEOUT, api_version: str | None = None,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        urls = split_urls(api_url) if isinstance(api_url, str) else list(api_url)
        if not urls:
            raise ValueError("no Ironic API URL")
        self.api_urls = [url.rstrip("/") for url in urls]
        self._http, self._clock = http, clock
        self._agent_version, self._request_id = agent_version, global_request_id
        self._request_timeout, self._uniform = request_timeout, uniform
        self._api_version: tuple[int, int] | None = _parse_version(api_version)

    @property
    def api_url(self) -> str:
        """The API URL tried first: the one that answered last."""
        return self.api_urls[0]

    # -- plumbing ---------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return f"{self.api_url}/{path}"

    def _headers(self, version: tuple[int, int] | None = None,
                 body: bool = False) -> dict[str, str]:
        headers = {"Accept": "application/json",
                   "User-Agent": f"ipa-twisted/{self._agent_version}"}
        if body:
            headers["Content-Type"] = "application/json"
        if self._request_id:
            headers[REQUEST_ID_HEADER] = self._request_id
        if version is not None:
            headers[VERSION_HEADER] = format_version(min(version, MAX_KNOWN_VERSION))
        return headers

    async def _exchange(self, method: str, path: str, headers: Mapping[str, str], *,
                        data: bytes | None = None, params: Mapping[str, str] | None = None,
                        timeout: float | None = None) -> tuple[int, bytes]:
        """(status, body) of one request to ``path`` under the first API URL that answers.

        Each URL's exchange times out on our clock. A connection error or timeout moves on
        to the next URL (logged); the last URL's is raised. The URL that answered becomes
        the first.
        """
        async def exchange(url: str) -> tuple[int, bytes]:
            response = await self._http.request(method, url, headers=dict(headers),
                                                data=data, params=dict(params or {}))
            body: bytes = await treq.content(response)
            return response.code, body

        for index, base in enumerate(list(self.api_urls)):
            url = f"{base}/{path}"
            exchanged = Deferred.fromCoroutine(exchange(url))
            exchanged.addTimeout(self._request_timeout if timeout is None else timeout,
                                 self._clock)
            try:
                answer = await exchanged
            except CancelledError:
                raise
            except CONNECTION_ERRORS as e:
                if index == len(self.api_urls) - 1:
                    raise
                self.log.warn("Cannot reach Ironic at {url}, trying the next API URL: "
                              "{error}", url=url, error=_describe(e))
                continue
            if index:
                self.api_urls = self.api_urls[index:] + self.api_urls[:index]
            return answer
        raise AssertionError("unreachable: there is always an API URL")

    # -- API version ------------------------------------------------------------------------
    async def api_version(self) -> tuple[int, int]:
        """Ironic's default (highest) API version, from ``GET /``.

        Cached once known. When it cannot be read, a warning is logged and
        MIN_IRONIC_VERSION returned, not cached: the next call asks again.
        """
        if self._api_version is not None:
            return self._api_version
        try:
            status, body = await self._exchange("GET", "", self._headers())
            if status != 200:
                raise ValueError(f"status {status}: {error_message(body)}")
            major, minor = json.loads(body)["default_version"]["version"].split(".")
            version = (int(major), int(minor))
        except CancelledError:
            raise
        except Exception as e:
            self.log.warn("Could not read the Ironic API version from {url}: {error}; "
                          "assuming {version}", url=", ".join(self.api_urls),
                          error=_describe(e), version=format_version(MIN_IRONIC_VERSION))
            return MIN_IRONIC_VERSION
        self.log.info("Ironic API version {version} at {url}", url=self.api_url,
                      version=format_version(version))
        self._api_version = version
        return version

    async def supports_auto_tls(self) -> bool:
        """Whether Ironic takes the agent's CA in heartbeats (API 1.68)."""
        return await self.api_version() >= AGENT_VERIFY_CA_IRONIC_VERSION

    # -- lookup -----------------------------------------------------------------------------
    async def lookup(self, macs: Sequence[str], node_uuid: str | None = None, *,
                     timeout: float, interval: float,
                     max_interval: float = 30.0) -> dict[str, Any]:
        """The node and config Ironic has for these MACs (and node UUID, when known).

        Retries until ``timeout`` seconds have passed, on connection errors and timeouts,
        non-200 answers, undecodable JSON and answers without ``node.uuid``. The wait after
        failed attempt n (1, 2, ...) is drawn uniformly from [interval, cap] where
        cap = min(interval * 2**(n-1), max_interval): random exponential backoff, so
        many agents coming back after an outage spread out. After a 409 (node locked or
        busy) the wait is at least ``max_interval``. Waits end at the deadline; one last
        attempt is made there, then LookupNodeError is raised. Each attempt's request times
        out after the request timeout or the time left, whichever is less (at least 1 s).

        Old API answers (top-level ``heartbeat_timeout``, no ``config``) are converted to
        ``{"config": {"heartbeat_timeout": ...}}``. The content holds the agent token: it
        is never logged.
        """
        deadline = self._clock.seconds() + timeout
        params = {"addresses": ",".join(macs)}
        if node_uuid:
            params["node_uuid"] = node_uuid
        low = min(interval, max_interval)

        def busy_waits_longer(error: BaseException, wait: float) -> float:
            conflict = isinstance(error, _RetryableLookupError) and error.status == 409
            return max(wait, max_interval) if conflict else wait

        try:
            content = await retry(
                lambda: self._lookup_once(params, deadline), self._clock,
                "Lookup of node with addresses {addresses} at {url}",
                backoff=Backoff(initial=low, factor=2.0, cap=max_interval,
                                jitter=full_jitter(low, self._uniform)),
                deadline=timeout, retry_on=_RetryableLookupError, log=self.log,
                fields=lambda e: {"addresses": params["addresses"],
                                  "url": getattr(e, "url", ""),
                                  "status": getattr(e, "status", None)},
                describe=lambda e: getattr(e, "error", str(e)),
                wait_for=busy_waits_longer)
        except GaveUp:
            raise LookupNodeError("Could not look up node info. Check logs for details.") \
                from None
        self.log.info("Looked up node {node_uuid} at {url}",
                      node_uuid=content["node"]["uuid"], url=self._url("v1/lookup"))
        return content

    async def _lookup_once(self, params: Mapping[str, str],
                           deadline: float) -> dict[str, Any]:
        version = await self.api_version()
        remaining = deadline - self._clock.seconds()
        try:
            status, body = await self._exchange(
                "GET", "v1/lookup", self._headers(version), params=params,
                timeout=min(self._request_timeout, max(remaining, 1.0)))
        except CancelledError:
            raise
        except Exception as e:
            raise _RetryableLookupError(_describe(e), url=", ".join(
                f"{base}/v1/lookup" for base in self.api_urls)) from e
        url = self._url("v1/lookup")
        if status != 200:
            raise _RetryableLookupError(error_message(body), status, url)
        try:
            content = json.loads(body)
        except ValueError as e:
            raise _RetryableLookupError(f"Error decoding response: {e}", status, url) from e
        node = content.get("node") if isinstance(content, dict) else None
        if not isinstance(node, dict) or not node.get("uuid"):
            raise _RetryableLookupError("Got invalid node data in the response", status, url)
        if "config" not in content:
            if "heartbeat_timeout" not in content:
                raise _RetryableLookupError("No config and no heartbeat_timeout in the "
                                            "response", status, url)
            content["config"] = {"heartbeat_timeout": content.pop("heartbeat_timeout")}
        result: dict[str, Any] = content
        return result

    # -- heartbeat --------------------------------------------------------------------------
    async def heartbeat(self, uuid: str, callback_url: str, agent_token: str | None,
                        agent_verify_ca: str | None = None) -> None:
        """Tell Ironic the agent is alive at ``callback_url``.

        The body carries what the API version allows: ``agent_version`` (1.36),
        ``agent_token`` (1.62, when known), ``agent_verify_ca`` (1.68, when given).
        Raises HeartbeatConflictError on 409 (with Ironic's faultstring),
        HeartbeatConnectionError when Ironic cannot be reached or does not answer in time,
        HeartbeatError on any other status ("Invalid status code: N: Ironic's message").
        """
        version = await self.api_version()
        data: dict[str, Any] = {"callback_url": callback_url}
        if version >= AGENT_TOKEN_IRONIC_VERSION and agent_token is not None:
            data["agent_token"] = agent_token
        if version >= AGENT_VERSION_IRONIC_VERSION:
            data["agent_version"] = self._agent_version
        if version >= AGENT_VERIFY_CA_IRONIC_VERSION and agent_verify_ca is not None:
            data["agent_verify_ca"] = agent_verify_ca
        path = f"v1/heartbeat/{quote(uuid, safe='')}"
        self.log.debug("Heartbeat to {url} with callback {callback_url}",
                       url=self._url(path), callback_url=callback_url)
        try:
            status, body = await self._exchange("POST", path,
                                                self._headers(version, body=True),
                                                data=encoding.encode(data))
        except CancelledError:
            raise
        except CONNECTION_ERRORS as e:
            raise HeartbeatConnectionError(_describe(e)) from e
        except Exception as e:
            raise HeartbeatError(_describe(e)) from e
        if status == 202:
            return
        error = error_message(body)
        if status == 409:
            raise HeartbeatConflictError(error)
        # The heartbeater logs the failure (one line); the message carries Ironic's words.
        raise HeartbeatError(f"Invalid status code: {status}: {error}" if error
                             else f"Invalid status code: {status}")
