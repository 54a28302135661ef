"""FakeInspectionReceiver: the two services that take inspection data, as one Klein app.

- ironic-inspector's ``POST /v1/continue``: 200 ``{"uuid": ...}`` for a known node, 404
  ``{"error": {"message": ...}}`` otherwise;
- Ironic's ``POST /v1/continue_inspection``: the body is checked as Ironic checks it (an
  ``inventory`` whose ``interfaces`` have string ``mac_address``es, at least one), then 202
  with ``{"node": {...}, "config": {...}}`` when API version 1.84 or later is asked for, or
  ``{"uuid": ...}`` without a version header (Ironic's inspector-compatible answer); errors
  are Ironic's ``{"error_message": "<JSON with faultstring>"}``.

Nodes are found by any inventory MAC or BMC address (``add_node``); with
``accept_any=True`` every post finds the first node. ``fail(503, 500)`` answers the next
posts with those statuses first. Every post is kept in ``posts``. Run standalone (for a
child process to post to) with ``listen(reactor)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

DEFAULT_NODE_UUID = "1be26c0b-03f2-4d2e-ae87-c02d7f33c123"
DEFAULT_TOKEN = "a" * 32


@dataclass
class Post:
    """One received post."""

    path: str
    headers: dict[str, str]
    data: Any
    status: int


@dataclass
class ReceiverNode:
    uuid: str
    macs: set[str] = field(default_factory=set)
    bmc_addresses: set[str] = field(default_factory=set)


class FakeInspectionReceiver:
    """ironic-inspector and Ironic receiving inspection data (see the module docstring)."""

    app = Klein()

    def __init__(self, *, accept_any: bool = False, agent_token: str = DEFAULT_TOKEN,
                 heartbeat_timeout: int = 300) -> None:
        self.nodes: list[ReceiverNode] = []
        self.posts: list[Post] = []
        self.accept_any = accept_any
        self.agent_token = agent_token
        self.heartbeat_timeout = heartbeat_timeout
        self._failures: list[int] = []

    def add_node(self, uuid: str = DEFAULT_NODE_UUID, macs: Sequence[str] = (),
                 bmc_addresses: Sequence[str] = ()) -> ReceiverNode:
        node = ReceiverNode(uuid, {m.lower() for m in macs}, set(bmc_addresses))
        self.nodes.append(node)
        return node

    def fail(self, *codes: int) -> None:
        """Answer the next posts with these statuses, in order."""
        self._failures.extend(codes)

    # -- helpers ---------------------------------------------------------------------------
    def _find(self, data: Any) -> ReceiverNode | None:
        inventory = data.get("inventory") if isinstance(data, dict) else None
        if not isinstance(inventory, dict):
            return None
        macs = {str(i.get("mac_address")).lower() for i in inventory.get("interfaces") or []
                if isinstance(i, dict) and i.get("mac_address")}
        bmcs = {inventory.get("bmc_address"), inventory.get("bmc_v6address")} - {None}
        for node in self.nodes:
            if node.macs & macs or node.bmc_addresses & bmcs:
                return node
        if self.accept_any and self.nodes:
            return self.nodes[0]
        return None

    def _receive(self, request: IRequest, path: str) -> tuple[Any, dict[str, str], int | None]:
        headers = {k.decode().lower(): v[-1].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        try:
            data = json.loads(request.content.read())
        except ValueError:
            data = None
        post = Post(path, headers, data, 0)
        self.posts.append(post)
        status = self._failures.pop(0) if self._failures else None
        return data, headers, status

    @staticmethod
    def _answer(request: IRequest, status: int, document: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(document).encode()

    def _record(self, status: int) -> None:
        self.posts[-1].status = status

    # -- ironic-inspector ------------------------------------------------------------------
    @app.route("/v1/continue", methods=["POST"])
    def inspector_continue(self, request: IRequest) -> bytes:
        data, _, failing = self._receive(request, "/v1/continue")
        if failing is not None:
            self._record(failing)
            return self._answer(request, failing, {"error": {"message": "Injected failure"}})
        if not isinstance(data, dict):
            self._record(400)
            return self._answer(request, 400, {"error": {"message": "Invalid JSON"}})
        node = self._find(data)
        if node is None:
            self._record(404)
            return self._answer(request, 404, {"error": {
                "message": "Could not find a node for attributes "
                           f"{{'mac': {sorted(self._macs(data))}}}"}})
        self._record(200)
        return self._answer(request, 200, {"uuid": node.uuid})

    @staticmethod
    def _macs(data: dict[str, Any]) -> list[str]:
        inventory = data.get("inventory") or {}
        return [str(i.get("mac_address")) for i in inventory.get("interfaces") or []
                if isinstance(i, dict)]

    # -- Ironic ----------------------------------------------------------------------------
    @staticmethod
    def _ironic_error(request: IRequest, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        inner = json.dumps({"faultstring": message, "faultcode": "Client",
                            "debuginfo": None})
        return json.dumps({"error_message": inner}).encode()

    @app.route("/v1/continue_inspection", methods=["POST"])
    def ironic_continue_inspection(self, request: IRequest) -> bytes:
        data, headers, failing = self._receive(request, "/v1/continue_inspection")
        if failing is not None:
            self._record(failing)
            return self._ironic_error(request, failing, "Injected failure")
        version = headers.get("x-openstack-ironic-api-version", "1.1")
        try:
            minor = int(version.split(".")[1])
        except (IndexError, ValueError):
            self._record(406)
            return self._ironic_error(request, 406, f"Invalid API version {version}")
        if minor < 84 and minor != 1:
            self._record(404)
            return self._ironic_error(request, 404, "API version 1.84 or newer is required")
        problem = self._invalid(data)
        if problem:
            self._record(400)
            return self._ironic_error(request, 400, f"Invalid data: {problem}")
        node = self._find(data)
        if node is None:
            self._record(404)
            return self._ironic_error(request, 404, "Not found")
        self._record(202)
        if minor >= 84:
            return self._answer(request, 202, {
                "node": {"uuid": node.uuid, "properties": {}, "instance_info": {},
                         "driver_internal_info": {}},
                "config": {"agent_token": self.agent_token, "agent_token_required": True,
                           "heartbeat_timeout": self.heartbeat_timeout}})
        return self._answer(request, 202, {"uuid": node.uuid})

    @staticmethod
    def _invalid(data: Any) -> str | None:
        """What Ironic's schema for the data would reject, or None."""
        if not isinstance(data, dict) or not isinstance(data.get("inventory"), dict):
            return "'inventory' is a required property"
        interfaces = data["inventory"].get("interfaces")
        if not isinstance(interfaces, list):
            return "'interfaces' is a required property"
        if not interfaces:
            return "'interfaces' should be non-empty"
        for interface in interfaces:
            if not isinstance(interface, dict) or not isinstance(
                    interface.get("mac_address"), str):
                return f"{interface!r}: 'mac_address' must be a string"
        for key in ("bmc_address", "bmc_v6address"):
            value = data["inventory"].get(key)
            if value is not None and not isinstance(value, str):
                return f"{key} must be a string or null"
        return None

    # -- serving ---------------------------------------------------------------------------
    def listen(self, reactor: Any, port: int = 0, interface: str = "127.0.0.1") -> Any:
        """Serve on TCP; the IListeningPort (``getHost().port``)."""
        from twisted.web.server import Site
        return reactor.listenTCP(port, Site(self.app.resource()), interface=interface)
