"""Tests for ipa_twisted.hardware: the manager interface, loading, dispatch, steps, versions."""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ipa_twisted.config import AgentConfig
from ipa_twisted.errors import (HardwareManagerMethodNotFound, HardwareManagerNotFound,
                                IncompatibleHardwareMethodError, VersionMismatch)
from ipa_twisted.hardware.dispatch import HardwareManagers, discover_managers
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.hardware.interface import HardwareManager, HardwareSupport, IHardwareManager
from ipa_twisted.context import HardwareContext
from ipa_twisted.testing.fake_process import FakeRunner

_T = TypeVar("_T")


def context() -> HardwareContext:
    return HardwareContext(config=AgentConfig(), runner=FakeRunner(), clock=Clock(),
                           reactor=None)


class Manager(HardwareManager):
    """A configurable manager for the tests."""

    support: int = HardwareSupport.GENERIC

    def __init__(self, support: int | None = None) -> None:
        if support is not None:
            self.support = support
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def evaluate_hardware_support(self) -> int:
        return self.support


class Mainline(Manager):
    HARDWARE_MANAGER_NAME = "mainline"
    HARDWARE_MANAGER_VERSION = "2.3"
    support = HardwareSupport.MAINLINE

    def erase(self, node: Any) -> str:          # plain value
        self.calls.append(("erase", (node,)))
        return "mainline erased"

    def refuse(self) -> None:
        raise IncompatibleHardwareMethodError("not my hardware")

    def explode(self) -> None:
        raise ZeroDivisionError()

    def get_clean_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        return [{"step": "erase", "priority": 10, "interface": "deploy"}]


class Vendor(Manager):
    HARDWARE_MANAGER_NAME = "vendor"
    support = HardwareSupport.SERVICE_PROVIDER

    def refuse(self) -> Deferred[None]:        # a Deferred failing
        from twisted.internet.defer import fail
        return fail(IncompatibleHardwareMethodError("not mine either"))

    async def get_clean_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        raise IncompatibleHardwareMethodError("no steps here")


class Fallback(Manager):
    HARDWARE_MANAGER_NAME = "fallback"

    async def refuse(self) -> str:              # a coroutine
        return "fallback accepted"

    def explode(self) -> str:
        return "never reached"

    def erase(self, node: Any) -> Deferred[str]:
        return succeed("fallback erased")


class NoName(Manager):
    pass


@implementer(IHardwareManager)
class Bare:
    """A provider that does not subclass HardwareManager (no bind, no get_version)."""

    HARDWARE_MANAGER_NAME = "bare"
    HARDWARE_MANAGER_VERSION = "0.1"

    async def evaluate_hardware_support(self) -> int:
        return HardwareSupport.MAINLINE

    def only_here(self) -> str:
        return "bare"


