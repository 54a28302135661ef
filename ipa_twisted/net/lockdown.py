"""The network side of ``system.lockdown``: the machine's own interfaces taken down.

After lockdown the agent must be unreachable for good (Ironic's ``disable_power_off``
nodes keep the ramdisk running while the instance boots on the same wire), so, as the
reference agent does once its API has stopped, every interface that leads off the machine
is set down with ``ip link set DEV down``: physical ones (a ``device`` link in sysfs), VLAN
interfaces (``eth0.100``) and bonds (a ``bonding`` directory). The loopback and other
virtual interfaces stay as they are.
"""

from __future__ import annotations

import os
import re

from twisted.logger import Logger

from ipa_twisted.context import CommandRunner
from ipa_twisted.process import ProcessExecutionError

log = Logger()

IP_LINK_TIMEOUT = 30.0
"""Longest wait, in seconds, for one ``ip link set DEV down``."""
_VLAN = re.compile(r"^.+\.\d+$")


def lockdown_interfaces(sys_path: str) -> list[str]:
    """The interfaces lockdown takes down, from ``{sys_path}/class/net``, sorted: physical
    (``device`` link), VLAN (``NAME.VID``) and bond (``bonding`` directory) interfaces.
    Empty when sysfs cannot be read."""
    directory = os.path.join(sys_path, "class", "net")
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        log.warn("Cannot list the network interfaces in {directory}: {error}",
                 directory=directory, error=str(e))
        return []
    return [name for name in names if name != "lo" and (
        _VLAN.match(name)
        or os.path.lexists(os.path.join(directory, name, "device"))
        or os.path.isdir(os.path.join(directory, name, "bonding")))]


async def take_interfaces_down(runner: CommandRunner, sys_path: str) -> list[str]:
    """Set every interface of ``lockdown_interfaces`` down, one after the other; the names
    of those that went down. A failure is logged and the others are still tried."""
    down = []
    for name in lockdown_interfaces(sys_path):
        try:
            await runner.execute("ip", "link", "set", name, "down", timeout=IP_LINK_TIMEOUT)
        except ProcessExecutionError as e:
            log.warn("Could not bring down interface {interface}: {error}", interface=name,
                     error=str(e))
            continue
        down.append(name)
    return down
