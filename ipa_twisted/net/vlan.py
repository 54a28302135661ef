"""VLAN interfaces the agent brings up (``enable_vlan_interfaces``, ``ipa-enable-vlan-interfaces``).

The setting is a comma-separated list of items:

- ``eth0.100``: VLAN 100 on ``eth0``;
- ``eth0``: every VLAN the switch announces over LLDP on ``eth0``;
- ``all``: every VLAN announced on every interface.

The last two need LLDP (``collect_lldp``). The VLANs a switch port carries are read from its
IEEE 802.1 "VLAN Name" TLVs (type 127, OUI 00-80-c2, subtype 3), as the reference agent
does. The "Port VLAN ID" TLV (subtype 1) names the port's *untagged* VLAN, whose frames
reach the parent interface without a tag: a tagged interface for it would hear nothing, so
it is only used when asked (``vlan_ids_from_lldp(..., include_port_vlan=True)``).

Each VLAN ``V`` on ``IF`` becomes ``IF.V`` with ``ip link add link IF name IF.V type vlan id
V`` and ``ip link set dev IF.V up``, through the process runner. One that already exists is
reported without being created again, so listing interfaces twice gives the same result. A
failure is logged and that VLAN left out.

``python -m ipa_twisted.net.vlan --interfaces eth0 --enable-vlan-interfaces eth0`` listens
for LLDP, brings the VLANs up and prints ``{"lldp": ..., "vlan_interfaces": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ipa_twisted.net.lldp import TLV_ORGANIZATIONALLY_SPECIFIC
from ipa_twisted.process import ProcessExecutionError

log = Logger()

IEEE_802_1_OUI = "0080c2"
SUBTYPE_PORT_VLAN_ID = 1
SUBTYPE_VLAN_NAME = 3
MAX_VLAN_ID = 4094
IFNAMSIZ = 16
"""Linux interface names are at most IFNAMSIZ - 1 characters."""

COMMAND_TIMEOUT = 30.0


class CommandRunner(Protocol):
    """What is needed of ``ipa_twisted.process.ProcessRunner`` (a FakeRunner in tests)."""

    def execute(self, *argv: str, timeout: float | None = ...) -> Deferred[tuple[bytes, bytes]]:
        ...


def parse_vlan_setting(text: str | None) -> list[str]:
    """The items of ``enable_vlan_interfaces``: stripped, empty ones dropped."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _vlan_id(text: str) -> int | None:
    if not text.isdigit():
        return None
    vlan = int(text)
    return vlan if 1 <= vlan <= MAX_VLAN_ID else None


def vlan_ids_from_lldp(tlvs: Iterable[Sequence[Any]], *,
                       include_port_vlan: bool = False) -> list[int]:
    """VLAN IDs announced in LLDP TLVs (``(type, hex value)`` pairs), in order, unique.

    VLAN Name TLVs always; the Port VLAN ID TLV only with ``include_port_vlan`` (it is
    the untagged VLAN). Undecodable TLVs and IDs outside 1-4094 are skipped.
    """
    subtypes = {SUBTYPE_VLAN_NAME} | ({SUBTYPE_PORT_VLAN_ID} if include_port_vlan else set())
    found: dict[int, None] = {}
    for tlv in tlvs:
        try:
            kind, value = int(tlv[0]), bytes.fromhex(str(tlv[1]))
        except (ValueError, TypeError, IndexError):
            continue
        if kind != TLV_ORGANIZATIONALLY_SPECIFIC or len(value) < 6:
            continue
        if value[:3].hex() != IEEE_802_1_OUI or value[3] not in subtypes:
            continue
        (vlan,) = struct.unpack_from("!H", value, 4)
        if 1 <= vlan <= MAX_VLAN_ID:
            found[vlan] = None
    return list(found)


