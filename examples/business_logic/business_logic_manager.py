"""An example manager adding a clean step and a deploy step with arguments."""

from __future__ import annotations

import os
from typing import Any

from ipa_twisted import errors
from ipa_twisted.hardware.interface import HardwareManager, HardwareSupport


class BusinessLogicHardwareManager(HardwareManager):
    """Company X's rules: only its own machines are cleaned; deploys may write a MOTD."""

    HARDWARE_MANAGER_NAME = "CompanyXHardwareManager"
    HARDWARE_MANAGER_VERSION = "1.0"
    ALLOWED_VENDOR = "CompanyX"

    def evaluate_hardware_support(self) -> int:
        # A service-provider manager: its steps win over the generic ones of the same name.
        return HardwareSupport.SERVICE_PROVIDER

    def get_clean_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        return [{"step": "companyx_verify_device_lifecycle", "priority": 472,
                 "interface": "deploy", "reboot_requested": False, "abortable": True}]

    def get_deploy_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        return [{"step": "write_motd", "priority": 0, "interface": "deploy",
                 "reboot_requested": False,
                 "argsinfo": {"text": {"description": "Message of the day",
                                       "required": True},
                              "path": {"description": "Where (default /etc/motd under "
                                                      "the agent's etc_path)",
                                       "required": False}}}]

    def companyx_verify_device_lifecycle(self, node: Any, ports: Any) -> str:
        """Fail cleaning of machines that are not Company X's."""
        vendor_file = os.path.join(self.context.config.sys_path, "class", "dmi", "id",
                                   "sys_vendor")
        try:
            with open(vendor_file) as f:
                vendor = f.read().strip()
        except OSError:
            vendor = "unknown"
        if vendor != self.ALLOWED_VENDOR:
            raise errors.CleaningError(f"{vendor} machines may not be cleaned here")
        return "device lifecycle verified"

    def write_motd(self, node: Any, ports: Any, text: str, path: str | None = None) -> str:
        """A deploy step taking arguments from a deploy template."""
        target = path or os.path.join(self.context.config.etc_path, "motd")
        with open(target, "w") as f:  # a few bytes: fine on the reactor thread
            f.write(text + "\n")
        return f"motd written to {target}"
