"""The memory floor of our stack: a Klein app answering ``GET /`` and nothing else.

``compare.py`` measures its idle RSS in the same run as the agents, so the table shows how
much of our agent's RSS the fixed stack (Twisted's reactor, pyOpenSSL that Twisted and Klein
import, Klein and werkzeug) holds before any agent code. Two ways, as a script on the plain
reactor and as a ``twistd -y`` application (twistd's own modules added):

    BARE_KLEIN_PORT=8080 python bench/bare_klein.py
    BARE_KLEIN_PORT=8080 twistd -n --pidfile= -y bench/bare_klein.py
"""

from __future__ import annotations

import os

from klein import Klein
from twisted.application import service
from twisted.web.server import Request, Site

app = Klein()


@app.route("/")
def root(request: Request) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return b"{}"


PORT = int(os.environ["BARE_KLEIN_PORT"])
site = Site(app.resource())

if __name__ == "__main__":
    from twisted.internet import reactor

    reactor.listenTCP(PORT, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
else:  # twistd -y: the module-level ``application`` is what twistd runs
    from twisted.application.internet import TCPServer

    application = service.Application("bare-klein")
    TCPServer(PORT, site, interface="127.0.0.1").setServiceParent(application)
