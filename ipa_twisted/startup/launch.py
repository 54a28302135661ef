"""``python -m ipa_twisted.startup.launch [twistd options] ipa [agent options]``: twistd
running the agent, without twistd's search for service makers.

``twistd ipa`` first imports every ``IServiceMaker`` dropin on the path (Twisted's own:
conch, mail, words...) to find ``ipa``; this launcher knows only the agent's, so start-up
under emulation (the ramdisk) and idle memory are spared them. Everything else is twistd's:
the same options, logging, signals and exit codes; ``twistd ipa ...`` keeps working.
"""

from __future__ import annotations

import gc

# Start-up allocates hundreds of thousands of long-lived objects (modules, classes,
# functions) and little garbage, so the cyclic collector's frequent young-generation passes
# mostly re-scan survivors: with a young generation of 20000 objects instead of 700 the
# imports took 6 % less on the host (0.232 -> 0.217 s, medians of 7). Switching the
# collector off saved 12 % but left 0.6 MiB more idle RSS (56.3 against 55.7-55.8 MiB, 3
# runs each), the garbage of start-up piling up in the heap. Python's thresholds come back
# once the reactor runs (``run_app``), with the API already listening.
STARTUP_THRESHOLD = 20000
_thresholds = gc.get_threshold()
gc.set_threshold(STARTUP_THRESHOLD, *_thresholds[1:])


def restore_gc_thresholds() -> None:
    """Python's collector thresholds as they were before start-up."""
    gc.set_threshold(*_thresholds)


from collections.abc import Iterable  # noqa: E402
from typing import Any  # noqa: E402

from twisted.application import app  # noqa: E402
from twisted.scripts import twistd  # noqa: E402
from twisted.scripts._twistd_unix import ServerOptions as UnixServerOptions  # noqa: E402


def agent_service_makers(interface: Any, package: Any = None) -> Iterable[Any]:
    """The service makers twistd may run: the agent's (``twisted/plugins/
    ipa_twisted_plugin.py``) and no other."""
    from twisted.plugins.ipa_twisted_plugin import ipa
    return [ipa]


class ServerOptions(UnixServerOptions):
    """twistd's options, whose only sub-command is ``ipa``."""

    _getPlugins = staticmethod(agent_service_makers)


def run_app(config: Any) -> None:
    """twistd's ``runApp``, with the collector's usual thresholds back once the reactor runs.

    The options are parsed by now, so the reactor they chose (``--reactor``) is installed.
    """
    from twisted.internet import reactor
    reactor.callWhenRunning(restore_gc_thresholds)
    twistd.runApp(config)


def main() -> None:
    """Run twistd with ``sys.argv[1:]``, as ``twistd`` would."""
    try:
        app.run(run_app, ServerOptions)
    finally:
        restore_gc_thresholds()


if __name__ == "__main__":
    main()
