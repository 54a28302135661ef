"""Mellanox (NVIDIA) NICs: the MAC and DHCP client-id of their InfiniBand interfaces, and
the NIC firmware steps (``update_nvidia_nic_firmware_image`` and
``update_nvidia_nic_firmware_settings``, in ``nvidia_nic``), which the reference agent's
Mellanox manager offers too: clean, deploy and service steps, only on machines with such a NIC.

An InfiniBand interface's hardware address is 20 bytes (59 characters): flags, the GID
prefix and the port GUID, its last 8 bytes. Mellanox derives an Ethernet-like MAC from the
GUID (its first 3 and last 3 bytes) and a DHCP client-id (``ff:00:00:00:00:00:02:00:00:02:
c9:00:`` + GUID), which Ironic needs to boot the port over PXE.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ipa_twisted.errors import IncompatibleHardwareMethodError
from ipa_twisted.fileutils import read_text as _read
from ipa_twisted.hardware.infiniband import (INFINIBAND_ADDR_LEN, INFINIBAND_CLIENT_ID_PREFIX,  # noqa: F401
                                             generate_client_id, infiniband_address_to_mac)
from ipa_twisted.hardware.interface import HardwareManager, HardwareSupport
from ipa_twisted.hardware.inventory import NetworkInterface
from ipa_twisted.process import ProcessExecutionError

MLNX_VENDOR_ID = "0x15b3"
IP_TIMEOUT = 10.0


class MellanoxDeviceHardwareManager(HardwareManager):
    """Mellanox hardware manager to support a single device."""

    HARDWARE_MANAGER_NAME = "MellanoxDeviceHardwareManager"
    HARDWARE_MANAGER_VERSION = "1"

    def _net(self, *parts: str) -> str:
        return os.path.join(self.context.config.sys_path, "class", "net", *parts)

    def _vendor(self, name: str) -> str | None:
        return _read(self._net(name, "device", "vendor"))

    def evaluate_hardware_support(self) -> int:
        """MAINLINE when a network interface is a Mellanox device, else NONE."""
        try:
            names = sorted(os.listdir(self._net()))
        except OSError:
            return HardwareSupport.NONE
        if any(self._vendor(name) == MLNX_VENDOR_ID for name in names):
            self.log.debug("Found Mellanox device")
            return HardwareSupport.MAINLINE
        self.log.debug("No Mellanox devices found")
        return HardwareSupport.NONE

    async def _addresses(self, name: str) -> tuple[str | None, str | None]:
        try:
            out, _ = await self.context.runner.execute("ip", "-j", "addr", "show", "dev", name,
                                                       timeout=IP_TIMEOUT)
            links = json.loads(out)
        except (ProcessExecutionError, ValueError) as e:
            self.log.debug("No addresses for {name}: {error}", name=name, error=str(e))
            return None, None
        found: dict[str, str] = {}
        for link in links if isinstance(links, list) else []:
            for info in link.get("addr_info") or []:
                family, local = info.get("family"), info.get("local")
                if family in ("inet", "inet6") and local and family not in found:
                    if family == "inet6" and info.get("scope") == "link":
                        continue
                    found[family] = local
        return found.get("inet"), found.get("inet6")

    async def get_interface_info(self, interface_name: str) -> NetworkInterface:
        """The interface, with MAC and client-id from its GUID, if it is a Mellanox
        InfiniBand interface; IncompatibleHardwareMethodError otherwise."""
        address = _read(self._net(interface_name, "address"))
        vendor = self._vendor(interface_name)
        if address is None or len(address) != INFINIBAND_ADDR_LEN or vendor != MLNX_VENDOR_ID:
            raise IncompatibleHardwareMethodError(
                f"{interface_name} is not a Mellanox InfiniBand interface")
        ipv4, ipv6 = await self._addresses(interface_name)
        return NetworkInterface(
            name=interface_name,
            mac_address=infiniband_address_to_mac(address),
            ipv4_address=ipv4,
            ipv6_address=ipv6,
            has_carrier=_read(self._net(interface_name, "carrier")) == "1",
            lldp=None,
            vendor=vendor,
            product=_read(self._net(interface_name, "device", "device")),
            client_id=generate_client_id(address))

    # -- NIC firmware (ipa_twisted.hardware.vendors.nvidia_nic) ------------------------------
    def get_clean_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        """The NIC firmware steps (priority 0: run when asked for)."""
        from ipa_twisted.hardware.vendors.nvidia_nic import nvidia_nic_steps  # on first use
        return nvidia_nic_steps()

    def get_deploy_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        """The same steps as for cleaning, as in the reference."""
        from ipa_twisted.hardware.vendors.nvidia_nic import nvidia_nic_steps  # on first use
        return nvidia_nic_steps()

    def get_service_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        """The same steps as for cleaning, as in the reference."""
        from ipa_twisted.hardware.vendors.nvidia_nic import nvidia_nic_steps  # on first use
        return nvidia_nic_steps()

    async def update_nvidia_nic_firmware_image(self, node: Any, ports: Any,
                                               images: Any) -> None:
        """Burn the ``images`` matching the NICs' PSIDs (``NvidiaNicFirmware.update_image``)."""
        from ipa_twisted.hardware.vendors.nvidia_nic import NvidiaNicFirmware
        await NvidiaNicFirmware(self.context).update_image(images)

    async def update_nvidia_nic_firmware_settings(self, node: Any, ports: Any,
                                                  settings: Any) -> None:
        """Set the NICs' firmware ``settings`` (``NvidiaNicFirmware.update_settings``)."""
        from ipa_twisted.hardware.vendors.nvidia_nic import NvidiaNicFirmware
        await NvidiaNicFirmware(self.context).update_settings(settings)