def wanted_vlans(interfaces: Sequence[str], lldp: Mapping[str, Sequence[Any]] | None,
                 setting: str | None) -> list[tuple[str, int]]:
    """``(interface, vlan)`` pairs the setting asks for, in order, unique; problems logged."""
    wanted: dict[tuple[str, int], None] = {}
    known = set(interfaces)
    for item in parse_vlan_setting(setting):
        parent, dot, vlan_text = item.rpartition(".")
        if dot:
            vlan = _vlan_id(vlan_text)
            if vlan is None:
                log.warn("Ignoring VLAN item {item!r} of enable_vlan_interfaces: "
                         "{vlan!r} is not a VLAN ID (1-{max})", item=item, vlan=vlan_text,
                         max=MAX_VLAN_ID)
            elif parent not in known:
                log.warn("Ignoring VLAN item {item!r} of enable_vlan_interfaces: no "
                         "interface {interface}", item=item, interface=parent)
            else:
                wanted[(parent, vlan)] = None
            continue
        if lldp is None:
            log.warn("Ignoring VLAN item {item!r} of enable_vlan_interfaces: VLANs are "
                     "learnt from LLDP, which is not collected (set collect_lldp)",
                     item=item)
            continue
        if item == "all":
            parents = list(interfaces)
        elif item in known:
            parents = [item]
        else:
            log.warn("Ignoring VLAN item {item!r} of enable_vlan_interfaces: no "
                     "interface {item}", item=item)
            continue
        for parent in parents:
            vlans = vlan_ids_from_lldp(lldp.get(parent) or [])
            if not vlans:
                log.info("No VLAN announced over LLDP on {interface}", interface=parent)
            for vlan in vlans:
                wanted[(parent, vlan)] = None
    return list(wanted)


async def bring_up_vlan_interfaces(runner: CommandRunner, interfaces: Sequence[str],
                                   lldp: Mapping[str, Sequence[Any]] | None,
                                   setting: str | None, *, sys_path: str = "/sys",
                                   timeout: float = COMMAND_TIMEOUT) -> list[str]:
    """Create and bring up the VLAN interfaces ``setting`` asks for; their names.

    ``interfaces`` are the parent interfaces that may carry VLANs; ``lldp`` is
    ``get_lldp_info``'s result, or None when LLDP is not collected. Interfaces that already
    exist are included without being created.
    """
    names: list[str] = []
    for parent, vlan in wanted_vlans(interfaces, lldp, setting):
        name = f"{parent}.{vlan}"
        if os.path.lexists(os.path.join(sys_path, "class", "net", name)):
            names.append(name)
            continue
        if len(name) >= IFNAMSIZ:
            log.warn("Cannot add VLAN {vlan} on {interface}: the name {name} is longer "
                     "than {limit} characters", vlan=vlan, interface=parent, name=name,
                     limit=IFNAMSIZ - 1)
            continue
        try:
            await runner.execute("ip", "link", "add", "link", parent, "name", name,
                                 "type", "vlan", "id", str(vlan), timeout=timeout)
            await runner.execute("ip", "link", "set", "dev", name, "up", timeout=timeout)
        except ProcessExecutionError as e:
            log.warn("Cannot bring up VLAN interface {name}: {error}", name=name,
                     error=str(e))
            continue
        log.info("Brought up VLAN interface {name}", name=name)
        names.append(name)
    return names


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ipa_twisted.net.vlan``: LLDP, then VLAN bring-up; JSON on stdout."""
    from twisted.internet.task import react

    from ipa_twisted.net.lldp import log_to_stderr, get_lldp_info
    from ipa_twisted.process import ProcessRunner

    parser = argparse.ArgumentParser(prog="python -m ipa_twisted.net.vlan")
    parser.add_argument("--interfaces", required=True, help="comma-separated parents")
    parser.add_argument("--enable-vlan-interfaces", required=True)
    parser.add_argument("--timeout", type=float, default=30.0, help="LLDP timeout")
    parser.add_argument("--no-lldp", action="store_true", help="do not collect LLDP")
    parser.add_argument("--sys-path", default="/sys")
    parser.add_argument("--debug", action="store_true")
    options = parser.parse_args(argv)
    log_to_stderr(options.debug)
    names = options.interfaces.split(",")

    async def run(reactor: Any) -> None:
        lldp = None if options.no_lldp else await get_lldp_info(
            names, options.timeout, reactor, options.sys_path)
        added = await bring_up_vlan_interfaces(ProcessRunner(reactor, reactor), names, lldp,
                                               options.enable_vlan_interfaces,
                                               sys_path=options.sys_path)
        print(json.dumps({"lldp": lldp, "vlan_interfaces": added}, sort_keys=True),
              flush=True)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
