"""The fake inspection receivers answer as ironic-inspector and Ironic do."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.testing.fake_inspector import DEFAULT_NODE_UUID, FakeInspectionReceiver

MAC = "52:54:00:12:34:56"


def data(mac: Any = MAC, **inventory: Any) -> bytes:
    return json.dumps({"inventory": {"interfaces": [{"name": "eth0", "mac_address": mac}],
                                     **inventory}}).encode()


class FakeReceiverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.receiver = FakeInspectionReceiver()
        self.receiver.add_node(macs=[MAC.upper()], bmc_addresses=["10.0.0.5"])
        self.http = StubTreq(self.receiver.app.resource())

    def call(self, path: str, body: bytes, version: str | None = None) -> tuple[int, Any]:
        headers = {"X-OpenStack-Ironic-API-Version": version} if version else {}
        response = self.successResultOf(self.http.post(f"http://r{path}", data=body,
                                                       headers=headers))
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_inspector(self) -> None:
        self.assertEqual(self.call("/v1/continue", data()), (200, {"uuid": DEFAULT_NODE_UUID}))
        code, body = self.call("/v1/continue", data("00:00:00:00:00:01"))
        self.assertEqual(code, 404)
        self.assertIn("Could not find a node", body["error"]["message"])
        self.assertEqual(self.call("/v1/continue", b"{")[0], 400)

    def test_ironic_by_version(self) -> None:
        self.assertEqual(self.call("/v1/continue_inspection", data()),
                         (202, {"uuid": DEFAULT_NODE_UUID}))
        code, body = self.call("/v1/continue_inspection", data(), "1.84")
        self.assertEqual((code, body["node"]["uuid"]), (202, DEFAULT_NODE_UUID))
        self.assertEqual(body["config"]["heartbeat_timeout"], 300)
        self.assertEqual(self.call("/v1/continue_inspection", data(), "1.68")[0], 404)

    def test_ironic_validates_like_ironic(self) -> None:
        code, body = self.call("/v1/continue_inspection", data(None), "1.84")
        self.assertEqual(code, 400)
        self.assertIn("mac_address", json.loads(body["error_message"])["faultstring"])
        self.assertEqual(self.call("/v1/continue_inspection", b"{}", "1.84")[0], 400)

    def test_bmc_lookup_and_accept_any(self) -> None:
        self.assertEqual(self.call("/v1/continue", data("00:00:00:00:00:01",
                                                        bmc_address="10.0.0.5"))[0], 200)
        self.receiver.accept_any = True
        self.assertEqual(self.call("/v1/continue", data("00:00:00:00:00:01"))[0], 200)

    def test_injected_failures_and_records(self) -> None:
        self.receiver.fail(503)
        self.assertEqual(self.call("/v1/continue_inspection", data(), "1.84")[0], 503)
        self.assertEqual(self.call("/v1/continue_inspection", data(), "1.84")[0], 202)
        self.assertEqual([(p.path, p.status) for p in self.receiver.posts],
                         [("/v1/continue_inspection", 503), ("/v1/continue_inspection", 202)])
        self.assertEqual(self.receiver.posts[1].headers["x-openstack-ironic-api-version"],
                         "1.84")
