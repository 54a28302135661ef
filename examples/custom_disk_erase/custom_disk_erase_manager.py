"""An example manager that erases one vendor's disks with the vendor's own tool."""

from __future__ import annotations

from typing import Any

from ipa_twisted import errors
from ipa_twisted.hardware.interface import HardwareManager, HardwareSupport
from ipa_twisted.process import ProcessExecutionError


class ExampleDiskEraseHardwareManager(HardwareManager):
    """ACME MagicStore disks are erased with ``acme-erase``; other disks are not ours."""

    HARDWARE_MANAGER_NAME = "ExampleDiskEraseHardwareManager"
    HARDWARE_MANAGER_VERSION = "1.0"

    def evaluate_hardware_support(self) -> int:
        # Only worth loading where the vendor tool is installed.
        if self.context.runner.which("acme-erase") is None:
            return HardwareSupport.NONE
        return HardwareSupport.MAINLINE

    async def erase_block_device(self, node: Any, block_device: Any) -> str:
        if (block_device.model or "").strip() != "MagicStore":
            raise errors.IncompatibleHardwareMethodError(
                f"{block_device.name} is not a MagicStore disk")
        try:
            out, _ = await self.context.runner.execute("acme-erase", "--secure",
                                                       block_device.name, timeout=3600)
        except ProcessExecutionError as e:
            raise errors.BlockDeviceEraseError(f"acme-erase failed: {e}") from e
        return out.decode("utf-8", "replace")
