"""Streaming image downloads: URLs in order, retries, resumption with Range, backpressure.

``ImageDownload.stream`` fetches ``image_info["urls"]`` in order and hands the body to a
``BodyConsumer`` chunk by chunk, as it arrives; nothing is buffered here. The consumer's
``Valve`` pauses the HTTP transport while the stages downstream (hashing, decompression,
writing) are behind, so memory stays bounded whatever the image size.

A dropped connection (or a stall: no byte for ``image_download_connection_timeout`` seconds
while not paused by us) is resumed with ``Range: bytes=<received>-``; the server must answer
206 with a matching ``Content-Range``. A 200 to a Range request restarts the image from byte 0
(the consumer resets its hash and position). Each URL gets
``image_download_connection_retries`` retries, ``image_download_connection_retry_interval``
seconds apart (a retry that made progress does not count); a 4xx other than 408/429 moves to
the next URL at once, which is also asked for the bytes still missing. When every URL failed,
ImageDownloadError lists each URL with its last error.

The ``Authorization`` header (``access.authorization_header``) is, as in the reference agent:
``image_request_authorization`` (Ironic base64-encodes the header value, e.g. an OCI
registry's bearer token), else HTTP basic auth with ``image_server_user``/``_password`` when
image_info's ``image_server_auth_strategy`` is ``http_basic``, else the same from the
agent's own options. ``proxies`` and ``no_proxy`` pick a proxy per URL (``access.proxy_for``); the
client for a proxy comes from ``ipa_twisted.proxy.make_proxy_http_client``. ``abort`` stops a
transfer at once, also while it waits for an answer or for its next retry
(``image_download_max_duration`` uses it).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from ipa_twisted import errors
from ipa_twisted.config import AgentConfig
from ipa_twisted.images.access import authorization_header
from ipa_twisted.retry import GaveUp, fixed, retry

log = Logger()

SMALL_FETCH_LIMIT = 4 * 1024 * 1024
READ_SIZE = 1024 * 1024
"""Bytes asked of each socket read while a body streams."""
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


class ImageDownloadTimeout(errors.ImageDownloadError):
    """The whole download took longer than ``image_download_max_duration``."""

    def __init__(self, image_id: str, msg: str) -> None:
        super().__init__(image_id, msg)
        self.type = "ImageDownloadTimeoutError"   # the reference agent's name


class Valve:
    """Backpressure: pauses the attached producer while ``pending`` bytes exceed ``high``.

    Stages ``add`` bytes they accepted and report them ``done`` when finished with them; the
    producer (the HTTP body, a child's stdout) resumes once ``pending`` is back under ``low``.
    """

    def __init__(self, high: int = 16 * 1024 * 1024, low: int = 8 * 1024 * 1024) -> None:
        self.high, self.low = high, low
        self.pending = 0
        self.paused = False
        self._producer: Any = None

    def attach(self, producer: Any) -> None:
        """Control ``producer`` (pauseProducing/resumeProducing) from now on."""
        self._producer = producer
        if self.paused:
            producer.pauseProducing()

    def detach(self, producer: Any) -> None:
        if self._producer is producer:
            self._producer = None

    def add(self, n: int) -> None:
        self.pending += n
        if self.pending > self.high and not self.paused:
            self.paused = True
            if self._producer is not None:
                self._producer.pauseProducing()

    def done(self, n: int) -> None:
        self.pending -= n
        if self.paused and self.pending <= self.low:
            self.paused = False
            if self._producer is not None:
                self._producer.resumeProducing()


class BodyConsumer(TypingProtocol):
    """Where ``ImageDownload.stream`` delivers the image."""

    valve: Valve

    def begin(self, total: int | None) -> Awaitable[None]:
        """The image starts (again) at byte 0; ``total`` is its size when the server said."""

    def data(self, chunk: bytes) -> None:
        """The next bytes of the image, in order."""


class _Transient(Exception):
    """A failure worth retrying on the same URL."""


class _NextURL(Exception):
    """A failure not worth retrying on this URL (404, 403, ...)."""


def _reason(error: BaseException) -> str:
    if isinstance(error, (_Transient, _NextURL)):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class _Collect(Protocol):
    def __init__(self, limit: int, done: Deferred[bytes], url: str) -> None:
        self._limit, self._done, self._url = limit, done, url
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            if not self._done.called:
                self._done.errback(ValueError(f"{self._url} is larger than {self._limit} bytes"))
            assert self.transport is not None
            self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


async def fetch_small(url: str, http: Any, limit: int = SMALL_FETCH_LIMIT, *,
                      headers: Mapping[str, str] | None = None, timeout: float = 60.0,
                      clock: IReactorTime | None = None) -> bytes:
    """GET ``url`` (a checksums file, a config drive) into memory: at most ``limit`` bytes.

    Raises ValueError for a non-200 answer or a body over ``limit``; network errors as they
    come; TimeoutError after ``timeout`` seconds in all (needs ``clock``).
    """
    async def discard(response: Any) -> None:
        ignored: Deferred[bytes] = Deferred()
        response.deliverBody(_Collect(64 * 1024, ignored, url))
        try:
            await ignored
        except Exception:
            pass

    async def get() -> bytes:
        response = await http.request("GET", url, headers=dict(headers or {}), unbuffered=True)
        if response.code != 200:
            await discard(response)
            raise ValueError(f"{url} answered HTTP {response.code}")
        length = response.length
        if isinstance(length, int) and length > limit:
            await discard(response)
            raise ValueError(f"{url} is larger than {limit} bytes ({length})")
        done: Deferred[bytes] = Deferred()
        response.deliverBody(_Collect(limit, done, url))
        return await done

    fetching = Deferred.fromCoroutine(get())
    if clock is not None:
        fetching.addTimeout(timeout, clock)
    return await fetching


class _Body(Protocol):
    """One response body: hands data on, notices stalls, can be stopped."""

    def __init__(self, deliver: Callable[[bytes], bool], clock: IReactorTime,
                 idle_timeout: float, valve: Valve) -> None:
        self._deliver, self._clock, self._idle, self._valve = deliver, clock, idle_timeout, valve
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.stalled = False
        self.stopped = False
        self._paused = False
        self._timer: IDelayedCall | None = None
        self._last = 0.0

    # The valve controls us; we control the transport and the stall timer.
    def pauseProducing(self) -> None:
        self._paused = True
        self._cancel_timer()
        if self.transport is not None and not self.stopped:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._paused = False
        if self.transport is not None and not self.stopped:
            self._arm()
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Close the connection (enough received, or the consumer failed)."""
        if not self.stopped and self.transport is not None:
            self.stopped = True
            self._cancel_timer()
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _arm(self) -> None:
        self._last = self._clock.seconds()
        if self._timer is None and not self._paused and not self.stopped:
            self._timer = self._clock.callLater(self._idle, self._check_stall)

    def _check_stall(self) -> None:
        # One timer per idle period, not one per chunk: it re-arms for what is left.
        self._timer = None
        idle = self._clock.seconds() - self._last
        if idle >= self._idle:
            self.stalled = True
            self.stop()
        elif not self._paused and not self.stopped:
            self._timer = self._clock.callLater(self._idle - idle, self._check_stall)

    def connectionMade(self) -> None:
        # Read the socket in large pieces: each recv() gives up and takes back the GIL, and
        # with the hash and write threads busy, taking it back dominates a 64 KiB read
        # (measured: 100 us per read, 3.3 s of a 2 GiB image). Twisted keeps the TCP
        # transport behind the body's transport proxy; plain TCP only (not TLS).
        tcp = getattr(self.transport, "_producer", None)
        if not isinstance(getattr(tcp, "bufferSize", None), int):  # TLS: the TCP below it
            tcp = getattr(tcp, "transport", None)
        if isinstance(getattr(tcp, "bufferSize", None), int):
            tcp.bufferSize = max(tcp.bufferSize, READ_SIZE)  # type: ignore[union-attr]
        self._valve.attach(self)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self.stopped:
            return
        self._last = self._clock.seconds()
        if not self._deliver(data):
            self.stop()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._cancel_timer()
        self._valve.detach(self)
        if not self.done.called:
            self.reason = reason
            self.done.callback(None)


class ImageDownload:
    """Streams one image from its URLs to a consumer, resuming and falling back."""

    def __init__(self, image_info: Mapping[str, Any], *, http: Any, clock: IReactorTime,
                 config: AgentConfig,
                 client_for: Callable[[str], Any] | None = None) -> None:
        self.image_id = str(image_info.get("id", ""))
        urls = image_info.get("urls") or []
        if isinstance(urls, str):
            urls = [urls]
        self.urls: list[str] = [str(u) for u in urls]
        if not self.urls:
            raise errors.ImageDownloadError(self.image_id, "image_info has no URL")
        self._http, self._clock, self._config = http, clock, config
        self._client_for = client_for or (lambda url: http)
        self.headers: dict[str, str] = {}
        auth = authorization_header(image_info, config)
        if auth:
            self.headers["Authorization"] = auth
        self.retries = config.image_download_connection_retries
        self.retry_interval = config.image_download_connection_retry_interval
        self.timeout = config.image_download_connection_timeout
        self.total: int | None = None
        self.url: str | None = None
        """The URL that served the whole image, once ``stream`` returned."""
        self.current_url: str = self.urls[0]
        """The URL being read now."""
        self._fatal: BaseException | None = None
        self._body: _Body | None = None
        self._waiting: Deferred[Any] | None = None

    def abort(self, reason: BaseException) -> None:
        """Stop now: the transfer in progress fails with ``reason``, with no retry."""
        if self._fatal is None:
            self._fatal = reason
        if self._body is not None:
            self._body.stop()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()

    async def _wait(self, d: Deferred[Any]) -> Any:
        """``await d``, cancelled by ``abort``."""
        if self._fatal is not None:
            d.cancel()
            d.addErrback(lambda _: None)
            raise self._fatal
        self._waiting = d
        try:
            return await d
        finally:
            if self._waiting is d:
                self._waiting = None

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def stream(self, consumer: BodyConsumer) -> str:
        """Deliver the whole image to ``consumer``; the URL that served it."""
        state = {"pos": 0}

        async def restart(total: int | None) -> None:
            state["pos"] = 0
            await consumer.begin(total)

        def deliver(offset: int, data: bytes) -> bool:
            consumer.data(data)
            state["pos"] = offset + len(data)
            return True

        url = await self._transfer(self.urls, state, None, deliver, restart, consumer.valve)
        self.url = url
        return url

    async def fetch_range(self, url: str, start: int, end: int,
                          deliver: Callable[[int, bytes], None], valve: Valve) -> None:
        """Deliver bytes ``[start, end)`` of ``url`` as ``deliver(offset, data)``, in order.

        Uses Range requests (resumed like ``stream``); a server answering 200 is read from the
        start, the bytes before ``start`` dropped. The image's other URLs are tried after
        ``url``.
        """
        state = {"pos": start}
        urls = [url] + [other for other in self.urls if other != url]

        def deliver_piece(offset: int, data: bytes) -> bool:
            deliver(offset, data)
            state["pos"] = offset + len(data)
            return state["pos"] < end

        await self._transfer(urls, state, end, deliver_piece, None, valve)

    async def _transfer(self, urls: Sequence[str], state: dict[str, int], end: int | None,
                        deliver: Callable[[int, bytes], bool],
                        restart: Callable[[int | None], Awaitable[None]] | None,
                        valve: Valve) -> str:
        failures: list[str] = []
        for url in urls:
            self.current_url = url
            moved = [False]

            async def attempt(url: str = url) -> None:
                self._check_fatal()
                before = state["pos"]
                try:
                    await self._attempt(url, state, end, deliver, restart, valve)
                except (CancelledError, errors.RESTError):
                    self._check_fatal()
                    raise
                except Exception:
                    self._check_fatal()
                    moved[0] = state["pos"] > before
                    raise

            async def wait(seconds: float) -> None:
                try:
                    await self._wait(deferLater(self._clock, seconds))
                except CancelledError:
                    self._check_fatal()
                    raise

            try:
                await retry(attempt, self._clock, "Downloading image {image_id} from {url} "
                            "at byte {pos}", backoff=fixed(self.retry_interval),
                            attempts=self.retries + 1,
                            retry_on=lambda e: not isinstance(e, (_NextURL, errors.RESTError)),
                            log=log, fields=lambda e: {"image_id": self.image_id, "url": url,
                                                       "pos": state["pos"]},
                            describe=_reason, progressed=lambda e: moved[0], sleep=wait)
                return url
            except _NextURL as e:
                log.warn("Downloading image {image_id} from {url} failed at byte {pos}: "
                         "{error}; trying the next URL", image_id=self.image_id, url=url,
                         pos=state["pos"], error=str(e))
                failures.append(f"{url}: {e}")
            except GaveUp as e:
                failures.append(f"{url}: {_reason(e.last)}")
        raise errors.ImageDownloadError(
            self.image_id, "every URL failed: " + "; ".join(failures))

    async def _attempt(self, url: str, state: dict[str, int], end: int | None,
                       deliver: Callable[[int, bytes], bool],
                       restart: Callable[[int | None], Awaitable[None]] | None,
                       valve: Valve) -> None:
        pos = state["pos"]
        headers = dict(self.headers)
        ranged = pos > 0 or end is not None
        if ranged:
            headers["Range"] = f"bytes={pos}-" + (f"{end - 1}" if end is not None else "")
        client = self._client_for(url)
        requesting = client.request("GET", url, headers=headers, unbuffered=True)
        requesting.addTimeout(self.timeout, self._clock)
        try:
            response = await self._wait(requesting)
        except TimeoutError:
            raise _Transient(f"no response within {self.timeout} s")
        except CancelledError:
            self._check_fatal()
            raise
        code = response.code
        if code == 206 and ranged:
            header = response.headers.getRawHeaders("content-range") or [""]
            match = _CONTENT_RANGE.match(header[0])
            if match is None or int(match.group(1)) != pos:
                response.deliverBody(_Body(lambda d: False, self._clock, 1, Valve()))
                raise _Transient(f"bad Content-Range {header[0]!r} for a request from {pos}")
            offset = pos
            total = None if match.group(3) == "*" else int(match.group(3))
        elif code == 200:
            offset = 0
            total = response.length if isinstance(response.length, int) else None
            if restart is not None:
                if pos:
                    log.warn("{url} ignored the Range request: restarting image {image_id} "
                             "from byte 0", url=url, image_id=self.image_id)
                await restart(total)
                pos = 0
        else:
            response.deliverBody(_Body(lambda d: False, self._clock, 1, Valve()))
            if 400 <= code < 500 and code not in (408, 429):
                raise _NextURL(f"HTTP {code}")
            raise _Transient(f"HTTP {code}")
        if restart is not None:
            self.total = total if total is not None else self.total
            self.url = url
        cursor = {"offset": offset}

        def receive(data: bytes) -> bool:
            at = cursor["offset"]
            cursor["offset"] = at + len(data)
            if at < state["pos"]:  # a 200 for a range: skip what is not wanted
                skip = state["pos"] - at
                if skip >= len(data):
                    return True
                data, at = data[skip:], at + skip
            if end is not None and at + len(data) > end:
                data = data[:end - at]
            return deliver(at, data) if data else end is None or at < end

        body = _Body(receive, self._clock, self.timeout, valve)
        self._body = body
        try:
            response.deliverBody(body)
            await body.done
        except BaseException:
            body.stop()   # cancelled (the command was): close the connection, no timer left
            raise
        finally:
            self._body = None
        self._check_fatal()
        reason = body.reason
        assert reason is not None
        if end is not None and state["pos"] >= end:
            return
        if body.stalled:
            raise _Transient(f"no data for {self.timeout} s")
        expected = end if end is not None else total
        if expected is not None and state["pos"] >= expected:
            return
        if expected is None and reason.check(ResponseDone, PotentialDataLoss):
            return  # no length given: a clean end is the end
        if reason.check(ResponseDone, PotentialDataLoss):
            raise _Transient(f"the body ended at byte {state['pos']} of {expected}")
        raise _Transient(f"connection lost at byte {state['pos']}: "
                         f"{reason.getErrorMessage()}")