class DispatchTestCase(SynchronousTestCase):
    def result(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return self.successResultOf(Deferred.fromCoroutine(coroutine))

    def load(self, *candidates: object) -> HardwareManagers:
        return self.result(HardwareManagers.load(context(), candidates))


class LoadTests(DispatchTestCase):
    def test_priority_order_by_support_then_name(self) -> None:
        generic, vendor, mainline = Fallback(), Vendor(), Mainline()
        other_generic = NoName()
        managers = self.load(generic, mainline, other_generic, vendor)
        self.assertEqual(managers.managers, [vendor, mainline, other_generic, generic])
        self.assertEqual(managers.support_of(vendor), HardwareSupport.SERVICE_PROVIDER)

    def test_name_defaults_to_class_name(self) -> None:
        self.assertEqual(NoName.HARDWARE_MANAGER_NAME, "NoName")
        self.assertEqual(NoName().get_version(), {"name": "NoName", "version": "1.0"})
        self.assertEqual(Mainline().get_version(), {"name": "mainline", "version": "2.3"})

    def test_binds_managers_that_can_be_bound(self) -> None:
        manager, bare = Mainline(), Bare()
        ctx = context()
        self.result(HardwareManagers.load(ctx, [manager, bare]))
        self.assertIs(manager.context, ctx)

    def test_unbound_manager_has_no_context(self) -> None:
        self.assertRaises(RuntimeError, lambda: Mainline().context)

    def test_evaluate_may_be_async_or_deferred(self) -> None:
        class Later(Manager):
            def evaluate_hardware_support(self) -> Deferred[int]:  # type: ignore[override]
                return succeed(HardwareSupport.SERVICE_PROVIDER)
        later, bare = Later(), Bare()
        managers = self.load(Fallback(), later, bare)
        self.assertEqual(managers.managers[:2], [later, bare])

    def test_no_support_is_dropped(self) -> None:
        kept = Fallback()
        managers = self.load(kept, Manager(HardwareSupport.NONE))
        self.assertEqual(managers.managers, [kept])

    def test_failing_evaluation_is_dropped_and_logged(self) -> None:
        class Broken(Manager):
            def evaluate_hardware_support(self) -> int:
                raise OSError("no such device")
        kept = Fallback()
        managers = self.load(Broken(), kept)
        self.assertEqual(managers.managers, [kept])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_failing_bind_is_dropped_and_logged(self) -> None:
        class Unbindable(Mainline):
            def bind(self, context: HardwareContext) -> None:
                raise ValueError("bad configuration")
        kept = Fallback()
        managers = self.load(Unbindable(), kept)
        self.assertEqual(managers.managers, [kept])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_no_manager_left(self) -> None:
        self.failureResultOf(Deferred.fromCoroutine(HardwareManagers.load(
            context(), [Manager(HardwareSupport.NONE)])), HardwareManagerNotFound)

    def test_duplicates_by_class_are_dropped(self) -> None:
        first = Fallback()
        managers = self.load(first, Fallback())
        self.assertEqual(managers.managers, [first])

    def test_generic_manager_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(IHardwareManager, GenericHardwareManager()))
        self.assertTrue(verifyObject(IHardwareManager, Bare()))

    def test_plugins_find_the_generic_manager(self) -> None:
        from twisted.plugin import getPlugins

        import twisted.plugins
        found = list(getPlugins(IHardwareManager, twisted.plugins))
        self.assertIn(GenericHardwareManager, [type(plugin) for plugin in found])

    def test_default_candidates_include_generic_once(self) -> None:
        managers = self.result(HardwareManagers.load(context()))
        generics = [m for m in managers.managers if isinstance(m, GenericHardwareManager)]
        self.assertEqual(len(generics), 1)
        self.assertEqual(managers.support_of(generics[0]), HardwareSupport.GENERIC)


_DROPIN_MANAGER = """
from ipa_twisted.hardware.interface import HardwareManager


class DropinManager(HardwareManager):
    HARDWARE_MANAGER_NAME = "dropin"

    def evaluate_hardware_support(self) -> int:
        return 1


manager = DropinManager()
"""

_DROPIN_WORDS = """
from twisted.plugin import IPlugin
from twisted.words.iwords import IProtocolPlugin
from zope.interface import implementer


@implementer(IPlugin, IProtocolPlugin)
class Chat:
    name = "chat"


chat = Chat()
"""

_WORDS = "twisted.words.iwords"


