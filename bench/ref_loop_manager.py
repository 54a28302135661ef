"""A hardware manager for the reference agent (ironic-python-agent) in the benchmarks.

The reference lists only block devices of type ``disk``: in the disk sandbox (a private
/dev holding only loop devices) it would find none. This manager, first by priority, reports
the sandbox's loop devices as the machine's disks and installs on the first; with
``BENCH_MAC`` set (fleets: one Ironic node per agent) it reports one interface with that MAC,
so lookup finds that agent's node. Everything else falls through to the generic manager.

``bench/real_ironic.py`` installs it into the reference's environment the way its docs say a
custom manager is installed: an entry point in ``ironic_python_agent.hardware_managers``
(here a ``.dist-info`` directory written on ``PYTHONPATH``).
"""

import os
import stat

from ironic_python_agent import hardware


def _loops():
    found = []
    for name in sorted(os.listdir("/dev")):
        path = os.path.join("/dev", name)
        if name.startswith("loop") and name[4:].isdigit() and \
                stat.S_ISBLK(os.stat(path).st_mode):
            found.append(path)
    return found


def _size(path):
    with open(f"/sys/class/block/{os.path.basename(path)}/size") as f:
        return int(f.read()) * 512


class BenchLoopManager(hardware.GenericHardwareManager):
    """The generic manager, but its disks are the sandbox's loop devices."""

    HARDWARE_MANAGER_NAME = "bench_loop"
    HARDWARE_MANAGER_VERSION = "1.0"

    def evaluate_hardware_support(self):
        return hardware.HardwareSupport.SERVICE_PROVIDER if _loops() else \
            hardware.HardwareSupport.NONE

    def initialize(self):
        pass  # the generic manager's instance initializes the machine once

    def list_block_devices(self, include_partitions=False, all_serial_and_wwn=False):
        return [hardware.BlockDevice(name=path, model="bench loop", size=_size(path),
                                     rotational=False, vendor="bench", serial=path)
                for path in _loops()]

    def get_os_install_device(self, permit_refresh=False):
        return _loops()[0]

    def list_network_interfaces(self):
        mac = os.environ.get("BENCH_MAC")
        if not mac:
            return super().list_network_interfaces()
        return [hardware.NetworkInterface("bench0", mac, ipv4_address="127.0.0.1")]
