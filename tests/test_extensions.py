"""The extensions' commands on fake hardware managers: clean, deploy, poll, standby, log."""

from __future__ import annotations

import base64
import gzip
import io
import tarfile
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted import errors
from ipa_twisted.agent import Agent
from ipa_twisted.commands import CommandResult
from ipa_twisted.config import AgentConfig
from ipa_twisted.context import Deployment
from ipa_twisted.encoding import to_jsonable
from ipa_twisted.extensions import default_extensions
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.inventory import NetworkInterface
from ipa_twisted.testing.fake_process import Exit, FakeRunner

NODE = {"uuid": "n-1", "properties": {}}


class Vendor:
    HARDWARE_MANAGER_NAME = "vendor"
    HARDWARE_MANAGER_VERSION = "2.0"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def evaluate_hardware_support(self) -> int:
        return 3

    def get_clean_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        return [{"step": "flash", "priority": 10, "interface": "deploy",
                 "reboot_requested": False, "abortable": False},
                {"step": "shared", "priority": 1, "interface": "deploy"}]

    def get_deploy_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        return [{"step": "write_file", "priority": 0, "interface": "deploy",
                 "argsinfo": {"path": {"required": True}}}]

    async def flash(self, node: Any, ports: Any, **kwargs: Any) -> str:
        self.calls.append(("flash", kwargs))
        return "flashed"

    def shared(self, node: Any, ports: Any) -> None:
        raise errors.IncompatibleHardwareMethodError("not here")

    def write_file(self, node: Any, ports: Any, path: str) -> tuple[str, int]:
        self.calls.append(("write_file", path))
        return (path, 1)


class Generic:
    HARDWARE_MANAGER_NAME = "generic"
    HARDWARE_MANAGER_VERSION = "1.1"

    def evaluate_hardware_support(self) -> int:
        return 1

    def get_clean_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        return [{"step": "shared", "priority": 50, "interface": "deploy"},
                {"step": "explode", "priority": 5, "interface": "deploy"}]

    def shared(self, node: Any, ports: Any) -> str:
        return "generic did it"

    def explode(self, node: Any, ports: Any) -> None:
        raise OSError("disk on fire")

    def list_hardware_info(self) -> dict[str, Any]:
        return {"interfaces": [NetworkInterface(name="eth0", mac_address="aa:bb:cc:dd:ee:ff")],
                "hostname": "node"}


class ExtensionTestCase(SynchronousTestCase):
    standalone = False

    def setUp(self) -> None:
        self.vendor, self.generic = Vendor(), Generic()
        self.managers = HardwareManagers([(self.vendor, 3), (self.generic, 1)])
        self.runner = FakeRunner()
        self.agent = Agent(AgentConfig(standalone=self.standalone), Clock(),
                           self.runner, managers=self.managers,  # type: ignore[arg-type]
                           extensions=default_extensions())

    def run_command(self, name: str, **params: Any) -> CommandResult:
        result: CommandResult = self.successResultOf(
            Deferred.fromCoroutine(self.agent.execute_command(name, params)))
        self.successResultOf(result.wait())
        return result

    def versions(self) -> dict[str, str]:
        return {"vendor": "2.0", "generic": "1.1"}


