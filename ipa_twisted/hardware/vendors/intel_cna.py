"""Intel CNA NICs (driver i40e): their own LLDP agent hides LLDP frames from the host.

When the agent collects LLDP (``collect_lldp``), the NIC's embedded LLDP agent is stopped
by writing ``lldp stop`` to the driver's debugfs command file of every i40e function
(``{sys_path}/kernel/debug/i40e/<pci address>/command``), as the reference agent does.
Failures are logged: LLDP then simply stays unavailable on those ports.
"""

from __future__ import annotations

import os

from ipa_twisted.hardware.interface import HardwareManager, HardwareSupport

CNA_DRIVER = "i40e"
LLDP_STOP = "lldp stop"


class IntelCnaHardwareManager(HardwareManager):
    """Detects Intel CNA cards and disables their embedded LLDP agent."""

    HARDWARE_MANAGER_NAME = "IntelCnaHardwareManager"
    HARDWARE_MANAGER_VERSION = "1.0"

    def _sys(self, *parts: str) -> str:
        return os.path.join(self.context.config.sys_path, *parts)

    def _has_cna_card(self) -> bool:
        net = self._sys("class", "net")
        try:
            names = sorted(os.listdir(net))
        except OSError as e:
            self.log.warn("Cannot list network interfaces in {path}: {error}", path=net,
                          error=str(e))
            return False
        for name in names:
            driver = os.path.join(net, name, "device", "driver")
            # The driver link's target names the driver (its module link may be absent
            # for built-in drivers).
            for link in (os.path.join(driver, "module"), driver):
                if os.path.islink(link) and \
                        os.path.basename(os.readlink(link)) == CNA_DRIVER:
                    return True
        return False

    def disable_embedded_lldp_agent(self) -> list[str]:
        """Write ``lldp stop`` to every i40e debugfs command file; the ones that failed."""
        directory = self._sys("kernel", "debug", CNA_DRIVER)
        if not os.path.isdir(directory):
            self.log.warn("Driver i40e was not loaded properly: no {path}", path=directory)
            return []
        failed = []
        for address in sorted(os.listdir(directory)):
            try:
                with open(os.path.join(directory, address, "command"), "w",
                          encoding="ascii") as f:
                    f.write(LLDP_STOP)
            except OSError:
                failed.append(address)
        if failed:
            self.log.warn("Failed to disable the embedded LLDP on Intel CNA network card. "
                          "Addresses of failed pci devices: {addresses}",
                          addresses=", ".join(failed))
        return failed

    def evaluate_hardware_support(self) -> int:
        """MAINLINE with an i40e NIC (stopping its LLDP agent if LLDP is collected)."""
        if not self._has_cna_card():
            self.log.debug("No Intel CNA network card found")
            return HardwareSupport.NONE
        self.log.debug("Found Intel CNA network card")
        if self.context.config.collect_lldp:
            self.log.info("Disable CNA network card embedded lldp agent now")
            self.disable_embedded_lldp_agent()
        return HardwareSupport.MAINLINE
