"""Hardware managers for tests: ones whose answers the test decides."""

from __future__ import annotations

from typing import Any

from ipa_twisted.hardware.interface import HardwareManager
from ipa_twisted.hardware.inventory import BootInfo


class FixedDeviceManager(HardwareManager):
    """Installs on ``device`` and reports ``boot_mode``, whatever the machine has."""

    HARDWARE_MANAGER_NAME = "fixed_device"

    def __init__(self, device: str, boot_mode: str = "bios") -> None:
        self.device, self.boot_mode = device, boot_mode

    def evaluate_hardware_support(self) -> int:
        return 3

    def get_os_install_device(self, permit_refresh: bool = False, *,
                              node: Any = None) -> str:
        return self.device

    def get_boot_info(self) -> BootInfo:
        return BootInfo(current_boot_mode=self.boot_mode, pxe_interface=None)