class PluginCacheTests(SynchronousTestCase):
    """discover_managers finds managers in a plugin package's cache without importing the
    Twisted interfaces other dropins provide, as a fresh agent process would."""

    def setUp(self) -> None:
        from twisted.plugin import IPlugin, getPlugins
        root = os.path.abspath(self.mktemp())
        self.name = f"ipa_test_dropins_{uuid.uuid4().hex}"
        directory = os.path.join(root, self.name)
        os.makedirs(directory)
        past = time.time() - 100
        for file, text in [("__init__.py", ""), ("hardware.py", _DROPIN_MANAGER),
                           ("chat.py", _DROPIN_WORDS)]:
            path = os.path.join(directory, file)
            with open(path, "w") as source:
                source.write(text)
            os.utime(path, (past, past))
        sys.path.insert(0, root)
        self.addCleanup(sys.path.remove, root)
        self.addCleanup(sys.modules.pop, self.name, None)
        self.package = importlib.import_module(self.name)
        list(getPlugins(IPlugin, self.package))  # the cache, as twistd or a build writes it
        self.cache = os.path.join(directory, "dropin.cache")
        with open(self.cache, "rb") as f:
            self.written = f.read()
        for dropin in ("hardware", "chat"):
            self.addCleanup(sys.modules.pop, f"{self.name}.{dropin}", None)
        # A fresh process: Twisted's words interfaces not imported yet.
        import twisted.words
        words = sys.modules.pop(_WORDS)

        def restore() -> None:
            sys.modules[_WORDS] = words
            twisted.words.iwords = words  # type: ignore[attr-defined]
        self.addCleanup(restore)

    def names(self, managers: list[object]) -> list[str]:
        return [getattr(m, "HARDWARE_MANAGER_NAME", type(m).__name__) for m in managers]

    def test_found_without_importing_other_interfaces(self) -> None:
        import twisted.plugin
        managers = discover_managers(self.package)
        self.assertEqual(self.names(managers), ["generic_hardware_manager", "dropin"])
        self.assertNotIn(_WORDS, sys.modules)
        self.assertIs(twisted.plugin.pickle, pickle)  # type: ignore[attr-defined]
        with open(self.cache, "rb") as f:
            self.assertEqual(f.read(), self.written)

    def test_rebuilt_cache_holds_the_real_interfaces(self) -> None:
        # The manager's dropin changed: Twisted rebuilds its entry and writes the cache
        # back, with the chat dropin's entry as it was read (a stand-in for IProtocolPlugin).
        changed = time.time() - 10
        os.utime(os.path.join(os.path.dirname(self.cache), "hardware.py"), (changed, changed))
        os.utime(self.cache, (changed - 40, changed - 40))
        managers = discover_managers(self.package)
        self.assertEqual(self.names(managers), ["generic_hardware_manager", "dropin"])
        self.assertGreater(os.path.getmtime(self.cache), changed)   # written back
        with open(self.cache, "rb") as f:
            written = f.read()
        self.assertEqual(written, self.written)   # the same interfaces, by module and name
        from twisted.plugin import IPlugin
        provided = pickle.loads(written)["chat"].plugins[0].provided
        # the very interfaces (a stand-in would only compare equal: same name and module)
        self.assertEqual({id(i) for i in provided},
                         {id(IPlugin), id(sys.modules[_WORDS].IProtocolPlugin)})

    def test_the_same_managers_as_getplugins(self) -> None:
        from twisted.plugin import getPlugins

        import twisted.plugins
        usual = {type(m) for m in getPlugins(IHardwareManager, twisted.plugins)}
        self.assertEqual({type(m) for m in discover_managers()}, usual)


