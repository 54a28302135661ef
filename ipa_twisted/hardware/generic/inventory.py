"""The generic manager's reading of the machine: the reader every part shares, and the
network interfaces (from start-up on: lookup sends their MAC addresses).

Every path is under the configured roots (``sys_path``, ``proc_path``, ``dev_path``) and
every program runs through the context's runner, so tests use fake trees and recorded
outputs. CPU, memory, BMC, system vendor and boot mode are read by ``machine.py``,
imported when first asked (an idle agent never is); the disks by ``disk_listing.py``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ipa_twisted.context import HardwareContext
from ipa_twisted.fileutils import read_text as _read
from ipa_twisted.hardware.infiniband import infiniband_ids as _infiniband_ids
from ipa_twisted.hardware.inventory import NetworkInterface
from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError

INVENTORY_COMMAND_TIMEOUT = 60.0
"""Longest wait, in seconds, for one inventory command (lscpu, lsblk, ip, dmidecode ...)."""

LldpReader = Callable[[list[str]], Awaitable[dict[str, Any] | None]]
"""Interface names → their LLDP TLVs (None when they cannot be read)."""

_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$", re.IGNORECASE)
_ARPHRD_INFINIBAND = "32"


class MachineReader:
    """Reads this machine through the context: paths under the configured roots, inventory
    commands with their timeout."""

    log = Logger()

    def __init__(self, context: HardwareContext) -> None:
        self.context = context

    def _sys(self, *parts: str) -> str:
        return os.path.join(self.context.config.sys_path, *parts)

    def _proc(self, *parts: str) -> str:
        return os.path.join(self.context.config.proc_path, *parts)

    def _dev(self, *parts: str) -> str:
        return os.path.join(self.context.config.dev_path, *parts)

    @property
    def _timeout(self) -> float:
        return min(self.context.config.command_timeout, INVENTORY_COMMAND_TIMEOUT)

    async def _output(self, *argv: str) -> str | None:
        """A program's stdout, or None (logged) if it is missing or fails."""
        try:
            out, _ = await self.context.runner.execute(*argv, timeout=self._timeout)
        except CommandNotFoundError:
            self.log.info("{program} is not installed; its information is left out",
                          program=argv[0])
            return None
        except ProcessExecutionError as e:
            self.log.warn("{argv} failed: {error}", argv=" ".join(argv), error=str(e))
            return None
        return out.decode("utf-8", "replace")


