"""One inspection run: collect the data with the configured collectors, then post it.

As in the reference agent, problems are gathered rather than raised, so the receiver
always hears from a machine it may know nothing else about: a failing collector becomes a
line of the ``error`` key, and the other collectors still run. An unknown collector name
is logged as a warning and skipped (not an error: Ironic fails an inspection whose data
has one).
"""

from __future__ import annotations

import importlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from ipa_twisted.config import AgentConfig
from ipa_twisted.errors import InspectionError
from ipa_twisted.context import HardwareContext
from ipa_twisted.inspector.collectors import (AccumulatedFailures, CollectorContext,
                                              LLDPReader, collector_names, find_collector,
                                              known_collectors, run_order)
from ipa_twisted.inspector.post import (POST_ATTEMPTS, InspectionAnswer, callback_url,
                                        post_inspection_data)
from ipa_twisted.ironic.client import HTTPClientLike

log = Logger()

async def collect(context: HardwareContext, managers: Any, config: AgentConfig | None = None,
                  *, lldp_reader: LLDPReader | None = None,
                  ) -> tuple[dict[str, Any], AccumulatedFailures]:
    """Run the collectors of ``inspection_collectors``: (data, failures).

    ``data["error"]`` is set from the failures (None when there were none).
    ``lldp_reader`` replaces ``ipa_twisted.net.lldp.get_lldp_info`` (tests).
    """
    config = config or context.config
    names = collector_names(config)
    collecting = CollectorContext(context, managers, tuple(names), config, lldp_reader)
    failures = AccumulatedFailures()
    data: dict[str, Any] = {}
    log.info("Inspection with collectors {names}", names=", ".join(names))
    for name in run_order(names):
        collector = find_collector(name)
        if collector is None:
            log.warn("Skipping unknown inspection collector {name} (known: {known})",
                     name=name, known=", ".join(known_collectors()))
            continue
        started = time.monotonic()
        try:
            await collector(data, failures, collecting)
        except CancelledError:
            raise
        except Exception as e:
            log.failure("Collector {name} failed", name=name)
            failures.add("collector %s failed: %s", name, e)
        log.debug("Collector {name} took {elapsed:.3f} s", name=name,
                  elapsed=time.monotonic() - started)
    data["error"] = failures.get_error()
    return data, failures


MDNSResolver = Callable[[AgentConfig, Any], Awaitable[AgentConfig]]
"""``resolve_mdns_urls(config, reactor)``: ``config`` with ``mdns`` URLs discovered."""


async def resolve_mdns(config: AgentConfig, reactor: Any) -> AgentConfig:
    """``config`` with ``inspection_callback_url=mdns`` (and ``api_url``) discovered.

    The inspector's ``baremetal-introspection`` service gives the URL (+ ``/v1/continue``)
    and may set a few options (``ipa_*`` TXT properties). InspectionError when this agent
    has no mDNS support; ``ServiceLookupFailure`` when nothing answers.
    """
    try:
        mdns = importlib.import_module("ipa_twisted.net.mdns")
    except ModuleNotFoundError as e:
        if e.name not in ("ipa_twisted.net", "ipa_twisted.net.mdns"):
            raise
        raise InspectionError("inspection_callback_url=mdns: mDNS discovery is not "
                              "available in this version of the agent; give the URL") from e
    resolved: AgentConfig = await mdns.resolve_mdns_urls(config, reactor)
    return resolved


async def inspect(context: HardwareContext, managers: Any, config: AgentConfig | None,
                  http: HTTPClientLike, *, url: str | None = None,
                  requested: bool = False, attempts: int | None = POST_ATTEMPTS,
                  uniform: Callable[[float, float], float] = random.uniform,
                  mdns_resolver: MDNSResolver = resolve_mdns,
                  ) -> tuple[str | None, dict[str, Any] | None]:
    """Inspect this machine and post the data: (node UUID, lookup content), or Nones.

    The URL is ``url``, else ``inspection_callback_url`` (``mdns``: discovered with
    ``mdns_resolver``, whose ``ipa_*`` settings then apply), else with
    ``requested`` Ironic's continue_inspection under ``api_url``; with none of them
    inspection is off and nothing is collected. Lookup content comes back from Ironic's
    ``/v1/continue_inspection`` (``{"node", "config"}``): the agent then needs no lookup.

    Raises InspectionError when the receiver refuses the data (4xx) or cannot be reached
    in ``attempts`` tries (None: try forever). Collector failures are reported in the
    data's ``error`` key and logged, not raised.
    """
    config = config or context.config
    target = url or callback_url(config, requested=requested)
    if not target:
        log.info("Inspection is disabled (no inspection_callback_url), skipping")
        return None, None
    if target == "mdns":
        config = await mdns_resolver(config, context.reactor)
        target = config.inspection_callback_url
        if not target or target == "mdns":
            raise InspectionError("mDNS discovery gave no inspection URL")
    started = time.monotonic()
    data, failures = await collect(context, managers, config)
    log.info("Inspection data collected in {elapsed:.3f} s",
             elapsed=time.monotonic() - started)
    answer: InspectionAnswer = await post_inspection_data(
        http, target, data, context.clock, attempts=attempts, uniform=uniform)
    if failures:
        log.error("Inspection finished with errors (sent to the receiver): {error}",
                  error=failures.get_error())
    else:
        log.info("Inspection finished successfully; node {uuid}", uuid=answer.node_uuid)
    return answer.node_uuid, answer.lookup
