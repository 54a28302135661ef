"""Network namespaces, veth pairs and real peers (lldpd, a zeroconf publisher) for tests.

Everything made here is removed by the test's cleanups, even when the test fails: peers are
stopped first, then veths deleted, then namespaces. Names are unique per process and call,
and short enough for interface names (15 characters). Root only: ``skip_reason`` says why
a test cannot run.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from ipa_twisted.process import ProcessExecutionError, ProcessRunner
from tests.processes import Child, child_env

_names = itertools.count()
PACKAGES = {"ip": "iproute2", "lldpd": "lldpd", "lldpcli": "lldpd"}


def skip_reason(*programs: str, modules: Sequence[str] = ()) -> str | None:
    """Why a namespace test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for program in ("ip", *programs):
        if shutil.which(program) is None:
            return f"needs {program} (Debian package {PACKAGES.get(program, program)})"
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            return f"needs the Python package {module} (pip install '.[test]')"
    return None


def unique(prefix: str) -> str:
    """A name no other test of any process uses at the same time."""
    return f"{prefix}{os.getpid() % 100000}x{next(_names)}"


def runner() -> ProcessRunner:
    return ProcessRunner(reactor, reactor)


async def ip(*args: str) -> bytes:
    out, _ = await runner().execute("ip", *args, timeout=30)
    return out


async def try_ip(*args: str) -> bool:
    """Run ``ip`` and say whether it worked (for cleanups and probes)."""
    try:
        await runner().execute("ip", *args, timeout=30)
    except ProcessExecutionError:
        return False
    return True


async def make_namespace(test: TestCase) -> str:
    """A new network namespace (loopback up), deleted when the test ends."""
    name = unique("ipat")
    await ip("netns", "add", name)
    test.addCleanup(try_ip, "netns", "del", name)
    await ip("-n", name, "link", "set", "lo", "up")
    return name


async def make_veth(test: TestCase, here: str, there: str) -> tuple[str, str]:
    """A veth pair, one end in each namespace, both up; deleted when the test ends."""
    a, b = unique("va"), unique("vb")
    await ip("link", "add", a, "netns", here, "type", "veth", "peer", "name", b,
             "netns", there)
    test.addCleanup(try_ip, "-n", here, "link", "del", a)
    await ip("-n", here, "link", "set", a, "up")
    await ip("-n", there, "link", "set", b, "up")
    return a, b


def in_namespace(namespace: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``namespace`` (``ip netns exec`` replaces itself with it)."""
    path = shutil.which("ip")
    assert path is not None
    return [path, "netns", "exec", namespace, *argv]


def python_in(namespace: str, module: str, *args: str) -> Child:
    """``python -m module args`` in ``namespace``, with this checkout on the path."""
    return Child(in_namespace(namespace, [sys.executable, "-m", module, *args]),
                 env=child_env())


async def run_to_end(child: Child, test: TestCase, timeout: float = 60) -> int | None:
    """Wait for ``child`` to exit (killed after ``timeout``); its exit code."""
    test.addCleanup(child.stop, "KILL")
    from twisted.internet.defer import Deferred
    ended: Deferred[int | None] = Deferred()
    child.ended.addBoth(lambda code: ended.callback(code) if not ended.called else None)
    ended.addTimeout(timeout, reactor)
    return await ended


def json_line(child: Child) -> Any:
    """The child's JSON output line (its logs share the output)."""
    for line in child.output.decode("utf-8", "replace").splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the output: {child.output[-3000:]!r}")


# -- lldpd --------------------------------------------------------------------------------

async def vlan_supported(namespace: str, interface: str) -> bool:
    """Whether this kernel makes 802.1Q VLAN interfaces (probed in ``namespace``)."""
    probe = unique("vp")
    if not await try_ip("-n", namespace, "link", "add", "link", interface, "name", probe,
                        "type", "vlan", "id", "4000"):
        return False
    await try_ip("-n", namespace, "link", "del", probe)
    return True


class LLDPPeer:
    """lldpd in a namespace, announcing on ``interfaces`` every second.

    The system name is ``system_name``. Each VLAN of ``vlans`` is announced: as a real
    VLAN interface on the first interface when the kernel has 802.1Q (lldpd then sends its
    VLAN Name TLV itself), else as a custom 802.1 VLAN Name TLV configured in lldpd for
    that interface.
    """

    def __init__(self, test: TestCase, namespace: str, interfaces: Sequence[str],
                 system_name: str, vlans: Sequence[int] = ()) -> None:
        self.test, self.namespace = test, namespace
        self.interfaces, self.system_name, self.vlans = list(interfaces), system_name, vlans
        # Short (a Unix socket path has at most 107 bytes) and open to lldpd's own user,
        # which its lldpcli helper runs as.
        self.directory = tempfile.mkdtemp(prefix="ipat-lldpd-")
        os.chmod(self.directory, 0o755)
        test.addCleanup(shutil.rmtree, self.directory, True)
        self.socket = os.path.join(self.directory, "lldpd.socket")
        self.real_vlans = False

    async def start(self) -> None:
        lines = [f"configure system hostname {self.system_name}",
                 "configure lldp tx-interval 1"]
        self.real_vlans = bool(self.vlans) and await vlan_supported(
            self.namespace, self.interfaces[0])
        for vlan in self.vlans:
            name = f"vlan{vlan}"
            if self.real_vlans:
                device = f"{self.interfaces[0]}.{vlan}"
                await ip("-n", self.namespace, "link", "add", "link", self.interfaces[0],
                         "name", device, "type", "vlan", "id", str(vlan))
                await ip("-n", self.namespace, "link", "set", device, "up")
            else:
                info = vlan.to_bytes(2, "big") + bytes([len(name)]) + name.encode()
                lines.append(f"configure ports {self.interfaces[0]} lldp custom-tlv add "
                             "oui 00,80,c2 subtype 3 "
                             "oui-info " + ",".join(f"{b:02x}" for b in info))
        config = os.path.join(self.directory, "lldpd.conf")
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        lldpd = shutil.which("lldpd")
        assert lldpd is not None
        self.child = Child(in_namespace(self.namespace, [
            lldpd, "-d", "-u", self.socket, "-O", config, "-I", ",".join(self.interfaces)]))
        self.test.addCleanup(self.child.stop)
        await self.child.wait_for(rb"lldpd should resume operations", timeout=20)

    async def lldpcli(self, *args: str) -> bytes:
        lldpcli = shutil.which("lldpcli")
        assert lldpcli is not None
        out, _ = await runner().execute(*in_namespace(self.namespace, [
            lldpcli, "-u", self.socket, *args]), timeout=30)
        return out
