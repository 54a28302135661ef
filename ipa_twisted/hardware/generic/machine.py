"""The generic manager's CPU, memory, BMC, system vendor and boot mode readings.

Imported when one of them is first asked for (inspection, ``get_hardware_info``): an agent
that only looks itself up and waits never loads them. Paths and programs as in
``inventory.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ipa_twisted.context import HardwareContext
from ipa_twisted.fileutils import read_text as _read
from ipa_twisted.hardware.generic.inventory import MachineReader, int_or_none
from ipa_twisted.hardware.inventory import (CPU, BootInfo, Memory, SystemFirmware,
                                            SystemVendorInfo)
from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError, ProcessTimeoutError

_T = TypeVar("_T")

IPMI_TIMEOUT = 10.0
"""Longest wait for one ipmitool command: a hung BMC must not hold up the inventory."""
IPMI_CHANNELS = range(1, 12)
IPMI_DEVICES = ("ipmi0", "ipmi/0", "ipmidev/0")
"""IPMI device nodes under dev_path; without one, ipmitool is not even tried."""
UNCONFIGURED_BMC_V4 = "0.0.0.0"
UNCONFIGURED_BMC_V6 = "::/0"

_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_DMI_SIZE = re.compile(r"^(\d+)\s*(bytes|kB|KB|MB|GB|TB)$")
_DMI_SIZE_MB = {"bytes": 1 / 1024 / 1024, "kB": 1 / 1024, "KB": 1 / 1024, "MB": 1, "GB": 1024,
                "TB": 1024 * 1024}


class MachineDetails(MachineReader):
    """The generic manager's getters other than the interfaces and disks: ``get_cpus``,
    ``get_memory``, the BMC getters, ``get_system_vendor_info``, ``get_boot_info``."""

    def __init__(self, context: HardwareContext) -> None:
        super().__init__(context)
        self._in_flight: dict[str, list[Deferred[Any]]] = {}

    def _share(self, key: str, start: Callable[[], Coroutine[Any, Any, _T]]) -> Deferred[_T]:
        """The result of the call named ``key``: joins it if it is running, else starts it."""
        waiter: Deferred[_T] = Deferred()
        waiters = self._in_flight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        waiters = self._in_flight[key] = [waiter]

        def finished(result: _T | Failure) -> None:
            self._in_flight.pop(key, None)
            for each in waiters:
                if each.called:          # cancelled
                    continue
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result)

        Deferred.fromCoroutine(start()).addBoth(finished)
        return waiter

    # -- CPU and memory --------------------------------------------------------------------
    async def get_cpus(self) -> CPU:
        """From ``lscpu``, with /proc/cpuinfo filling what it lacks (or all, without it)."""
        lscpu_output = await self._output("lscpu")
        lscpu = _colon_pairs(lscpu_output or "")
        processors = _cpuinfo_blocks(_read(self._proc("cpuinfo")) or "")
        if not lscpu and not processors:
            raise RuntimeError("neither lscpu nor /proc/cpuinfo gave CPU information")
        first = processors[0] if processors else {}
        flags = (lscpu.get("Flags") or first.get("flags") or first.get("Features") or "")
        sockets = {p["physical id"] for p in processors if "physical id" in p}
        return CPU(
            model_name=lscpu.get("Model name") or first.get("model name"),
            frequency=(lscpu.get("CPU max MHz") or lscpu.get("CPU MHz")
                       or first.get("cpu MHz")),
            count=int_or_none(lscpu.get("CPU(s)")) or (len(processors) or None),
            architecture=lscpu.get("Architecture") or os.uname().machine,
            flags=flags.split(),
            socket_count=int_or_none(lscpu.get("Socket(s)")) or (len(sockets) or None),
        )

    async def get_memory(self) -> Memory:
        """``total`` from /proc/meminfo; ``physical_mb`` from SMBIOS (``dmidecode``)."""
        meminfo = _colon_pairs(_read(self._proc("meminfo")) or "")
        total_kb = int_or_none((meminfo.get("MemTotal") or "").removesuffix("kB").strip())
        dmi = await self._output("dmidecode", "--type", "memory")
        return Memory(total=total_kb * 1024 if total_kb is not None else None,
                      physical_mb=_physical_memory_mb(dmi) if dmi else None)

    # -- BMC -------------------------------------------------------------------------------
    def _has_ipmi(self) -> bool:
        return any(os.path.exists(self._dev(device)) for device in IPMI_DEVICES)

    async def get_bmc_address(self) -> str | None:
        """The BMC's IPv4 address; "0.0.0.0" if no channel has one, None without IPMI."""
        found = await self._share("lan", self._scan_lan_channels)
        return found[0] if found is not None else None

    async def get_bmc_mac(self) -> str | None:
        """The MAC address of the BMC channel that has an IPv4 address, or None."""
        found = await self._share("lan", self._scan_lan_channels)
        return found[1] if found is not None else None

    async def _scan_lan_channels(self) -> tuple[str, str | None] | None:
        """(address, MAC) of the first LAN channel with an IPv4 address configured."""
        if not self._has_ipmi():
            self.log.debug("No IPMI device: no BMC address")
            return None
        for channel in IPMI_CHANNELS:
            try:
                out = await self._ipmitool("lan", "print", str(channel))
            except _IPMIUnusable:
                return None
            if out is None:
                continue
            fields = _colon_pairs(out)
            address = fields.get("IP Address")
            if address and address != UNCONFIGURED_BMC_V4:
                mac = (fields.get("MAC Address") or "").lower()
                return address, mac if _MAC.match(mac) and mac != "00:00:00:00:00:00" else None
        return UNCONFIGURED_BMC_V4, None

    async def get_bmc_v6address(self) -> str | None:
        """The BMC's IPv6 address; "::/0" if no channel has one, None without IPMI."""
        if not self._has_ipmi():
            return None
        for channel in IPMI_CHANNELS:
            try:
                out = await self._ipmitool("lan6", "print", str(channel))
            except _IPMIUnusable:
                return None
            if out is None:
                continue
            address = _lan6_address(out)
            if address:
                return address
        return UNCONFIGURED_BMC_V6

    async def _ipmitool(self, *args: str) -> str | None:
        """ipmitool's output; None for a channel that fails.

        Raises _IPMIUnusable when ipmitool is missing or the BMC does not answer in time.
        """
        argv = ("ipmitool", *args)
        try:
            out, _ = await self.context.runner.execute(*argv, timeout=IPMI_TIMEOUT)
        except CommandNotFoundError:
            self.log.debug("ipmitool is not installed: no BMC information")
            raise _IPMIUnusable()
        except ProcessTimeoutError:
            self.log.warn("{argv} timed out: giving up on the BMC", argv=" ".join(argv))
            raise _IPMIUnusable()
        except ProcessExecutionError as e:
            self.log.debug("{argv} failed: {error}", argv=" ".join(argv), error=str(e))
            return None
        return out.decode("utf-8", "replace")

    # -- system and boot -------------------------------------------------------------------
    async def get_system_vendor_info(self) -> SystemVendorInfo:
        """From sysfs DMI files; from ``dmidecode`` when the kernel does not export them.

        Fields nobody can tell are None (no DMI files and no working dmidecode: all of them).
        """
        dmi = self._sys("class", "dmi", "id")
        if os.path.isdir(dmi):
            def field(name: str) -> str | None:
                return _read(os.path.join(dmi, name)) or None
            return SystemVendorInfo(
                product_name=field("product_name"), serial_number=field("product_serial"),
                manufacturer=field("sys_vendor"),
                firmware=SystemFirmware(vendor=field("bios_vendor"),
                                        version=field("bios_version"),
                                        build_date=field("bios_date")))
        out = await self._output("dmidecode", "--type", "bios", "--type", "system")
        sections = _dmidecode_sections(out or "")
        system = next((s for t, s in sections if t == "System Information"), {})
        bios = next((s for t, s in sections if t == "BIOS Information"), {})
        return SystemVendorInfo(
            product_name=system.get("Product Name"), serial_number=system.get("Serial Number"),
            manufacturer=system.get("Manufacturer"),
            firmware=SystemFirmware(vendor=bios.get("Vendor"), version=bios.get("Version"),
                                    build_date=bios.get("Release Date")))

    def get_boot_info(self) -> BootInfo:
        """UEFI if the firmware exports EFI variables; the PXE MAC from ``BOOTIF=``."""
        mode = "uefi" if os.path.isdir(self._sys("firmware", "efi")) else "bios"
        return BootInfo(current_boot_mode=mode,
                        pxe_interface=_bootif_mac(_read(self.context.config.cmdline_path)))


