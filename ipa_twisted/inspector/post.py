"""Posting inspection data to its receiver, with the spec's backoff.

Two receivers are in use, and both are spoken to:

- ironic-inspector's ``POST /v1/continue`` answers ``{"uuid": "<node>"}``;
- Ironic's own ``POST /v1/continue_inspection`` (Ironic's ``agent`` inspect interface):
  asked for API version 1.84 it answers lookup-style content, ``{"node": {...},
  "config": {...}}`` with the agent token, so the agent needs no lookup afterwards. (Without
  the version header it answers ``{"uuid": ...}`` like the inspector.)

Connection failures, timeouts and 5xx answers are retried: the waits are 1, 2.7, 7.29 ...
seconds (factor 2.7) capped at 1200 s, each multiplied by a random factor in [0.7, 1.2]
(the reference agent's ``IronicInspection`` backoff). A 4xx answer is final:
InspectionError with the receiver's message.

The receiver may be given as several comma-separated URLs (as the reference agent allows):
each attempt tries them in order, moving on to the next after a connection error or
timeout; a 5xx answer ends the attempt.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import treq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ipa_twisted import __version__, encoding
from ipa_twisted.config import AgentConfig, split_urls
from ipa_twisted.errors import InspectionError
from ipa_twisted.ironic.client import CONNECTION_ERRORS, HTTPClientLike, error_message
from ipa_twisted.retry import Backoff, GaveUp, retry, spread

log = Logger()

INITIAL_DELAY = 1.0
BACKOFF_FACTOR = 2.7
MAX_DELAY = 1200.0
MIN_JITTER_MULTIPLIER = 0.7
MAX_JITTER_MULTIPLIER = 1.2
POST_ATTEMPTS = 6
"""Attempts before the agent gives up at start-up (about 80 s of waits) and goes on to
lookup; the console command retries without end (``attempts=None``)."""
REQUEST_TIMEOUT = 120.0
"""Longest wait for one POST and its answer (the data may hold megabytes of logs)."""

CONTINUE_INSPECTION_VERSION = "1.84"
"""The Ironic API version whose /v1/continue_inspection answers with lookup content."""
IRONIC_VERSION_HEADER = "X-OpenStack-Ironic-API-Version"
CONTINUE_INSPECTION_PATH = "/v1/continue_inspection"
INSPECTOR_CONTINUE_PATH = "/v1/continue"

_NOT_LOGGED = ("logs",)


@dataclass(frozen=True)
class InspectionAnswer:
    """What the receiver said: the node's UUID, and lookup content when Ironic gave it."""

    node_uuid: str | None
    lookup: dict[str, Any] | None = None


def callback_url(config: AgentConfig, *, requested: bool = False) -> str | None:
    """Where to post inspection data; None when inspection is off.

    ``inspection_callback_url`` when set (``mdns`` is returned as is: the caller discovers
    the receiver). Otherwise, if inspection was ``requested`` (the console command) and
    the Ironic URL is known, Ironic's ``{api_url}/v1/continue_inspection`` (for each URL
    of an ``api_url`` list, comma-separated).
    """
    if config.inspection_callback_url:
        return config.inspection_callback_url
    if requested and config.api_url and config.api_url != "mdns":
        return ",".join(url.rstrip("/") + CONTINUE_INSPECTION_PATH
                        for url in split_urls(config.api_url))
    return None


def is_ironic_receiver(url: str) -> bool:
    """Whether ``url`` is Ironic's continue_inspection (rather than the inspector's)."""
    return urlsplit(url).path.rstrip("/").endswith(CONTINUE_INSPECTION_PATH)


def backoff(uniform: Callable[[float, float], float] = random.uniform) -> Backoff:
    """The waits between attempts: 1, 2.7, 7.29 ... capped at 1200 s, each jittered."""
    return Backoff(initial=INITIAL_DELAY, factor=BACKOFF_FACTOR, cap=MAX_DELAY,
                   jitter=spread(MIN_JITTER_MULTIPLIER, MAX_JITTER_MULTIPLIER, uniform))


class _Retry(Exception):
    """One attempt failed in a way worth retrying; ``unreachable``: no answer at all."""

    def __init__(self, error: str, unreachable: bool = False) -> None:
        super().__init__(error)
        self.unreachable = unreachable


