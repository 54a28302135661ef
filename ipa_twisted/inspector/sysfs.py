"""PCI and USB devices and NUMA topology read from sysfs (the pci-devices, usb-devices and
numa-topology collectors).

Every function takes the sysfs root (``AgentConfig.sys_path``) so tests use a fake tree.
The files are tiny kernel attributes: they are read synchronously, like the generic
hardware manager reads its sysfs files.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.logger import Logger

from ipa_twisted.errors import IncompatibleNumaFormatError

log = Logger()

_NODE_DIR = re.compile(r"^node(\d+)$")
_CPU_DIR = re.compile(r"^cpu(\d+)$")
_MEMTOTAL = re.compile(r"MemTotal:\s*(\d+)\s*([kKMGT]?B)?\s*$")
_KB_PER_UNIT = {"B": 1 / 1024, "kB": 1, "KB": 1, "MB": 1024, "GB": 1024 ** 2, "TB": 1024 ** 3}


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def _hex_id(text: str) -> str:
    """``0x8086`` → ``8086`` (IndexError/ValueError when it is not that shape)."""
    prefix, sep, digits = text.strip().partition("x")
    if not sep or prefix != "0" or not digits:
        raise ValueError(f"not a 0x-prefixed hexadecimal id: {text!r}")
    int(digits, 16)
    return digits


# -- PCI -----------------------------------------------------------------------------------
def list_pci_devices(sys_path: str) -> list[dict[str, Any]]:
    """Every PCI function under ``{sys}/bus/pci/devices``, sorted by address.

    Items: ``vendor_id`` and ``product_id`` (hexadecimal without ``0x``, as Ironic's
    pci-devices hooks match them), ``class`` and ``revision`` (likewise, ``revision`` None
    when unreadable), ``bus`` (the PCI address) and ``numa_node_id`` (the kernel's text,
    ``"-1"`` without NUMA; None when absent). A device whose ids cannot be read is
    skipped with a warning. OSError when the directory cannot be listed.
    """
    directory = os.path.join(sys_path, "bus", "pci", "devices")
    devices = []
    for address in sorted(os.listdir(directory)):
        base = os.path.join(directory, address)
        if not os.path.isdir(base):
            continue
        try:
            vendor = _hex_id(_read(os.path.join(base, "vendor")))
            product = _hex_id(_read(os.path.join(base, "device")))
            pci_class = _hex_id(_read(os.path.join(base, "class")))
        except (OSError, ValueError) as e:
            log.warn("Skipping PCI device {address}: cannot read its ids: {error}",
                     address=address, error=str(e))
            continue
        revision = numa_node = None
        try:
            revision = _hex_id(_read(os.path.join(base, "revision")))
        except (OSError, ValueError):
            pass
        try:
            numa_node = _read(os.path.join(base, "numa_node"))
        except OSError:
            pass
        devices.append({"vendor_id": vendor, "product_id": product, "class": pci_class,
                        "revision": revision, "bus": address, "numa_node_id": numa_node})
    return devices


# -- USB -----------------------------------------------------------------------------------
_USB_DEVICE = re.compile(r"^\d+-\d+(\.\d+)*$")
"""A device behind a port (``1-4``, ``2-1.3``); not a root hub (``usb1``) nor an interface
(``1-4:1.0``)."""
USB_CLASS_HUB = "09"


def list_usb_devices(sys_path: str) -> list[dict[str, Any]]:
    """Every USB device under ``{sys}/bus/usb/devices`` except hubs, by bus and device
    number.

    Items as the reference agent's ``usb_devices``: ``product`` and ``vendor`` (the
    device's strings, ``""`` when it has none) and ``handle`` (``USB:<bus>:<device>``,
    lshw's form), plus ``vendor_id`` and ``product_id`` (hexadecimal, as in ``lsusb``).
    The kernel caches these attributes when the device is enumerated: reading them never
    talks to the device. A device whose numbers cannot be read is skipped with a warning;
    no USB (no directory) is an empty list.
    """
    directory = os.path.join(sys_path, "bus", "usb", "devices")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not _USB_DEVICE.match(name):
            continue
        base = os.path.join(directory, name)

        def attribute(key: str) -> str:
            try:
                return _read(os.path.join(base, key))
            except OSError:
                return ""

        if attribute("bDeviceClass") == USB_CLASS_HUB:
            continue
        try:
            bus, number = int(_read(os.path.join(base, "busnum"))), int(
                _read(os.path.join(base, "devnum")))
        except (OSError, ValueError) as e:
            log.warn("Skipping USB device {name}: cannot read its numbers: {error}",
                     name=name, error=str(e))
            continue
        found.append(((bus, number), {
            "product": attribute("product"), "vendor": attribute("manufacturer"),
            "handle": f"USB:{bus}:{number}", "vendor_id": attribute("idVendor"),
            "product_id": attribute("idProduct")}))
    return [device for _, device in sorted(found, key=lambda item: item[0])]


# -- NUMA ----------------------------------------------------------------------------------
def numa_node_dirs(sys_path: str) -> list[str] | None:
    """``{sys}/devices/system/node/node<N>`` directories by node id; None without NUMA."""
    directory = os.path.join(sys_path, "devices", "system", "node")
    if not os.path.isdir(directory):
        return None
    found = []
    for name in os.listdir(directory):
        match = _NODE_DIR.match(name)
        if match and os.path.isdir(os.path.join(directory, name)):
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return [path for _, path in sorted(found)]


def numa_node_id(node_dir: str) -> int:
    """The id in a ``node<N>`` directory name (IncompatibleNumaFormatError otherwise)."""
    match = _NODE_DIR.match(os.path.basename(node_dir.rstrip("/")))
    if match is None:
        raise IncompatibleNumaFormatError(f"{node_dir} is not a NUMA node directory")
    return int(match.group(1))


def nodes_memory(node_dirs: list[str]) -> list[dict[str, int]]:
    """``[{"numa_node": N, "size_kb": kB}, ...]`` from each node's ``meminfo``."""
    ram = []
    for node_dir in node_dirs:
        node = numa_node_id(node_dir)
        path = os.path.join(node_dir, "meminfo")
        try:
            text = _read(path)
        except OSError as e:
            raise IncompatibleNumaFormatError(
                f"Cannot read the memory of NUMA node {node}: {e}") from e
        for line in text.splitlines():
            match = _MEMTOTAL.search(line)
            if match:
                unit = match.group(2) or "kB"
                if unit not in _KB_PER_UNIT:
                    raise IncompatibleNumaFormatError(
                        f"Unknown memory unit {unit!r} in {path}")
                ram.append({"numa_node": node,
                            "size_kb": int(int(match.group(1)) * _KB_PER_UNIT[unit])})
                break
        else:
            raise IncompatibleNumaFormatError(f"No MemTotal line in {path}")
    return ram


