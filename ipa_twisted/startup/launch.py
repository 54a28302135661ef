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
# functions) and no garbage worth collecting, so the cyclic collector only slows it down:
# measured 12 % of the import time (241 -> 211 ms on the host, more under emulation). It is
# switched back on once the reactor runs (``main``), with the API already listening.
gc.disable()

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
    """twistd's ``runApp``, with the cyclic garbage collector back on once the reactor runs.

    The options are parsed by now, so the reactor they chose (``--reactor``) is installed.
    """
    from twisted.internet import reactor
    reactor.callWhenRunning(gc.enable)  # type: ignore[attr-defined]
    twistd.runApp(config)


def main() -> None:
    """Run twistd with ``sys.argv[1:]``, as ``twistd`` would."""
    try:
        app.run(run_app, ServerOptions)
    finally:
        gc.enable()


if __name__ == "__main__":
    main()
