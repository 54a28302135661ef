"""Container steps (ipa_twisted.hardware.container_manager) and the steps file reader
(ipa_twisted.hardware.yaml_subset).

Unit tests run on a FakeRunner; the reader is checked against PyYAML (a test-only package)
on the reference agent's example files and on generated ones. ``RealPodmanTests`` pulls and
runs an image built here (busybox-static's busybox, ``podman import``) from a registry
started by the test (Debian's docker-registry on 127.0.0.1), with podman's storage, run
state and configuration in the test's own directory (``tests/podman.py``); it skips,
saying why, when podman, docker-registry or busybox is missing, when not root, or when
podman cannot run a container on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipa_twisted import errors
from ipa_twisted.agent import Agent
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions.steps import execute_step, list_steps
from ipa_twisted.hardware import yaml_subset
from ipa_twisted.hardware.container_manager import (ContainerHardwareManager, as_options,
                                                    normalize_image_ref, read_steps_file)
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.hardware.interface import HardwareSupport
from ipa_twisted.process import ProcessExecutionError, proxy_environment
from ipa_twisted.testing.fake_process import Exit, FakeRunner

try:
    import yaml
except ImportError:  # pragma: no cover - pyyaml is in the test extra
    yaml = None

ALLOWED = "docker://registry.example.com/allowed:latest"
OTHER = "docker://registry.example.com/other:latest"
VERSIONS: dict[tuple[str, ...], Any] = {("podman", "--version"): "podman version 4.3.1\n",
            ("docker", "--version"): "Docker version 28.2.2\n"}
STEPS_YAML = """\
# Written by hand, as an operator would (the reference's documentation's shape).
steps:
  - name: manage_raid
    image: docker://registry.example.com/raid:1  # trusted: baked into the ramdisk
    priority: 20
    interface: raid
    reboot_requested: false
    abortable: true
    pull_options: "--tls-verify=false"
    run_options: ["--rm", "--privileged", '--network=host']
  - name: firmware
    image: registry.example.com/fw@sha256:0123abcd
    priority: 10
    interface: management
    reboot_requested: yes
    abortable: no
"""


def ironic_containers(**changes: Any) -> dict[str, Any]:
    """Ironic 39's ``agent_containers`` with its defaults, changed by ``changes``."""
    return {"allow_arbitrary_containers": False, "allowed_containers": [],
            "container_steps_file": "/etc/ironic-python-agent.d/mysteps.yaml",
            "runner": "podman", "pull_options": None, "run_options": None, **changes}


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.runner = FakeRunner({**VERSIONS, ("podman", "pull"): b"", ("podman", "run"): b"",
                                  ("docker", "pull"): b"", ("docker", "run"): b""})
        self.agent = Agent(AgentConfig(container_container_steps_file=os.path.join(
            self.dir, "absent.yaml")), Clock(), runner=self.runner,  # type: ignore[arg-type]
            extensions=[])
        self.manager = ContainerHardwareManager()
        self.manager.bind(self.agent.context)

    def lookup(self, **containers: Any) -> None:
        """What Ironic's lookup answer with ``agent_containers`` does to the agent."""
        self.agent.process_lookup_data({"node": {"uuid": "n1"}, "config": {
            "heartbeat_timeout": 300, "agent_containers": ironic_containers(**containers)}})

    def steps_file(self, text: str) -> str:
        path = os.path.join(self.dir, "steps.yaml")
        with open(path, "w") as f:
            f.write(text)
        self.agent.config = self.agent.config.merged({"container_container_steps_file": path},
                                                     "test")
        return path

    def run_step(self, name: str, **args: Any) -> Any:
        method = getattr(self.manager, name)
        return self.successResultOf(_deferred(method({}, [], **args)))

    def fail_step(self, name: str, **args: Any) -> Any:
        method = getattr(self.manager, name)
        return self.failureResultOf(_deferred(method({}, [], **args))).value

    def ran(self) -> list[tuple[str, ...]]:
        return [argv for argv in self.runner.argvs if argv[1:2] in (("pull",), ("run",))]


def _deferred(coroutine: Any) -> Any:
    from twisted.internet.defer import Deferred
    return Deferred.fromCoroutine(coroutine)


