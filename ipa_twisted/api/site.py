"""The HTTP site serving the API: access log without query strings, idle timeouts."""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from ipa_twisted.api.app import AgentAPI


class AgentSite(Site):
    """A Site whose access log never shows query strings (they carry the agent token)."""

    access_log = Logger(namespace="ipa_twisted.api.access")
    displayTracebacks = False

    def __init__(self, resource: IResource, idle_timeout: float = 60.0) -> None:
        super().__init__(resource, timeout=idle_timeout)

    def log(self, request: Request) -> None:  # type: ignore[override]
        """One debug event per request: client, method, path (no query), status, size."""
        client = request.getClientAddress()
        self.access_log.debug(
            "{client} {method} {path} {code} {length}",
            client=getattr(client, "host", "-"),
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            code=request.code, length=request.sentLength)


def make_site(api: AgentAPI, idle_timeout: float = 60.0) -> AgentSite:
    """The Site for ``api``."""
    return AgentSite(api.app.resource(), idle_timeout)