class _IPMIUnusable(Exception):
    """ipmitool is missing or the BMC hangs: stop scanning channels."""


# -- parsing (pure functions) -----------------------------------------------------------------


def _colon_pairs(text: str) -> dict[str, str]:
    """``Key: value`` lines (lscpu, meminfo, ipmitool) as a dict; the first colon splits."""
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            pairs[key.strip()] = value.strip()
    return pairs


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo's per-processor blocks (those with a ``processor`` line)."""
    blocks = [_colon_pairs(block) for block in re.split(r"\n\s*\n", text)]
    return [block for block in blocks if "processor" in block]


def _dmidecode_sections(text: str) -> list[tuple[str, dict[str, str]]]:
    """dmidecode records as (title, {field: value}); list-valued fields are skipped."""
    sections: list[tuple[str, dict[str, str]]] = []
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            if line.startswith("Handle "):
                current = None
            elif current is None:
                current = {}
                sections.append((line.strip(), current))
            continue
        if current is not None:
            key, sep, value = line.strip().partition(":")
            if sep and value.strip():
                current.setdefault(key.strip(), value.strip())
    return sections


def _physical_memory_mb(dmidecode_memory: str) -> int | None:
    """Installed MiB: the sum of the sizes of the "Memory Device" records."""
    total = 0.0
    for title, fields in _dmidecode_sections(dmidecode_memory):
        if title != "Memory Device":
            continue
        match = _DMI_SIZE.match(fields.get("Size", ""))
        if match:
            total += int(match.group(1)) * _DMI_SIZE_MB[match.group(2)]
    return int(total) or None


