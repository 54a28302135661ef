"""What the agent relies on from Ironic's API, as one suite run against any Ironic.

``ironic_contract_tests(make_ironic)`` returns a ``TestCase`` class whose tests talk HTTP to
the Ironic that ``make_ironic(test)`` gives (an ``IronicUnderTest``): the same assertions run
against ``FakeIronic`` (in memory, through ``StubTreq``) and against the real Ironic 39 of
``tests/ironic/harness.py`` (``tests/test_ironic_contract.py`` makes both classes), so the
fake cannot drift from what it stands for. The shape follows txkube's
``kubernetes_client_tests(get_client)``.

Covered: the version document, version negotiation, lookup (answer shape, the policy keys
Ironic 39 sends, tokens given once then masked), heartbeat (accepted and refused, token
rules, fields per version), continue_inspection (lookup's answer, refusals) and the error
shape for unknown nodes and bad requests.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from twisted.trial.unittest import TestCase

from ipa_twisted.testing.fake_ironic import IRONIC_39_POLICY

AGENT_VERSION = "1.68"
"""The newest API version the agent asks for (ironic.client.MAX_KNOWN_VERSION)."""
VERSION_HEADER = "X-OpenStack-Ironic-API-Version"
UNKNOWN_UUID = "00000000-1111-4222-8333-444444444444"
LOOKUP_NODE_FIELDS = {"uuid", "properties", "instance_info", "driver_internal_info"}
LOOKUP_CONFIG_KEYS = {"heartbeat_timeout", "agent_token", "agent_token_required", "metrics",
                      "metrics_statsd", "agent_containers", *IRONIC_39_POLICY}
"""Every key of Ironic 39's lookup ``config`` (the agent reads each of them)."""


class IronicUnderTest(Protocol):
    """An Ironic the contract talks to."""

    async def request(self, method: str, path: str, *, version: str | None = AGENT_VERSION,
                      body: bytes | None = None) -> tuple[int, Any]:
        """``(status, decoded JSON body or None)``; ``version`` None sends no header."""

    async def add_node(self, macs: Sequence[str], inspecting: bool = False) -> str:
        """A node with ports for ``macs`` that lookup may find (``inspecting``: waiting for
        inspection data); its UUID."""


def fault(body: Any) -> dict[str, Any]:
    """The fault inside Ironic's error answer (``error_message`` is JSON in a string)."""
    if not isinstance(body, dict) or set(body) != {"error_message"}:
        raise AssertionError(f"not Ironic's error shape: {body!r}")
    inner: dict[str, Any] = json.loads(body["error_message"])
    return inner


