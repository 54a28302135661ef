"""The agent's hardware managers, in priority order, and how calls are dispatched to them.

Managers are found as Twisted plugins providing ``IHardwareManager`` (any
``twisted/plugins/*.py`` dropin on the path; see ``twisted/plugins/ipa_twisted_hardware.py``)
plus our GenericHardwareManager. Each evaluates its support for this machine; those with none
are dropped and the rest are asked in order of support (highest first), then name.
"""

from __future__ import annotations

import importlib
import pickle
import sys
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface.interface import InterfaceClass

from ipa_twisted.errors import (HardwareManagerMethodNotFound, HardwareManagerNotFound,
                                IncompatibleHardwareMethodError, VersionMismatch)
from ipa_twisted.context import HardwareContext
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.hardware.interface import IHardwareManager, call_manager_method

log = Logger()

_DEFAULT_VERSION = "1.0"


def manager_name(manager: object) -> str:
    """A manager's HARDWARE_MANAGER_NAME, or its class name."""
    return str(getattr(manager, "HARDWARE_MANAGER_NAME", None) or type(manager).__name__)


def manager_version(manager: object) -> str:
    """A manager's HARDWARE_MANAGER_VERSION, or "1.0"."""
    return str(getattr(manager, "HARDWARE_MANAGER_VERSION", None) or _DEFAULT_VERSION)


def _twisteds_own(module: str) -> bool:
    """Whether ``module`` is Twisted's own (``twisted`` is a regular package: only its
    ``twisted.plugins`` takes modules from other distributions)."""
    return (module == "twisted" or module.startswith("twisted.")) and not (
        module == "twisted.plugins" or module.startswith("twisted.plugins."))


class _StandInUnpickler(pickle.Unpickler):
    """Reads a plugin cache, with stand-ins for interfaces of Twisted modules not imported
    (see ``_PluginCachePickle``), recorded in ``standins``."""

    def __init__(self, file: Any, standins: dict[int, tuple[InterfaceClass, str, str]]) -> None:
        super().__init__(file)
        self._standins = standins

    def find_class(self, module: str, name: str) -> Any:
        if module not in sys.modules and _twisteds_own(module):
            standin = InterfaceClass(name, __module__=module)
            self._standins[id(standin)] = (standin, module, name)
            return standin
        return super().find_class(module, name)


class _PluginCachePickle:
    """What ``twisted.plugin`` uses as ``pickle`` while hardware managers are discovered.

    Twisted's ``dropin.cache`` lists what each of its dropins provides: trial's reporters
    (``twisted.trial.itrial``, which imports ``unittest`` and ``argparse``),
    ``twisted.cred.strcred``, ``twisted.words.iwords``... Read the usual way, it imports
    them all (about 0.8 MiB the agent then holds for good) to find none of them a hardware
    manager. Here an interface of a Twisted module not imported yet is read as a stand-in,
    an empty interface of the same name: like the real one it neither extends
    ``IHardwareManager`` (Twisted's interfaces cannot extend another package's) nor has an
    adapter to it (registering one would have imported its module), so ``getPlugins``
    finds the same plugins. A cache Twisted rebuilds (a dropin changed) gets the real
    interfaces back, imported then, before it is written.
    """

    def __init__(self) -> None:
        self._standins: dict[int, tuple[InterfaceClass, str, str]] = {}

    def load(self, file: Any) -> Any:
        """``pickle.load``, with the stand-ins."""
        return _StandInUnpickler(file, self._standins).load()

    def dumps(self, cache: dict[str, Any]) -> bytes:
        """``pickle.dumps`` of a plugin cache, with the real interfaces."""
        for dropin in cache.values():
            for plugin in dropin.plugins:
                plugin.provided = [self._real(interface) for interface in plugin.provided]
        return pickle.dumps(cache)

    def _real(self, interface: Any) -> Any:
        found = self._standins.get(id(interface))
        if found is None or found[0] is not interface:
            return interface
        return getattr(importlib.import_module(found[1]), found[2])

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


