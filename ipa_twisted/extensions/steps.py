"""``clean.*``, ``deploy.*`` and ``service.*``: one step extension, three kinds of step.

Each lists the hardware managers' steps of its kind (``get_<kind>_steps``) and runs one
(``execute_<kind>_step``, asynchronous, after the manager version check). Cleaning and
deploying set the clock first when they list steps (``ntp_server``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from twisted.logger import Logger

from ipa_twisted import errors
from ipa_twisted.clock_sync import sync_clock
from ipa_twisted.commands import CommandSpec
from ipa_twisted.extensions.base import Extension

if TYPE_CHECKING:
    from ipa_twisted.hardware.dispatch import HardwareManagers

log = Logger()


def validate_step(step: dict[str, Any]) -> None:
    """400 unless ``step`` names a step (and its args, if any, are an object)."""
    name = step.get("step")
    if not isinstance(name, str) or not name:
        raise errors.InvalidCommandParamsError(f'Malformed step, no "step" key: {step}')
    if name.startswith("_"):
        raise errors.InvalidCommandParamsError(f"Invalid step name: {name}")
    args = step.get("args")
    if args is not None and not isinstance(args, dict):
        raise errors.InvalidCommandParamsError("Step args must be an object")


async def list_steps(managers: HardwareManagers, kind: str, node: dict[str, Any],
                     ports: list[Any]) -> dict[str, list[dict[str, Any]]]:
    """Every manager's ``get_<kind>_steps``, deduplicated, keyed by manager name."""
    managers.cache_node(node)
    try:
        candidates = await managers.dispatch_to_all_managers(f"get_{kind}_steps", node, ports)
    except errors.HardwareManagerMethodNotFound:
        candidates = {}
    return {name: [dict(step) for step in steps]
            for name, steps in managers.deduplicate_steps(candidates).items()}


async def execute_step(managers: HardwareManagers, kind: str, step: dict[str, Any],
                       node: dict[str, Any], ports: list[Any], version: Any,
                       kwargs: dict[str, Any], failure: type[errors.RESTError]) -> Any:
    """Run ``step`` on the best manager that has it, after the version check.

    Only advertised steps run: a name no manager lists is refused rather than looked up
    as an arbitrary method.
    """
    managers.cache_node(node)
    managers.check_versions(version)
    name = step["step"]
    advertised = await list_steps(managers, kind, node, ports)
    if not any(s.get("step") == name for steps in advertised.values() for s in steps):
        raise failure(f"Unknown {kind} step {name!r}: no hardware manager offers it")
    kwargs = {**kwargs, **(step.get("args") or {})}
    log.info("Executing {kind} step {step}", kind=kind, step=name)
    try:
        result = await managers.dispatch_to_managers(name, node, ports, **kwargs)
    except errors.RESTError:
        raise
    except Exception as e:
        raise failure(f"Error performing {kind} step {name}: {e}") from e
    log.info("{kind} step {step} completed", kind=kind, step=name)
    return list(result) if isinstance(result, tuple) else result


def _validate(extension: StepExtension, step: dict[str, Any], **params: Any) -> None:
    validate_step(step)
    version = params.get(f"{extension.kind}_version")
    if version is not None and not isinstance(version, (dict, list)):
        raise errors.InvalidCommandParamsError(
            f"Parameter {extension.kind}_version must be an object or a list or null, "
            f"not {type(version).__name__}")


class StepExtension(Extension):
    """Lists and executes the hardware managers' steps of one ``kind``.

    A subclass names the ``kind`` (its commands are ``get_<kind>_steps`` and
    ``execute_<kind>_step``), the error a failed step raises, and whether listing the
    steps sets the clock first.
    """

    kind: ClassVar[str] = ""
    failure: ClassVar[type[errors.RESTError]] = errors.RESTError
    syncs_clock: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            listing, executing = f"get_{cls.kind}_steps", f"execute_{cls.kind}_step"
            cls.commands = {**cls.commands,
                            listing: CommandSpec(listing, False, None, "get_steps"),
                            executing: CommandSpec(executing, True, _validate,
                                                   "execute_step")}

    async def get_steps(self, node: dict[str, Any], ports: list[Any]) -> dict[str, Any]:
        """Steps by manager, and the manager versions Ironic must send back."""
        managers = await self.agent.get_managers()
        if self.syncs_clock:
            await sync_clock(self.agent.runner, self.agent.config, ignore_errors=True)
        return {f"{self.kind}_steps": await list_steps(managers, self.kind, node, ports),
                "hardware_manager_version": managers.get_current_versions()}

    async def execute_step(self, step: dict[str, Any], node: dict[str, Any],
                           ports: list[Any], **kwargs: Any) -> dict[str, Any]:
        """Run one step (``<kind>_version``: the versions Ironic listed the steps with;
        CLEAN_VERSION_MISMATCH if the managers changed since)."""
        version = kwargs.pop(f"{self.kind}_version", None)
        managers = await self.agent.get_managers()
        result = await execute_step(managers, self.kind, step, node, ports, version,
                                    kwargs, self.failure)
        return {f"{self.kind}_result": result, f"{self.kind}_step": step}


class CleanExtension(StepExtension):
    """The steps Ironic runs to clean a node."""

    name = kind = "clean"
    failure = errors.CleaningError
    syncs_clock = True


class DeployExtension(StepExtension):
    """The in-band deploy steps."""

    name = kind = "deploy"
    failure = errors.DeploymentError
    syncs_clock = True


class ServiceExtension(StepExtension):
    """Steps Ironic runs on a deployed node (servicing)."""

    name = kind = "service"
    failure = errors.ServicingError