async def post_inspection_data(http: HTTPClientLike, url: str, data: Mapping[str, Any],
                               clock: IReactorTime, *, attempts: int | None = POST_ATTEMPTS,
                               uniform: Callable[[float, float], float] = random.uniform,
                               timeout: float = REQUEST_TIMEOUT) -> InspectionAnswer:
    """POST ``data`` (JSON) to ``url`` until it is accepted; what the receiver answered.

    ``url`` may list several URLs, comma-separated: each attempt tries them in turn until
    one answers. ``attempts`` None retries forever. Raises InspectionError on a 4xx
    answer, or when the attempts are used up (with the last failure).
    """
    body = encoding.encode(data)
    urls = split_urls(url) or [url]
    log.info("Posting inspection data ({size} bytes) to {url}", size=len(body), url=url)
    log.debug("Inspection data: {data}",
              data={k: v for k, v in data.items() if k not in _NOT_LOGGED})
    try:
        return await retry(lambda: _post_to_first(http, urls, body, clock, timeout), clock,
                           "Posting inspection data to {url}", backoff=backoff(uniform),
                           attempts=attempts, retry_on=_Retry, log=log, fields={"url": url})
    except GaveUp as e:
        raise InspectionError(f"Posting inspection data to {url} failed "
                              f"{e.attempts} times; last: {e.last}") from None


async def _post_to_first(http: HTTPClientLike, urls: list[str], body: bytes,
                         clock: IReactorTime, timeout: float) -> InspectionAnswer:
    """One attempt: the URLs in turn until one answers (the last one's failure raised)."""
    for index, url in enumerate(urls):
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": f"ipa-twisted/{__version__}"}
        if is_ironic_receiver(url):
            headers[IRONIC_VERSION_HEADER] = CONTINUE_INSPECTION_VERSION
        try:
            return await _post_once(http, url, body, headers, clock, timeout)
        except _Retry as e:
            if not e.unreachable or index == len(urls) - 1:
                raise
            log.warn("Cannot reach the inspection receiver at {url}, trying the next URL: "
                     "{error}", url=url, error=str(e))
    raise AssertionError("unreachable: there is always a URL")


async def _post_once(http: HTTPClientLike, url: str, body: bytes, headers: dict[str, str],
                     clock: IReactorTime, timeout: float) -> InspectionAnswer:
    async def exchange() -> tuple[int, bytes]:
        response = await http.request("POST", url, headers=headers, data=body)
        content: bytes = await treq.content(response)
        return response.code, content

    try:
        code, content = await Deferred.fromCoroutine(exchange()).addTimeout(timeout, clock)
    except CancelledError:
        raise
    except CONNECTION_ERRORS as e:
        raise _Retry(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
                     unreachable=True) from e
    if code >= 500:
        raise _Retry(f"status {code}: {_message(content)}")
    if code >= 400:
        raise InspectionError(f"{url} refused the inspection data with status {code}: "
                              f"{_message(content)}")
    answer = parse_answer(content)
    log.info("Inspection data accepted by {url} (status {code}); node {uuid}", url=url,
             code=code, uuid=answer.node_uuid)
    return answer


def _message(content: bytes) -> str:
    """The error text of an Ironic (faultstring) or ironic-inspector (error.message) body."""
    try:
        document = json.loads(content)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        message = document["error"].get("message")
        if message:
            return str(message)
    return error_message(content)


def parse_answer(content: bytes) -> InspectionAnswer:
    """The node UUID (and lookup content) in a receiver's answer; empty when it has none."""
    try:
        document = json.loads(content) if content.strip() else {}
    except ValueError:
        log.warn("The inspection receiver's answer is not JSON; no node UUID from it")
        return InspectionAnswer(None)
    if not isinstance(document, dict):
        return InspectionAnswer(None)
    node = document.get("node")
    if isinstance(node, dict) and isinstance(node.get("uuid"), str):
        config = document.get("config")
        lookup = {"node": node, "config": config if isinstance(config, dict) else {}}
        return InspectionAnswer(node["uuid"], lookup)
    uuid = document.get("uuid")
    return InspectionAnswer(uuid if isinstance(uuid, str) and uuid else None)