def discover_managers(package: ModuleType | None = None) -> list[object]:
    """Our GenericHardwareManager, then every plugin providing IHardwareManager.

    Found with ``twisted.plugin.getPlugins`` in ``package`` (default: ``twisted.plugins``,
    every dropin on the path), reading its caches without importing Twisted's own
    interfaces (see ``_PluginCachePickle``).
    """
    from twisted import plugin

    if package is None:
        package = importlib.import_module("twisted.plugins")

    # A fresh generic manager first: deduplication by class then drops the dropin's shared
    # module-level instance of it.
    found: list[object] = [GenericHardwareManager()]
    usual = getattr(plugin, "pickle", None)
    if usual is not pickle:   # a Twisted that reads its caches some other way
        return [*found, *plugin.getPlugins(IHardwareManager, package)]
    setattr(plugin, "pickle", _PluginCachePickle())  # noqa: B010 - for getCache only
    try:
        found += plugin.getPlugins(IHardwareManager, package)
    finally:
        setattr(plugin, "pickle", pickle)  # noqa: B010
    return found


class HardwareManagers:
    """The managers supporting this machine, highest support first."""

    def __init__(self, ranked: Sequence[tuple[object, int]]) -> None:
        """Use ``load`` rather than this: ``ranked`` is (manager, support), already sorted."""
        self._ranked = list(ranked)
        self._support = {id(manager): support for manager, support in self._ranked}
        self._inventory: dict[str, Any] | None = None
        self._collecting: list[Deferred[dict[str, Any]]] | None = None
        self._node: Any = None

    @classmethod
    async def load(cls, context: HardwareContext,
                   candidates: Iterable[object] | None = None) -> HardwareManagers:
        """Bind and rank ``candidates`` (default: ``discover_managers()``).

        Support is evaluated concurrently. A manager answering NONE, or whose ``bind`` or
        evaluation fails (logged), is dropped. Raises HardwareManagerNotFound when none is left.
        """
        found = discover_managers() if candidates is None else list(candidates)
        unique: list[object] = []
        seen: set[type] = set()
        for manager in found:
            if type(manager) not in seen:
                seen.add(type(manager))
                unique.append(manager)
        bound: list[object] = []
        for manager in unique:
            bind = getattr(manager, "bind", None)
            try:
                if callable(bind):
                    bind(context)
            except Exception:
                log.failure("Hardware manager {name} failed to bind; not using it",
                            name=manager_name(manager))
                continue
            bound.append(manager)
        unique = bound
        evaluating = [call_manager_method(getattr(manager, "evaluate_hardware_support"))
                      for manager in unique]
        ranked: list[tuple[object, int]] = []
        for manager, evaluation in zip(unique, evaluating):
            try:
                support = int(await evaluation)
            except Exception:
                log.failure("Hardware manager {name} failed to evaluate its hardware "
                            "support; not using it", name=manager_name(manager))
                continue
            if support <= 0:
                log.info("Hardware manager {name} does not support this machine",
                         name=manager_name(manager))
                continue
            ranked.append((manager, support))
        if not ranked:
            raise HardwareManagerNotFound()
        ranked.sort(key=lambda pair: (-pair[1], manager_name(pair[0])))
        log.info("Hardware managers in priority order: {managers}",
                 managers=", ".join(f"{manager_name(m)} ({s})" for m, s in ranked))
        return cls(ranked)

    @property
    def managers(self) -> list[object]:
        """The managers, highest priority first."""
        return [manager for manager, _ in self._ranked]

    def support_of(self, manager: object) -> int:
        """The support level ``manager`` reported (KeyError if it is not one of ours)."""
        return self._support[id(manager)]

    # -- dispatch --------------------------------------------------------------------------
    async def dispatch_to_managers(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the best manager that has it and does not refuse it.

        Managers lacking the method or raising IncompatibleHardwareMethodError are skipped;
        any other error propagates. HardwareManagerMethodNotFound when all are skipped.
        """
        for manager in self.managers:
            function = getattr(manager, method, None)
            if not callable(function):
                continue
            try:
                return await call_manager_method(function, *args, **kwargs)
            except IncompatibleHardwareMethodError as e:
                log.debug("{name}.{method} is not compatible with this hardware: {error}",
                          name=manager_name(manager), method=method, error=str(e))
        raise HardwareManagerMethodNotFound(method)

    async def dispatch_to_all_managers(self, method: str, *args: Any,
                                       **kwargs: Any) -> dict[str, Any]:
        """``{manager name: result}`` from every manager that has ``method``, in order.

        Managers raising IncompatibleHardwareMethodError are left out; any other error
        propagates. HardwareManagerMethodNotFound when none answered.
        """
        answers: dict[str, Any] = {}
        for manager in self.managers:
            function = getattr(manager, method, None)
            if not callable(function):
                continue
            try:
                answers[manager_name(manager)] = await call_manager_method(
                    function, *args, **kwargs)
            except IncompatibleHardwareMethodError as e:
                log.debug("{name}.{method} is not compatible with this hardware: {error}",
                          name=manager_name(manager), method=method, error=str(e))
        if not answers:
            raise HardwareManagerMethodNotFound(method)
        return answers

    # -- versions --------------------------------------------------------------------------
    def get_current_versions(self) -> dict[str, str]:
        """``{name: version}`` for every manager."""
        return {manager_name(m): manager_version(m) for m in self.managers}

    def check_versions(self, provided: Any = None) -> None:
        """Raise VersionMismatch unless ``provided`` equals the current versions.

        ``provided`` is what Ironic stored: a ``{name: version}`` dict, or the older list of
        ``{"name": ..., "version": ...}`` items (or one such item). None means nothing to
        check.
        """
        if provided is None:
            return
        current = self.get_current_versions()
        if _normalise_versions(provided) != current:
            raise VersionMismatch(agent_version=current, node_version=provided)

    # -- steps -----------------------------------------------------------------------------
    def deduplicate_steps(self, candidate_steps: Mapping[str, Sequence[Mapping[str, Any]]]
                          ) -> dict[str, list[Mapping[str, Any]]]:
        """Keep one step per step name, from ``{manager name: [steps]}``.

        The winner's manager has the highest support; on a tie, the step has the higher
        priority; on a tie again, its manager's name comes first in the alphabet. Every
        manager in ``candidate_steps`` stays a key (its list may become empty).
        """
        support_by_name = {manager_name(m): s for m, s in self._ranked}

        def rank(manager: str, step: Mapping[str, Any]) -> tuple[int, int, str]:
            return (-support_by_name.get(manager, 0), -int(step.get("priority") or 0),
                    manager)

        winners: dict[str, tuple[tuple[int, int, str], str, int]] = {}
        for manager, steps in candidate_steps.items():
            for index, step in enumerate(steps):
                key = rank(manager, step)
                best = winners.get(step["step"])
                if best is None or key < best[0]:
                    winners[step["step"]] = (key, manager, index)
        kept = {(manager, index) for _, manager, index in winners.values()}
        return {manager: [step for index, step in enumerate(steps)
                          if (manager, index) in kept]
                for manager, steps in candidate_steps.items()}

    # -- inventory and node ----------------------------------------------------------------
    async def list_hardware_info(self, use_cache: bool = True) -> dict[str, Any]:
        """The inventory from the best manager, cached.

        ``use_cache=False`` collects it again. Callers arriving while a collection is
        running share that one.
        """
        if use_cache and self._inventory is not None:
            return dict(self._inventory)
        waiter: Deferred[dict[str, Any]] = Deferred()
        if self._collecting is not None:
            self._collecting.append(waiter)
        else:
            self._collecting = [waiter]
            collection = Deferred.fromCoroutine(
                self.dispatch_to_managers("list_hardware_info"))
            collection.addBoth(self._collected)
        return dict(await waiter)

    def _collected(self, result: dict[str, Any] | Failure) -> None:
        waiters, self._collecting = self._collecting or [], None
        if not isinstance(result, Failure):
            self._inventory = result
        for waiter in waiters:
            if waiter.called:          # cancelled by its caller
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def cache_node(self, node: Any) -> bool:
        """Remember the Ironic node; True when it is not the node cached before.

        Callers may then wait for the node's root device (``wait_for_disks``).
        """
        changed = _node_uuid(node) != _node_uuid(self._node) or self._node is None
        self._node = node
        # Managers that choose devices by the node's hints keep their own copy.
        for manager in self.managers:
            remember = getattr(manager, "cache_node", None)
            if callable(remember):
                remember(node)
        return changed

    @property
    def cached_node(self) -> Any:
        """The node given to ``cache_node``, or None."""
        return self._node


def _node_uuid(node: Any) -> Any:
    if isinstance(node, Mapping):
        return node.get("uuid")
    return getattr(node, "uuid", None)


def _normalise_versions(provided: Any) -> dict[str, str] | None:
    """``{name: version}`` from either format Ironic may have stored, or None if neither."""
    if isinstance(provided, Mapping):
        if set(provided) == {"name", "version"} and isinstance(provided["name"], str):
            return {provided["name"]: str(provided["version"])}
        return {str(name): str(version) for name, version in provided.items()}
    if isinstance(provided, (list, tuple)):
        result: dict[str, str] = {}
        for item in provided:
            if not isinstance(item, Mapping) or "name" not in item:
                return None
            result[str(item["name"])] = str(item.get("version", _DEFAULT_VERSION))
        return result
    return None
