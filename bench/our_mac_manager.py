"""Twisted plugin dropin for our agent in a benchmark fleet: one MAC per agent.

In a fleet every agent runs on this one machine, so each would report the same MACs and
Ironic could not tell their nodes apart. With ``BENCH_MAC`` set, this manager (support 3,
above the generic manager) reports one interface with that MAC; lookup then finds that
agent's node. Without it, it answers nothing and the generic manager's interfaces are used.
``bench/real_ironic.py`` copies this file to ``<dir>/twisted/plugins/`` and puts ``<dir>``
on the agent's ``PYTHONPATH``. The reference agent gets the same from
``bench/ref_loop_manager.py``.
"""

from __future__ import annotations

import os

from ipa_twisted.hardware.interface import HardwareManager
from ipa_twisted.hardware.inventory import NetworkInterface


class BenchMacManager(HardwareManager):
    """One interface whose MAC is ``$BENCH_MAC``."""

    HARDWARE_MANAGER_NAME = "bench_mac"

    def evaluate_hardware_support(self) -> int:
        return 3 if os.environ.get("BENCH_MAC") else 0

    def list_network_interfaces(self) -> list[NetworkInterface]:
        return [NetworkInterface(name="bench0", mac_address=os.environ["BENCH_MAC"],
                                 ipv4_address="127.0.0.1")]


bench_mac_manager = BenchMacManager()