class DispatchToManagersTests(DispatchTestCase):
    def setUp(self) -> None:
        self.vendor, self.mainline, self.fallback = Vendor(), Mainline(), Fallback()
        self.managers = self.load(self.fallback, self.mainline, self.vendor)

    def test_best_manager_with_the_method_answers(self) -> None:
        self.assertEqual(self.result(self.managers.dispatch_to_managers("erase", "node")),
                         "mainline erased")
        self.assertEqual(self.mainline.calls, [("erase", ("node",))])

    def test_keyword_arguments_are_passed(self) -> None:
        self.assertEqual(self.result(self.managers.dispatch_to_managers("erase", node=1)),
                         "mainline erased")
        self.assertEqual(self.mainline.calls, [("erase", (1,))])

    def test_incompatible_falls_through(self) -> None:
        # vendor's Deferred fails, mainline raises, fallback's coroutine answers.
        self.assertEqual(self.result(self.managers.dispatch_to_managers("refuse")),
                         "fallback accepted")

    def test_deferred_result(self) -> None:
        managers = self.load(self.fallback)
        self.assertEqual(self.result(managers.dispatch_to_managers("erase", "n")),
                         "fallback erased")

    def test_other_errors_propagate(self) -> None:
        self.failureResultOf(Deferred.fromCoroutine(
            self.managers.dispatch_to_managers("explode")), ZeroDivisionError)

    def test_method_nowhere(self) -> None:
        failure = self.failureResultOf(Deferred.fromCoroutine(
            self.managers.dispatch_to_managers("no_such_method")),
            HardwareManagerMethodNotFound)
        self.assertIn("no_such_method", str(failure.value))

    def test_all_incompatible(self) -> None:
        managers = self.load(self.vendor, self.mainline)
        self.failureResultOf(Deferred.fromCoroutine(managers.dispatch_to_managers("refuse")),
                             HardwareManagerMethodNotFound)

    def test_dispatch_to_all(self) -> None:
        answers = self.result(self.managers.dispatch_to_all_managers("erase", "n"))
        self.assertEqual(answers, {"mainline": "mainline erased",
                                   "fallback": "fallback erased"})
        self.assertEqual(list(answers), ["mainline", "fallback"])

    def test_dispatch_to_all_skips_incompatible(self) -> None:
        answers = self.result(self.managers.dispatch_to_all_managers("refuse"))
        self.assertEqual(answers, {"fallback": "fallback accepted"})
        steps = self.result(self.managers.dispatch_to_all_managers("get_clean_steps", {}, []))
        self.assertEqual(set(steps), {"mainline", "fallback"})

    def test_dispatch_to_all_errors_propagate(self) -> None:
        self.failureResultOf(Deferred.fromCoroutine(
            self.managers.dispatch_to_all_managers("explode")), ZeroDivisionError)

    def test_dispatch_to_all_nobody(self) -> None:
        managers = self.load(self.vendor, self.mainline)
        self.failureResultOf(Deferred.fromCoroutine(
            managers.dispatch_to_all_managers("refuse")), HardwareManagerMethodNotFound)
        self.failureResultOf(Deferred.fromCoroutine(
            managers.dispatch_to_all_managers("nothing")), HardwareManagerMethodNotFound)


class VersionTests(DispatchTestCase):
    def setUp(self) -> None:
        self.managers = self.load(Fallback(), Mainline())
        self.current = {"mainline": "2.3", "fallback": "1.0"}

    def test_current_versions(self) -> None:
        self.assertEqual(self.managers.get_current_versions(), self.current)

    def test_nothing_to_check(self) -> None:
        self.managers.check_versions(None)
        self.managers.check_versions()

    def test_same_versions_as_a_dict(self) -> None:
        self.managers.check_versions({"fallback": "1.0", "mainline": "2.3"})

    def test_same_versions_as_the_older_list(self) -> None:
        self.managers.check_versions([{"name": "mainline", "version": "2.3"},
                                      {"name": "fallback", "version": "1.0"}])

    def test_single_manager_item(self) -> None:
        managers = self.load(Mainline())
        managers.check_versions({"name": "mainline", "version": "2.3"})
        self.assertRaises(VersionMismatch, managers.check_versions,
                          {"name": "mainline", "version": "2.2"})

    def test_different_versions(self) -> None:
        provided = {"mainline": "2.2", "fallback": "1.0"}
        error = self.assertRaises(VersionMismatch, self.managers.check_versions, provided)
        self.assertEqual((error.agent_version, error.node_version), (self.current, provided))
        self.assertRaises(VersionMismatch, self.managers.check_versions,
                          [{"name": "mainline", "version": "2.3"}])
        self.assertRaises(VersionMismatch, self.managers.check_versions,
                          {"mainline": "2.3", "fallback": "1.0", "extra": "1"})
        self.assertRaises(VersionMismatch, self.managers.check_versions, "garbage")