def _lan6_address(output: str) -> str | None:
    """The active IPv6 address of one ``ipmitool lan6 print`` channel (global first)."""
    addresses: list[str] = []
    current: dict[str, str] | None = None
    blocks: list[dict[str, str]] = []
    for line in output.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "IPv6/IPv4 Addressing Enables" and value.lower() == "ipv4":
            return None
        if re.match(r"^IPv6 (Static|Dynamic) Address \d+$", key):
            current = {}
            blocks.append(current)
        elif current is not None and line[:1].isspace() and key:
            current.setdefault(key, value)
        elif not line[:1].isspace():
            current = None
    for block in blocks:
        address = block.get("Address", "").split("/")[0]
        if block.get("Status", "").lower() == "active" and address not in ("", "::"):
            addresses.append(address)
    addresses.sort(key=lambda a: a.lower().startswith("fe80:"))
    return addresses[0] if addresses else None


def _bootif_mac(cmdline: str | None) -> str | None:
    """The MAC in ``BOOTIF=01-aa-bb-cc-dd-ee-ff`` (PXELINUX/iPXE), as ``aa:bb:...``."""
    for word in (cmdline or "").split():
        key, sep, value = word.partition("=")
        if key != "BOOTIF" or not sep:
            continue
        octets = value.lower().replace(":", "-").split("-")
        if len(octets) == 7:
            octets = octets[1:]            # the ARP hardware type (01: Ethernet)
        mac = ":".join(octets)
        return mac if _MAC.match(mac) else None
    return None
