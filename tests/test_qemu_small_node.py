"""A small node: our ramdisk in a VM with 512 MiB of RAM deploys a qcow2 image of 8 GiB.

The ramdisk is a tmpfs root (the ~57 MB initramfs unpacks into RAM), so an agent that staged
the image before converting it (the reference stages qcow2 images whole in RAM) could not
deploy it here: ours converts the qcow2 as it streams, with bounded memory.

The image: 8 GiB virtual, mostly sparse, with ``DATA_MIB`` of random data spread over it in
unaligned pieces (quick under TCG); made by ``qemu-img convert`` from a sparse raw file and
served over HTTP from the host (the guest reaches it through QEMU's user network, see
tests/qemu.py). It lands on a virtio disk backed by a sparse file a little larger than the
image, junk planted in the image's holes beforehand; ``standby.prepare_image`` is driven over
REST as Ironic's older flow does, the checksum verified by the agent. The disk is then compared
byte for byte with ``qemu-img convert -O raw`` of the same image, on the host.

``deploy_on_small_node`` is the one run; ``bench/small_node.py`` repeats it with less and less
RAM to find the smallest that boots and deploys. Its figures include the guest's MemAvailable
(lowest seen while the image was written) and the agent's peak RSS (VmHWM), read from /proc
in the guest through its probe shell.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site

from ipa_twisted.process import ProcessExecutionError, ProcessRunner
from tests import qemu
from tests.image_server import ImageResource
from tests.processes import Child, sleep

log = Logger()
MiB = 1 << 20
GiB = 1 << 30
VIRTUAL_SIZE = 8 * GiB
DISK_SIZE = VIRTUAL_SIZE + 256 * MiB
DATA_MIB = 128
"""Random data in the test's image (the bench uses more)."""
PIECES = 64
SERIAL = "IPA-SMALL-1"
JUNK = b"junk that must be zeroed! " * 40
ROOTFS = "ramfs"
"""The initramfs is unpacked into the kernel's rootfs: a tmpfs by default, which may hold
only half the RAM (the ~213 MB unpacked ramdisk does not fit with 512 MiB: "Initramfs
unpacking failed: write error", files missing), or a ramfs with ``rootfstype=ramfs``."""


@dataclass(frozen=True)
class SparseImage:
    """A qcow2 image (``path``, its sha256) and the raw bytes it stands for (``raw``)."""

    path: str
    raw: str
    sha256: str
    size: int
    data_mib: int
    holes: list[int]
    """Offsets inside the image's holes (where junk is planted on the disk beforehand)."""


def runner() -> ProcessRunner:
    return ProcessRunner(reactor, reactor)


