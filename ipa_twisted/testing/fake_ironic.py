"""A fake Ironic API for tests: lookup, heartbeat and version discovery, recording everything.

In memory: ``StubTreq(FakeIronic(...).app.resource())``. As a separate process (integration
tests, which can kill and restart it to simulate an outage)::

    python -m ipa_twisted.testing.fake_ironic --port 0 --mac 52:54:00:12:34:56 \
        --heartbeat-timeout 10 --record /tmp/ironic.jsonl

prints ``listening on <port>`` once listening on 127.0.0.1 and appends each request it
records to the ``--record`` file as one JSON line.

What it emulates of Ironic (Ironic 39 with its default configuration; the contract suite
of ``tests/ironic/contract.py`` runs the same assertions against it and the real one):

- ``GET /``: the version document (``default_version.version`` is ``version``);
- ``X-OpenStack-Ironic-API-Version``: missing means 1.1, "latest" the fake's version; above
  the fake's version, or not a version, is a 406 (whose body is ``{"code", "title",
  "description"}`` inside ``error_message``, not a fault); the ramdisk endpoints need 1.22
  (else 404);
- ``GET /v1/lookup?addresses=..&node_uuid=..``: by node UUID if given, else by any
  registered port MAC; 404 "Resource could not be found." when nothing matches. The
  answer's ``config`` holds every key Ironic 39 sends, its policy keys with their defaults
  (``IRONIC_39_POLICY``); ``lookup_config`` (``--lookup-config JSON``) overrides keys. With
  API >= 1.62 the first lookup issues the node's agent token; later lookups get
  ``"******"`` as Ironic does (unless ``reissue_tokens``);
- ``POST /v1/heartbeat/<uuid>``: 202; 400 "Missing mandatory parameter: callback_url"; 400
  for fields the requested version does not know (``agent_version`` < 1.36,
  ``agent_verify_ca`` < 1.68); 404 for an unknown node; 400 "Agent token is required for
  heartbeat processing." without a token, 400 for no ``agent_version``, 400 "Invalid or
  missing agent token received." for a token lookup has not issued (Ironic's
  InvalidParameterValue is a 400, not a 409); a fake whose ``version`` is below 1.62 stands
  for an Ironic from before tokens and checks neither token nor agent version;
- ``POST /v1/continue_inspection``: 202 with lookup's answer (token included) for API 1.84
  and later, ``{"uuid": ...}`` without a version header (ironic-inspector's answer), 404
  for versions between, 400 for data without an inventory of interfaces with MACs, 404
  "Resource could not be found." when no node has one of its MACs (any node is taken to
  wait for inspection: the fake has no provision states);
- failures on demand: ``fail_lookups(n, code)`` / ``fail_heartbeats(n, code)`` answer the
  next n requests with ``code`` (409: Ironic's NodeLocked; else a server error).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

DEFAULT_VERSION = "1.115"
"""Ironic 39's newest API version."""
IRONIC_39_POLICY: dict[str, Any] = {
    "agent_md5_checksum_enable": True, "disable_deep_image_inspection": False,
    "permitted_image_formats": ["raw", "gpt", "qcow2", "iso"],
    "agent_skip_bmc_detect": False, "enable_bios_bootloader_install": False,
    "tls_min_version": "1.3", "tls_cipher_suites": None,
}
"""The policy keys of Ironic 39's lookup answer with its default configuration."""
IRONIC_39_CONTAINERS: dict[str, Any] = {
    "allow_arbitrary_containers": False, "allowed_containers": [],
    "container_steps_file": "/etc/ironic-python-agent.d/mysteps.yaml", "runner": "podman",
    "pull_options": [], "run_options": ["--rm", "--network=host"],
}
"""``agent_containers`` of Ironic 39's lookup answer with its default configuration."""
NOT_FOUND = "Resource could not be found."
DEFAULT_NODE_UUID = "1be26c0b-03f2-4d2e-ae87-c02d7f33c123"
MASKED_TOKEN = "******"
RAMDISK_ENDPOINTS_VERSION = (1, 22)
TOKENS_VERSION = (1, 62)
CONTINUE_INSPECTION_VERSION = (1, 84)
"""A fake of an older ``version`` stands for an Ironic that knew no agent tokens."""


def _parse_version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def error_body(message: str, faultcode: str = "Client") -> bytes:
    """Ironic's error answer: a JSON string holding the fault, inside JSON."""
    fault = json.dumps({"faultstring": message, "faultcode": faultcode, "debuginfo": None})
    return json.dumps({"error_message": fault}).encode()


def not_acceptable_body(message: str) -> bytes:
    """Ironic's 406 for an API version it does not serve (another shape than faults)."""
    inner = json.dumps({"code": 406, "title": "Not Acceptable", "description": message})
    return json.dumps({"error_message": inner}).encode()