class CleanTests(ExtensionTestCase):
    def test_get_clean_steps_deduplicated_with_versions(self) -> None:
        result = self.run_command("clean.get_clean_steps", node=NODE, ports=[])
        steps = result.command_result["clean_steps"]
        self.assertEqual(sorted(s["step"] for s in steps["vendor"]), ["flash", "shared"])
        self.assertEqual([s["step"] for s in steps["generic"]], ["explode"])
        self.assertEqual(result.command_result["hardware_manager_version"], self.versions())

    def test_execute_clean_step(self) -> None:
        step = {"step": "flash", "priority": 10, "interface": "deploy",
                "args": {"image": "v2"}}
        result = self.run_command("clean.execute_clean_step", step=step, node=NODE, ports=[],
                                  clean_version=self.versions())
        self.assertEqual(result.command_status.value, "SUCCEEDED")
        self.assertEqual(result.command_result, {"clean_result": "flashed", "clean_step": step})
        self.assertEqual(self.vendor.calls, [("flash", {"image": "v2"})])

    def test_incompatible_falls_through_to_next_manager(self) -> None:
        result = self.run_command("clean.execute_clean_step",
                                  step={"step": "shared"}, node=NODE, ports=[])
        self.assertEqual(result.command_result["clean_result"], "generic did it")

    def test_version_mismatch(self) -> None:
        result = self.run_command("clean.execute_clean_step", step={"step": "flash"},
                                  node=NODE, ports=[],
                                  clean_version={"vendor": "1.0", "generic": "1.1"})
        self.assertEqual(result.command_status.value, "CLEAN_VERSION_MISMATCH")
        self.assertIsInstance(result.command_error, errors.VersionMismatch)

    def test_old_list_version_format_accepted(self) -> None:
        result = self.run_command("clean.execute_clean_step", step={"step": "flash"},
                                  node=NODE, ports=[], clean_version=[
                                      {"name": "vendor", "version": "2.0"},
                                      {"name": "generic", "version": "1.1"}])
        self.assertEqual(result.command_status.value, "SUCCEEDED")

    def test_failing_step_is_cleaning_error(self) -> None:
        result = self.run_command("clean.execute_clean_step", step={"step": "explode"},
                                  node=NODE, ports=[])
        self.assertEqual(result.command_status.value, "FAILED")
        assert result.command_error is not None
        self.assertEqual(result.command_error.type, "CleaningError")
        self.assertIn("disk on fire", result.command_error.details)

    def test_unadvertised_step_is_refused(self) -> None:
        for name in ("list_hardware_info", "evaluate_hardware_support"):
            result = self.run_command("clean.execute_clean_step", step={"step": name},
                                      node=NODE, ports=[])
            self.assertEqual(result.command_status.value, "FAILED")
            assert result.command_error is not None
            self.assertIn("no hardware manager offers it", result.command_error.details)

    def test_malformed_step_is_400(self) -> None:
        for step in ({}, {"step": ""}, {"step": "_private"}, {"step": "flash", "args": [1]}):
            failure = self.failureResultOf(Deferred.fromCoroutine(self.agent.execute_command(
                "clean.execute_clean_step", {"step": step, "node": NODE, "ports": []})))
            self.assertIsInstance(failure.value, errors.InvalidCommandParamsError)


class DeployTests(ExtensionTestCase):
    def test_get_and_execute_deploy_steps(self) -> None:
        steps = self.run_command("deploy.get_deploy_steps", node=NODE, ports=[])
        self.assertEqual(steps.command_result["deploy_steps"]["vendor"][0]["step"],
                         "write_file")
        result = self.run_command("deploy.execute_deploy_step",
                                  step={"step": "write_file", "args": {"path": "/x"}},
                                  node=NODE, ports=[], deploy_version=self.versions())
        self.assertEqual(result.command_result["deploy_result"], ["/x", 1])

    def test_failure_is_deployment_error(self) -> None:
        result = self.run_command("deploy.execute_deploy_step",
                                  step={"step": "write_file"}, node=NODE, ports=[])
        self.assertEqual(result.command_status.value, "FAILED")
        assert result.command_error is not None
        self.assertEqual(result.command_error.type, "DeploymentError")


class PollTests(ExtensionTestCase):
    def test_get_hardware_info(self) -> None:
        result = self.run_command("poll.get_hardware_info")
        self.assertEqual(result.command_result["interfaces"][0]["mac_address"],
                         "aa:bb:cc:dd:ee:ff")

    def test_set_node_info_refused_unless_standalone(self) -> None:
        failure = self.failureResultOf(Deferred.fromCoroutine(self.agent.execute_command(
            "poll.set_node_info", {"node_info": {"node": {"uuid": "x"}}})))
        self.assertIsInstance(failure.value, errors.InvalidCommandError)