class SupportTests(Base):
    def evaluate(self) -> int:
        return int(self.successResultOf(_deferred(self.manager.evaluate_hardware_support())))

    def test_podman(self) -> None:
        self.assertEqual(self.evaluate(), HardwareSupport.MAINLINE)
        self.assertEqual(self.runner.argvs, [("podman", "--version")])

    def test_docker_when_podman_is_missing(self) -> None:
        self.runner.missing = {"podman"}
        self.assertEqual(self.evaluate(), HardwareSupport.MAINLINE)
        self.assertEqual(self.runner.argvs, [("podman", "--version"), ("docker", "--version")])

    def test_runtime_that_cannot_run_is_no_support(self) -> None:
        self.runner.answers[("podman", "--version")] = Exit(125, b"", b"cannot create runtime")
        self.runner.missing = {"docker"}
        with capturedLogs() as events:
            self.assertEqual(self.evaluate(), HardwareSupport.NONE)
        self.assertTrue(any("No container runtime" in e["log_format"] for e in events))

    def test_dropped_by_the_dispatcher_without_runtime(self) -> None:
        self.runner.missing = {"podman", "docker"}
        managers = self.successResultOf(_deferred(HardwareManagers.load(
            self.agent.context, [self.manager, GenericHardwareManager()])))
        self.assertEqual([type(m) for m in managers.managers], [GenericHardwareManager])


class StepListTests(Base):
    def test_other_managers_methods_are_quiet_misses(self) -> None:
        """The dispatcher asks every manager for every method: without a steps file such a
        miss reads nothing and logs nothing; with one, a file step cannot take the name of
        another manager's method."""
        with capturedLogs() as events:
            self.assertIsNone(getattr(self.manager, "erase_devices_metadata", None))
            self.assertIsNone(getattr(self.manager, "cache_node", None))
        self.assertEqual(events, [])
        self.steps_file("steps:\n  - name: erase_devices_metadata\n    image: x\n"
                        "  - name: my_step\n    image: quay.io/x\n")
        self.assertIsNone(getattr(self.manager, "erase_devices_metadata", None))
        self.assertIsNotNone(getattr(self.manager, "my_step", None))

    def test_without_steps_file(self) -> None:
        steps = self.manager.get_clean_steps({}, [])
        self.assertEqual([s["step"] for s in steps],
                         ["generic_container_step", "container_clean_step"])
        self.assertEqual(steps[0], {
            "step": "generic_container_step", "priority": 0, "interface": "deploy",
            "reboot_requested": False, "abortable": True, "argsinfo": {
                "container_url": {"description": "Container image URL", "required": True},
                "pull_options": {"description": "Pull options", "required": False},
                "run_options": {"description": "Run options", "required": False}}})
        self.assertEqual(self.manager.get_deploy_steps({}, []), steps)
        self.assertEqual(self.manager.get_service_steps({}, []), steps)

    def test_file_steps_priority_only_for_cleaning(self) -> None:
        self.steps_file(STEPS_YAML)
        clean = {s["step"]: s for s in self.manager.get_clean_steps({}, [])}
        self.assertEqual(clean["manage_raid"], {
            "step": "manage_raid", "priority": 20, "interface": "raid",
            "reboot_requested": False, "abortable": True})
        self.assertEqual(clean["firmware"], {
            "step": "firmware", "priority": 10, "interface": "management",
            "reboot_requested": True, "abortable": False})
        for listed in (self.manager.get_deploy_steps({}, []),
                       self.manager.get_service_steps({}, [])):
            self.assertEqual({s["step"]: s["priority"] for s in listed},
                             {"generic_container_step": 0, "container_clean_step": 0,
                              "manage_raid": 0, "firmware": 0})

    def test_steps_file_named_by_lookup(self) -> None:
        path = os.path.join(self.dir, "from-ironic.yaml")
        with open(path, "w") as f:
            f.write(STEPS_YAML)
        self.lookup(container_steps_file=path)
        self.assertIn("firmware", [s["step"] for s in self.manager.get_clean_steps({}, [])])

    def test_json_steps_file(self) -> None:
        self.steps_file(json.dumps({"steps": [{
            "name": "wipe_nvme", "image": "quay.io/x/y:1", "priority": 0,
            "interface": "deploy", "reboot_requested": False, "abortable": True}]}))
        self.assertIn("wipe_nvme", [s["step"] for s in self.manager.get_clean_steps({}, [])])

    def test_empty_files(self) -> None:
        for text in ("", "# nothing\n", "other: value\n", "steps:\n", "steps: []\n"):
            self.steps_file(text)
            self.assertEqual(len(self.manager.get_clean_steps({}, [])), 2, text)

    def test_bad_files_fail_the_listing(self) -> None:
        for text, expected in [
                ("steps: [unclosed\n", "flow sequence"),
                ("- a\n- b\n", "must contain a mapping"),
                ("steps: not-a-list\n", "must be a list"),
                ("steps:\n  - name: no_image\n", "missing the required 'image'"),
                ("steps:\n  - image: docker://x\n", "missing the required 'name'"),
                ("steps:\n  - 3\n", "must be a mapping"),
                ("steps:\n  - name: x\n    image: y\n", "Missing required key 'priority'"),
                ("steps:\n  - name: x\n    image: &a y\n", "anchors"),
                ("steps:\n  - name: 12\n    image: y\n", "is not a string")]:
            path = self.steps_file(text)
            for listing in (self.manager.get_clean_steps, self.manager.get_deploy_steps,
                            self.manager.get_service_steps):
                error = self.assertRaises(errors.HardwareManagerConfigurationError,
                                          listing, {}, [])
                self.assertIn(expected, str(error), text)
                self.assertIn(path, str(error))

    def test_unreadable_file(self) -> None:
        path = self.steps_file("")
        os.remove(path)
        os.mkdir(path)
        self.assertRaises(errors.HardwareManagerConfigurationError,
                          self.manager.get_clean_steps, {}, [])

    def test_step_shadowing_a_manager_method_is_refused(self) -> None:
        for name in ("erase_devices_metadata", "burnin_cpu", "generic_container_step",
                     "get_clean_steps", "update_nvidia_nic_firmware_image", "_private"):
            self.steps_file(f"steps:\n  - name: {name}\n    image: x\n    priority: 0\n"
                            "    interface: deploy\n    reboot_requested: false\n"
                            "    abortable: true\n")
            error = self.assertRaises(errors.HardwareManagerConfigurationError,
                                      self.manager.get_clean_steps, {}, [])
            self.assertIn("collides with an existing hardware manager method", str(error))
            self.assertIn(name, str(error))

    def test_file_step_resolves_only_for_listed_names(self) -> None:
        self.steps_file(STEPS_YAML)
        self.assertTrue(callable(getattr(self.manager, "firmware")))
        self.assertFalse(hasattr(self.manager, "not_a_step"))
        self.assertFalse(hasattr(self.manager, "erase_devices_metadata"))
        self.assertFalse(hasattr(self.manager, "__deepcopy__"))

    def test_broken_file_breaks_no_other_dispatch(self) -> None:
        self.steps_file("steps: [unclosed\n")
        with capturedLogs() as events:
            self.assertFalse(hasattr(self.manager, "firmware"))
        self.assertTrue(any("Cannot resolve container step" in e["log_format"]
                            for e in events))


