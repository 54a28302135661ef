"""What clean, deploy and service steps share: listing, validation and execution."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from ipa_twisted import errors

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