class StandalonePollTests(ExtensionTestCase):
    standalone = True

    def test_set_node_info_adopts_node_and_token(self) -> None:
        result = self.run_command("poll.set_node_info", node_info={
            "node": {"uuid": "n-9"}, "config": {"agent_token": "z" * 32,
                                                "heartbeat_timeout": 42}})
        self.assertEqual(result.command_status.value, "SUCCEEDED")
        self.assertEqual(self.agent.get_node_uuid(), "n-9")
        self.assertEqual(self.agent.heartbeat_timeout, 42)
        self.assertTrue(self.agent.validate_agent_token("z" * 32))
        self.assertEqual(self.managers.cached_node["uuid"], "n-9")

    def test_set_node_info_validates(self) -> None:
        for info in (None, {"node": {}}, {"node": {"uuid": "x"}, "config": []}):
            failure = self.failureResultOf(Deferred.fromCoroutine(self.agent.execute_command(
                "poll.set_node_info", {"node_info": info})))
            self.assertIsInstance(failure.value, errors.InvalidContentError)


class StandbyTests(ExtensionTestCase):
    def test_sync_runs_sync(self) -> None:
        self.runner = FakeRunner({("sync",): Exit(0)})
        self.agent.runner = self.runner  # type: ignore[assignment]
        result = self.run_command("standby.sync")
        self.assertEqual(result.command_status.value, "SUCCEEDED")
        self.assertEqual([c.argv for c in self.runner.calls], [("sync",)])

    def test_sync_failure(self) -> None:
        self.runner = FakeRunner({("sync",): Exit(1, stderr=b"I/O error")})
        self.agent.runner = self.runner  # type: ignore[assignment]
        result = self.run_command("standby.sync")
        self.assertEqual(result.command_status.value, "FAILED")
        assert result.command_error is not None
        self.assertIn("Flushing file system buffers failed", result.command_error.details)

    def test_partition_uuids_empty_before_deploy(self) -> None:
        self.assertEqual(self.run_command("standby.get_partition_uuids").command_result, {})


class ManagersLoadingTests(SynchronousTestCase):
    def test_commands_wait_for_managers(self) -> None:
        agent = Agent(AgentConfig(), Clock(), FakeRunner(),  # type: ignore[arg-type]
                      extensions=default_extensions())
        pending = Deferred.fromCoroutine(agent.execute_command("poll.get_hardware_info", {}))
        self.assertNoResult(pending)
        agent.set_managers(HardwareManagers([(Generic(), 1)]))
        result = self.successResultOf(pending)
        self.assertEqual(result.command_result["hostname"], "node")


class LogTests(TestCase):
    async def test_collect_system_logs(self) -> None:
        runner = FakeRunner({("dmesg",): Exit(0, stdout=b"kernel says hi\n")},
                            unknown_missing=True)
        agent = Agent(AgentConfig(), reactor, runner, reactor=reactor,  # type: ignore[arg-type]
                      extensions=default_extensions())
        result = await agent.execute_command("log.collect_system_logs", {})
        self.assertEqual(result.command_status.value, "SUCCEEDED", result.serialize())
        archive = base64.b64decode(result.command_result["system_logs"])
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(archive))) as tar:
            names = tar.getnames()
            dmesg = [n for n in names if n.endswith("dmesg")]
            self.assertTrue(dmesg, names)
            member = tar.extractfile(dmesg[0])
            assert member is not None
            self.assertEqual(member.read(), b"kernel says hi\n")