class PolicyTests(Base):
    def test_unlisted_image_refused_before_anything_runs(self) -> None:
        self.lookup(allowed_containers=[ALLOWED])
        error = self.fail_step("generic_container_step", container_url=OTHER)
        self.assertIsInstance(error, errors.ContainerNotPermittedError)
        self.assertIn(OTHER, str(error))
        self.assertEqual(self.runner.argvs, [])

    def test_nothing_allowed_by_default(self) -> None:
        self.assertIsInstance(self.fail_step("generic_container_step", container_url=ALLOWED),
                              errors.ContainerNotPermittedError)
        self.assertEqual(self.runner.argvs, [])

    def test_listed_image_runs_with_configured_options_only(self) -> None:
        self.lookup(allowed_containers=[ALLOWED], pull_options=["--tls-verify=false"],
                    run_options=["--rm --network=host"])
        self.run_step("generic_container_step", container_url=ALLOWED,
                      pull_options="--privileged", run_options=["-v", "/:/host"])
        self.assertEqual(self.runner.argvs, [
            ("podman", "--version"), ("podman", "pull", "--tls-verify=false", ALLOWED),
            ("podman", "run", "--rm", "--network=host", ALLOWED)])
        self.assertEqual([c.kwargs["timeout"] for c in self.runner.calls[1:]], [None, None])

    def test_transport_prefix_ignored_when_matching(self) -> None:
        self.lookup(allowed_containers=["registry.example.com/allowed:latest"])
        self.run_step("generic_container_step", container_url=ALLOWED)
        self.lookup(allowed_containers=[ALLOWED])
        self.run_step("generic_container_step",
                      container_url="oci://registry.example.com/allowed:latest")
        self.lookup(allowed_containers=[ALLOWED])
        self.assertIsInstance(self.fail_step(
            "generic_container_step",
            container_url="containers-storage:registry.example.com/allowed:latest"),
            errors.ContainerNotPermittedError)

    def test_arbitrary_containers_use_the_step_options(self) -> None:
        self.lookup(allow_arbitrary_containers=True, runner="docker")
        self.run_step("generic_container_step", container_url=OTHER,
                      pull_options="--quiet", run_options=["--rm", "--net=none"])
        self.assertEqual(self.ran(), [("docker", "pull", "--quiet", OTHER),
                                      ("docker", "run", "--rm", "--net=none", OTHER)])
        self.run_step("generic_container_step", container_url=OTHER)
        self.assertEqual(self.ran()[2:], [("docker", "pull", OTHER),
                                          ("docker", "run", "--rm", "--network=host", OTHER)])

    def test_deprecated_name(self) -> None:
        self.lookup(allowed_containers=[ALLOWED])
        with capturedLogs() as events:
            self.run_step("container_clean_step", container_url=ALLOWED)
        self.assertTrue(any("deprecated" in e["log_format"] for e in events))
        self.assertEqual(len(self.ran()), 2)
        self.assertIsInstance(self.fail_step("container_clean_step", container_url=OTHER),
                              errors.ContainerNotPermittedError)

    def test_bad_container_url(self) -> None:
        for value in (None, "", 3, ["x"]):
            self.assertIsInstance(self.fail_step("generic_container_step",
                                                 container_url=value),
                                  errors.InvalidCommandParamsError)
        self.assertEqual(self.runner.argvs, [])

    def test_configured_runner_unusable(self) -> None:
        self.lookup(allow_arbitrary_containers=True, runner="docker")
        self.runner.missing = {"docker"}
        error = self.fail_step("generic_container_step", container_url=OTHER)
        self.assertIsInstance(error, errors.HardwareManagerConfigurationError)
        self.assertIn("'docker' ([container]runner) is not usable", str(error))
        self.assertEqual(self.ran(), [])

    def test_file_step_is_trusted_and_uses_its_options(self) -> None:
        self.steps_file(STEPS_YAML)
        self.run_step("manage_raid")
        self.run_step("firmware")
        self.assertEqual(self.ran(), [
            ("podman", "pull", "--tls-verify=false", "docker://registry.example.com/raid:1"),
            ("podman", "run", "--rm", "--privileged", "--network=host",
             "docker://registry.example.com/raid:1"),
            ("podman", "pull", "registry.example.com/fw@sha256:0123abcd"),
            ("podman", "run", "--rm", "--network=host",
             "registry.example.com/fw@sha256:0123abcd")])

    def test_proxies_reach_the_runtime(self) -> None:
        self.lookup(allow_arbitrary_containers=True)
        self.patch(os, "environ", {"https_proxy": "http://proxy:3128", "NO_PROXY": "local",
                                   "HOME": "/root", "http_proxy": ""})
        self.run_step("generic_container_step", container_url=OTHER)
        self.assertEqual([c.kwargs["env"] for c in self.runner.calls[1:]],
                         [{"https_proxy": "http://proxy:3128", "NO_PROXY": "local"}] * 2)

    def test_failing_pull_stops_the_step(self) -> None:
        self.lookup(allow_arbitrary_containers=True)
        self.runner.answers[("podman", "pull")] = Exit(125, b"", b"manifest unknown")
        self.assertIn("manifest unknown", str(self.fail_step("generic_container_step",
                                                             container_url=OTHER)))
        self.assertEqual([argv[1] for argv in self.ran()], ["pull"])

    def test_options_normalised(self) -> None:
        self.assertEqual(as_options(None), [])
        self.assertEqual(as_options(["--rm --network=host", "-q"]),
                         ["--rm", "--network=host", "-q"])
        self.assertEqual(as_options("--rm  -q"), ["--rm", "-q"])
        self.assertRaises(errors.InvalidCommandParamsError, as_options, 3)
        self.assertEqual(normalize_image_ref("oci://a/b:1"), "a/b:1")
        self.assertEqual(proxy_environment({"HTTPS_PROXY": "p", "PATH": "x"}),
                         {"HTTPS_PROXY": "p"})