@dataclass
class FakeNode:
    uuid: str
    macs: list[str]
    properties: dict[str, Any] = field(default_factory=dict)
    instance_info: dict[str, Any] = field(default_factory=dict)
    driver_internal_info: dict[str, Any] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    token_issued: bool = False


@dataclass
class Record:
    """One request the fake answered."""

    kind: str  # "version", "lookup", "heartbeat" or "inspection"
    time: float
    status: int
    headers: dict[str, str]
    addresses: list[str] = field(default_factory=list)  # lookup
    node_uuid: str | None = None  # lookup: the query's; heartbeat: the path's
    body: Any = None  # heartbeat: the decoded JSON body

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Answer(Exception):
    """An error answer: status and faultstring."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def body(self) -> bytes:
        """The answer's body, in the shape Ironic gives this status."""
        if self.status == 406:
            return not_acceptable_body(self.message)
        return error_body(self.message, "Client" if self.status < 500 else "Server")


class FakeIronic:
    """The fake; ``lookups`` and ``requests`` hold every answered request, ``heartbeats``
    the accepted (202) heartbeats."""

    app = Klein()

    def __init__(self, *, version: str = DEFAULT_VERSION, heartbeat_timeout: float = 300,
                 agent_token: str | None = None, reissue_tokens: bool = False,
                 clock: IReactorTime | None = None,
                 record: Callable[[Record], None] | None = None,
                 lookup_config: Mapping[str, Any] | None = None) -> None:
        self.version = version
        self.lookup_config = dict(lookup_config or {})
        self.heartbeat_timeout = heartbeat_timeout
        self.agent_token = agent_token
        self.reissue_tokens = reissue_tokens
        self._clock, self._record = clock, record
        self.nodes: dict[str, FakeNode] = {}
        self.requests: list[Record] = []
        self.lookups: list[Record] = []
        self.heartbeats: list[Record] = []
        self._lookup_failures: list[int] = []
        self._heartbeat_failures: list[int] = []
        self._waiters: list[tuple[int, Deferred[list[Record]]]] = []

    # -- set-up -----------------------------------------------------------------------------
    def add_node(self, uuid: str = DEFAULT_NODE_UUID, macs: Sequence[str] = (),
                 **fields: Any) -> FakeNode:
        """Register a node and its port MACs; its token is ``agent_token`` or random."""
        node = FakeNode(uuid, [mac.lower() for mac in macs], **fields)
        if self.agent_token is not None:
            node.token = self.agent_token
        self.nodes[uuid] = node
        return node

    def fail_lookups(self, times: int, code: int = 500) -> None:
        self._lookup_failures.extend([code] * times)

    def fail_heartbeats(self, times: int, code: int = 409) -> None:
        self._heartbeat_failures.extend([code] * times)

    def wait_for_heartbeats(self, count: int,
                            timeout: float | None = None) -> Deferred[list[Record]]:
        """Fires with ``heartbeats`` once it holds ``count`` of them (timeout: needs a clock)."""
        if len(self.heartbeats) >= count:
            return succeed(list(self.heartbeats))
        waiting: Deferred[list[Record]] = Deferred()
        self._waiters.append((count, waiting))
        if timeout is not None:
            if self._clock is None:
                raise ValueError("wait_for_heartbeats(timeout=) needs FakeIronic(clock=)")
            waiting.addTimeout(timeout, self._clock)
        return waiting

    # -- helpers ----------------------------------------------------------------------------
    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def _keep(self, record: Record) -> None:
        self.requests.append(record)
        if self._record is not None:
            self._record(record)

    @staticmethod
    def _headers(request: IRequest) -> dict[str, str]:
        return {name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
                for name, values in request.requestHeaders.getAllRawHeaders()}

    def _requested_version(self, request: IRequest) -> tuple[int, int]:
        header = request.getHeader(b"X-OpenStack-Ironic-API-Version")
        ours = _parse_version(self.version)
        if header is None:
            return (1, 1)
        text = header.decode("latin-1").strip()
        if text == "latest":
            return ours
        try:
            wanted = _parse_version(text)
        except ValueError:
            raise _Answer(406, "Invalid value for X-OpenStack-Ironic-API-Version header")
        if wanted > ours or wanted < (1, 1):
            raise _Answer(406, f"Version {text} was requested but the minor version is not "
                               f"supported by this service. The supported version range "
                               f"is: [1.1, {self.version}].")
        return wanted

    @staticmethod
    def _json(request: IRequest, status: int, body: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return body

    # -- routes -----------------------------------------------------------------------------
    @app.route("/", methods=["GET"])
    def root(self, request: IRequest) -> bytes:
        self._keep(Record("version", self._now(), 200, self._headers(request)))
        doc = {"name": "OpenStack Ironic API",
               "description": "Ironic is an OpenStack project which enables the provision and "
                              "management of baremetal machines.",
               "default_version": {"id": "v1", "version": self.version, "min_version": "1.1",
                                   "status": "CURRENT", "links": []},
               "versions": [{"id": "v1", "version": self.version, "min_version": "1.1",
                             "status": "CURRENT", "links": []}]}
        return self._json(request, 200, json.dumps(doc).encode())

    @app.route("/v1/lookup", methods=["GET"])
    def lookup(self, request: IRequest) -> bytes:
        args = request.args or {}
        addresses = [mac.strip().lower() for value in args.get(b"addresses", [])
                     for mac in value.decode("latin-1").split(",") if mac.strip()]
        uuids = args.get(b"node_uuid")
        node_uuid = uuids[0].decode("latin-1") if uuids else None
        record = Record("lookup", self._now(), 200, self._headers(request), addresses,
                        node_uuid)
        try:
            body = self._lookup(request, addresses, node_uuid)
        except _Answer as e:
            record.status = e.status
            body = e.body()
        self._keep(record)
        self.lookups.append(record)
        return self._json(request, record.status, body)

    def _lookup(self, request: IRequest, addresses: list[str], node_uuid: str | None) -> bytes:
        version = self._requested_version(request)
        if version < RAMDISK_ENDPOINTS_VERSION:
            raise _Answer(404, NOT_FOUND)
        if self._lookup_failures:
            self._fail(self._lookup_failures.pop(0), node_uuid or DEFAULT_NODE_UUID)
        if not addresses and not node_uuid:
            raise _Answer(400, "At least one of 'addresses' and 'node_uuid' parameters is "
                               "required")
        if node_uuid:
            node = self.nodes.get(node_uuid)
        else:
            node = next((n for n in self.nodes.values() if set(n.macs) & set(addresses)),
                        None)
        if node is None:
            raise _Answer(404, NOT_FOUND)
        return json.dumps(self._node_content(node, version)).encode()

    def _node_content(self, node: FakeNode, version: tuple[int, int]) -> dict[str, Any]:
        """Lookup's answer for ``node`` (continue_inspection's too), issuing its token."""
        token: str | None = None
        if version >= TOKENS_VERSION:
            token = MASKED_TOKEN if node.token_issued and not self.reissue_tokens \
                else node.token
            node.token_issued = True
        return {
            "node": {"uuid": node.uuid, "properties": node.properties,
                     "instance_info": node.instance_info,
                     "driver_internal_info": node.driver_internal_info},
            "config": {"heartbeat_timeout": self.heartbeat_timeout, "agent_token": token,
                       "agent_token_required": True,
                       "metrics": {"backend": "noop", "prepend_host": False,
                                   "prepend_uuid": False, "prepend_host_reverse": True,
                                   "global_prefix": None},
                       "metrics_statsd": {"statsd_host": "localhost", "statsd_port": 8125},
                       "agent_containers": IRONIC_39_CONTAINERS, **IRONIC_39_POLICY,
                       **self.lookup_config},
        }

    @app.route("/v1/continue_inspection", methods=["POST"])
    def continue_inspection(self, request: IRequest) -> bytes:
        record = Record("inspection", self._now(), 202, self._headers(request))
        try:
            body = self._continue_inspection(request, record)
        except _Answer as e:
            record.status = e.status
            body = e.body()
        self._keep(record)
        return self._json(request, record.status, body)

    def _continue_inspection(self, request: IRequest, record: Record) -> bytes:
        try:
            record.body = json.loads(request.content.read() if request.content else b"")
        except ValueError:
            raise _Answer(400, "Invalid data: the body is not JSON")
        version = self._requested_version(request)
        if version != (1, 1) and version < CONTINUE_INSPECTION_VERSION:
            raise _Answer(404, "API version 1.84 or newer is required")
        inventory = record.body.get("inventory") if isinstance(record.body, dict) else None
        interfaces = inventory.get("interfaces") if isinstance(inventory, dict) else None
        if not isinstance(interfaces, list) or not interfaces or not all(
                isinstance(i, dict) and isinstance(i.get("mac_address"), str)
                for i in interfaces):
            raise _Answer(400, "Invalid data: an inventory with interfaces, each with a "
                               "mac_address, is required")
        macs = {str(i["mac_address"]).lower() for i in interfaces}
        record.addresses = sorted(macs)
        node = next((n for n in self.nodes.values() if set(n.macs) & macs), None)
        if node is None:
            raise _Answer(404, NOT_FOUND)
        record.node_uuid = node.uuid
        if version == (1, 1):
            return json.dumps({"uuid": node.uuid}).encode()   # ironic-inspector's answer
        return json.dumps(self._node_content(node, version)).encode()

    @staticmethod
    def _fail(code: int, uuid: str) -> None:
        if code == 409:
            raise _Answer(409, f"Node {uuid} is locked by host fake-conductor, please retry "
                               f"after the current operation is completed.")
        raise _Answer(code, "Fake Ironic was told to fail this request.")

    @app.route("/v1/heartbeat/<string:node_ident>", methods=["POST"])
    def heartbeat(self, request: IRequest, node_ident: str) -> bytes:
        record = Record("heartbeat", self._now(), 202, self._headers(request),
                        node_uuid=node_ident)
        try:
            self._heartbeat(request, record, node_ident)
        except _Answer as e:
            record.status = e.status
            body = e.body()
        else:
            body = b""
        self._keep(record)
        if record.status == 202:
            self.heartbeats.append(record)
            for count, waiting in list(self._waiters):
                if len(self.heartbeats) >= count:
                    self._waiters.remove((count, waiting))
                    if not waiting.called:
                        waiting.callback(list(self.heartbeats))
            request.setResponseCode(202)
            return body
        return self._json(request, record.status, body)

    def _heartbeat(self, request: IRequest, record: Record, node_ident: str) -> None:
        try:
            record.body = json.loads(request.content.read() if request.content else b"")
        except ValueError:
            record.body = None      # Ironic reads no field from it
        version = self._requested_version(request)
        if version < RAMDISK_ENDPOINTS_VERSION:
            raise _Answer(404, NOT_FOUND)
        body = record.body if isinstance(record.body, dict) else {}
        if self._heartbeat_failures:
            self._fail(self._heartbeat_failures.pop(0), node_ident)
        if not isinstance(body.get("callback_url"), str):
            raise _Answer(400, "Missing mandatory parameter: callback_url")
        if body.get("agent_version") is not None and version < (1, 36):
            raise _Answer(400, 'Field "agent_version" not recognised')
        if body.get("agent_verify_ca") is not None and version < (1, 68):
            raise _Answer(400, 'Field "agent_verify_ca" not recognised in this version')
        node = self.nodes.get(node_ident)
        if node is None:
            raise _Answer(404, f"Node {node_ident} could not be found.")
        if _parse_version(self.version) < TOKENS_VERSION:
            return                    # an Ironic from before agent tokens checks none
        token = body.get("agent_token")
        if token is None:
            raise _Answer(400, "Agent token is required for heartbeat processing.")
        if body.get("agent_version") is None:
            raise _Answer(400, "Agent did not transmit a version, and a version is required. "
                               "Please update the agent being used.")
        if not node.token_issued or not secrets.compare_digest(str(token), node.token):
            raise _Answer(400, "Invalid or missing agent token received.")


def _json_lines(path: str) -> Callable[[Record], None]:
    def append(record: Record) -> None:
        # A small append per request; fine for a test fake.
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json()) + "\n")
    return append