class DeduplicateStepsTests(DispatchTestCase):
    def test_higher_support_wins(self) -> None:
        managers = self.load(Vendor(), Fallback())
        deduplicated = managers.deduplicate_steps({
            "fallback": [{"step": "erase", "priority": 99}, {"step": "only", "priority": 1}],
            "vendor": [{"step": "erase", "priority": 1}]})
        self.assertEqual(deduplicated, {"fallback": [{"step": "only", "priority": 1}],
                                        "vendor": [{"step": "erase", "priority": 1}]})

    def test_equal_support_higher_priority_wins(self) -> None:
        managers = self.load(Fallback(), NoName())
        deduplicated = managers.deduplicate_steps({
            "fallback": [{"step": "erase", "priority": 10}],
            "NoName": [{"step": "erase", "priority": 20}]})
        self.assertEqual(deduplicated, {"fallback": [],
                                        "NoName": [{"step": "erase", "priority": 20}]})

    def test_equal_support_and_priority_first_name_wins(self) -> None:
        managers = self.load(Fallback(), NoName())
        steps = {"fallback": [{"step": "erase", "priority": 10, "by": "fallback"}],
                 "NoName": [{"step": "erase", "priority": 10, "by": "NoName"}]}
        # "NoName" < "fallback" in the (ASCII) alphabet, whatever the input order.
        self.assertEqual(managers.deduplicate_steps(steps)["NoName"][0]["by"], "NoName")
        reversed_steps = dict(reversed(list(steps.items())))
        self.assertEqual(managers.deduplicate_steps(reversed_steps)["fallback"], [])

    def test_missing_priority_counts_as_zero(self) -> None:
        managers = self.load(Fallback(), NoName())
        deduplicated = managers.deduplicate_steps({
            "fallback": [{"step": "erase"}], "NoName": [{"step": "erase", "priority": 1}]})
        self.assertEqual(deduplicated["fallback"], [])


class InventoryCacheTests(DispatchTestCase):
    def setUp(self) -> None:
        self.collections: list[Deferred[dict[str, Any]]] = []
        test = self

        class Collector(Manager):
            def list_hardware_info(self) -> Deferred[dict[str, Any]]:  # type: ignore[override]
                collection: Deferred[dict[str, Any]] = Deferred()
                test.collections.append(collection)
                return collection

        self.managers = self.load(Collector())

    def test_concurrent_misses_share_one_collection(self) -> None:
        first = Deferred.fromCoroutine(self.managers.list_hardware_info())
        second = Deferred.fromCoroutine(self.managers.list_hardware_info(use_cache=False))
        self.assertEqual(len(self.collections), 1)
        self.assertNoResult(first)
        self.collections[0].callback({"cpu": "x"})
        self.assertEqual(self.successResultOf(first), {"cpu": "x"})
        self.assertEqual(self.successResultOf(second), {"cpu": "x"})

    def test_cached_until_refreshed(self) -> None:
        first = Deferred.fromCoroutine(self.managers.list_hardware_info())
        self.collections[0].callback({"cpu": "x"})
        self.successResultOf(first)
        self.assertEqual(self.result(self.managers.list_hardware_info()), {"cpu": "x"})
        self.assertEqual(len(self.collections), 1)
        refreshed = Deferred.fromCoroutine(self.managers.list_hardware_info(use_cache=False))
        self.collections[1].callback({"cpu": "y"})
        self.assertEqual(self.successResultOf(refreshed), {"cpu": "y"})
        self.assertEqual(self.result(self.managers.list_hardware_info()), {"cpu": "y"})

    def test_callers_get_copies(self) -> None:
        first = Deferred.fromCoroutine(self.managers.list_hardware_info())
        self.collections[0].callback({"cpu": "x"})
        self.successResultOf(first)["extra"] = 1
        self.assertEqual(self.result(self.managers.list_hardware_info()), {"cpu": "x"})

    def test_failure_reaches_every_caller_and_is_not_cached(self) -> None:
        first = Deferred.fromCoroutine(self.managers.list_hardware_info())
        second = Deferred.fromCoroutine(self.managers.list_hardware_info())
        self.collections[0].errback(OSError("boom"))
        self.failureResultOf(first, OSError)
        self.failureResultOf(second, OSError)
        Deferred.fromCoroutine(self.managers.list_hardware_info())
        self.assertEqual(len(self.collections), 2)

    def test_a_cancelled_caller_does_not_disturb_the_others(self) -> None:
        first = Deferred.fromCoroutine(self.managers.list_hardware_info())
        second = Deferred.fromCoroutine(self.managers.list_hardware_info())
        first.cancel()
        self.failureResultOf(first)
        self.collections[0].callback({"cpu": "x"})
        self.assertEqual(self.successResultOf(second), {"cpu": "x"})

    def test_cache_node(self) -> None:
        self.assertIsNone(self.managers.cached_node)
        self.assertTrue(self.managers.cache_node({"uuid": "a"}))
        self.assertFalse(self.managers.cache_node({"uuid": "a", "extra": 1}))
        self.assertEqual(self.managers.cached_node, {"uuid": "a", "extra": 1})
        self.assertTrue(self.managers.cache_node({"uuid": "b"}))


