"""Inspection collectors: each adds its keys to the data posted to the receiver.

``inspection_collectors`` (kernel ``ipa-inspection-collectors``) names them, comma-separated,
and they run in that order, except ``logs``, which always runs last so that its archive
holds the others' log lines. Built in:

============== ===================================================================
default        ``inventory``, ``root_disk``, ``boot_interface``, ``configuration``
logs           ``logs``: base64 of a tar.gz of the journal (or /var/log), dmesg ...
pci-devices    ``pci_devices``: ``[{vendor_id, product_id, class, revision, bus,
               numa_node_id}]``
usb-devices    ``usb_devices``: ``[{product, vendor, handle, vendor_id, product_id}]``
               from sysfs, hubs left out (a manager's ``get_usb_devices`` wins)
extra-hardware ``data``: ``hardware-detect`` output (the ``hardware`` package), with
               ``inspection_benchmarks`` (cpu, disk, mem) run
dmi-decode     ``dmi``: ``{bios, cpu, memory}`` from ``dmidecode``
numa-topology  ``numa_topology``: ``{ram, cpus, nics}`` from sysfs
lldp           ``lldp_raw``: ``{interface: [[type, hex value], ...]}``
============== ===================================================================

Other packages add collectors under the ``ipa_twisted.inspector.collectors`` entry point
group: an ``async`` callable ``(data, failures, context) -> None``.

A collector reports problems with ``failures.add(...)``; they become the ``error`` key of
the data (Ironic's ``ramdisk-error`` hook then fails the inspection with that message),
and one collector's failure never stops the others. Problems the reference agent only
logs (a missing NUMA tree, a log archive that cannot be built) are only logged here too.
An unknown collector name is logged as a warning and skipped: unlike the reference agent,
which fails the whole inspection for it, this agent does not let a typo, or a collector
that only another version has, cost the node its inspection.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ipa_twisted.config import AgentConfig
from ipa_twisted.errors import (HardwareManagerMethodNotFound, IncompatibleNumaFormatError,
                                InspectionError)
from ipa_twisted.context import HardwareContext
from ipa_twisted.inspector import dmi, sysfs
from ipa_twisted.inspector.dhcp import wait_for_dhcp
from ipa_twisted.inspector.enrich import complete_inventory, field, guess_root_disk
from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError

log = Logger()

ENTRY_POINT_GROUP = "ipa_twisted.inspector.collectors"
DMIDECODE_TIMEOUT = 60.0
HARDWARE_DETECT_TIMEOUT = 600.0
"""hardware-detect with benchmarks runs for minutes."""
BENCHMARK_TIMEOUT = 3600.0
KNOWN_BENCHMARKS = ("cpu", "disk", "mem")
JOURNALD_MAX_LINES = 10000


class AccumulatedFailures:
    """Problems met while collecting, reported together instead of stopping the run."""

    def __init__(self, exc_class: type[Exception] = InspectionError) -> None:
        self._failures: list[str] = []
        self._exc_class = exc_class

    def add(self, failure: str | BaseException, *args: Any) -> None:
        """Record (and log as an error) ``failure``, %-formatted with ``args`` if given."""
        text = str(failure) % args if args else str(failure)
        log.error("Inspection: {problem}", problem=text)
        self._failures.append(text)

    @property
    def failures(self) -> list[str]:
        return list(self._failures)

    def get_error(self) -> str | None:
        """The failures as one message (the ``error`` key), or None when there are none."""
        if not self._failures:
            return None
        return "The following errors were encountered:\n" + "\n".join(
            f"* {failure}" for failure in self._failures)

    def raise_if_needed(self) -> None:
        """Raise the exception class with ``get_error()`` when anything was added."""
        if self._failures:
            raise self._exc_class(self.get_error())

    def __bool__(self) -> bool:
        return bool(self._failures)

    def __len__(self) -> int:
        return len(self._failures)


LLDPReader = Callable[[Sequence[str], float, Any, str], Awaitable[Mapping[str, Any]]]
"""``get_lldp_info(interface_names, timeout, reactor, sys_path)``."""


@dataclass(frozen=True)
class CollectorContext:
    """What collectors work with."""

    hardware: HardwareContext
    managers: Any
    """``ipa_twisted.hardware.dispatch.HardwareManagers``."""
    collector_names: tuple[str, ...]
    config: AgentConfig
    """The configuration of this run (the agent's, with any mDNS settings applied)."""
    lldp_reader: LLDPReader | None = None
    """Replaces ``ipa_twisted.net.lldp.get_lldp_info`` (tests)."""


Collector = Callable[[dict[str, Any], AccumulatedFailures, CollectorContext], Awaitable[None]]


def collector_names(config: AgentConfig) -> list[str]:
    """The names in ``inspection_collectors``, in order, without blanks or repeats."""
    names: list[str] = []
    for name in config.inspection_collectors.split(","):
        name = name.strip()
        if name and name not in names:
            names.append(name)
    return names


def run_order(names: Sequence[str]) -> list[str]:
    """``names`` with ``logs`` moved last (a warning says so when it was not)."""
    if "logs" in names and names[-1] != "logs":
        log.warn("The logs collector must run last; moving it after {others}",
                 others=", ".join(n for n in names if n != "logs"))
        return [n for n in names if n != "logs"] + ["logs"]
    return list(names)


# -- default -------------------------------------------------------------------------------
async def collect_default(data: dict[str, Any], failures: AccumulatedFailures,
                          context: CollectorContext) -> None:
    """The inventory, the guessed root disk, the PXE MAC and the configuration.

    Waits (at the same time) for DHCP (``inspection_dhcp_wait_timeout``) and for a disk
    (``disk_wait_attempts``/``disk_wait_delay``, when a manager has ``wait_for_disks``).
    """
    config, managers = context.config, context.managers
    dhcp = Deferred.fromCoroutine(wait_for_dhcp(managers, config, context.hardware.clock))
    disks = Deferred.fromCoroutine(_wait_for_disks(managers))
    await dhcp
    await disks
    inventory = complete_inventory(await managers.list_hardware_info(use_cache=False),
                                   config.sys_path)
    data["inventory"] = inventory
    root = guess_root_disk(inventory.get("disks"))
    if root is None:
        log.warn("No suitable root device detected (no disk of 4 GiB or more)")
    else:
        data["root_disk"] = root
        log.debug("Default root device is {name}", name=field(root, "name"))
    # Deprecated (use inventory.boot.pxe_interface); kept for older inspector hooks.
    data["boot_interface"] = field(inventory.get("boot"), "pxe_interface")
    data["configuration"] = {
        "collectors": list(context.collector_names),
        "managers": [{"name": name, "version": version}
                     for name, version in managers.get_current_versions().items()],
    }


async def _wait_for_disks(managers: Any) -> None:
    try:
        await managers.dispatch_to_managers("wait_for_disks")
    except HardwareManagerMethodNotFound:
        pass
    except Exception as e:
        log.warn("Waiting for disks failed: {error}", error=str(e))


# -- logs ----------------------------------------------------------------------------------
async def collect_logs(data: dict[str, Any], failures: AccumulatedFailures,
                       context: CollectorContext) -> None:
    """The system logs archive; a failure is only logged (as the reference agent does)."""
    from ipa_twisted.system_logs import collect_system_logs
    hardware = context.hardware
    try:
        data["logs"] = await collect_system_logs(
            hardware.runner,  # type: ignore[arg-type]
            hardware.reactor, journald_max_lines=JOURNALD_MAX_LINES,
            proc_path=context.config.proc_path)
    except Exception as e:
        log.warn("Could not collect the system logs: {error}", error=str(e))


# -- pci-devices ---------------------------------------------------------------------------
async def collect_pci_devices(data: dict[str, Any], failures: AccumulatedFailures,
                              context: CollectorContext) -> None:
    try:
        data["pci_devices"] = sysfs.list_pci_devices(context.config.sys_path)
    except OSError as e:
        failures.add("Failed to get the list of PCI devices: %s", e)


# -- usb-devices ---------------------------------------------------------------------------
async def collect_usb_devices(data: dict[str, Any], failures: AccumulatedFailures,
                              context: CollectorContext) -> None:
    """USB devices: a hardware manager's ``get_usb_devices`` when one has it, else sysfs."""
    try:
        devices = await context.managers.dispatch_to_managers("get_usb_devices")
    except HardwareManagerMethodNotFound:
        try:
            devices = sysfs.list_usb_devices(context.config.sys_path)
        except OSError as e:
            failures.add("Failed to get the list of USB devices: %s", e)
            return
    data["usb_devices"] = devices


# -- extra-hardware ------------------------------------------------------------------------
def benchmarks(config: AgentConfig) -> list[str]:
    """The known benchmark names in ``inspection_benchmarks`` (others are warned about)."""
    names = []
    for name in config.inspection_benchmarks.split(","):
        name = name.strip()
        if not name:
            continue
        if name not in KNOWN_BENCHMARKS:
            log.warn("Unknown benchmark {name} in inspection_benchmarks (known: {known})",
                     name=name, known=", ".join(KNOWN_BENCHMARKS))
            continue
        if name not in names:
            names.append(name)
    return names


async def collect_extra_hardware(data: dict[str, Any], failures: AccumulatedFailures,
                                 context: CollectorContext) -> None:
    """``hardware-detect`` (from the ``hardware`` package) output under ``data``.

    It runs as a child process, through the runner, like any program: the reactor never
    waits on it, and it can be killed when it hangs.
    """
    argv = ["hardware-detect"]
    wanted = benchmarks(context.config)
    if wanted:
        argv += ["--benchmark", *wanted]
    try:
        out, _ = await context.hardware.runner.execute(
            *argv, timeout=BENCHMARK_TIMEOUT if wanted else HARDWARE_DETECT_TIMEOUT)
    except CommandNotFoundError:
        failures.add("extra-hardware: the hardware package is not installed (no "
                     "hardware-detect program); install it in the ramdisk to use this "
                     "collector")
        return
    except ProcessExecutionError as e:
        failures.add("Failed to run the hardware-detect utility: %s", e)
        return
    try:
        data["data"] = json.loads(out)
    except ValueError as e:
        failures.add("JSON returned from hardware-detect cannot be decoded: %s", e)


# -- dmi-decode ----------------------------------------------------------------------------
async def collect_dmidecode(data: dict[str, Any], failures: AccumulatedFailures,
                            context: CollectorContext) -> None:
    try:
        out, _ = await context.hardware.runner.execute(*dmi.DMIDECODE_ARGV,
                                                       timeout=DMIDECODE_TIMEOUT)
    except ProcessExecutionError as e:   # CommandNotFoundError too
        failures.add("Failed to run dmidecode: %s", e)
        return
    data["dmi"] = dmi.parse_dmi(out.decode("utf-8", "replace"))


# -- numa-topology -------------------------------------------------------------------------
async def collect_numa_topology(data: dict[str, Any], failures: AccumulatedFailures,
                                context: CollectorContext) -> None:
    """NUMA nodes' memory, cores and NICs; unreadable data is logged, as the reference
    agent does, and leaves the key out."""
    try:
        topology = sysfs.numa_topology(context.config.sys_path)
    except IncompatibleNumaFormatError as e:
        log.warn("Failed to get the NUMA topology: {error}", error=str(e))
        return
    if topology is None:
        log.warn("No NUMA information: {path} does not exist",
                 path=f"{context.config.sys_path}/devices/system/node")
        return
    data["numa_topology"] = topology


# -- lldp ----------------------------------------------------------------------------------
async def collect_lldp(data: dict[str, Any], failures: AccumulatedFailures,
                       context: CollectorContext) -> None:
    """Raw LLDP TLVs per interface (``lldp_raw``), for Ironic's parse-lldp hooks."""
    read = context.lldp_reader
    if read is None:
        try:
            lldp = importlib.import_module("ipa_twisted.net.lldp")
        except ModuleNotFoundError as e:
            if e.name not in ("ipa_twisted.net", "ipa_twisted.net.lldp"):
                raise
            failures.add("lldp: LLDP support (ipa_twisted.net.lldp) is not available in "
                         "this version of the agent")
            return
        read = lldp.get_lldp_info
    inventory = data.get("inventory") or {}
    interfaces = inventory.get("interfaces")
    if interfaces is None:
        interfaces = await context.managers.dispatch_to_managers("list_network_interfaces")
    names = [str(field(i, "name")) for i in interfaces if field(i, "name")]
    config = context.config
    found = await read(names, config.lldp_timeout, context.hardware.reactor,
                       config.sys_path)
    data["lldp_raw"] = {name: [[int(t), str(v)] for t, v in tlvs]
                        for name, tlvs in found.items()}


BUILTIN_COLLECTORS: dict[str, Collector] = {
    "default": collect_default,
    "logs": collect_logs,
    "pci-devices": collect_pci_devices,
    "usb-devices": collect_usb_devices,
    "extra-hardware": collect_extra_hardware,
    "dmi-decode": collect_dmidecode,
    "numa-topology": collect_numa_topology,
    "lldp": collect_lldp,
}


def find_collector(name: str) -> Collector | None:
    """The built-in collector ``name``, else one from the entry point group, else None."""
    if name in BUILTIN_COLLECTORS:
        return BUILTIN_COLLECTORS[name]
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name == name:
            loaded: Collector = point.load()
            return loaded
    return None


def known_collectors() -> list[str]:
    """The built-in collectors' names, then those of the entry point group."""
    names = list(BUILTIN_COLLECTORS)
    names += sorted({point.name for point in entry_points(group=ENTRY_POINT_GROUP)}
                    - set(names))
    return names
