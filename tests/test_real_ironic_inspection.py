"""A real Ironic inspects a node through our agent (the ``agent`` inspect interface).

Ironic boots the (fake) machine into the ramdisk and waits; our agent, started with
``inspection_callback_url`` pointing at Ironic's ``/v1/continue_inspection``, collects the
inventory and posts it; Ironic stores it and the node returns to ``manageable``.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import TestCase

from tests.ironic.harness import skip_reason, start_agent, start_ironic
from tests.processes import Child, physical_macs


class RealIronicInspectionTests(TestCase):
    timeout = 180

    async def setUp(self) -> None:
        reason = skip_reason(macs=True)
        if reason:
            raise self.skipTest(reason)
        self.macs = physical_macs()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        # The fake boot interface cannot boot a ramdisk: the test starts the agent itself,
        # as an operator's own boot would (unmanaged inspection).
        self.ironic = await start_ironic(self, self.dir, restrict_lookup=True,
                                         heartbeat_timeout=10, options={
            "DEFAULT": {"default_inspect_interface": "agent"},
            "inspector": {"require_managed_boot": False, "add_ports": "all",
                          "hooks": "$default_hooks,memory"},
            "auto_discovery": {"enabled": True, "driver": "ipa-test"}})

    def start_agent(self) -> Child:
        return start_agent(self, self.ironic, self.dir, config=(
            f"inspection_callback_url = {self.ironic.api_url}/v1/continue_inspection\n"
            "inspection_collectors = default,pci-devices,numa-topology\n"))

    async def test_inventory_stored_by_ironic(self) -> None:
        uuid = await self.ironic.enroll_node(self.macs, state="manageable",
                                             inspect_interface="agent")
        node = await self.ironic.node(uuid)
        self.assertEqual(node["inspect_interface"], "agent", node)
        await self.ironic.set_provision_state(uuid, "inspect")
        await self.ironic.wait_for_state(uuid, "inspect wait", timeout=60)
        agent = self.start_agent()
        node = await self.ironic.wait_for_state(uuid, "manageable", timeout=120)
        self.assertIsNone(node["last_error"])
        _, data = await self.ironic.request("GET", f"/v1/nodes/{uuid}/inventory",
                                            expect=[200])
        inventory: dict[str, Any] = data["inventory"]
        macs = {i["mac_address"] for i in inventory["interfaces"]}
        self.assertTrue(set(self.macs) <= macs, macs)
        for field in ("cpu", "memory", "disks", "system_vendor", "boot", "hostname"):
            self.assertIn(field, inventory)
        self.assertIn("pci_devices", data["plugin_data"])
        self.assertGreater(inventory["memory"]["total"], 0)
        self.assertEqual(node["properties"].get("cpu_arch"), inventory["cpu"]["architecture"])
        self.assertIn(b"Inspection", agent.output)

    async def test_unknown_machine_enrolled_with_its_ports(self) -> None:
        """Auto-discovery: no node exists; Ironic creates one, with a port per MAC."""
        agent = self.start_agent()

        async def discovered() -> Any:
            _, body = await self.ironic.request("GET", "/v1/nodes?detail=true", expect=[200])
            return body["nodes"]

        from tests.processes import poll
        nodes = await poll(discovered, timeout=120, interval=0.5)
        self.assertEqual(len(nodes), 1)
        uuid = nodes[0]["uuid"]

        async def port_addresses() -> set[str]:
            _, ports = await self.ironic.request("GET", f"/v1/ports?node={uuid}",
                                                 expect=[200])
            return {p["address"] for p in ports["ports"]} & set(self.macs)

        try:
            addresses = await poll(port_addresses, timeout=60, interval=0.5)
        except AssertionError:
            self.fail(f"no ports created; node {await self.ironic.node(uuid)}"
                      f"{self.ironic.log_excerpt(30)}")
        self.assertEqual(addresses, set(self.macs))
        async def inventory() -> Any:
            code, body = await self.ironic.request("GET", f"/v1/nodes/{uuid}/inventory",
                                                   expect=[200, 404])
            return body if code == 200 else None

        data = await poll(inventory, timeout=60, interval=0.5)   # stored after the ports
        self.assertEqual(data["inventory"]["hostname"], os.uname().nodename)
        self.assertIn(b"Inspection", agent.output)