class ThroughTheStepExtensionTests(Base):
    """The steps as Ironic runs them: listed by kind, then executed by name."""

    def setUp(self) -> None:
        super().setUp()
        self.runner.missing = set()
        self.managers = self.successResultOf(_deferred(HardwareManagers.load(
            self.agent.context, [self.manager])))

    def execute(self, kind: str, step: dict[str, Any]) -> Any:
        failure = {"clean": errors.CleaningError, "deploy": errors.DeploymentError,
                   "service": errors.ServicingError}[kind]
        return _deferred(execute_step(self.managers, kind, step, {}, [], None, {}, failure))

    def test_file_step_in_every_kind(self) -> None:
        self.steps_file(STEPS_YAML)
        for kind in ("clean", "deploy", "service"):
            listed = self.successResultOf(_deferred(list_steps(self.managers, kind, {}, [])))
            self.assertIn("firmware", [s["step"] for s in listed["ContainerHardwareManager"]])
            self.successResultOf(self.execute(kind, {"step": "firmware", "interface":
                                                     "management"}))
        self.assertEqual(len(self.ran()), 6)

    def test_generic_step_refused_through_the_extension(self) -> None:
        failure = self.failureResultOf(self.execute("clean", {
            "step": "generic_container_step", "args": {"container_url": OTHER}}))
        self.assertIsInstance(failure.value, errors.ContainerNotPermittedError)
        self.assertEqual(self.ran(), [])

    def test_pull_failure_is_the_kinds_error(self) -> None:
        self.lookup(allowed_containers=[OTHER])
        self.runner.answers[("podman", "pull")] = Exit(125, b"", b"denied")
        failure = self.failureResultOf(self.execute("service", {
            "step": "generic_container_step", "args": {"container_url": OTHER}}))
        self.assertIsInstance(failure.value, errors.ServicingError)
        self.assertIn("denied", str(failure.value))