class ImageWriter:
    """A manager whose write_image records, reports progress and waits on a gate."""

    HARDWARE_MANAGER_NAME = "writer"
    HARDWARE_MANAGER_VERSION = "1"

    def __init__(self, context: Any) -> None:
        self.context = context
        self.writes: list[tuple[Any, ...]] = []
        self.gate: Deferred[None] = Deferred()

    def evaluate_hardware_support(self) -> int:
        return 2

    def get_deploy_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        return [{"step": "write_image", "priority": 80, "interface": "deploy"}]

    class Progress:
        def serialize(self) -> dict[str, Any]:
            return {"bytes_written": 1024, "eta_seconds": 3}

    async def write_image(self, node: Any, ports: Any, image_info: Any,
                          configdrive: Any = None) -> Deployment:
        self.writes.append((node, image_info["id"], configdrive))
        self.context.report_progress(self.Progress())
        await self.gate
        return Deployment(image_id=image_info["id"], device="/dev/sdz",
                          partition_uuids={"root uuid": "abcd"})


IMAGE = {"id": "img-1", "urls": ["http://images/x.raw"], "checksum": "a" * 32}


class StandbyImageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proc = self.mktemp()
        import os
        os.makedirs(self.proc)
        self.runner = FakeRunner({("sync",): Exit(0), ("reboot", "-f"): Exit(0),
                                  ("poweroff", "-f"): Exit(1, stderr=b"nope")})
        self.agent = Agent(AgentConfig(proc_path=self.proc), Clock(),
                           self.runner, extensions=default_extensions())  # type: ignore
        self.writer = ImageWriter(self.agent.hardware_context())
        self.agent.set_managers(HardwareManagers([(self.writer, 2)]))

    def start(self, name: str, **params: Any) -> CommandResult:
        return self.successResultOf(Deferred.fromCoroutine(
            self.agent.execute_command(name, params)))

    def test_prepare_image_shows_progress_then_result(self) -> None:
        result = self.start("standby.prepare_image", image_info=IMAGE, configdrive="H4sI")
        self.assertEqual(result.serialize()["command_result"],
                         {"progress": {"bytes_written": 1024, "eta_seconds": 3}})
        self.writer.gate.callback(None)
        self.assertEqual(result.command_status.value, "SUCCEEDED")
        self.assertEqual(result.command_result["result"],
                         "prepare_image: image (img-1) written to device /dev/sdz "
                         "and configdrive written ")
        self.assertEqual(self.start("standby.get_partition_uuids").command_result,
                         {"root uuid": "abcd"})

    def test_standby_knows_what_the_write_image_deploy_step_wrote(self) -> None:
        """Ironic writes through ``deploy.execute_deploy_step``, then asks standby for the
        partition UUIDs: standby reads them from that command's result, which the wire
        still shows as null."""
        self.writer.gate.callback(None)
        step = self.start("deploy.execute_deploy_step", node={}, ports=[],
                          step={"step": "write_image", "args": {"image_info": IMAGE}})
        self.assertEqual(step.command_status.value, "SUCCEEDED")
        self.assertIsNone(to_jsonable(step.serialize())["command_result"]["deploy_result"])
        self.assertEqual(self.start("standby.get_partition_uuids").command_result,
                         {"root uuid": "abcd"})
        again = self.start("standby.cache_image", image_info=IMAGE)
        self.assertIn("already present on device /dev/sdz", again.command_result["result"])
        self.assertEqual(len(self.writer.writes), 1)

    def test_cache_image_skips_when_present_unless_forced(self) -> None:
        self.writer.gate.callback(None)
        self.start("standby.cache_image", image_info=IMAGE)
        again = self.start("standby.cache_image", image_info=IMAGE)
        self.assertIn("already present", again.command_result["result"])
        self.assertEqual(len(self.writer.writes), 1)
        self.start("standby.cache_image", image_info=IMAGE, force=True)
        self.assertEqual(len(self.writer.writes), 2)

    def test_image_info_validated_before_anything_runs(self) -> None:
        bad = [None, {}, {"id": "x"}, {"id": "x", "urls": []},
               {"id": "x", "urls": ["http://a"]},
               {"id": "x", "urls": ["http://a"], "os_hash_algo": "sha256"},
               {"id": "x", "urls": ["http://a"], "checksum": 5},
               {"id": "x", "urls": ["http://a"], "checksum": "a" * 32, "root_mb": -1}]
        for info in bad:
            failure = self.failureResultOf(Deferred.fromCoroutine(
                self.agent.execute_command("standby.prepare_image", {"image_info": info})))
            self.assertIsInstance(failure.value, errors.InvalidCommandParamsError, info)
        self.assertEqual(self.writer.writes, [])

    def test_run_image_syncs_then_reboots(self) -> None:
        result = self.start("standby.run_image")
        self.assertEqual(result.command_status.value, "SUCCEEDED")
        self.assertEqual(self.runner.argvs, [("sync",), ("reboot", "-f")])

    def test_power_off_falls_back_to_sysrq(self) -> None:
        import os
        trigger = os.path.join(self.proc, "sysrq-trigger")
        open(trigger, "w").close()
        result = self.start("standby.power_off")
        self.assertEqual(result.command_status.value, "SUCCEEDED")
        with open(trigger) as f:
            self.assertEqual(f.read(), "o")

    def test_power_off_failure_reported(self) -> None:
        result = self.start("standby.power_off")  # no sysrq-trigger file in proc_path
        self.assertEqual(result.command_status.value, "FAILED")
        assert result.command_error is not None
        self.assertEqual(result.command_error.type, "SystemRebootError")