class BaseInventoryTests(DispatchTestCase):
    """HardwareManager.list_hardware_info, from whatever getters a manager has."""

    def test_fields_from_getters_and_failures_degrade(self) -> None:
        class Partial(Manager):
            HARDWARE_MANAGER_NAME = "partial"

            def list_network_interfaces(self) -> list[Any]:
                return []

            async def get_cpus(self) -> Any:
                return "cpu"

            def list_block_devices(self, include_partitions: bool = False) -> Any:
                return succeed(["disk"])

            def get_memory(self) -> Any:
                raise OSError("no meminfo")

            def get_bmc_address(self) -> Any:
                return None

            def get_bmc_v6address(self) -> Any:
                return None

            def get_system_vendor_info(self) -> Any:
                return "vendor"

            def get_boot_info(self) -> Any:
                return "boot"

            def get_hostname(self) -> str:
                return "host"

        with capturedLogs() as events:
            inventory = self.result(Partial().list_hardware_info())
        self.assertEqual(inventory, {
            "interfaces": [], "cpu": "cpu", "disks": ["disk"], "memory": None,
            "bmc_address": None, "bmc_v6address": None, "system_vendor": "vendor",
            "boot": "boot", "hostname": "host"})             # no bmc_mac: unsupported
        warnings = [e for e in events if e.get("field") == "memory"]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["error"], "no meminfo")

    def test_incompatible_manager_falls_through_to_the_next(self) -> None:
        class StepsOnly(Manager):
            HARDWARE_MANAGER_NAME = "steps_only"
            support = HardwareSupport.SERVICE_PROVIDER

        class Inventory(Manager):
            def list_hardware_info(self) -> dict[str, Any]:  # type: ignore[override]
                return {"from": "inventory"}

        managers = self.load(StepsOnly(), Inventory())
        self.assertEqual(self.result(managers.list_hardware_info()), {"from": "inventory"})


class CacheNodePropagationTests(SynchronousTestCase):
    def test_managers_with_cache_node_get_the_node(self) -> None:
        class Remembering:
            HARDWARE_MANAGER_NAME = "remembering"
            HARDWARE_MANAGER_VERSION = "1"
            node: Any = None

            def evaluate_hardware_support(self) -> int:
                return 1

            def cache_node(self, node: Any) -> None:
                self.node = node

        class Forgetful:
            HARDWARE_MANAGER_NAME = "forgetful"
            HARDWARE_MANAGER_VERSION = "1"

            def evaluate_hardware_support(self) -> int:
                return 1

        remembering = Remembering()
        managers = HardwareManagers([(remembering, 2), (Forgetful(), 1)])
        self.assertTrue(managers.cache_node({"uuid": "n1"}))
        self.assertEqual(remembering.node, {"uuid": "n1"})
        self.assertFalse(managers.cache_node({"uuid": "n1"}))