class YamlSubsetTests(SynchronousTestCase):
    """The reader agrees with PyYAML wherever it accepts a document, and refuses the rest."""

    def setUp(self) -> None:
        if yaml is None:
            raise SkipTest("PyYAML (the test extra) is not installed")

    def same(self, text: str) -> Any:
        ours = yaml_subset.load(text)
        self.assertEqual(ours, yaml.safe_load(text), text)
        return ours

    def test_hand_written(self) -> None:
        data = self.same(STEPS_YAML)
        self.assertEqual(data["steps"][1]["reboot_requested"], True)

    def test_reference_shapes(self) -> None:
        for text in ["", "\n", "other: value\n", "steps:\n", "---\nsteps: []\n",
                     "steps:\n- name: a\n  image: docker://x/y:1\n  priority: 10\n",
                     "steps:\n  -   name: a\n      image: 'it''s'\n",
                     "a: {}\nb: []\nc: ~\nd: null\ne: -3\nf: 1.5\ng: 'true'\nh: \"\\u00e9\"\n",
                     "k: v # comment\nurl: http://x/#frag\nq: 'a # b'\n",
                     "nested:\n  deeper:\n    - - 1\n      - 2\n    - x\n",
                     "flow: [a, 'b c', \"d,e\", 3, true, ]\n",
                     "\"quoted key\": 1\n'single': 2\n",
                     '{"steps": [{"name": "j", "image": "i"}]}',
                     "[1, 2]\n"]:
            self.same(text)

    def test_refused(self) -> None:
        for text in ["a: &x 1\nb: *x\n", "a: !!str 1\n", "a: |\n  text\n", "a: >\n  t\n",
                     "a: {b: 1}\n", "a: [[1]]\n", "a: b\n  c\n", "\ta: 1\n", "a: 1\na: 2\n",
                     "---\na: 1\n---\nb: 2\n", "%YAML 1.1\n---\na: 1\n", "a: 'open\n",
                     "a: 0x10\n", "a: 2026-01-01\n", "a: .inf\n", "a: 1_000\n",
                     "a: b: c\n", "? a\n: b\n", "a: 1\n b: 2\n", "{a: 1}\n"]:
            self.assertRaises(yaml_subset.YamlSubsetError, yaml_subset.load, text)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.fixed_dictionaries({
        "name": st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True),
        "image": st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1,
                         max_size=30),
        "priority": st.integers(-5, 100),
        "interface": st.sampled_from(["deploy", "raid", "management", "bios"]),
        "reboot_requested": st.booleans(), "abortable": st.booleans(),
        "run_options": st.one_of(st.none(), st.text(st.characters(
            min_codepoint=32, max_codepoint=255, blacklist_categories=["Cc"]), max_size=20),
            st.lists(
            st.text(st.sampled_from("-=abc/: ,'\""), min_size=1, max_size=12),
            max_size=4))}), max_size=4),
        st.sampled_from([{}, {"default_flow_style": False}, {"indent": 4},
                         {"default_style": "'"}, {"default_style": '"'},
                         {"default_flow_style": None}, {"json": True}]))
    def test_dumped_files(self, steps: list[dict[str, Any]], style: dict[str, Any]) -> None:
        document = {"steps": steps}
        text = (json.dumps(document, indent=2) if style.get("json")
                else yaml.safe_dump(document, allow_unicode=True, **style))
        try:
            ours = yaml_subset.load(text)
        except yaml_subset.YamlSubsetError:
            # Only constructs outside the subset (flow mappings, tags) may be refused.
            self.assertTrue("{" in text or "!!" in text, text)
            return
        self.assertEqual(ours, document, text)


