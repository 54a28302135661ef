"""Our ``twistd ipa`` driven by a real Ironic (``tests/ironic``): the wire protocol, end to end.

Needs ``.venv-ironic`` (``tests/ironic/setup-ironic.sh``, run by ``.ci/setup``) and root.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

import ipa_twisted
from tests.ironic.harness import RealIronic, skip_reason, start_agent
from tests.processes import Child, physical_macs, poll

HEARTBEAT_TIMEOUT = 10          # [api]ramdisk_heartbeat_timeout: the agent beats every 3-6 s


class RealIronicTests(TestCase):
    """Lookup, heartbeats and commands between a real conductor and our agent."""

    timeout = 240

    def setUp(self) -> None:
        reason = skip_reason()
        if reason:
            raise self.skipTest(reason)
        self.macs = physical_macs()
        if not self.macs:
            raise self.skipTest("this machine has no physical network interface to look up by")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def start_agent(self, ironic: RealIronic) -> Child:
        return start_agent(self, ironic, self.dir)

    async def test_fast_track_deploy_through_the_conductor(self) -> None:
        """Fast track: Ironic adopts a running agent, then deploys with ``custom-agent``
        (the agent's own deploy steps only, so nothing is written to disk). The conductor
        calls ``deploy.get_deploy_steps`` and ``standby.sync``, powers off (fake) and on."""
        ironic = RealIronic(os.path.join(self.dir, "ironic"), fast_track=True,
                            heartbeat_timeout=HEARTBEAT_TIMEOUT)
        started = reactor.seconds()
        await ironic.start()
        self.addCleanup(ironic.stop)
        print(f"\n  Ironic start-up: {reactor.seconds() - started:.1f}s")
        uuid = await ironic.enroll_node(self.macs, deploy_interface="custom-agent")

        # Lookup (allowed in "available" with fast track) and a heartbeat Ironic recorded.
        agent = self.start_agent(ironic)
        port = agent.port
        info = await poll(lambda: recorded_heartbeat(ironic, uuid), timeout=60, interval=0.25)
        # Ironic requires TLS by default: our automatic TLS makes that work.
        self.assertEqual(info["agent_url"], f"https://127.0.0.1:{port}")
        self.assertIn("agent_verify_ca", info)
        self.assertEqual(info["agent_secret_token"], "******")    # issued, and hidden
        self.assertEqual(info["agent_version"], ipa_twisted.__version__)
        await poll(lambda: recorded_heartbeat(ironic, uuid, after=info["agent_last_heartbeat"]),
                   timeout=3 * HEARTBEAT_TIMEOUT, interval=0.25)

        # A deploy: the conductor asks the agent for its deploy steps, then syncs it.
        await ironic.deploy(uuid)
        await self.assert_deployed(ironic, uuid, agent)

    async def test_deploy_waits_for_the_agent(self) -> None:
        """Without fast track, with lookup restricted to nodes waiting for an agent: the
        deploy reboots the (fake) machine and waits; the agent "boots", looks up, heartbeats,
        and the conductor carries the deploy through to ``active``."""
        ironic = RealIronic(os.path.join(self.dir, "ironic"), restrict_lookup=True,
                            heartbeat_timeout=HEARTBEAT_TIMEOUT)
        await ironic.start()
        self.addCleanup(ironic.stop)
        uuid = await ironic.enroll_node(self.macs, deploy_interface="custom-agent")
        await ironic.deploy(uuid)
        node = await ironic.wait_for_state(uuid, "wait call-back", timeout=30)
        self.assertNotIn("agent_url", node["driver_internal_info"])
        agent = self.start_agent(ironic)
        await self.assert_deployed(ironic, uuid, agent)

    async def assert_deployed(self, ironic: RealIronic, uuid: str, agent: Child) -> None:
        node = await ironic.wait_for_state(uuid, "active", timeout=90)
        self.assertIsNone(node["last_error"])
        self.assertEqual(node["power_state"], "power on")
        self.assertIn("generic_hardware_manager",
                      node["driver_internal_info"]["hardware_manager_version"])
        self.assertIn(b"Executing command deploy.get_deploy_steps", agent.output)
        self.assertIn(b"Executing command standby.sync", agent.output)
        # Powering the node off at the end of the deploy revokes the agent's token, as the
        # machine would reboot into its instance; our agent, still up, is then refused.
        errors = [line for line in ironic.log_lines("ERROR")
                  if "Invalid or missing agent_token received" not in line]
        self.assertEqual(errors, [])
        await agent.stop("TERM")
        self.assertTrue(agent.stopped_cleanly, agent.output[-2000:])


async def recorded_heartbeat(ironic: RealIronic, uuid: str,
                             after: object = None) -> dict[str, object]:
    """The node's driver_internal_info once Ironic recorded a heartbeat (later than
    ``after``, a previous ``agent_last_heartbeat``); else empty."""
    info: dict[str, object] = (await ironic.node(uuid))["driver_internal_info"]
    beat = info.get("agent_last_heartbeat")
    return info if beat is not None and beat != after else {}
