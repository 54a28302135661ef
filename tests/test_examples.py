"""The example hardware managers load as plugins and their steps run through the agent."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted.agent import Agent
from ipa_twisted.config import AgentConfig
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.inventory import BlockDevice
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from tests.processes import ROOT, Child

EXAMPLES = os.path.join(ROOT, "examples")
sys.path[:0] = [os.path.join(EXAMPLES, "business_logic"),
                os.path.join(EXAMPLES, "custom_disk_erase")]

from business_logic_manager import BusinessLogicHardwareManager  # noqa: E402
from custom_disk_erase_manager import ExampleDiskEraseHardwareManager  # noqa: E402


class PluginDiscoveryTests(TestCase):
    async def test_found_by_get_plugins(self) -> None:
        env = {"PATH": os.environ["PATH"],
               "PYTHONPATH": os.pathsep.join([os.path.join(EXAMPLES, "business_logic"),
                                              ROOT])}
        child = Child([sys.executable, "-c",
                       "from twisted.plugin import getPlugins\n"
                       "import twisted.plugins\n"
                       "from ipa_twisted.hardware.interface import IHardwareManager\n"
                       "print(sorted(type(p).__name__ for p in "
                       "getPlugins(IHardwareManager, twisted.plugins)))"], env=env)
        await child.ended
        self.assertIn(b"BusinessLogicHardwareManager", child.output)
        self.assertIn(b"GenericHardwareManager", child.output)


class BusinessLogicTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "sys", "class", "dmi", "id"))
        os.makedirs(os.path.join(self.root, "etc"))
        config = AgentConfig(sys_path=os.path.join(self.root, "sys"),
                             etc_path=os.path.join(self.root, "etc"))
        self.agent = Agent(config, Clock(), FakeRunner())  # type: ignore[arg-type]
        manager = BusinessLogicHardwareManager()
        manager.bind(self.agent.hardware_context())
        self.agent.set_managers(HardwareManagers([(manager, 3)]))

    def run_cmd(self, name: str, **params: Any) -> Any:
        result = self.successResultOf(Deferred.fromCoroutine(
            self.agent.execute_command(name, params)))
        return result

    def set_vendor(self, vendor: str) -> None:
        with open(os.path.join(self.root, "sys", "class", "dmi", "id", "sys_vendor"), "w") as f:
            f.write(vendor + "\n")

    def test_clean_step_checks_vendor(self) -> None:
        steps = self.run_cmd("clean.get_clean_steps", node={}, ports=[]).command_result
        self.assertEqual(steps["hardware_manager_version"], {"CompanyXHardwareManager": "1.0"})
        self.set_vendor("OtherCorp")
        step = {"step": "companyx_verify_device_lifecycle"}
        result = self.run_cmd("clean.execute_clean_step", step=step, node={}, ports=[])
        self.assertEqual(result.command_error.type, "CleaningError")
        self.set_vendor("CompanyX")
        result = self.run_cmd("clean.execute_clean_step", step=step, node={}, ports=[])
        self.assertEqual(result.command_result["clean_result"], "device lifecycle verified")

    def test_deploy_step_with_arguments(self) -> None:
        result = self.run_cmd("deploy.execute_deploy_step",
                              step={"step": "write_motd", "args": {"text": "hello"}},
                              node={}, ports=[])
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.serialize())
        with open(os.path.join(self.root, "etc", "motd")) as f:
            self.assertEqual(f.read(), "hello\n")


class DiskEraseTests(SynchronousTestCase):
    def test_only_its_vendor(self) -> None:
        runner = FakeRunner({("acme-erase",): Exit(0, stdout=b"erased")})
        agent = Agent(AgentConfig(), Clock(), runner)  # type: ignore[arg-type]
        manager = ExampleDiskEraseHardwareManager()
        manager.bind(agent.hardware_context())
        self.assertEqual(manager.evaluate_hardware_support(), 2)
        magic = BlockDevice(name="/dev/sdb", model="MagicStore", size=1, rotational=False)
        other = BlockDevice(name="/dev/sdc", model="Other", size=1, rotational=False)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(
            manager.erase_block_device({}, magic))), "erased")
        from ipa_twisted.errors import IncompatibleHardwareMethodError
        self.failureResultOf(Deferred.fromCoroutine(manager.erase_block_device({}, other)),
                             IncompatibleHardwareMethodError)
