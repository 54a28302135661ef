"""What a hardware manager is, and a convenient base class for writing one.

Every manager provides ``IHardwareManager``: a name, a version and
``evaluate_hardware_support()``. Everything else (inventory getters, clean and deploy steps,
``erase_block_device`` ...) is optional and found by name when the agent dispatches a call to
the managers (see ``ipa_twisted.hardware.dispatch``). Any manager method may return a plain
value, a Deferred, or be an ``async def``.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar, Union

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface, implementer

from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import IncompatibleHardwareMethodError
from ipa_twisted.hardware.inventory import (CPU, BlockDevice, BootInfo, Memory,
                                            NetworkInterface, SystemVendorInfo)

_T = TypeVar("_T")
MaybeAsync = Union[_T, Awaitable[_T]]
"""What a manager method may return: the value itself, a Deferred or a coroutine of it."""


class IHardwareManager(Interface):
    """A provider of hardware support: inventory, steps, erasure ... for some hardware."""

    HARDWARE_MANAGER_NAME = Attribute(
        "Name used in step lists, version checks and dispatch_to_all_managers results.")
    HARDWARE_MANAGER_VERSION = Attribute(
        "Version string; Ironic restarts cleaning/deploying when it changes.")

    def evaluate_hardware_support() -> MaybeAsync[int]:
        """Support level for this machine: an int (a HardwareSupport value; 0 means none).

        May return a Deferred of it, or be a coroutine function.
        """


class HardwareSupport(enum.IntEnum):
    """Support levels; the larger, the more specific, and the earlier a manager is asked."""

    NONE = 0
    GENERIC = 1
    MAINLINE = 2
    SERVICE_PROVIDER = 3


def call_manager_method(method: Callable[..., Any], *args: Any,
                        **kwargs: Any) -> Deferred[Any]:
    """Call a manager method and give its result as a Deferred.

    Plain values, Deferreds and coroutines (``async def``) are all accepted; an exception
    raised synchronously becomes a failed Deferred.
    """
    return maybeDeferred(method, *args, **kwargs)


# Inventory fields and the getters that fill them, in the reference agent's order.
_INVENTORY_GETTERS: tuple[tuple[str, str], ...] = (
    ("interfaces", "list_network_interfaces"),
    ("cpu", "get_cpus"),
    ("disks", "list_block_devices"),
    ("memory", "get_memory"),
    ("bmc_address", "get_bmc_address"),
    ("bmc_v6address", "get_bmc_v6address"),
    ("system_vendor", "get_system_vendor_info"),
    ("boot", "get_boot_info"),
    ("hostname", "get_hostname"),
)
# Fields that are left out (not set to None) when the manager does not support them.
_OPTIONAL_INVENTORY_GETTERS: tuple[tuple[str, str], ...] = (("bmc_mac", "get_bmc_mac"),)
_BMC_FIELDS = frozenset({"bmc_address", "bmc_v6address"})
_OPTIONAL_BMC_FIELDS = frozenset({"bmc_mac"})
"""Fields ``skip_bmc_detect`` leaves None, and leaves out."""


@implementer(IHardwareManager, IPlugin)
class HardwareManager:
    """Base class for hardware managers.

    Subclasses set ``HARDWARE_MANAGER_NAME`` (default: the class name) and
    ``HARDWARE_MANAGER_VERSION`` (default ``"1.0"``), implement
    ``evaluate_hardware_support()`` and whichever getters or steps they support; the
    getters here raise IncompatibleHardwareMethodError so dispatch moves on to the next
    manager. The agent calls ``bind(context)`` before using a manager.

    Instances also provide ``IPlugin``, so a module-level instance in a
    ``twisted/plugins/*.py`` dropin is found by the agent.
    """

    log = Logger()

    HARDWARE_MANAGER_NAME: ClassVar[str]
    HARDWARE_MANAGER_VERSION: ClassVar[str] = "1.0"
    _default_name: ClassVar[bool] = False

    _context: HardwareContext | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The name defaults to the class name: set by a class (or a parent) or else this
        # class's own name, never a parent's default.
        named = any("HARDWARE_MANAGER_NAME" in vars(klass)
                    and not vars(klass).get("_default_name", False) for klass in cls.__mro__)
        if not named:
            cls.HARDWARE_MANAGER_NAME = cls.__name__
            cls._default_name = True

    def bind(self, context: HardwareContext) -> None:
        """Give this manager the configuration, process runner and clock it works with."""
        self._context = context

    @property
    def context(self) -> HardwareContext:
        """The context given to ``bind``; RuntimeError before that."""
        if self._context is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a HardwareContext; "
                               "call bind() first")
        return self._context

    def evaluate_hardware_support(self) -> MaybeAsync[int]:
        raise NotImplementedError(f"{type(self).__name__} must evaluate its hardware support")

    def get_version(self) -> dict[str, str]:
        """``{"name": ..., "version": ...}`` of this manager."""
        return {"name": self.HARDWARE_MANAGER_NAME,
                "version": str(self.HARDWARE_MANAGER_VERSION)}

    def get_clean_steps(self, node: Any, ports: Any) -> MaybeAsync[list[dict[str, Any]]]:
        """Clean steps this manager offers (see the spec for the step format)."""
        return []

    def get_deploy_steps(self, node: Any, ports: Any) -> MaybeAsync[list[dict[str, Any]]]:
        """Deploy steps this manager offers."""
        return []

    def get_service_steps(self, node: Any, ports: Any) -> MaybeAsync[list[dict[str, Any]]]:
        """Service steps this manager offers."""
        return []

    # -- inventory getters: unsupported unless a subclass says otherwise -------------------
    def _unsupported(self, what: str) -> IncompatibleHardwareMethodError:
        return IncompatibleHardwareMethodError(f"{self.HARDWARE_MANAGER_NAME} does not "
                                               f"implement {what}")

    def list_network_interfaces(self) -> MaybeAsync[list[NetworkInterface]]:
        raise self._unsupported("list_network_interfaces")

    def get_cpus(self) -> MaybeAsync[CPU]:
        raise self._unsupported("get_cpus")

    def list_block_devices(self, include_partitions: bool = False
                           ) -> MaybeAsync[list[BlockDevice]]:
        raise self._unsupported("list_block_devices")

    def get_memory(self) -> MaybeAsync[Memory]:
        raise self._unsupported("get_memory")

    def get_bmc_address(self) -> MaybeAsync[str | None]:
        raise self._unsupported("get_bmc_address")

    def get_bmc_v6address(self) -> MaybeAsync[str | None]:
        raise self._unsupported("get_bmc_v6address")

    def get_bmc_mac(self) -> MaybeAsync[str | None]:
        raise self._unsupported("get_bmc_mac")

    def get_system_vendor_info(self) -> MaybeAsync[SystemVendorInfo]:
        raise self._unsupported("get_system_vendor_info")

    def get_boot_info(self) -> MaybeAsync[BootInfo]:
        raise self._unsupported("get_boot_info")

    def get_hostname(self) -> MaybeAsync[str]:
        """This machine's host name (usually set by DHCP)."""
        return socket.gethostname()

    async def list_hardware_info(self) -> dict[str, Any]:
        """The hardware inventory, from this manager's getters run concurrently.

        A getter that fails leaves its field None (logged as a warning); the rest of the
        inventory is kept. A getter raising IncompatibleHardwareMethodError means this
        manager cannot produce the inventory at all: that error propagates, so dispatch
        asks the next manager (``bmc_mac`` is the exception: it is left out instead).
        With the ``skip_bmc_detect`` option (Ironic's ``agent_skip_bmc_detect``) the BMC
        getters are not called: ``bmc_address`` and ``bmc_v6address`` are None and
        ``bmc_mac`` is left out, as with the reference agent.
        """
        skip_bmc = self._context is not None and self._context.config.skip_bmc_detect
        if skip_bmc:
            self.log.info("Skipping BMC detection as requested by Ironic "
                          "(agent_skip_bmc_detect)")
        started: dict[str, Deferred[Any]] = {
            field: succeed(None) if skip_bmc and field in _BMC_FIELDS
            else call_manager_method(getattr(self, getter))
            for field, getter in _INVENTORY_GETTERS + _OPTIONAL_INVENTORY_GETTERS
            if not (skip_bmc and field in _OPTIONAL_BMC_FIELDS)}
        optional = {field for field, _ in _OPTIONAL_INVENTORY_GETTERS}
        inventory: dict[str, Any] = {}
        incompatible: IncompatibleHardwareMethodError | None = None
        for field, running in started.items():   # all running already: just collect
            try:
                inventory[field] = await running
            except (IncompatibleHardwareMethodError, NotImplementedError) as e:
                if field in optional:
                    continue
                if isinstance(e, IncompatibleHardwareMethodError):
                    incompatible = incompatible or e
                    continue
                self._degrade(field, e, inventory)
            except Exception as e:
                self._degrade(field, e, inventory)
        if incompatible is not None:
            raise incompatible
        return inventory

    def _degrade(self, field: str, error: Exception, inventory: dict[str, Any]) -> None:
        self.log.warn("Inventory field {field} left empty: {manager} failed with "
                      "{error_type}: {error}", field=field,
                      manager=self.HARDWARE_MANAGER_NAME, error_type=type(error).__name__,
                      error=str(error))
        inventory[field] = None
