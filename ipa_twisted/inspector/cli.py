"""``ironic-collect-introspection-data``: inspect this machine and post the data, once or
every ``introspection_daemon_post_interval`` seconds.

Meant for a running instance whose operator is also the cloud user (ironic-inspector
with ``[processing] permit_active_introspection``), as in the reference agent::

    ironic-collect-introspection-data --inspection_callback_url http://IP:5050/v1/continue
    ironic-collect-introspection-data --inspection_callback_url mdns --introspection_daemon

Options are read like the agent's (defaults < config files < kernel ``ipa-*`` parameters <
these flags). Without ``--inspection_callback_url`` (or the option set elsewhere), the data
goes to Ironic's ``{api_url}/v1/continue_inspection`` when ``api_url`` is known.
Unreachable receivers are retried without end (backoff up to 20 minutes); a refusal (4xx)
ends a one-shot run with status 1 and is logged in daemon mode, which carries on.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, Logger,
                            globalLogBeginner, textFileLogObserver)
from twisted.python import usage

from ipa_twisted.config import AgentConfig, ConfigError, load_config, validate_urls
from ipa_twisted.inspector.post import callback_url

log = Logger()

PROGRAM = "ironic-collect-introspection-data"

Inspect = Callable[[], Awaitable[tuple[str | None, Any]]]
"""One inspection run and post (``ipa_twisted.inspector.inspect.inspect`` bound to its
context, managers and HTTP client)."""


class Options(usage.Options):
    """The reference command's flags (underscored, as oslo.config spells them; the dashed
    spellings are accepted too)."""

    synopsis = f"Usage: {PROGRAM} [options]"
    longdesc = ("Collect this machine's inspection data and post it to ironic-inspector "
                "or Ironic, once or periodically. See docs/inspection.md.")
    optFlags = [
        ["introspection_daemon", None,
         "Keep posting every introspection_daemon_post_interval seconds."],
        ["debug", "d", "Debug logging."],
        ["no-default-config-files", None,
         "Do not read /etc/ironic-python-agent.conf and the like."],
    ]
    optParameters = [
        ["inspection_callback_url", None, None,
         "Receiver URL (inspector's .../v1/continue or Ironic's .../v1/continue_inspection), "
         "or 'mdns' to discover it."],
        ["introspection_daemon_post_interval", None, None,
         "Seconds between posts in daemon mode (default 300)."],
        ["inspection_collectors", None, None,
         "Comma-separated collectors (default: default)."],
        ["api_url", None, None, "Ironic URL, used when no callback URL is given."],
        ["cmdline-path", None, None, "File to read kernel ipa-* parameters from."],
    ]
    _UNDERSCORED = ("introspection_daemon", "introspection_daemon_post_interval",
                    "inspection_callback_url", "inspection_collectors", "api_url")

    def __init__(self) -> None:
        super().__init__()
        self["config-files"] = []

    def opt_config_file(self, path: str) -> None:
        """INI config file read after the default ones; repeatable."""
        self["config-files"].append(path)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        if options is None:
            options = sys.argv[1:]
        super().parseOptions([self._underscore(arg) for arg in options])

    def _underscore(self, arg: str) -> str:
        """``--inspection-callback-url=x`` → ``--inspection_callback_url=x``."""
        if not arg.startswith("--"):
            return arg
        name, equals, value = arg[2:].partition("=")
        underscored = name.replace("-", "_")
        if underscored in self._UNDERSCORED:
            return f"--{underscored}{equals}{value}"
        return arg

    def postOptions(self) -> None:
        url = self["inspection_callback_url"]
        if url is not None:
            try:
                validate_urls(url)
            except ValueError as e:
                raise usage.UsageError(f"--inspection_callback_url {url!r}: {e}") from None
        interval = self["introspection_daemon_post_interval"]
        if interval is not None:
            try:
                if float(interval) <= 0:
                    raise ValueError
            except ValueError:
                raise usage.UsageError("--introspection_daemon_post_interval takes a "
                                       "positive number of seconds") from None


def config_from_options(options: Options) -> tuple[AgentConfig, list[str]]:
    """The merged configuration; ConfigError for a bad value in any source."""
    cli: dict[str, Any] = {
        "inspection_callback_url": options["inspection_callback_url"],
        "introspection_daemon_post_interval": options["introspection_daemon_post_interval"],
        "inspection_collectors": options["inspection_collectors"],
        "api_url": options["api_url"],
        "introspection_daemon": True if options["introspection_daemon"] else None,
        "debug": True if options["debug"] else None,
    }
    names = {name: f"--{name}" for name in cli}
    return load_config(cli=cli, config_files=list(options["config-files"]),
                       default_files=not options["no-default-config-files"],
                       cmdline_path=options["cmdline-path"], cli_names=names)


async def run(config: AgentConfig, inspect_once: Inspect, clock: IReactorTime) -> int:
    """Inspect once, or forever in daemon mode; the exit status of a one-shot run."""
    if config.introspection_daemon:
        log.info("Daemon mode: posting inspection data every {interval} s",
                 interval=config.introspection_daemon_post_interval)
    while True:
        try:
            uuid, _ = await inspect_once()
        except Exception as e:
            log.error("Inspection failed: {error}", error=str(e))
            if not config.introspection_daemon:
                return 1
        else:
            log.info("Inspection data posted; node {uuid}", uuid=uuid)
            if not config.introspection_daemon:
                return 0
        await deferLater(clock, config.introspection_daemon_post_interval)


def _start_logging(debug: bool, out: TextIO) -> None:
    level = LogLevel.debug if debug else LogLevel.info
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(out),
                              [LogLevelFilterPredicate(defaultLogLevel=level)])],
        redirectStandardIO=False)


async def _main(reactor: Any, argv: Sequence[str]) -> None:
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{PROGRAM}: {e}\n{options}")
        raise SystemExit(2) from None
    try:
        config, warnings = config_from_options(options)
    except ConfigError as e:
        sys.stderr.write(f"{PROGRAM}: {e}\n")
        raise SystemExit(2) from None
    if not (config.inspection_callback_url or config.api_url):
        sys.stderr.write(f"{PROGRAM}: no receiver: give --inspection_callback_url "
                         "(a URL or 'mdns') or api_url\n")
        raise SystemExit(2)
    _start_logging(config.debug, sys.stderr)
    for warning in warnings:
        log.warn("Configuration: {warning}", warning=warning)

    from ipa_twisted.hardware.dispatch import HardwareManagers
    from ipa_twisted.context import HardwareContext
    from ipa_twisted.http import make_http_client
    from ipa_twisted.inspector.inspect import inspect, resolve_mdns
    from ipa_twisted.process import ProcessRunner

    if "mdns" in (config.inspection_callback_url, config.api_url):
        config = await resolve_mdns(config, reactor)
    if callback_url(config, requested=True) is None:
        log.error("No inspection receiver: api_url is {api_url}", api_url=config.api_url)
        raise SystemExit(2)

    runner = ProcessRunner(reactor, reactor)
    http = make_http_client(reactor, config)
    context = HardwareContext(config, runner, reactor, reactor, http_client=lambda: http)
    managers = await HardwareManagers.load(context)

    async def inspect_once() -> tuple[str | None, Any]:
        return await inspect(context, managers, config, http, requested=True, attempts=None)

    raise SystemExit(await run(config, inspect_once, reactor))


def main(argv: Sequence[str] | None = None) -> None:
    """The console script."""
    from twisted.internet import task

    arguments = list(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: Deferred.fromCoroutine(_main(reactor, arguments)))


if __name__ == "__main__":
    main()
