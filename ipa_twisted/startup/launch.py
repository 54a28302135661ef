"""``python -m ipa_twisted.startup.launch [twistd options] ipa [agent options]``: twistd
running the agent, without twistd's search for service makers.

``twistd ipa`` first imports every ``IServiceMaker`` dropin on the path (Twisted's own:
conch, mail, words...) to find ``ipa``; this launcher knows only the agent's, so start-up
under emulation (the ramdisk) and idle memory are spared them. Everything else is twistd's:
the same options, logging, signals and exit codes; ``twistd ipa ...`` keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.application import app
from twisted.scripts import twistd
from twisted.scripts._twistd_unix import ServerOptions as UnixServerOptions  # twistd's, here


def agent_service_makers(interface: Any, package: Any = None) -> Iterable[Any]:
    """The service makers twistd may run: the agent's (``twisted/plugins/
    ipa_twisted_plugin.py``) and no other."""
    from twisted.plugins.ipa_twisted_plugin import ipa
    return [ipa]


class ServerOptions(UnixServerOptions):
    """twistd's options, whose only sub-command is ``ipa``."""

    _getPlugins = staticmethod(agent_service_makers)


def main() -> None:
    """Run twistd with ``sys.argv[1:]``, as ``twistd`` would."""
    app.run(twistd.runApp, ServerOptions)


if __name__ == "__main__":
    main()