class ConfigFollowsTests(SynchronousTestCase):
    def test_managers_see_configuration_changes(self) -> None:
        agent = Agent(AgentConfig(), Clock(), FakeRunner())  # type: ignore[arg-type]
        context = agent.hardware_context()
        agent.process_lookup_data({"node": {"uuid": "n"},
                                   "config": {"metrics": {"backend": "statsd"}}})
        self.assertEqual(context.config.metrics_backend, "statsd")
        agent.config = agent.config.override(lldp_timeout=5.0)
        self.assertEqual(context.config.lldp_timeout, 5.0)


class ExtensionsOnDemandTests(SynchronousTestCase):
    """Extensions given with a name are made when first used; the rest at once."""

    def test_made_on_first_use_once(self) -> None:
        made: list[Any] = []

        class Named:
            name = "named"

            def __init__(self, agent: Agent) -> None:
                made.append(self)

            def command(self, name: str) -> tuple[Any, Any]:
                raise AssertionError("not called")

        agent = Agent(AgentConfig(), Clock(), FakeRunner([]), extensions=[Named])
        self.assertEqual((list(agent.extensions), made), (["named"], []))
        first = agent.extensions["named"]
        self.assertIs(agent.extensions.get("named"), first)
        self.assertEqual(made, [first])
        self.assertIsNone(agent.extensions.get("other"))

    def test_factory_without_a_name_is_made_at_once(self) -> None:
        made: list[Any] = []

        def factory(agent: Agent) -> Any:
            extension = SimpleNamespace(name="anonymous")
            made.append(extension)
            return extension

        agent = Agent(AgentConfig(), Clock(), FakeRunner([]), extensions=[factory])
        self.assertEqual(len(made), 1)
        self.assertIs(agent.extensions["anonymous"], made[0])

    def test_every_default_extension_loads_under_its_name(self) -> None:
        for extension in default_extensions():
            self.assertEqual(extension.load().name, extension.name)

    def test_a_wrong_name_is_refused(self) -> None:
        from ipa_twisted.extensions import ExtensionOnDemand
        with self.assertRaises(RuntimeError) as caught:
            ExtensionOnDemand("clean", "poll", "PollExtension").load()
        self.assertIn("is named 'poll', not 'clean'", str(caught.exception))

    def test_unknown_extension_is_404(self) -> None:
        agent = Agent(AgentConfig(), Clock(), FakeRunner([]),
                      extensions=default_extensions())
        with self.assertRaises(errors.RequestedObjectNotFoundError):
            agent.check_command("nothing.here", {})
