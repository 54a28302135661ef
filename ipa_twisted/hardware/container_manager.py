"""Container steps: the reference agent's container hardware manager.

Steps that run a container image with podman or docker (``[container] runner``): each pulls
the image (``runner pull <pull_options> <image>``) and runs it (``runner run <run_options>
<image>``), both through the context's runner, with no timeout (an aborted step kills the
runner).

- ``generic_container_step`` (and its deprecated name ``container_clean_step``): clean,
  deploy and service; interface ``deploy``, priority 0, abortable; arguments
  ``container_url`` (required), ``pull_options``, ``run_options``. The image comes from
  the step's arguments (a runbook or deploy template), so it must be listed in
  ``[container] allowed_containers`` unless ``allow_arbitrary_containers`` is set; that is
  checked before anything is pulled. Without ``allow_arbitrary_containers`` the
  arguments' options are ignored too (``--privileged`` or ``-v /:/host`` would defeat the
  allowlist): the configured ones are used.
- the steps of the file ``[container] container_steps_file`` (YAML, or JSON; read by
  ``yaml_subset``): a mapping with a ``steps`` list, each step a mapping with ``name``,
  ``image``, ``priority``, ``interface``, ``reboot_requested``, ``abortable`` and, if
  wanted, ``pull_options``/``run_options`` (else the configured ones). Operators put the
  file in the ramdisk, so its images need no allowlist. Its priorities apply to cleaning;
  as deploy and service steps they are offered at priority 0 (manual only). A missing file
  means no such steps; an unreadable or malformed one, or a step named like any hardware
  manager's method, fails the listing (HardwareManagerConfigurationError).

Ironic's lookup answer (``agent_containers``) sets the ``[container]`` options, so the
conductor can name the steps file, the allowlist, the runner and the options. Option
values are split on whitespace as well as commas (the conductor sends ``"--rm
--network=host"`` as one item), so one option cannot hold a space.

The manager answers MAINLINE when ``podman --version`` or ``docker --version`` runs,
otherwise it is not used; the configured runner is checked again when a step runs (lookup
may have changed it since). Image references match the allowlist exactly, ignoring only a
``docker://`` or ``oci://`` transport prefix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import partial
from typing import Any, ClassVar

from twisted.logger import Logger

from ipa_twisted.errors import (ContainerNotPermittedError, HardwareManagerConfigurationError,
                                InvalidCommandParamsError)
from ipa_twisted.hardware.interface import HardwareManager, HardwareSupport
from ipa_twisted.process import ProcessExecutionError, proxy_environment

log = Logger()

RUNNERS = ("podman", "docker")
"""Runtimes whose presence makes this manager available; ``[container] runner`` picks one."""

TRANSPORT_PREFIXES = ("docker://", "oci://")
"""Transports naming an image in a registry: stripped before matching the allowlist. Any
other transport (``containers-storage:`` ...) is not, so it matches no registry entry."""

DEPRECATED_STEP_NAME = "container_clean_step"
STEPS_FILE_MAX_SIZE = 1024 * 1024
VERSION_TIMEOUT = 30.0

CONTAINER_STEP_ARGSINFO: dict[str, dict[str, Any]] = {
    "container_url": {"description": "Container image URL", "required": True},
    "pull_options": {"description": "Pull options", "required": False},
    "run_options": {"description": "Run options", "required": False},
}


def normalize_image_ref(value: str) -> str:
    """``value`` without a ``docker://`` or ``oci://`` transport prefix."""
    for prefix in TRANSPORT_PREFIXES:
        if value.startswith(prefix):
            return value[len(prefix):]
    return value


