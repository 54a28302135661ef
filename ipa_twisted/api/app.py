"""The agent's REST API (Klein), wire-compatible with the reference agent's."""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import RequestRedirect

from ipa_twisted import errors
from ipa_twisted.agent import Agent
from ipa_twisted.encoding import encode

_MEDIA_TYPE = "application/vnd.openstack.ironic-python-agent.v1+json"
_DOCS_URL = "https://docs.openstack.org/ironic-python-agent"


class TokenInvalid(Exception):
    """The request lacks the agent token or carries a wrong one."""

    status_code = 401

    def __str__(self) -> str:
        return "Token invalid."


class RequestTooLarge(Exception):
    """The request body is above the configured limit."""

    status_code = 413


def format_exception(error: BaseException, code: int) -> dict[str, Any]:
    """The reference agent's (WSME-style) error body."""
    return {"faultcode": "Server" if code >= 500 else "Client", "faultstring": str(error)}


def _link(root: str, rel: str, resource: str = "", bookmark: bool = False,
          type_: str | None = None) -> dict[str, Any]:
    if rel == "describedby":
        root, type_ = _DOCS_URL, "text/html"
    elif rel == "bookmark":
        bookmark = True
    href = f"{root}/{resource}" if bookmark else f"{root}/v1/{resource}"
    link: dict[str, Any] = {"href": href, "rel": rel}
    if type_:
        link["type"] = type_
    return link


def _version(root: str) -> dict[str, Any]:
    return {"id": "v1", "links": [_link(root, "self", "v1", bookmark=True),
                                  _link(root, "describedby", bookmark=True)]}


def _arg(request: IRequest, name: bytes) -> str | None:
    values = request.args.get(name) if request.args else None
    if not values:
        return None
    value: str = values[0].decode("utf-8", "replace")
    return value


def _wants_wait(request: IRequest) -> bool:
    wait = _arg(request, b"wait")
    return wait is not None and wait.lower() == "true"


class AgentAPI:
    """Routes of the agent API bound to one Agent."""

    app = Klein()
    log = Logger()

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _json(request: IRequest, value: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return encode(value)

    @staticmethod
    def _root_url(request: IRequest) -> str:
        scheme = "https" if request.isSecure() else "http"
        host = request.getHeader(b"host")
        if host:
            return f"{scheme}://{host.decode('latin-1')}"
        address = request.getHost()
        host_text = f"[{address.host}]" if ":" in address.host else address.host
        return f"{scheme}://{host_text}:{address.port}"

    def _check_token(self, request: IRequest) -> None:
        if not self.agent.validate_agent_token(_arg(request, b"agent_token")):
            raise TokenInvalid()

    # -- routes ---------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def root(self, request: IRequest) -> bytes:
        url = self._root_url(request)
        return self._json(request, {
            "name": "OpenStack Ironic Python Agent API",
            "description": "Ironic Python Agent is a provisioning agent for OpenStack Ironic",
            "versions": [_version(url)],
            "default_version": _version(url),
        })

    @app.route("/v1/", methods=["GET"])
    def v1(self, request: IRequest) -> bytes:
        url = self._root_url(request)
        return self._json(request, dict({
            "commands": [_link(url, "self", "commands"), _link(url, "bookmark", "commands")],
            "status": [_link(url, "self", "status"), _link(url, "bookmark", "status")],
            "media_types": [{"base": "application/json", "type": _MEDIA_TYPE}],
        }, **_version(url)))

    @app.route("/v1/status", methods=["GET"])
    @app.route("/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        return self._json(request, self.agent.get_status())

    @app.route("/v1/commands/", methods=["GET"])
    @app.route("/commands/", methods=["GET"])
    def list_commands(self, request: IRequest) -> bytes:
        self._check_token(request)
        return self._json(request, {"commands": self.agent.list_command_results()})

    @app.route("/v1/commands/<string:cmd>", methods=["GET"])
    @app.route("/commands/<string:cmd>", methods=["GET"])
    async def get_command(self, request: IRequest, cmd: str) -> bytes:
        self._check_token(request)
        result = self.agent.get_command_result(cmd)
        if _wants_wait(request):
            await result.wait()
        return self._json(request, result)

    @app.route("/v1/commands/", methods=["POST"])
    @app.route("/commands/", methods=["POST"])
    async def run_command(self, request: IRequest) -> bytes:
        self._check_token(request)
        body = self._read_body(request)
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise errors.InvalidContentError(f"Invalid JSON: {e}") from None
        if (not isinstance(parsed, dict) or "name" not in parsed or "params" not in parsed
                or not isinstance(parsed["params"], dict)):
            raise errors.InvalidContentError("Missing or invalid name or params")
        result = await self.agent.execute_command(parsed["name"], parsed["params"])
        if _wants_wait(request):
            await result.wait()
        elif result.answer_within > 0 and not result.is_done():
            ended = result.wait()
            ended.addTimeout(result.answer_within, self.agent.clock)
            try:
                await ended        # still RUNNING after that: answered as such
            except defer.TimeoutError:
                pass
        return self._json(request, result)

    def _read_body(self, request: IRequest) -> bytes:
        limit = self.agent.config.max_request_body
        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestTooLarge(f"Request body larger than {limit} bytes")
        body = request.content.read(limit + 1) if request.content is not None else b""
        if len(body) > limit:
            raise RequestTooLarge(f"Request body larger than {limit} bytes")
        return body

    # -- errors -----------------------------------------------------------------------------

    @app.handle_errors(Exception)
    def handle_error(self, request: IRequest, failure: Failure) -> bytes | None:
        error = failure.value
        assert error is not None
        if isinstance(error, CancelledError):  # the client went away while we waited
            return None
        if isinstance(error, RequestRedirect):
            request.setResponseCode(error.code)
            request.setHeader(b"Location", error.new_url.encode("utf-8"))
            return b""
        if isinstance(error, HTTPException):
            code = error.code or 500
            if isinstance(error, MethodNotAllowed) and error.valid_methods:
                request.setHeader(b"Allow", ", ".join(error.valid_methods).encode())
            return self._json(request, format_exception(error, code), code)
        code = getattr(error, "status_code", 500)
        if code >= 500:
            self.log.failure("Internal error answering {method} {path}", failure,
                             method=request.method, path=request.path)
        else:
            self.log.info("{code} for {method} {path}: {error}", code=code,
                          method=request.method, path=request.path, error=str(error))
        return self._json(request, format_exception(error, code), code)
