"""FakeSystem: fake /sys, /proc and /dev trees in a directory, for hardware tests.

The layout mirrors the kernel's where the agent looks: ``sys/class/net/<if>`` with a
``device`` link into ``sys/devices/...`` (vendor, device, driver link),
``sys/class/dmi/id/*``, ``sys/firmware/efi``, ``sys/block/<disk>/device/scsi_device/<hctl>``,
``proc/meminfo``, ``proc/cpuinfo``, ``proc/cmdline``, ``dev/<disk>`` and
``dev/disk/by-path`` links. ``config()`` gives an AgentConfig pointing at the tree.
"""

from __future__ import annotations

import os
from typing import Any

from ipa_twisted.config import AgentConfig


class FakeSystem:
    """Builds a fake system tree under ``root`` (which must exist or be creatable)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.sys_path = os.path.join(self.root, "sys")
        self.proc_path = os.path.join(self.root, "proc")
        self.dev_path = os.path.join(self.root, "dev")
        self.etc_path = os.path.join(self.root, "etc")
        for path in (self.sys_path, self.proc_path, self.dev_path, self.etc_path):
            os.makedirs(path, exist_ok=True)
        os.makedirs(os.path.join(self.sys_path, "class", "net"), exist_ok=True)
        self.write("proc/cmdline", "")

    def config(self, **overrides: Any) -> AgentConfig:
        """An AgentConfig whose roots are this tree's."""
        paths: dict[str, Any] = {
            "sys_path": self.sys_path, "proc_path": self.proc_path,
            "dev_path": self.dev_path, "etc_path": self.etc_path,
            "cmdline_path": os.path.join(self.proc_path, "cmdline")}
        paths.update(overrides)
        return AgentConfig(**paths)

    # -- files -----------------------------------------------------------------------------
    def path(self, relative: str) -> str:
        """The absolute path of ``relative`` (e.g. ``"sys/class/net"``) in the tree."""
        return os.path.join(self.root, relative)

    def write(self, relative: str, content: str) -> str:
        """Write a file (creating directories); returns its path."""
        path = self.path(relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        return path

    def symlink(self, relative: str, target: str) -> None:
        """Make ``relative`` a symbolic link to ``target`` (relative to the link's dir)."""
        path = self.path(relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)

    def _link_into_tree(self, relative: str, target_relative: str) -> None:
        link = self.path(relative)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(self.path(target_relative), os.path.dirname(link)), link)

    # -- /proc -----------------------------------------------------------------------------
    def set_cmdline(self, cmdline: str) -> None:
        self.write("proc/cmdline", cmdline + "\n")

    def set_meminfo(self, total_kb: int) -> None:
        self.write("proc/meminfo", f"MemTotal:       {total_kb} kB\n"
                                   f"MemFree:        {total_kb // 2} kB\n")

    def set_cpuinfo(self, text: str) -> None:
        self.write("proc/cpuinfo", text)

    # -- firmware --------------------------------------------------------------------------
    def set_efi(self) -> None:
        """Boot in UEFI mode (``sys/firmware/efi`` exists)."""
        os.makedirs(self.path("sys/firmware/efi/efivars"), exist_ok=True)

    def set_dmi(self, **fields: str) -> None:
        """Files in ``sys/class/dmi/id`` (product_name=..., sys_vendor=..., bios_date=...)."""
        os.makedirs(self.path("sys/class/dmi/id"), exist_ok=True)
        for name, value in fields.items():
            self.write(f"sys/class/dmi/id/{name}", value + "\n")

    def add_ipmi_device(self, name: str = "ipmi0") -> None:
        """A BMC device node (``dev/ipmi0``, or ``ipmi/0``, ``ipmidev/0``)."""
        self.write(f"dev/{name}", "")

    # -- network ---------------------------------------------------------------------------
    def add_interface(self, name: str, mac: str, *, carrier: bool | None = True,
                      speed: int | None = 1000, physical: bool = True,
                      pci_address: str | None = "0000:00:19.0", driver: str | None = "e1000e",
                      vendor: str | None = "0x8086", product: str | None = "0x1502",
                      link_type: int = 1, virtio: str | None = None) -> None:
        """A network interface; ``physical`` interfaces get a ``device`` link.

        ``carrier=None`` makes the carrier file unreadable (a directory), as when the link
        is down; ``virtio="virtio0"`` puts the device under the PCI function, like virtio.
        """
        base = f"sys/class/net/{name}"
        self.write(f"{base}/address", mac + "\n")
        self.write(f"{base}/type", f"{link_type}\n")
        if carrier is None:
            os.makedirs(self.path(f"{base}/carrier"), exist_ok=True)
        else:
            self.write(f"{base}/carrier", "1\n" if carrier else "0\n")
        if speed is not None:
            self.write(f"{base}/speed", f"{speed}\n")
        if not physical:
            return
        device = f"sys/devices/pci0000:00/{pci_address or 'platform-' + name}"
        if virtio:
            device = f"{device}/{virtio}"
        os.makedirs(self.path(device), exist_ok=True)
        if vendor is not None:
            self.write(f"{device}/vendor", vendor + "\n")
        if product is not None:
            self.write(f"{device}/device", product + "\n")
        if driver is not None:
            os.makedirs(self.path(f"sys/bus/pci/drivers/{driver}"), exist_ok=True)
            self._link_into_tree(f"{device}/driver", f"sys/bus/pci/drivers/{driver}")
        self._link_into_tree(f"{base}/device", device)

    # -- disks -----------------------------------------------------------------------------
    def add_block_device(self, name: str, *, hctl: str | None = None,
                         by_path: str | None = None) -> None:
        """``dev/<name>``, ``sys/block/<name>``, with an HCTL and a by-path link if given."""
        self.write(f"dev/{name}", "")
        os.makedirs(self.path(f"sys/block/{name}/device"), exist_ok=True)
        if hctl is not None:
            os.makedirs(self.path(f"sys/block/{name}/device/scsi_device/{hctl}"),
                        exist_ok=True)
        if by_path is not None:
            self._link_into_tree(f"dev/disk/by-path/{by_path}", f"dev/{name}")


def lsblk_row(kname: str, size: int, type_: str, **extra: Any) -> dict[str, Any]:
    """One device of ``lsblk --json`` output as the generic manager asks for it."""
    row: dict[str, Any] = {"kname": kname, "model": None, "size": size, "rota": False,
                           "type": type_, "uuid": None, "partuuid": None, "serial": None,
                           "wwn": None, "vendor": None, "log-sec": 512, "phy-sec": 512,
                           "tran": None}
    row.update(extra)
    return row
