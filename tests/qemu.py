"""The test bed: the project's ramdisk (ramdisk/build.sh) booted in QEMU, driven over its API.

``build_ramdisk`` builds it, or finds it built (``.cache/ramdisk``, keyed by the hash of its
inputs). ``VirtualMachine`` boots it with file-backed disks (virtio, NVMe, SATA) and QEMU's
user-mode network in ``restrict=on`` mode: the guest reaches nothing but what is forwarded
explicitly, the agent's API (host ``127.0.0.1:<port>`` → guest port 9999) one way and,
optionally, a test's HTTP server the other (guest ``10.0.2.100:8080`` → host
``127.0.0.1:<port>``, through ``tests/qemu_relay.py``). The serial console is the QEMU
child's standard output.

KVM is not used unless ``IPA_QEMU_ACCEL=kvm`` (it may be present but unusable, as on the
project's machines): QEMU emulates the CPU (TCG), a boot to the agent's API takes ~30 s.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from tests.processes import ROOT, Child, free_port, poll, sleep

RAMDISK_OUTPUT = os.path.join(ROOT, ".cache", "ramdisk")
BUILD_SCRIPT = os.path.join(ROOT, "ramdisk", "build.sh")
QEMU = "qemu-system-x86_64"
GUEST_HTTP = "10.0.2.100:8080"
"""Where the guest finds the test's HTTP server (``http_port``)."""
AGENT_PORT = 9999
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
"""UEFI firmware (Debian's ovmf) for ``VirtualMachine(uefi=True)``; the VARS file is copied."""


