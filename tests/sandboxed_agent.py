"""``python -m tests.sandboxed_agent SPEC``: run one agent command inside the disk sandbox.

Tests start this with ``run_in_sandbox`` (a private mount namespace whose /dev holds only
their loop devices; see ``ipa_twisted.testing.sandbox``), so every mount the agent makes
stays in there. SPEC is JSON:

- ``device``: the install device (a loop device) and ``boot_mode``: what the agent's
  boot mode is said to be (``bios`` or ``uefi``), both answered by ``LoopManager``;
- ``command`` and ``params``: the agent command to run (``image.install_bootloader``); or
  ``step`` and ``params`` to run a deploy step through ``deploy.execute_deploy_step`` with
  ``deploy.inject.inject_files`` as the manager's step; or ``call: "vmedia"`` to read virtual media
  parameters (``get_vmedia_params``);
- ``manager: "generic"`` with ``devices`` (loop device paths): the generic hardware manager
  instead, as the ramdisk runs it, through a LoopOnlyRunner (it lists and touches only
  ``devices``); ``clean_step`` (and ``interface``, default ``deploy``) runs that clean step
  through ``clean.execute_clean_step``;
- ``config``: AgentConfig fields; ``node``: the node the step is run for;
- ``private_run``: mount a tmpfs on /run first (tgtd's control socket lives there);
- ``log``: the agent's log lines go to stderr.

The result is printed as one JSON line: ``{"status", "result", "error"}``. Commands run
through a real ProcessRunner whose PATH is this process's: a test puts fakes (efibootmgr)
first on it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import globalLogBeginner, textFileLogObserver

from ipa_twisted.agent import Agent
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions import default_extensions
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.deploy.inject import INJECT_FILES_STEP, inject_files
from ipa_twisted.hardware.interface import HardwareManager
from ipa_twisted.blockdev.md import is_md_name
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.fake_managers import FixedDeviceManager
from ipa_twisted.testing.sandbox import LoopOnlyRunner


class LoopManager(FixedDeviceManager):
    """Installs on the given loop device; the boot mode is what the test says."""

    HARDWARE_MANAGER_NAME = "loop_manager"


class LoopAndMdRunner(LoopOnlyRunner):
    """Also lets programs name md devices (``/dev/md0``): the tests that use the generic
    manager give it a fake mdadm, and the sandbox's /dev holds no md device nodes."""

    def _allowed(self, path: str) -> bool:
        return super()._allowed(path) or is_md_name(path)


class InjectingLoopManager(LoopManager):
    def get_deploy_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        return [dict(INJECT_FILES_STEP)]

    async def inject_files(self, node: Any, ports: Any, files: Any = None,
                           verify_ca: bool = True) -> None:
        async def install_device() -> str:
            return self.get_os_install_device(node=node)
        await inject_files(self.context, node, ports, files, verify_ca,
                           install_device=install_device)


async def main(reactor: Any, spec: dict[str, Any]) -> None:
    if spec.get("log"):
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                         redirectStandardIO=False)
    runner = ProcessRunner(reactor, reactor)
    if spec.get("private_run"):
        await runner.execute("mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "tmpfs",
                             "/run")
    config = AgentConfig(**spec.get("config", {}))
    if spec.get("call") == "vmedia":
        from ipa_twisted.vmedia import get_vmedia_params
        try:
            found = await get_vmedia_params(runner, config)
        except Exception as e:
            print(json.dumps({"status": "FAILED", "result": None,
                              "error": {"type": type(e).__name__, "details": str(e)}}))
        else:
            print(json.dumps({"status": "SUCCEEDED", "result": found, "error": None}))
        return
    manager: HardwareManager
    if spec.get("manager") == "generic":
        runner = LoopAndMdRunner(runner, spec["devices"])
        manager = GenericHardwareManager()
    else:
        manager_class = InjectingLoopManager if "step" in spec else LoopManager
        manager = manager_class(spec["device"], spec.get("boot_mode", "bios"))
    agent = Agent(config, reactor, runner, managers=HardwareManagers([(manager, 3)]),
                  reactor=reactor, extensions=default_extensions())
    manager.bind(agent.hardware_context())
    params: dict[str, Any]
    if "clean_step" in spec:
        name = "clean.execute_clean_step"
        params = {"step": {"step": spec["clean_step"], "priority": 0,
                           "interface": spec.get("interface", "deploy"),
                           "args": spec.get("params", {})},
                  "node": spec.get("node", {"uuid": "sandboxed"}), "ports": []}
    elif "step" in spec:
        name = "deploy.execute_deploy_step"
        params = {"step": {"step": spec["step"], "priority": 0, "interface": "deploy",
                           "args": spec.get("params", {})},
                  "node": spec.get("node", {"uuid": "sandboxed"}), "ports": []}
    else:
        name, params = spec["command"], spec.get("params", {})
    result = await agent.execute_command(name, params)
    await result.wait()
    serialized = result.serialize()
    print(json.dumps({"status": serialized["command_status"],
                      "result": serialized["command_result"],
                      "error": serialized["command_error"]}, default=str))


if __name__ == "__main__":
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, json.loads(sys.argv[1]))))
