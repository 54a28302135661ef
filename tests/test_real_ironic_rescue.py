"""A real Ironic rescues and unrescues a node through our agent (``agent`` rescue).

The node is deployed (``custom-agent``: nothing written to disk), then rescued: Ironic
boots the (fake) machine into the ramdisk, our agent looks up and heartbeats, Ironic sends
``rescue.finalize_rescue``; the agent writes the crypted password under its ``etc_path``
and stops. Unrescue brings the node back to ``active``.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from ipa_twisted.passwords import sha512_crypt
from tests.ironic.harness import skip_reason, start_agent, start_ironic
from tests.processes import Child, physical_macs, poll


class RealIronicRescueTests(TestCase):
    timeout = 240

    async def setUp(self) -> None:
        reason = skip_reason(macs=True)
        if reason:
            raise self.skipTest(reason)
        self.macs = physical_macs()
        self.dir = os.path.abspath(self.mktemp())
        self.etc = os.path.join(self.dir, "etc")
        os.makedirs(self.etc)
        self.ironic = await start_ironic(self, self.dir, restrict_lookup=True,
                                         heartbeat_timeout=10)

    def start_agent(self, name: str) -> Child:
        return start_agent(self, self.ironic, self.dir, name=name,
                           config=f"etc_path = {self.etc}\n")

    async def test_rescue_and_unrescue(self) -> None:
        uuid = await self.ironic.enroll_node(self.macs, deploy_interface="custom-agent",
                                             rescue_interface="agent",
                                             boot_interface="fake-rescue")
        await self.ironic.deploy(uuid)
        await self.ironic.wait_for_state(uuid, "wait call-back", timeout=60)
        deploying = self.start_agent("deploy")
        await self.ironic.wait_for_state(uuid, "active", timeout=90)
        await deploying.stop("TERM")   # the machine reboots into its instance

        await self.ironic.set_provision_state(uuid, "rescue", rescue_password="p455w0rd")
        await self.ironic.wait_for_state(uuid, "rescue wait", timeout=60)
        rescuing = self.start_agent("rescue")
        node = await self.ironic.wait_for_state(uuid, "rescue", timeout=90)
        self.assertIsNone(node["last_error"])
        self.assertIn(b"Executing command rescue.finalize_rescue", rescuing.output)
        with open(os.path.join(self.etc, "ipa-rescue-config", "ipa-rescue-password")) as f:
            crypted = f.read()
        # Ironic sends the password already crypted (hashed=True; SHA-256 crypt by
        # default): the agent stores it as it came. A SHA-512 crypt is checked fully.
        self.assertRegex(crypted, r"^\$[56]\$")
        if crypted.startswith("$6$") and "rounds=" not in crypted:
            self.assertEqual(sha512_crypt("p455w0rd", crypted.split("$")[2]), crypted)
        # The agent stops once it has answered, so the tenant network never sees its API.
        await poll(lambda: rescuing.ended.called, timeout=15)
        self.assertTrue(rescuing.stopped_cleanly, rescuing.output[-2000:])

        await self.ironic.set_provision_state(uuid, "unrescue")
        node = await self.ironic.wait_for_state(uuid, "active", timeout=60)
        self.assertIsNone(node["last_error"])
