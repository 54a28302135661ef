"""The example hardware managers load as plugins and their steps run through the agent."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted.agent import Agent
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions import default_extensions
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


def _can_build_wheels_offline() -> bool:
    """Whether this Python's setuptools makes wheels without downloading anything.

    setuptools 70.1 and later have ``bdist_wheel`` built in; older ones need ``wheel``.
    """
    import setuptools
    try:
        major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


class PackagingTests(TestCase):
    """Each example installs from its pyproject.toml, offline, and is then found as a plugin."""

    async def run_child(self, argv: list[str], env: dict[str, str] | None = None) -> bytes:
        child = Child(argv, env=env)
        code = await child.ended
        self.assertEqual(code, 0, child.output.decode(errors="replace")[-3000:])
        return child.output

    async def test_installed_examples_found_by_get_plugins(self) -> None:
        work = os.path.abspath(self.mktemp())
        targets = {}
        for example in ("business_logic", "custom_disk_erase"):
            # One directory each: pip --target does not merge into an existing twisted/.
            target = targets[example] = os.path.join(work, "site-" + example)
            # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
            source = os.path.join(work, example)
            shutil.copytree(os.path.join(EXAMPLES, example), source,
                            ignore=shutil.ignore_patterns("__pycache__", "dropin.cache",
                                                          "build", "*.egg-info"))
            if _can_build_wheels_offline():
                await self.run_child([sys.executable, "-m", "pip", "install", "-q",
                                      "--no-deps", "--no-build-isolation", "--no-index",
                                      "--disable-pip-version-check", "--target", target,
                                      source])
            else:
                # No bdist_wheel here (setuptools < 70.1 without wheel): let setuptools lay
                # out, from the same pyproject.toml, the files a wheel would hold.
                await self.run_child([sys.executable, "-W", "ignore", "-c",
                                      "import os, sys\n"
                                      "os.chdir(sys.argv.pop(1))\n"
                                      "from setuptools import setup\n"
                                      "setup()", source, "-q", "build_py",
                                      "--build-lib", target])
        plugins = os.path.join(targets["business_logic"], "twisted", "plugins")
        self.assertTrue(os.path.exists(os.path.join(plugins, "companyx_hardware.py")))
        for target in targets.values():
            self.assertFalse(os.path.exists(os.path.join(target, "twisted", "__init__.py")))
            self.assertFalse(os.path.exists(os.path.join(target, "twisted", "plugins",
                                                         "__init__.py")))
        # The repository's examples are not on this path: only the installed copies are.
        env = {"PATH": os.environ["PATH"],
               "PYTHONPATH": os.pathsep.join([*targets.values(), ROOT])}
        output = await self.run_child(
            [sys.executable, "-c",
             "from twisted.plugin import getPlugins\n"
             "import twisted.plugins, sys\n"
             "from ipa_twisted.hardware.interface import IHardwareManager\n"
             "for p in getPlugins(IHardwareManager, twisted.plugins):\n"
             "    print(type(p).__name__, sys.modules[type(p).__module__].__file__)\n"],
            env=env)
        lines = output.decode().splitlines()
        for example, name in (("business_logic", "BusinessLogicHardwareManager"),
                              ("custom_disk_erase", "ExampleDiskEraseHardwareManager")):
            found = [line for line in lines if line.startswith(name + " ")]
            self.assertEqual(len(found), 1, output)
            self.assertTrue(found[0].split(" ", 1)[1].startswith(targets[example] + os.sep),
                            found[0])
        self.assertTrue(any(line.startswith("GenericHardwareManager ") for line in lines),
                        output)


class BusinessLogicTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "sys", "class", "dmi", "id"))
        os.makedirs(os.path.join(self.root, "etc"))
        config = AgentConfig(sys_path=os.path.join(self.root, "sys"),
                             etc_path=os.path.join(self.root, "etc"))
        self.agent = Agent(config, Clock(), FakeRunner(),  # type: ignore[arg-type]
                           extensions=default_extensions())
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
        agent = Agent(AgentConfig(), Clock(), runner,  # type: ignore[arg-type]
                      extensions=default_extensions())
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