async def make_image(directory: str, data_mib: int = DATA_MIB, pieces: int = PIECES,
                     seed: int = 14) -> SparseImage:
    """An 8 GiB qcow2 with ``data_mib`` of random data in ``pieces`` unaligned stretches,
    and its raw form as ``qemu-img convert`` makes it (both sparse files in ``directory``)."""
    rng = random.Random(seed)
    source = os.path.join(directory, "source.raw")
    piece = data_mib * MiB // pieces
    stride = VIRTUAL_SIZE // pieces
    holes = []
    with open(source, "wb") as f:
        f.truncate(VIRTUAL_SIZE)
        for number in range(pieces):
            # not cluster-aligned: a piece starts and ends inside 64 KiB clusters
            start = number * stride + (rng.randrange(1, 4096) * 512 if number else 0)
            f.seek(start)
            f.write(rng.randbytes(piece))
            holes.append(start + piece + (stride - piece) // 2)
        f.seek(0)     # an MBR with one Linux partition from 1 MiB to the end
        f.write(rng.randbytes(440) + struct.pack("<I", 0x14145A11) + bytes(2)
                + struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048,
                              (VIRTUAL_SIZE - MiB) // 512)
                + bytes(48) + b"\x55\xaa")
    path = os.path.join(directory, "image.qcow2")
    raw = os.path.join(directory, "expected.raw")
    await runner().execute("qemu-img", "convert", "-f", "raw", "-O", "qcow2", source, path,
                           timeout=600)
    os.unlink(source)
    await runner().execute("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw,
                           timeout=600)
    out, _ = await runner().execute("sha256sum", path, timeout=600)
    return SparseImage(path, raw, out.split()[0].decode(), os.path.getsize(path), data_mib,
                       holes)


class FileData:
    """An image file served by ``ImageResource`` without reading it into memory."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return len(self.map)

    def __getitem__(self, item: slice) -> bytes:
        return self.map[item]

    def close(self) -> None:
        self.map.close()


@dataclass
class SmallNodeRun:
    """What one boot-and-deploy showed."""

    memory_mb: int
    booted: bool = False
    deployed: bool = False
    verified: bool = False
    boot_seconds: float | None = None
    deploy_seconds: float | None = None
    mem_total_kb: int | None = None
    available_after_boot_kb: int | None = None
    lowest_available_kb: int | None = None
    agent_rss_kb: int | None = None
    agent_peak_rss_kb: int | None = None
    error: str = ""
    samples: list[int] = field(default_factory=list)

    def throughput(self, image: SparseImage) -> dict[str, float]:
        """MiB/s of the qcow2 file downloaded and of the virtual disk written."""
        seconds = self.deploy_seconds or float("nan")
        return {"download_mib_s": round(image.size / MiB / seconds, 1),
                "virtual_mib_s": round(VIRTUAL_SIZE / MiB / seconds, 1)}


def _meminfo(text: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE)}


AGENT_STATUS = ("for p in /proc/[0-9]*; do "
                "case \"$(tr '\\0' ' ' <$p/cmdline 2>/dev/null)\" in "
                "*twisted.scripts.twist[d]*|*bin/twist[d]\\ *|*startup.launc[h]*) "
                "cat $p/status;; esac; done")
"""The agent's /proc/<pid>/status (the pattern does not match this shell's own command)."""


async def guest_memory(vm: qemu.VirtualMachine) -> tuple[dict[str, int], dict[str, int]]:
    """(the guest's /proc/meminfo, the agent's status fields in kB) through the probe."""
    _, meminfo = await vm.run_in_guest(["cat", "/proc/meminfo"], timeout=120)
    _, status = await vm.run_in_guest(["sh", "-c", AGENT_STATUS], timeout=120)
    return _meminfo(meminfo.decode()), _meminfo(status.decode())


def plant_junk(disk: qemu.Disk, image: SparseImage) -> None:
    """Junk in the image's holes and past its end: the holes must read as zeros after the
    deploy (the agent zeroes what the image leaves unallocated); past the end stays."""
    with open(disk.path, "r+b") as f:
        for offset in [*image.holes, VIRTUAL_SIZE + MiB]:
            f.seek(offset)
            f.write(JUNK)


async def same_bytes(disk: qemu.Disk, image: SparseImage) -> str | None:
    """None when the disk's first 8 GiB equal the image's raw form (``cmp``), else why."""
    try:
        await runner().execute("cmp", "-n", str(VIRTUAL_SIZE), image.raw, disk.path,
                               timeout=900)
    except ProcessExecutionError as e:
        return f"the disk differs from qemu-img's raw image: {e}"
    if disk.read(VIRTUAL_SIZE + MiB, len(JUNK)) != JUNK:
        return "the disk was written past the image's end"
    return None


BOOT_FAILURES = re.compile(r"Initramfs unpacking failed.*|Kernel panic.*|Out of memory.*")


async def boot(vm: qemu.VirtualMachine, timeout: float) -> float:
    """Start ``vm`` and wait for the agent's API (as ``vm.start``), giving up as soon as
    the console shows the boot failed (the initramfs not unpacked whole, a panic), QEMU
    ended or ``timeout`` passed; the seconds it took."""
    started = time.monotonic()
    vm.child = Child(vm.argv())
    while True:
        failed = BOOT_FAILURES.search(vm.console)
        if failed:
            raise AssertionError(failed.group(0).strip())
        if vm.child.ended.called:
            raise AssertionError(f"QEMU ended: {vm.console[-500:]}")
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no answer in {timeout} s: {_reason(vm.console)}")
        try:
            response = await vm.http.get(f"{vm.url}/v1/status", timeout=5)
            await response.content()
            if response.code == 200:
                vm.boot_seconds = time.monotonic() - started
                return vm.boot_seconds
        except Exception:  # not listening yet
            pass
        await sleep(1)


async def deploy_on_small_node(ramdisk: qemu.Ramdisk, image: SparseImage, work: str,
                               memory_mb: int, *, rootfs: str = ROOTFS,
                               boot_timeout: float = 400, deploy_timeout: float = 1200,
                               interval: float = 3) -> SmallNodeRun:
    """Boot the ramdisk with ``memory_mb`` (its root file system ``rootfs``: ``ramfs``, or
    the kernel's default ``tmpfs``) and deploy ``image`` onto its one virtio disk; what was
    seen (failures are recorded in the result, not raised)."""
    run = SmallNodeRun(memory_mb)
    disk = qemu.Disk(os.path.join(work, f"disk-{memory_mb}.img"), "virtio", SERIAL, DISK_SIZE)
    disk.create()
    plant_junk(disk, image)
    data = FileData(image.path)
    server: Any = reactor.listenTCP(0, Site(ImageResource(data)),  # type: ignore[arg-type]
                                    interface="127.0.0.1")
    args = "ipa-standalone=1" + (" rootfstype=ramfs" if rootfs == "ramfs" else "")
    vm = qemu.VirtualMachine(ramdisk, [disk], memory_mb=memory_mb, kernel_args=args,
                             http_port=server.getHost().port, probe=True)
    try:
        try:
            run.boot_seconds = round(await boot(vm, boot_timeout), 1)
        except AssertionError as e:
            run.error = f"no API: {str(e)[:300]}"
            return run
        run.booted = True
        meminfo, status = await guest_memory(vm)
        run.mem_total_kb = meminfo.get("MemTotal")
        run.available_after_boot_kb = meminfo.get("MemAvailable")
        run.agent_rss_kb = status.get("VmRSS")
        image_info = {"id": "small-node-qcow2", "disk_format": "qcow2",
                      "urls": [f"http://{qemu.GUEST_HTTP}/image.qcow2"],
                      "os_hash_algo": "sha256", "os_hash_value": image.sha256}
        started = time.monotonic()
        result = await vm.post("standby.prepare_image", {"image_info": image_info},
                               wait=False)
        while result["command_status"] == "RUNNING":
            if time.monotonic() - started > deploy_timeout:
                raise AssertionError(f"prepare_image still running after {deploy_timeout} s")
            meminfo, _ = await guest_memory(vm)
            if "MemAvailable" in meminfo:
                run.samples.append(meminfo["MemAvailable"])
            await sleep(interval)
            result = await vm.result(result["id"])
        run.deploy_seconds = round(time.monotonic() - started, 1)
        meminfo, status = await guest_memory(vm)
        run.samples.append(meminfo.get("MemAvailable", 0))
        run.lowest_available_kb = min(run.samples)
        run.agent_peak_rss_kb = status.get("VmHWM")
        if result["command_status"] != "SUCCEEDED":
            run.error = f"prepare_image {result['command_status']}: {result['command_error']}"
            return run
        run.deployed = True
        await vm.stop()            # nothing in flight to the disk before comparing
        why = await same_bytes(disk, image)
        run.verified = why is None
        run.error = why or ""
        return run
    except Exception as e:
        run.error = f"{type(e).__name__}: {e} {_reason(vm.console)}"[:600]
        return run
    finally:
        with open(os.path.join(work, f"console-{memory_mb}.log"), "w") as f:
            f.write(vm.console)
        await vm.stop()
        stopped = server.stopListening()
        if stopped is not None:
            await stopped
        data.close()
        os.unlink(disk.path)


def _reason(console: str) -> str:
    """The console's last sign of running out of memory, if any."""
    found = re.findall(r"^.*(?:Out of memory|oom-kill|Kernel panic|Killed process|"
                       r"Initramfs unpacking failed|not enough memory).*$", console,
                       re.MULTILINE | re.IGNORECASE)
    return found[-1].strip() if found else ""


class SmallNodeTests(TestCase):
    """512 MiB of RAM, an 8 GiB qcow2: deployed, checksum verified, byte for byte."""

    timeout = 2400

    def setUp(self) -> None:
        reason = qemu.unavailable()
        if reason is not None:
            raise SkipTest(reason)
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)

    async def test_deploy_8gib_qcow2_with_512mib(self) -> None:
        ramdisk = await qemu.build_ramdisk()
        image = await make_image(self.work)
        self.assertLess(image.size, VIRTUAL_SIZE // 32, "the qcow2 is not sparse")
        run = await deploy_on_small_node(ramdisk, image, self.work, 512)
        log.info("small node: {run} {rates}", run=run, rates=run.throughput(image))
        self.assertTrue(run.booted and run.deployed and run.verified, run)
        assert run.mem_total_kb is not None and run.lowest_available_kb is not None
        self.assertLess(run.mem_total_kb, 512 * 1024)
        # bounded memory: the guest never came near writing the image to RAM
        self.assertGreater(run.lowest_available_kb, 32 * 1024, run)
        assert run.agent_peak_rss_kb is not None
        self.assertLess(run.agent_peak_rss_kb, 256 * 1024, run)
