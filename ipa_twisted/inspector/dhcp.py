"""Waiting for DHCP before inspection, so that the inventory has the NICs' addresses."""

from __future__ import annotations

import re
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from ipa_twisted.config import AgentConfig, parse_kernel_cmdline
from ipa_twisted.inspector.enrich import field, permanent_macs, use_permanent_macs
from ipa_twisted.retry import GaveUp, fixed, retry

log = Logger()

DHCP_RETRY_INTERVAL = 2.0
"""Seconds between two looks at the interfaces' addresses."""

_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class InterfaceSource(Protocol):
    """What ``wait_for_dhcp`` needs of ``HardwareManagers``."""

    async def dispatch_to_managers(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


def normalize_mac(value: str) -> str | None:
    """``aa:bb:cc:dd:ee:ff`` from that, ``AA-BB-...`` or PXELINUX's ``01-aa-bb-...``."""
    octets = value.strip().lower().replace("-", ":").split(":")
    if len(octets) == 7:
        octets = octets[1:]                 # the ARP hardware type
    mac = ":".join(octets)
    return mac if _MAC.match(mac) else None


def pxe_mac(config: AgentConfig) -> str | None:
    """The PXE-booted NIC's MAC from ``BOOTIF=`` on the kernel command line, if any."""
    try:
        with open(config.cmdline_path, "rb") as f:
            params = parse_kernel_cmdline(f.read().decode("utf-8", "replace"))
    except OSError:
        return None
    bootif = params.get("BOOTIF")
    return normalize_mac(bootif) if bootif else None


async def wait_for_dhcp(managers: InterfaceSource, config: AgentConfig, clock: IReactorTime,
                        *, interval: float = DHCP_RETRY_INTERVAL) -> bool:
    """Wait until the NICs have IPv4 addresses, at most ``inspection_dhcp_wait_timeout`` s.

    The PXE NIC only, or every NIC with ``inspection_dhcp_all_interfaces``. True when they
    all have one (or the timeout is 0: no waiting); False after the timeout, or at once
    when only the PXE NIC is wanted and no ``BOOTIF`` says which one it is.
    """
    timeout = config.inspection_dhcp_wait_timeout
    if not timeout:
        return True
    every = config.inspection_dhcp_all_interfaces
    wanted = None if every else pxe_mac(config)
    if not every and wanted is None:
        log.warn("No PXE boot interface known (no BOOTIF= parameter): not waiting for "
                 "DHCP")
        return False

    async def look() -> None:
        try:
            interfaces = await managers.dispatch_to_managers("list_network_interfaces")
        except Exception as e:
            log.warn("Cannot list network interfaces while waiting for DHCP: {error}",
                     error=str(e))
            raise _NoAddressYet(["(interfaces unknown)"]) from e
        # Bond members all show the bond's MAC; BOOTIF names the member's own.
        interfaces = use_permanent_macs(list(interfaces), permanent_macs(config.sys_path))
        missing = [str(field(i, "name")) for i in interfaces
                   if (every or (field(i, "mac_address") or "").lower() == wanted)
                   and not field(i, "ipv4_address")]
        if missing:
            raise _NoAddressYet(missing)

    try:
        await retry(look, clock, "Waiting for IPv4 addresses", backoff=fixed(interval),
                    deadline=timeout, retry_on=_NoAddressYet, log=log, level=LogLevel.debug)
    except GaveUp as e:
        log.warn("Not all network interfaces received IPv4 addresses in {timeout} s: "
                 "{missing}", timeout=timeout, missing=str(e.last))
        return False
    return True


class _NoAddressYet(Exception):
    """These interfaces have no IPv4 address yet."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(", ".join(missing))