def as_options(value: Any) -> list[str]:
    """Container options as argv words: a string or a list of strings, split on whitespace."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable):
        raise InvalidCommandParamsError(f"Container options must be a string or a list of "
                                        f"strings, not {type(value).__name__}")
    return [word for item in value for word in str(item).split()]


def container_step(name: str = "generic_container_step") -> dict[str, Any]:
    """The step that runs the image its arguments name (``name``: it or its old name)."""
    return {"step": name, "priority": 0, "interface": "deploy", "reboot_requested": False,
            "abortable": True, "argsinfo": {key: dict(value) for key, value
                                            in CONTAINER_STEP_ARGSINFO.items()}}


def read_steps_file(path: str) -> list[dict[str, Any]]:
    """The steps of the container steps file ``path`` (``[]`` when it does not exist).

    HardwareManagerConfigurationError when it exists but cannot be read or parsed, or its
    content is not a mapping with a list of steps each having a ``name`` and an ``image``.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(STEPS_FILE_MAX_SIZE + 1)
    except FileNotFoundError:
        log.debug("No container steps file at {path}", path=path)
        return []
    except OSError as e:
        raise HardwareManagerConfigurationError(
            f"Could not read container steps from {path}: {e}") from e
    if len(raw) > STEPS_FILE_MAX_SIZE:
        raise HardwareManagerConfigurationError(
            f"Container steps file {path} is larger than {STEPS_FILE_MAX_SIZE} bytes")
    # Loaded here, when there is a file to read: most ramdisks have none.
    from ipa_twisted.hardware import yaml_subset
    try:
        data = yaml_subset.load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml_subset.YamlSubsetError) as e:
        raise HardwareManagerConfigurationError(
            f"Could not read container steps from {path}: {e}") from e
    if data is None:
        return []
    if not isinstance(data, dict):
        raise HardwareManagerConfigurationError(
            f"Container steps file {path} must contain a mapping with a 'steps' key, got "
            f"{type(data).__name__}.")
    steps = data.get("steps") or []
    if not isinstance(steps, list):
        raise HardwareManagerConfigurationError(
            f"'steps' in {path} must be a list, got {type(steps).__name__}.")
    for step in steps:
        if not isinstance(step, dict):
            raise HardwareManagerConfigurationError(
                f"Each container step in {path} must be a mapping, got "
                f"{type(step).__name__}.")
        for key in ("name", "image"):
            if not step.get(key):
                raise HardwareManagerConfigurationError(
                    f"Container step '{step.get('name', '<unnamed>')}' in {path} is "
                    f"missing the required '{key}' key.")
    return steps