class InterfaceListing(MachineReader):
    """``list_network_interfaces`` of the generic manager, given the context."""

    def __init__(self, context: HardwareContext, lldp: LldpReader | None = None) -> None:
        """``lldp`` replaces the capture of LLDP frames (tests)."""
        super().__init__(context)
        self._lldp_reader = lldp
        self._biosdevname_missing = False

    async def list_network_interfaces(self) -> list[NetworkInterface]:
        """Physical interfaces (those with a ``device`` link in sysfs), by name, then the
        VLAN interfaces ``enable_vlan_interfaces`` asks for; LLDP TLVs when
        ``collect_lldp`` is set."""
        config = self.context.config
        names = self._physical_interfaces()
        naming = Deferred.fromCoroutine(self._biosdevnames(names))
        lldp: dict[str, Any] | None = None
        if config.collect_lldp:
            lldp = await self._lldp(names)
        vlans: list[str] = []
        if config.enable_vlan_interfaces:
            from ipa_twisted.net.vlan import bring_up_vlan_interfaces   # when configured
            try:
                vlans = await bring_up_vlan_interfaces(
                    self.context.runner, names, lldp, config.enable_vlan_interfaces,
                    sys_path=config.sys_path)
            except Exception as e:  # the physical interfaces still count
                self.log.warn("VLAN interfaces not brought up: {error}", error=str(e))
        addresses = await self._interface_addresses()   # after VLANs exist
        biosdevnames = await naming
        interfaces = [self._interface(name, addresses.get(name, (None, None)),
                                      biosdevnames.get(name)) for name in names]
        interfaces += [self._interface(name, addresses.get(name, (None, None)), None)
                       for name in vlans if name not in names]
        if lldp is not None:
            for interface in interfaces:
                interface.lldp = [list(tlv) for tlv in lldp.get(interface.name, [])]
        return interfaces

    async def _lldp(self, names: list[str]) -> dict[str, Any] | None:
        """LLDP TLVs per interface, or None (logged) when they cannot be read."""
        if self._lldp_reader is not None:
            return await self._lldp_reader(names)
        config = self.context.config
        from ipa_twisted.net.lldp import get_lldp_info   # LLDP code: loaded when first asked
        try:
            return dict(await get_lldp_info(names, config.lldp_timeout, self.context.reactor,
                                            config.sys_path))
        except Exception as e:
            self.log.warn("LLDP not collected: {error}", error=str(e))
            return None

    def _physical_interfaces(self) -> list[str]:
        directory = self._sys("class", "net")
        try:
            names = sorted(os.listdir(directory))
        except OSError as e:
            raise RuntimeError(f"cannot list network interfaces in {directory}: {e}") from e
        return [name for name in names if name != "lo"
                and os.path.lexists(os.path.join(directory, name, "device"))]

    def _interface(self, name: str, addresses: tuple[str | None, str | None],
                   biosdevname: str | None) -> NetworkInterface:
        base = self._sys("class", "net", name)
        mac = (_read(os.path.join(base, "address")) or "").lower() or None
        client_id = None
        if mac is not None and _read(os.path.join(base, "type")) == _ARPHRD_INFINIBAND:
            mac, client_id = _infiniband_ids(mac)
        speed = int_or_none(_read(os.path.join(base, "speed")))
        device = os.path.join(base, "device")
        driver = os.path.join(device, "driver")
        return NetworkInterface(
            name=name,
            mac_address=mac,
            ipv4_address=addresses[0],
            ipv6_address=addresses[1],
            has_carrier=_read(os.path.join(base, "carrier")) == "1",
            lldp=None,
            vendor=_read(os.path.join(device, "vendor")),
            product=_read(os.path.join(device, "device")),
            client_id=client_id,
            biosdevname=biosdevname,
            speed_mbps=speed if speed is not None and speed >= 0 else None,
            pci_address=_pci_address(os.path.realpath(device)),
            driver=(os.path.basename(os.path.realpath(driver))
                    if os.path.lexists(driver) else None),
        )

    async def _interface_addresses(self) -> dict[str, tuple[str | None, str | None]]:
        """``{name: (IPv4, IPv6)}`` from one ``ip -j addr`` call; {} if it fails."""
        output = await self._output("ip", "-j", "addr", "show")
        if output is None:
            return {}
        try:
            return _ip_addresses(json.loads(output))
        except (ValueError, TypeError, AttributeError) as e:
            self.log.warn("Cannot parse the output of ip -j addr: {error}", error=str(e))
            return {}

    async def _biosdevnames(self, names: list[str]) -> dict[str, str | None]:
        if self._biosdevname_missing or not names:
            return {}
        if self.context.runner.which("biosdevname") is None:
            self._biosdevname_missing = True
            self.log.debug("biosdevname is not installed; no BIOS-given NIC names")
            return {}
        running = {name: Deferred.fromCoroutine(self._biosdevname(name)) for name in names}
        return {name: await naming for name, naming in running.items()}

    async def _biosdevname(self, name: str) -> str | None:
        if self._biosdevname_missing:
            return None
        try:
            out, _ = await self.context.runner.execute("biosdevname", "-i", name,
                                                       timeout=self._timeout)
        except CommandNotFoundError:
            self._biosdevname_missing = True
            self.log.debug("biosdevname is not installed; no BIOS-given NIC names")
            return None
        except ProcessExecutionError as e:   # e.g. exit 4 in a virtual machine
            self.log.debug("biosdevname has no name for {name}: {error}", name=name,
                           error=str(e))
            return None
        return out.decode("utf-8", "replace").strip() or None


def int_or_none(value: object) -> int | None:
    """An int from a text value, None when it is not one."""
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def clean_text(value: object) -> str | None:
    """A stripped string, None for None or blank."""
    if value is None:
        return None
    return str(value).strip() or None


def _pci_address(device_path: str) -> str | None:
    """The PCI address of a device directory, or of its parent (virtio sits under PCI)."""
    for candidate in (device_path, os.path.dirname(device_path)):
        name = os.path.basename(candidate)
        if _PCI_ADDRESS.match(name):
            return name
    return None


def _ip_addresses(document: Any) -> dict[str, tuple[str | None, str | None]]:
    """``{name: (IPv4, IPv6)}`` from ``ip -j addr``: global addresses first."""
    result: dict[str, tuple[str | None, str | None]] = {}
    for link in document:
        name = link.get("ifname")
        if not name:
            continue
        infos = link.get("addr_info") or []

        def best(family: str) -> str | None:
            found = [info for info in infos
                     if info.get("family") == family and info.get("local")]
            found.sort(key=lambda info: info.get("scope") != "global")   # stable
            return str(found[0]["local"]) if found else None

        result[name] = (best("inet"), best("inet6"))
    return result