def nodes_cpus(node_dirs: list[str]) -> list[dict[str, Any]]:
    """``[{"cpu": core id, "numa_node": N, "thread_siblings": [threads]}, ...]``.

    Threads (``cpu<T>`` entries of a node) sharing a core (``topology/core_id`` within the
    same ``physical_package_id``) are one item; siblings are sorted.
    """
    cores: dict[tuple[int, str, int], dict[str, Any]] = {}
    for node_dir in node_dirs:
        node = numa_node_id(node_dir)
        try:
            entries = os.listdir(node_dir)
        except OSError as e:
            raise IncompatibleNumaFormatError(
                f"Cannot list the CPUs of NUMA node {node}: {e}") from e
        threads = sorted((int(m.group(1)), name) for name in entries
                         if (m := _CPU_DIR.match(name))
                         and os.path.isdir(os.path.join(node_dir, name)))
        for thread, name in threads:
            topology = os.path.join(node_dir, name, "topology")
            try:
                core = int(_read(os.path.join(topology, "core_id")))
            except (OSError, ValueError) as e:
                raise IncompatibleNumaFormatError(
                    f"Cannot read the core of CPU {thread} in NUMA node {node}: {e}") from e
            try:
                package = _read(os.path.join(topology, "physical_package_id"))
            except OSError:
                package = ""
            item = cores.setdefault((node, package, core), {
                "cpu": core, "numa_node": node, "thread_siblings": []})
            item["thread_siblings"].append(thread)
    return sorted(cores.values(),
                  key=lambda c: (c["numa_node"], c["thread_siblings"][0]))


def nodes_nics(sys_path: str) -> list[dict[str, Any]]:
    """``[{"name": NIC, "numa_node": N}, ...]`` for interfaces backed by a device.

    The node is the device's ``numa_node``, or its parent's (a virtio NIC sits under its
    PCI function). Interfaces with neither are left out (debug log); an unreadable value
    is an IncompatibleNumaFormatError.
    """
    directory = os.path.join(sys_path, "class", "net")
    if not os.path.isdir(directory):
        raise IncompatibleNumaFormatError(f"No network interface directory {directory}")
    nics = []
    for name in sorted(os.listdir(directory)):
        device = os.path.join(directory, name, "device")
        if not os.path.isdir(device):
            continue
        real = os.path.realpath(device)
        for candidate in (real, os.path.dirname(real)):
            path = os.path.join(candidate, "numa_node")
            if os.path.exists(path):
                break
        else:
            log.debug("No NUMA node for NIC {name}", name=name)
            continue
        try:
            node = int(_read(path))
        except (OSError, ValueError) as e:
            raise IncompatibleNumaFormatError(
                f"Cannot read the NUMA node of NIC {name}: {e}") from e
        nics.append({"name": name, "numa_node": node})
    return nics


def numa_topology(sys_path: str) -> dict[str, Any] | None:
    """``{"ram": ..., "cpus": ..., "nics": ...}``; None when the kernel has no NUMA nodes.

    Raises IncompatibleNumaFormatError on data it cannot read.
    """
    node_dirs = numa_node_dirs(sys_path)
    if node_dirs is None:
        return None
    return {"ram": nodes_memory(node_dirs), "cpus": nodes_cpus(node_dirs),
            "nics": nodes_nics(sys_path)}