class ContainerHardwareManager(HardwareManager):
    """Steps that pull and run container images (see the module docstring)."""

    HARDWARE_MANAGER_NAME = "ContainerHardwareManager"
    HARDWARE_MANAGER_VERSION = "2"   # the reference's: container_clean_step renamed

    log = Logger()

    _reserved: ClassVar[frozenset[str] | None] = None

    async def evaluate_hardware_support(self) -> int:
        """MAINLINE when podman or docker answers ``--version``, else NONE."""
        for runner in RUNNERS:
            try:
                await self.context.runner.execute(runner, "--version",
                                                  timeout=VERSION_TIMEOUT)
            except ProcessExecutionError as e:
                self.log.debug("Container runtime {runner} is not usable: {error}",
                               runner=runner, error=str(e))
                continue
            self.log.debug("Found container runtime {runner}", runner=runner)
            return HardwareSupport.MAINLINE
        self.log.info("No container runtime ({runners}) is usable here: container steps "
                      "are not offered", runners=", ".join(RUNNERS))
        return HardwareSupport.NONE

    # -- steps -------------------------------------------------------------------------------
    def _steps_file(self) -> str:
        return self.context.config.container_container_steps_file

    def _file_steps(self, automatic: bool) -> list[dict[str, Any]]:
        path = self._steps_file()
        steps = [container_step(), container_step(DEPRECATED_STEP_NAME)]
        for step in read_steps_file(path):
            name = step["name"]
            if not isinstance(name, str):
                raise HardwareManagerConfigurationError(
                    f"Container step name {name!r} in {path} is not a string.")
            if name.startswith("_") or name in self._reserved_names():
                raise HardwareManagerConfigurationError(
                    f"Container step '{name}' collides with an existing hardware manager "
                    f"method and would shadow it. Rename it in {path}.")
            try:
                # Read even when not used, so a file lacking it fails in every phase.
                priority = step["priority"]
                steps.append({"step": name,
                              "priority": priority if automatic else 0,
                              "interface": step["interface"],
                              "reboot_requested": step["reboot_requested"],
                              "abortable": step["abortable"]})
            except KeyError as e:
                raise HardwareManagerConfigurationError(
                    f"Missing required key {e} in container step {name} of {path}") from e
        return steps

    def get_clean_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        """The container steps; the file's priorities apply (automated cleaning)."""
        return self._file_steps(automatic=True)

    def get_deploy_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        """The container steps at priority 0: a deploy step above 0 would run on every
        deployment."""
        return self._file_steps(automatic=False)

    def get_service_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        """The container steps at priority 0 (run only when asked for)."""
        return self._file_steps(automatic=False)

    @classmethod
    def _reserved_names(cls) -> frozenset[str]:
        """Names a steps file may not claim: every method of every hardware manager found
        (this manager is asked first, so a file step named ``erase_devices_metadata``
        would otherwise run a container instead of erasing)."""
        if cls._reserved is None:
            from ipa_twisted.hardware.dispatch import discover_managers
            names = set(dir(cls))
            for manager in discover_managers():
                names.update(dir(type(manager)))
            cls._reserved = frozenset(names)
        return cls._reserved

    def __getattr__(self, name: str) -> Any:
        """A step of the steps file, as the callable that runs it (the dispatcher finds
        steps by name). The reserved names are worked out only for a name the file has: the
        dispatcher asks every manager for every method, and most machines have no file."""
        if (name.startswith("_") or self._context is None
                or not os.path.exists(self._steps_file())):   # no file: no file steps
            raise AttributeError(f"{type(self).__name__} object has no attribute {name}")
        try:
            steps = read_steps_file(self._steps_file())
        except HardwareManagerConfigurationError as e:
            # Listing the steps reports it; here it would break every other dispatch.
            self.log.error("Cannot resolve container step {step}: {error}", step=name,
                           error=str(e))
            steps = []
        for step in steps:
            if step.get("name") == name and name not in self._reserved_names():
                return partial(self._container_step, container_url=step.get("image"),
                               pull_options=step.get("pull_options"),
                               run_options=step.get("run_options"), trusted=True)
        raise AttributeError(f"{type(self).__name__} object has no attribute {name}")

    async def generic_container_step(self, node: Any, ports: Any, container_url: Any = None,
                                     pull_options: Any = None, run_options: Any = None
                                     ) -> None:
        """Run the image the step's arguments name (held to the allowlist)."""
        await self._container_step(node, ports, container_url=container_url,
                                   pull_options=pull_options, run_options=run_options,
                                   trusted=False)

    async def container_clean_step(self, node: Any, ports: Any, container_url: Any = None,
                                   pull_options: Any = None, run_options: Any = None
                                   ) -> None:
        """Deprecated name of ``generic_container_step`` (runbooks keep old names)."""
        self.log.warn("The 'container_clean_step' step is deprecated, use "
                      "'generic_container_step' instead.")
        await self.generic_container_step(node, ports, container_url=container_url,
                                          pull_options=pull_options, run_options=run_options)

    # -- running -----------------------------------------------------------------------------
    def _policy(self, container_url: Any, pull_options: Any, run_options: Any,
                trusted: bool) -> tuple[list[str], list[str]]:
        """The pull and run options to use, once the image is known to be permitted."""
        if not isinstance(container_url, str) or not container_url:
            raise InvalidCommandParamsError(
                f"container_url must be a non-empty string, got "
                f"{type(container_url).__name__}.")
        config = self.context.config
        if trusted or config.container_allow_arbitrary_containers:
            return (as_options(pull_options or config.container_pull_options),
                    as_options(run_options or config.container_run_options))
        allowed = {normalize_image_ref(image) for image in config.container_allowed_containers}
        if normalize_image_ref(container_url) not in allowed:
            self.log.error("Refusing to run container {image}: it is not listed in "
                           "[container]allowed_containers, which permits {allowed}",
                           image=container_url,
                           allowed=list(config.container_allowed_containers))
            raise ContainerNotPermittedError(container_url)
        return (as_options(config.container_pull_options),
                as_options(config.container_run_options))

    async def _container_step(self, node: Any, ports: Any, container_url: Any,
                              pull_options: Any = None, run_options: Any = None,
                              trusted: bool = False) -> None:
        """The one place images are run: the policy first, then the runner."""
        pull, run = self._policy(container_url, pull_options, run_options, trusted)
        runner = self.context.config.container_runner
        commands: Any = self.context.runner
        try:
            await commands.execute(runner, "--version", timeout=VERSION_TIMEOUT)
        except ProcessExecutionError as e:
            raise HardwareManagerConfigurationError(
                f"Configured container runner '{runner}' ([container]runner) is not usable "
                f"here: {e}") from e
        env = proxy_environment()
        self.log.info("Pulling container image {image} with {runner}", image=container_url,
                      runner=runner)
        await commands.execute(runner, "pull", *pull, container_url, timeout=None, env=env)
        self.log.info("Running container image {image}", image=container_url)
        await commands.execute(runner, "run", *run, container_url, timeout=None, env=env)
        self.log.info("Container step completed for image {image}", image=container_url)