async def _serve(reactor: Any, options: argparse.Namespace) -> None:
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.server import Site

    fake = FakeIronic(version=options.api_version, heartbeat_timeout=options.heartbeat_timeout,
                      agent_token=options.token, reissue_tokens=options.reissue_tokens,
                      clock=reactor, record=_json_lines(options.record) if options.record
                      else None, lookup_config=json.loads(options.lookup_config))
    fake.add_node(options.node_uuid, options.mac or [])
    if options.fail_lookups:
        fake.fail_lookups(options.fail_lookups, options.fail_code)
    port = await TCP4ServerEndpoint(reactor, options.port, interface="127.0.0.1").listen(
        Site(fake.app.resource()))
    print(f"listening on {port.getHost().port}", flush=True)
    await Deferred()  # until SIGTERM/SIGINT stops the reactor


def run_standalone(argv: Sequence[str] | None = None) -> None:
    """Serve a FakeIronic on 127.0.0.1 until killed (see the module docstring)."""
    from twisted.internet.task import react

    parser = argparse.ArgumentParser(prog="python -m ipa_twisted.testing.fake_ironic")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--mac", action="append", help="a port MAC of the node (repeat)")
    parser.add_argument("--node-uuid", default=DEFAULT_NODE_UUID)
    parser.add_argument("--heartbeat-timeout", type=float, default=300)
    parser.add_argument("--api-version", default=DEFAULT_VERSION)
    parser.add_argument("--token", default=None, help="the agent token (else random)")
    parser.add_argument("--reissue-tokens", action="store_true",
                        help="give the token on every lookup, not only the first")
    parser.add_argument("--fail-lookups", type=int, default=0)
    parser.add_argument("--fail-code", type=int, default=500)
    parser.add_argument("--record", default=None, help="append records as JSON lines here")
    parser.add_argument("--lookup-config", default="{}",
                        help="a JSON object added to the lookup answer's config")
    options = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    react(_serve, (options,))


if __name__ == "__main__":
    run_standalone()