class ReadStepsFileTests(SynchronousTestCase):
    def test_too_large(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("#" * (1024 * 1024 + 10))
        self.assertRaises(errors.HardwareManagerConfigurationError, read_steps_file, path)

    def test_not_utf8(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"steps: \xff\n")
        self.assertRaises(errors.HardwareManagerConfigurationError, read_steps_file, path)


# -- real podman and a real registry -------------------------------------------------------

class RealPodmanTests(TestCase):
    """Container steps pulling from a registry started here and running with real podman."""

    timeout = 300

    async def setUp(self) -> None:  # type: ignore[override]
        from tests.podman import PodmanBed
        self.bed = bed = await PodmanBed.start(self)
        self.dir = bed.dir
        os.makedirs(os.path.join(self.dir, "out"))
        # The image: busybox alone, whose command leaves a marker in /out.
        await bed.build_image("localhost/ipa-test/busybox:1", {},
                              ["/bin/busybox", "sh", "-c", "echo ran > /out/marker"])
        host = await bed.start_registry(self)
        self.image = f"{host}/ipa-test/busybox:1"
        await bed.push("localhost/ipa-test/busybox:1", self.image)
        self.requests_before = bed.registry_requests()
        self.runner = bed.runner
        self.agent = Agent(AgentConfig(
            container_pull_options=("--tls-verify=false",),
            container_run_options=("--rm", "--network=host", "-v", f"{self.dir}/out:/out"),
            container_container_steps_file=os.path.join(self.dir, "steps.yaml")),
            reactor, runner=self.runner)
        self.manager = ContainerHardwareManager()
        self.manager.bind(self.agent.context)

    def registry_requests(self) -> list[str]:
        return self.bed.registry_requests()

    def marker(self) -> str | None:
        try:
            with open(os.path.join(self.dir, "out", "marker")) as f:
                return f.read()
        except FileNotFoundError:
            return None

    async def test_allowed_image_pulled_and_run(self) -> None:
        self.agent.process_lookup_data({"node": {"uuid": "n1"}, "config": {
            "agent_containers": ironic_containers(
                allowed_containers=[f"docker://{self.image}"],
                pull_options=["--tls-verify=false"],
                run_options=[f"--rm --network=host -v {self.dir}/out:/out"],
                container_steps_file=os.path.join(self.dir, "steps.yaml"))}})
        managers = await HardwareManagers.load(self.agent.context, [self.manager])
        await execute_step(managers, "clean", {"step": "generic_container_step", "args": {
            "container_url": self.image}}, {}, [], None, {}, errors.CleaningError)
        self.assertEqual(self.marker(), "ran\n")
        self.assertTrue(any("/manifests/1" in line for line in self.registry_requests()))

    async def test_steps_file_step(self) -> None:
        with open(os.path.join(self.dir, "steps.yaml"), "w") as f:
            f.write(textwrap.dedent(f"""\
                steps:
                  - name: leave_marker
                    image: docker://{self.image}
                    priority: 0
                    interface: deploy
                    reboot_requested: false
                    abortable: true
                    run_options: [--rm, --network=host, -v, "{self.dir}/out:/out"]
                """))
        managers = await HardwareManagers.load(self.agent.context, [self.manager])
        listed = await list_steps(managers, "deploy", {}, [])
        self.assertIn("leave_marker", [s["step"] for s in listed["ContainerHardwareManager"]])
        await execute_step(managers, "deploy", {"step": "leave_marker"}, {}, [], None, {},
                           errors.DeploymentError)
        self.assertEqual(self.marker(), "ran\n")

    async def test_unlisted_image_never_reaches_the_registry(self) -> None:
        self.agent.config = self.agent.config.merged(
            {"container_allowed_containers": [f"{self.image}-other"]}, "test")
        managers = await HardwareManagers.load(self.agent.context, [self.manager])
        with self.assertRaises(errors.ContainerNotPermittedError):
            await execute_step(managers, "clean", {"step": "generic_container_step",
                                                   "args": {"container_url": self.image}},
                               {}, [], None, {}, errors.CleaningError)
        self.assertEqual(self.registry_requests(), self.requests_before)
        self.assertIsNone(self.marker())
        with self.assertRaises(ProcessExecutionError):     # never pulled
            await self.runner.execute("podman", "image", "exists", self.image)


class RealIronicContainerStepTests(TestCase):
    """A real Ironic runs ``generic_container_step`` as a manual clean step through our
    agent, the allowlist and the runtime's options coming from Ironic's
    ``[agent_containers]`` configuration in the lookup answer (podman's storage and
    settings of the test given as its global options, as an operator may)."""

    timeout = 300

    async def setUp(self) -> None:  # type: ignore[override]
        from tests.ironic.harness import skip_reason, start_ironic
        from tests.podman import PodmanBed
        reason = skip_reason(macs=True)
        if reason:
            raise SkipTest(reason)
        self.bed = bed = await PodmanBed.start(self)
        os.makedirs(os.path.join(bed.dir, "out"))
        await bed.build_image("localhost/ipa-test/busybox:1", {},
                              ["/bin/busybox", "sh", "-c", "echo ran > /out/marker"])
        host = await bed.start_registry(self)
        self.image = f"{host}/ipa-test/busybox:1"
        await bed.push("localhost/ipa-test/busybox:1", self.image)
        runtime = "--runtime runc " if shutil.which("runc") else ""
        podman = (f"--root {bed.dir}/storage --runroot {bed.dir}/run --storage-driver vfs "
                  f"--tmpdir {bed.dir}/libpod-tmp --cgroup-manager cgroupfs "
                  f"--events-backend file {runtime}")
        self.dir = os.path.abspath(self.mktemp())
        self.ironic = await start_ironic(self, self.dir, restrict_lookup=True,
                                         heartbeat_timeout=10, options={"agent_containers": {
                                             "allowed_containers": f"docker://{self.image}",
                                             "pull_options": podman + "--tls-verify=false",
                                             "run_options": podman + (
                                                 "--ulimit nofile=1024:1024 --ulimit "
                                                 "nproc=1024:1024 --rm --network=host "
                                                 f"-v {bed.dir}/out:/out")}})

    async def test_manual_clean_step(self) -> None:
        from tests.ironic.harness import start_agent
        from tests.processes import physical_macs
        uuid = await self.ironic.enroll_node(physical_macs(), state="manageable")
        await self.ironic.set_provision_state(uuid, "clean", clean_steps=[{
            "interface": "deploy", "step": "generic_container_step",
            "args": {"container_url": self.image}}])
        await self.ironic.wait_for_state(uuid, "clean wait", timeout=60)
        agent = start_agent(self, self.ironic, self.dir, name="clean")
        node = await self.ironic.wait_for_state(uuid, "manageable", timeout=180)
        self.assertIsNone(node["last_error"])
        with open(os.path.join(self.bed.dir, "out", "marker")) as f:
            self.assertEqual(f.read(), "ran\n")
        self.assertIn(b"Container step completed", agent.output)

        # An image Ironic's allowlist lacks fails the step before anything is pulled.
        await agent.stop("TERM")
        before = self.bed.registry_requests()
        await self.ironic.set_provision_state(uuid, "clean", clean_steps=[{
            "interface": "deploy", "step": "generic_container_step",
            "args": {"container_url": self.image + "-other"}}])
        await self.ironic.wait_for_state(uuid, "clean wait", timeout=60)
        start_agent(self, self.ironic, self.dir, name="refused")
        node = await self.ironic.wait_for_state(uuid, "clean failed", timeout=180)
        self.assertIn("is not in [container]allowed_containers", node["last_error"])
        self.assertEqual(self.bed.registry_requests(), before)