def unavailable() -> str | None:
    """Why the ramdisk cannot be built and booted here (None: it can)."""
    if platform.machine() != "x86_64":
        return f"the ramdisk is built for x86_64, this machine is {platform.machine()}"
    missing = [tool for tool in (QEMU, "debootstrap", "cpio") if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (bash .ci/setup installs "
                "qemu-system-x86, debootstrap and cpio)")
    if os.geteuid() != 0 and not _built():
        return "building the ramdisk needs root (debootstrap, chroot, device nodes)"
    return None


def uefi_unavailable() -> str | None:
    """Why a UEFI guest cannot boot here (None: it can)."""
    missing = [path for path in (OVMF_CODE, OVMF_VARS) if not os.path.exists(path)]
    if missing:
        return f"{', '.join(missing)} missing (bash .ci/setup installs ovmf)"
    return unavailable()


def _built() -> bool:
    return all(os.path.exists(os.path.join(RAMDISK_OUTPUT, name))
               for name in ("vmlinuz", "initrd.img", "stamp"))


@dataclass(frozen=True)
class Ramdisk:
    kernel: str
    initrd: str
    seconds: float
    """How long ``build.sh`` took (0-ish when the cached build was up to date)."""
    rebuilt: bool
    manifest: str


async def build_ramdisk(timeout: float = 900) -> Ramdisk:
    """Run ramdisk/build.sh (a no-op when the cached build is up to date)."""
    started = time.monotonic()
    child = Child(["bash", BUILD_SCRIPT])
    guard = reactor.callLater(timeout, child.process.signalProcess, "KILL")
    code = await child.ended
    if guard.active():
        guard.cancel()
    output = child.output.decode("utf-8", "replace")
    if code != 0:
        raise AssertionError(f"ramdisk/build.sh failed ({code}):\n{output[-4000:]}")
    manifest = ""
    try:
        with open(os.path.join(RAMDISK_OUTPUT, "manifest.txt")) as f:
            manifest = f.read()
    except OSError:
        pass
    return Ramdisk(os.path.join(RAMDISK_OUTPUT, "vmlinuz"),
                   os.path.join(RAMDISK_OUTPUT, "initrd.img"),
                   time.monotonic() - started, "up to date" not in output, manifest)


@dataclass(frozen=True)
class Disk:
    """A file-backed disk: ``kind`` is ``virtio``, ``nvme`` or ``sata``."""

    path: str
    kind: str
    serial: str
    size: int

    def create(self, fill: bytes = b"") -> None:
        """Make the backing file: sparse zeros, or ``fill`` repeated over all of it."""
        with open(self.path, "wb") as f:
            if fill:
                block = (fill * ((1 << 20) // len(fill) + 1))[:1 << 20]
                for _ in range(self.size >> 20):
                    f.write(block)
            f.truncate(self.size)

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def is_zero(self) -> bool:
        """Whether every byte of the disk is zero."""
        zero = bytes(1 << 20)
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                if chunk != zero[:len(chunk)]:
                    return False
        return True

    def find(self, needle: bytes) -> int:
        """The offset of the first ``needle`` on the disk, or -1."""
        with open(self.path, "rb") as f:
            data = f.read()
        return data.find(needle)


class _ProbeShell(Protocol):
    """The guest's probe shell (``ipa-ramdisk-probe``): one command at a time, its output
    base64-encoded between markers (the serial line is not 8-bit clean for us)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: tuple[bytes, Deferred[tuple[int, bytes]]] | None = None
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.waiting is None:
            return
        marker, answered = self.waiting
        found = re.search(rb"@@BEGIN " + marker + rb"@@(.*?)@@END " + marker + rb" (\d+)@@",
                          self.buffer, re.DOTALL)
        if found:
            self.waiting, self.buffer = None, self.buffer[found.end():]
            answered.callback((int(found.group(2)),
                               base64.b64decode(b"".join(found.group(1).split()))))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class VirtualMachine:
    """The ramdisk in QEMU with ``disks``; ``http_port`` is forwarded as ``GUEST_HTTP``.

    With ``probe``, the guest also runs a root shell on its second serial port
    (``ipa-ramdisk-probe=ttyS1``, a UNIX socket on the host) for ``run_in_guest``. By
    default the guest boots with QEMU's BIOS (SeaBIOS); with ``uefi`` with OVMF, its NVRAM
    a copy of ``OVMF_VARS`` in a directory of its own. ``extra_args`` go at the end of
    QEMU's command line (a second NIC, say).
    """

    def __init__(self, ramdisk: Ramdisk, disks: list[Disk], *, memory_mb: int = 1024,
                 cpus: int = 2, http_port: int | None = None,
                 kernel_args: str = "ipa-standalone=1", probe: bool = False,
                 uefi: bool = False, extra_args: Sequence[str] = ()) -> None:
        self.ramdisk, self.disks = ramdisk, disks
        self.extra_args = list(extra_args)
        self.memory_mb, self.cpus = memory_mb, cpus
        self.http_port, self.kernel_args = http_port, kernel_args
        self.port = free_port()
        self.child: Child | None = None
        self.probe_path = (os.path.join(tempfile.mkdtemp(prefix="ipa-probe-"), "ttyS1")
                           if probe else None)
        self._probe: _ProbeShell | None = None
        self.nvram = None
        if uefi:
            self.nvram = os.path.join(tempfile.mkdtemp(prefix="ipa-nvram-"), "OVMF_VARS.fd")
            shutil.copyfile(OVMF_VARS, self.nvram)
        self._probes = 0
        self.boot_seconds: float | None = None
        # No connection kept alive between requests: nothing is left for the reactor.
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor,
                                                                      persistent=False)))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        accel = os.environ.get("IPA_QEMU_ACCEL", "tcg")
        accel = "tcg,thread=multi" if accel == "tcg" else accel
        nic = (f"user,model=virtio-net-pci,restrict=on,"
               f"hostfwd=tcp:127.0.0.1:{self.port}-:{AGENT_PORT}")
        if self.http_port is not None:
            host, port = GUEST_HTTP.split(":")
            relay = os.path.join(ROOT, "tests", "qemu_relay.py")
            nic += (f",guestfwd=tcp:{host}:{port}-cmd:{sys.executable} {relay} "
                    f"127.0.0.1 {self.http_port}")
        argv = [QEMU, "-machine", "q35", "-accel", accel, "-cpu", "max",
                "-m", str(self.memory_mb), "-smp", str(self.cpus),
                "-kernel", self.ramdisk.kernel, "-initrd", self.ramdisk.initrd,
                "-append", f"console=ttyS0 panic=-1 {self.kernel_args}"
                + (" ipa-ramdisk-probe=ttyS1" if self.probe_path else ""),
                "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
                "-nic", nic]
        if self.nvram:
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={self.nvram}"]
        if self.probe_path:
            argv += ["-chardev", f"socket,id=probe,path={self.probe_path},server=on,wait=off",
                     "-serial", "chardev:probe"]
        sata = 0
        for number, disk in enumerate(self.disks):
            drive = f"disk{number}"
            argv += ["-drive", f"file={disk.path},if=none,id={drive},format=raw,cache=unsafe"]
            if disk.kind == "virtio":
                argv += ["-device", f"virtio-blk-pci,drive={drive},serial={disk.serial}"]
            elif disk.kind == "nvme":
                argv += ["-device", f"nvme,drive={drive},serial={disk.serial}"]
            elif disk.kind == "sata":
                argv += ["-device", f"ide-hd,drive={drive},bus=ide.{sata},"
                                    f"serial={disk.serial}"]          # q35's AHCI ports
                sata += 1
            else:
                raise ValueError(f"unknown disk kind {disk.kind}")
        return argv + self.extra_args

    async def start(self, timeout: float = 300) -> float:
        """Boot and wait for the agent's API; the seconds it took."""
        started = time.monotonic()
        self.child = Child(self.argv())

        async def answering() -> bool:
            assert self.child is not None
            if self.child.ended.called:
                raise AssertionError(f"QEMU ended ({self.child.exit_code}):\n"
                                     f"{self.console[-4000:]}")
            response = await self.http.get(f"{self.url}/v1/status", timeout=5)
            await response.content()
            return bool(response.code == 200)
        try:
            await poll(answering, timeout=timeout, interval=1)
        except AssertionError as e:
            raise AssertionError(f"{e}\nconsole:\n{self.console[-4000:]}") from None
        self.boot_seconds = time.monotonic() - started
        return self.boot_seconds

    @property
    def console(self) -> str:
        return self.child.output.decode("utf-8", "replace") if self.child else ""

    async def stop(self) -> None:
        if self._probe is not None:
            probe, self._probe = self._probe, None
            if probe.transport is not None:
                probe.transport.loseConnection()
            await probe.closed
        if self.child is not None:
            await self.child.stop("KILL")
        if self.probe_path:
            shutil.rmtree(os.path.dirname(self.probe_path), ignore_errors=True)
        if self.nvram:
            shutil.rmtree(os.path.dirname(self.nvram), ignore_errors=True)

    async def run_in_guest(self, argv: Sequence[str], timeout: float = 60) -> tuple[int, bytes]:
        """(exit code, standard output) of ``argv`` run by the guest's probe shell."""
        if self.probe_path is None:
            raise ValueError("run_in_guest needs VirtualMachine(probe=True)")
        if self._probe is None:
            self._probe = await connectProtocol(UNIXClientEndpoint(reactor, self.probe_path),
                                                _ProbeShell())
        self._probes += 1
        marker = str(self._probes).encode()
        answered: Deferred[tuple[int, bytes]] = Deferred()
        self._probe.waiting = (marker, answered)
        command = " ".join(shlex.quote(word) for word in argv)
        assert self._probe.transport is not None
        self._probe.transport.write(
            f"{command} >/tmp/probe.out 2>/dev/null; code=$?; "
            f"echo '@@BEGIN {self._probes}@@'; base64 /tmp/probe.out; "
            f"echo \"@@END {self._probes} $code@@\"\n".encode())
        answered.addTimeout(timeout, reactor)
        try:
            return await answered
        except Exception as e:
            raise AssertionError(f"{command}: no answer from the guest's probe shell in "
                                 f"{timeout} s ({e!r}); it printed "
                                 f"{self._probe.buffer[-2000:]!r}") from None

    # -- the API ---------------------------------------------------------------------------
    async def post(self, name: str, params: dict[str, Any], wait: bool = True,
                   timeout: float = 600) -> dict[str, Any]:
        """POST a command; its result object (waited for unless ``wait`` is False)."""
        response = await self.http.post(f"{self.url}/v1/commands/",
                                   params={"wait": "true"} if wait else {},
                                   data=json.dumps({"name": name, "params": params}).encode(),
                                   headers={"Content-Type": ["application/json"]},
                                   timeout=timeout)
        body = await response.json()
        if response.code >= 400:
            raise AssertionError(f"{name} answered {response.code}: {body}")
        return dict(body)

    async def result(self, command_id: str) -> dict[str, Any]:
        response = await self.http.get(f"{self.url}/v1/commands/{command_id}", timeout=30)
        return dict(await response.json())

    async def run(self, name: str, params: dict[str, Any], timeout: float = 600,
                  interval: float = 0.5) -> tuple[dict[str, Any], list[Any], float]:
        """Start an asynchronous command and poll it to the end.

        (final result object, the progress objects seen while it ran, seconds it took).
        """
        started = time.monotonic()
        result = await self.post(name, params, wait=False)
        progress: list[Any] = []
        while result["command_status"] == "RUNNING":
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{name} still running after {timeout} s: {result}")
            shown = (result.get("command_result") or {})
            if isinstance(shown, dict) and "progress" in shown:
                progress.append(shown["progress"])
            await sleep(interval)
            result = await self.result(result["id"])
        return result, progress, time.monotonic() - started
