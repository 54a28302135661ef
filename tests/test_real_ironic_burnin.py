"""A real Ironic runs the ``burnin_cpu`` step through our agent: as a manual clean step and
as a service step.

Manual cleaning: a ``manageable`` node is asked to ``clean`` with ``deploy.burnin_cpu``;
Ironic waits in ``clean wait``, the agent (started then, as a booting ramdisk would be)
looks up, Ironic fetches its clean steps, checks the requested one against them and runs it:
stress-ng burns one CPU for the node's ``agent_burnin_cpu_timeout`` (2 s), and the node goes
back to ``manageable``. Servicing: the node is deployed (``custom-agent``: nothing written),
then serviced with the same step, and goes back to ``active``. The agents run in the disk
sandbox on a loop device (the node's install disk), as in ``test_real_ironic_service``.
"""

from __future__ import annotations


from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.ironic.harness import set_up_one_disk_node, start_agent
from tests.processes import Child, physical_macs

SERVICE_VERSION = "1.87"
DISK_SIZE = 64 * 1024 * 1024
BURNIN = {"agent_burnin_cpu_timeout": 2, "agent_burnin_cpu_cpu": 1}
STEP = {"interface": "deploy", "step": "burnin_cpu"}


class RealIronicBurnInTests(TestCase):
    timeout = 300

    async def setUp(self) -> None:
        await set_up_one_disk_node(self, DISK_SIZE, ("stress-ng",))

    def start_agent(self, name: str) -> Child:
        return start_agent(self, self.ironic, self.dir, name=name, sandbox=[self.loop])

    def assert_burnt_in(self, agent: Child) -> None:
        output = agent.output.decode(errors="replace")
        self.assertIn("Burn-in burnin_cpu: running ['stress-ng', '--cpu', '1', '--timeout', "
                      "'2', '--metrics-brief']", output)
        self.assertRegex(output, r"(?s)stress-ng \(cpu\) passed: .*dispatching hogs: 1 cpu.*"
                         r"successful run completed")

    async def test_manual_clean_step(self) -> None:
        uuid = await self.ironic.enroll_node(physical_macs(), driver_info=BURNIN,
                                             state="manageable")
        started = reactor.seconds()
        await self.ironic.set_provision_state(uuid, "clean", clean_steps=[STEP])
        await self.ironic.wait_for_state(uuid, "clean wait", timeout=60)
        agent = self.start_agent("clean")
        node = await self.ironic.wait_for_state(uuid, "manageable", timeout=180)
        print(f"\n  manual clean with burnin_cpu: {reactor.seconds() - started:.1f}s")
        self.assertIsNone(node["last_error"])
        self.assertIn(b"Executing command clean.execute_clean_step", agent.output)
        self.assert_burnt_in(agent)

    async def test_service_step(self) -> None:
        uuid = await self.ironic.enroll_node(
            physical_macs(), driver_info=BURNIN, deploy_interface="custom-agent",
            properties={"root_device": {"name": self.loop.path}})
        await self.ironic.deploy(uuid)
        await self.ironic.wait_for_state(uuid, "wait call-back", timeout=60)
        deploying = self.start_agent("deploy")
        await self.ironic.wait_for_state(uuid, "active", timeout=90)
        await deploying.stop("TERM")
        await self.ironic.request("PUT", f"/v1/nodes/{uuid}/states/provision",
                                  {"target": "service", "service_steps": [STEP]},
                                  microversion=SERVICE_VERSION, expect=[202])
        await self.ironic.wait_for_state(uuid, "service wait", timeout=60)
        servicing = self.start_agent("service")
        node = await self.ironic.wait_for_state(uuid, "active", timeout=120)
        self.assertIsNone(node["last_error"])
        self.assertIn(b"Executing command service.execute_service_step", servicing.output)
        self.assert_burnt_in(servicing)