def ironic_contract_tests(
        make_ironic: Callable[[TestCase], Awaitable[IronicUnderTest]]) -> type[TestCase]:
    """A TestCase class checking the Ironic that ``make_ironic(test)`` gives."""

    class IronicContractTests(TestCase):
        macs = ["52:54:00:aa:bb:01", "52:54:00:aa:bb:02"]

        async def ironic(self) -> tuple[IronicUnderTest, str]:
            ironic = await make_ironic(self)
            return ironic, await ironic.add_node(self.macs)

        def assert_fault(self, answer: tuple[int, Any], status: int,
                         message: str | None = None) -> dict[str, Any]:
            code, body = answer
            self.assertEqual(code, status, body)
            error = fault(body)
            self.assertEqual(set(error), {"faultstring", "faultcode", "debuginfo"})
            self.assertEqual(error["faultcode"], "Client" if status < 500 else "Server")
            if message is not None:
                self.assertEqual(error["faultstring"], message)
            return error

        async def lookup(self, ironic: IronicUnderTest, query: str,
                         version: str | None = AGENT_VERSION) -> tuple[int, Any]:
            return await ironic.request("GET", f"/v1/lookup?{query}", version=version)

        async def heartbeat(self, ironic: IronicUnderTest, uuid: str,
                            body: Mapping[str, Any] | bytes,
                            version: str = AGENT_VERSION) -> tuple[int, Any]:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            return await ironic.request("POST", f"/v1/heartbeat/{uuid}", version=version,
                                        body=data)

        # -- version discovery ----------------------------------------------------------
        async def test_version_document(self) -> None:
            ironic, _ = await self.ironic()
            code, doc = await ironic.request("GET", "/", version=None)
            self.assertEqual(code, 200)
            default = doc["default_version"]
            self.assertEqual((default["id"], default["min_version"], default["status"]),
                             ("v1", "1.1", "CURRENT"))
            major, minor = (int(part) for part in default["version"].split("."))
            self.assertGreaterEqual((major, minor), (1, 68), "older than the agent needs")
            self.assertIn(default["version"], [v["version"] for v in doc["versions"]])
            self.assertEqual(doc["name"], "OpenStack Ironic API")

        async def test_version_negotiation(self) -> None:
            ironic, _ = await self.ironic()
            query = f"addresses={self.macs[0]}"
            # No header: API 1.1, which has no ramdisk endpoints.
            self.assert_fault(await self.lookup(ironic, query, version=None), 404)
            self.assert_fault(await self.lookup(ironic, query, version="1.21"), 404)
            for version, message in [
                    ("1.999", "Version 1.999 was requested but the minor version is not "
                              "supported by this service. The supported version range is: "),
                    ("abc", "Invalid value for X-OpenStack-Ironic-API-Version header")]:
                code, body = await self.lookup(ironic, query, version=version)
                self.assertEqual(code, 406, body)
                inner = json.loads(body["error_message"])     # not a fault: another shape
                self.assertEqual((set(body), inner["code"], inner["title"]),
                                 ({"error_message"}, 406, "Not Acceptable"))
                self.assertTrue(inner["description"].startswith(message), inner)
            code, doc = await self.lookup(ironic, query, version="latest")
            self.assertEqual((code, doc["node"]["uuid"] is not None), (200, True))

        # -- lookup ---------------------------------------------------------------------
        async def test_lookup_answer(self) -> None:
            ironic, uuid = await self.ironic()
            code, doc = await self.lookup(ironic, f"addresses=52:54:00:00:00:99,{self.macs[1]}")
            self.assertEqual(code, 200, doc)
            self.assertEqual(set(doc), {"node", "config"})
            self.assertEqual(set(doc["node"]) - {"links"}, LOOKUP_NODE_FIELDS)
            self.assertEqual(doc["node"]["uuid"], uuid)
            for field in LOOKUP_NODE_FIELDS - {"uuid"}:
                self.assertIsInstance(doc["node"][field], dict, field)
            config = doc["config"]
            self.assertEqual(set(config), LOOKUP_CONFIG_KEYS)
            self.assertIs(config["agent_token_required"], True)
            self.assertIsInstance(config["heartbeat_timeout"], int)
            self.assertEqual(set(config["metrics"]), {"backend", "prepend_host", "prepend_uuid",
                                                      "prepend_host_reverse", "global_prefix"})
            self.assertEqual(set(config["metrics_statsd"]), {"statsd_host", "statsd_port"})
            # The policy with Ironic 39's defaults.
            self.assertEqual({key: config[key] for key in IRONIC_39_POLICY}, IRONIC_39_POLICY)
            code, by_uuid = await self.lookup(ironic, f"node_uuid={uuid}")
            self.assertEqual((code, by_uuid["node"]["uuid"]), (200, uuid))

        async def test_token_given_once_then_masked(self) -> None:
            ironic, uuid = await self.ironic()
            code, old = await self.lookup(ironic, f"addresses={self.macs[0]}", version="1.61")
            self.assertEqual((code, old["config"]["agent_token"]), (200, None))
            token = (await self.lookup(ironic, f"addresses={self.macs[0]}"))[1]["config"][
                "agent_token"]
            self.assertIsInstance(token, str)
            self.assertGreaterEqual(len(token), 32)
            again = (await self.lookup(ironic, f"node_uuid={uuid}"))[1]["config"]["agent_token"]
            self.assertEqual(again, "******")

        async def test_lookup_errors(self) -> None:
            ironic, _ = await self.ironic()
            self.assert_fault(await self.lookup(ironic, "addresses=52:54:00:00:00:99"), 404,
                              "Resource could not be found.")
            self.assert_fault(await self.lookup(ironic, f"node_uuid={UNKNOWN_UUID}"), 404,
                              "Resource could not be found.")
            self.assert_fault(await self.lookup(ironic, "addresses="), 400,
                              "At least one of 'addresses' and 'node_uuid' parameters is "
                              "required")

        # -- heartbeat ------------------------------------------------------------------
        async def test_heartbeat_refused(self) -> None:
            ironic, uuid = await self.ironic()
            url = "http://127.0.0.1:9999"
            self.assert_fault(await self.heartbeat(ironic, UNKNOWN_UUID, {
                "callback_url": url, "agent_token": "x" * 43, "agent_version": "1"}),
                404, f"Node {UNKNOWN_UUID} could not be found.")
            # A token is always required, and none is valid before lookup issued one.
            self.assert_fault(await self.heartbeat(ironic, uuid, {
                "callback_url": url, "agent_version": "1"}),
                400, "Agent token is required for heartbeat processing.")
            self.assert_fault(await self.heartbeat(ironic, uuid, {
                "callback_url": url, "agent_token": "x" * 43, "agent_version": "1"}),
                400, "Invalid or missing agent token received.")
            token = (await self.lookup(ironic, f"node_uuid={uuid}"))[1]["config"][
                "agent_token"]
            self.assert_fault(await self.heartbeat(ironic, uuid, {
                "callback_url": url, "agent_token": token[::-1], "agent_version": "1"}),
                400, "Invalid or missing agent token received.")
            # Fields a version does not know, and a missing agent version.
            self.assert_fault(await self.heartbeat(ironic, uuid, {
                "callback_url": url, "agent_token": token, "agent_version": "1"},
                version="1.35"), 400, 'Field "agent_version" not recognised')
            self.assert_fault(await self.heartbeat(ironic, uuid, {
                "callback_url": url, "agent_token": token, "agent_version": "1",
                "agent_verify_ca": "pem"}, version="1.67"),
                400, 'Field "agent_verify_ca" not recognised in this version')
            self.assert_fault(await self.heartbeat(ironic, uuid, {
                "callback_url": url, "agent_token": token}), 400,
                "Agent did not transmit a version, and a version is required. Please update "
                "the agent being used.")
            for body in ({"agent_token": token, "agent_version": "1"}, b"{"):
                self.assert_fault(await self.heartbeat(ironic, uuid, body), 400,
                                  "Missing mandatory parameter: callback_url")

        async def test_heartbeat_accepted(self) -> None:
            ironic, uuid = await self.ironic()
            token = (await self.lookup(ironic, f"addresses={self.macs[0]}"))[1]["config"][
                "agent_token"]
            code, body = await self.heartbeat(ironic, uuid, {
                "callback_url": "http://127.0.0.1:9999", "agent_token": token,
                "agent_version": "10.0.0"})
            self.assertEqual((code, body), (202, None))

        # -- continue_inspection --------------------------------------------------------
        async def test_continue_inspection(self) -> None:
            ironic = await make_ironic(self)
            uuid = await ironic.add_node(self.macs, inspecting=True)

            async def post(data: Any, version: str | None = "1.84") -> tuple[int, Any]:
                return await ironic.request("POST", "/v1/continue_inspection",
                                            version=version, body=json.dumps(data).encode())

            def inventory(*macs: str) -> dict[str, Any]:
                return {"inventory": {"interfaces": [{"mac_address": mac, "name": f"eth{i}"}
                                                     for i, mac in enumerate(macs)],
                                      "bmc_address": None}}

            self.assert_fault(await post({"inventory": {}}), 400)
            self.assert_fault(await post(inventory("52:54:00:00:00:99")), 404,
                              "Resource could not be found.")
            self.assert_fault(await post(inventory(self.macs[0]), version="1.83"), 404)
            code, doc = await post(inventory("52:54:00:00:00:98", self.macs[1]))
            self.assertEqual(code, 202, doc)
            self.assertEqual(set(doc), {"node", "config"})
            self.assertEqual(set(doc["node"]) - {"links"}, LOOKUP_NODE_FIELDS)
            self.assertEqual(doc["node"]["uuid"], uuid)
            self.assertEqual(set(doc["config"]), LOOKUP_CONFIG_KEYS)
            self.assertIsInstance(doc["config"]["agent_token"], str)
            self.assertGreaterEqual(len(doc["config"]["agent_token"]), 32)

    return IronicContractTests
