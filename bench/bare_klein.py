"""The memory floor of our stack: a Klein app answering ``GET /`` and nothing else.

``compare.py`` measures its idle RSS in the same run as the agents, so the table shows how
much of our agent's RSS the fixed stack (Twisted's reactor, pyOpenSSL that Twisted and Klein
import, Klein and werkzeug) holds before any agent code. Two ways, as a script on the plain
reactor and as a ``twistd -y`` application (twistd's own modules added):

    BARE_KLEIN_PORT=8080 python bench/bare_klein.py
    BARE_KLEIN_PORT=8080 twistd -n --pidfile= -y bench/bare_klein.py

"In use" (``BARE_KLEIN_TLS_DIR=DIR``, with ``agent.crt`` and ``agent.key`` in DIR): the same
app serving HTTPS with that certificate (read, and its OpenSSL context made, on the first
connection, as the agent's automatic TLS does), and treq imported, the HTTP client every agent on
this stack talks to Ironic with: the fixed stack as an agent driven by Ironic must use it
(automatic TLS, lookup and heartbeats), still without any agent code. ``real_ironic.py``
reports it beside the bare floor, for the agents' idle RSS at their first heartbeat.
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
TLS_DIR = os.environ.get("BARE_KLEIN_TLS_DIR")
site = Site(app.resource())
tls = None
if TLS_DIR:
    import treq  # noqa: F401  (imported as an agent's Ironic client is: its memory counts)
    from OpenSSL import SSL
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from twisted.internet.ssl import PrivateCertificate
    from zope.interface import implementer

    @implementer(IOpenSSLServerConnectionCreator)
    class _OnFirstConnection:
        """The certificate read and the context made when the first client connects, as
        the agent's automatic TLS does (an agent Ironic has not called holds neither)."""

        options = None

        def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
            if self.options is None:
                assert TLS_DIR is not None
                with open(os.path.join(TLS_DIR, "agent.crt")) as crt, \
                        open(os.path.join(TLS_DIR, "agent.key")) as key:
                    self.options = PrivateCertificate.loadPEM(crt.read() + key.read()).options()
            return SSL.Connection(self.options.getContext(), None)

    tls = _OnFirstConnection()

if __name__ == "__main__":
    from twisted.internet import reactor

    if tls is None:
        reactor.listenTCP(PORT, site, interface="127.0.0.1")  # type: ignore[arg-type]
    else:
        reactor.listenSSL(PORT, site, tls, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()
else:  # twistd -y: the module-level ``application`` is what twistd runs
    from twisted.application.internet import SSLServer, TCPServer

    application = service.Application("bare-klein")
    server = (TCPServer(PORT, site, interface="127.0.0.1") if tls is None else
              SSLServer(PORT, site, tls, interface="127.0.0.1"))
    server.setServiceParent(application)
