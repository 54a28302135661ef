"""Deploys through a real Ironic: ours and the reference agent, alternating, in one run.

Usage: .venv/bin/python bench/real_ironic.py [--size-gib 2] [--runs 2] [--qcow2-gib 1,4,8]
           [--fleet 8,16] [--fleet-gib 1] [--only deploy,qcow2,fleet] [--json] [--keep]

One Ironic (``tests/ironic/harness.py``: API and conductor in one process, ``direct``
deploy, fake power and boot) deploys whole-disk images from one image server on 127.0.0.1
(``bench/deploy.py serve``: sendfile, counts the bytes it sends). Each agent, ours
(``twistd ipa``) or the reference (``ironic-python-agent`` from PyPI, in
``bench/_scratch/ref-venv``), runs in the disk sandbox (``ipa_twisted.testing.sandbox``: a
private mount namespace whose /dev holds only its loop device, ``reboot``/``poweroff``
shadowed by /bin/true): it cannot reach this machine's disks. It is started when its node
reaches ``wait call-back``, as a machine would boot its ramdisk.

1. ``deploy``: a SIZE GiB image of random data with a GPT, raw, ``--runs`` times each side,
   alternating: deploy request -> ``active``, the ``write_image`` step as the conductor logs
   it, and where the time goes (see ``BREAKDOWN``).
2. ``qcow2``: 1, 4 and 8 GiB (virtual) qcow2 images with a GPT and 1/16 random data: time
   and peak memory = peak RSS of the agent and its children + the bytes it staged in its
   temp dir (the reference downloads a qcow2 whole before converting it; in a ramdisk its
   temp dir is RAM).
3. ``fleet``: N nodes deployed at once, each agent with its own loop disk and MAC, then the
   same for the other side (the first side alternates from one N to the next): time until all are active, bytes the image server sent, each
   agent's peak RSS, CPU time and idle RSS (read when it logs its first heartbeat, after
   lookup), the latter against the floor of the fixed stack (``bench/bare_klein.py`` under twistd,
   measured in the same run), and against that floor in use (serving HTTPS, treq imported).

Before every deploy its disks are filled with zeros, so both sides write over blocks
already allocated in the sparse files, as on a real disk: the side that went first used to
pay for allocating them.

With ``--json`` the rows are printed as one JSON list for ``bench/compare.py``. Needs root,
loop devices, ``.venv-ironic`` (``tests/ironic/setup-ironic.sh``), qemu-img and sgdisk.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess  # making images before the reactor runs: a benchmark driver
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]

from twisted.internet import reactor, task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.protocol import ProcessProtocol  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

import compare  # noqa: E402  (ensure_reference, STUBBED, SCRATCH)
from ipa_twisted.process import ProcessRunner  # noqa: E402
from ipa_twisted.testing.sandbox import (LoopDevice, attach_loop_devices,  # noqa: E402
                                         loop_devices_unavailable, sandbox_argv)
from tests.ironic.harness import RealIronic, skip_reason  # noqa: E402
from tests.processes import SAFE_POWER, free_port, physical_macs  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
SIDES = ("ours", "reference")
LAUNCH = [sys.executable, "-m", "ipa_twisted.startup.launch"]
# Tools the reference would use to change this machine beyond its sandbox (kernel modules,
# clock, BMC, EFI variables, udev, services); disk tools stay real: in the sandbox they can
# only reach its loop device. lshw is not installed here: its stub answers a minimal JSON.
REF_STUBBED = ("mdadm", "modprobe", "multipath", "multipathd", "iscsistart", "hwclock",
               "chronyd", "ntpdate", "ipmitool", "efibootmgr", "udevadm", "lshw",
               "systemctl", "reboot", "poweroff")
REF_RUN = "/run/ironic-python-agent"
# What each agent logs when the write_image deploy step starts and ends in it.
COMMAND_START = {"ours": re.compile(r"Executing deploy step write_image"),
                 "reference": re.compile(r"Asynchronous command execute_deploy_step started")}
COMMAND_DONE = {"ours": re.compile(r"deploy step write_image (completed|failed)"),
                "reference": re.compile(r"Asynchronous command execute_deploy_step "
                                        r"completed")}
# How long the image's bytes took (download and write), as each agent logs it: the rest of
# its write_image step is preparing the disk before and checking it after.
IMAGE_BYTES = {"ours": re.compile(r"Wrote image .* in ([\d.]+) s;"),
               "reference": re.compile(r"Image streamed onto device .* in ([\d.]+) seconds")}
# The first heartbeat (after lookup and automatic TLS): the agent's idle RSS is read then.
FIRST_HEARTBEAT = {"ours": re.compile(r"Heartbeat sent in"),
                   "reference": re.compile(r"sleeping before next heartbeat")}
BREAKDOWN = (
    ("request", "wait", "  request -> wait call-back (conductor)"),
    ("wait", "cmd_start", "  agent boot, lookup, beat -> write starts"),
    ("cmd_start", "cmd_done", "  agent write (write_image step in the agent)"),
    ("cmd_done", "step_done", "  heartbeat wait: write done -> step done"),
    ("step_done", "active", "  conductor: write_image done -> active"),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


# -- processes ---------------------------------------------------------------------------------

def _proc_tree() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _tree(pid: int, children: dict[int, list[int]]) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_seconds(pids: Sequence[int], main: int) -> float:
    """User + system time of ``pids``, plus the children ``main`` has reaped."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])          # utime, stime
        if pid == main:
            ticks += int(fields[13]) + int(fields[14])      # cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _dir_bytes(path: str) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_blocks * 512
            except OSError:
                pass
    return total


class Agent(ProcessProtocol):
    """One agent process: its output lines with their arrival time, RSS/CPU samples."""

    def __init__(self, side: str, argv: list[str], env: dict[str, str],
                 staging: str) -> None:
        self.side, self.staging = side, staging
        self.lines: list[tuple[float, str]] = []
        self._partial = b""
        self.ended: Deferred[None] = Deferred()
        self.peak_rss = 0.0      # KiB, the tree's sum, sampled
        self.peak_staged = 0     # bytes in its temp dir, sampled
        self.idle_rss = float("nan")   # KiB, read when it logs its first heartbeat
        self.cpu = 0.0
        self.started = time.time()
        self.transport_ = reactor.spawnProcess(self, argv[0], argv, env, path=staging)
        self.pid: int = self.transport_.pid

    def outReceived(self, data: bytes) -> None:
        self.errReceived(data)

    def errReceived(self, data: bytes) -> None:
        now = time.time()
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append((now, line))
            if self.idle_rss != self.idle_rss and FIRST_HEARTBEAT[self.side].search(line):
                self.idle_rss = sum(_status_kib(pid, "VmRSS")
                                    for pid in _tree(self.pid, _proc_tree()))

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)

    def first(self, pattern: re.Pattern[str], after: float = 0.0) -> float | None:
        for when, line in self.lines:
            if when >= after and pattern.search(line):
                return when
        return None

    def seconds(self, pattern: re.Pattern[str]) -> float:
        """The number the first line matching ``pattern`` logs (its first group), or NaN."""
        for _, line in self.lines:
            found = pattern.search(line)
            if found:
                return float(found.group(1))
        return float("nan")

    def sample(self, children: dict[int, list[int]]) -> None:
        if self.ended.called:
            return
        pids = _tree(self.pid, children)
        rss = sum(_status_kib(pid, "VmRSS") for pid in pids)
        self.peak_rss = max(self.peak_rss, rss, _status_kib(self.pid, "VmHWM"))
        self.cpu = max(self.cpu, _cpu_seconds(pids, self.pid))
        self.peak_staged = max(self.peak_staged, _dir_bytes(self.staging))

    async def stop(self) -> None:
        with open(os.path.join(os.path.dirname(self.staging), "agent.log"), "w") as f:
            f.writelines(f"{when:.3f} {line}\n" for when, line in self.lines)
        if not self.ended.called:
            for pid in reversed(_tree(self.pid, _proc_tree())):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await self.ended

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


class Sampler:
    """Samples every running agent every ``interval`` seconds (one /proc scan a tick)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.agents: list[Agent] = []
        self._loop = task.LoopingCall(self._tick)
        self._loop.start(interval)

    def _tick(self) -> None:
        live = [agent for agent in self.agents if not agent.ended.called]
        if live:
            children = _proc_tree()
            for agent in live:
                agent.sample(children)

    def stop(self) -> None:
        self._loop.stop()


def conductor_times(lines: Iterable[str], uuid: str, after: float) -> dict[str, float]:
    """From the conductor's INFO log ``lines``, when it logged for node ``uuid`` at or after
    ``after`` (epoch seconds): ``wait`` (first ``wait call-back``), ``step_start``
    (write_image begins), ``step_done`` (a heartbeat found the agent's write_image done:
    the first deploy command success after it began) and ``active``."""
    found: dict[str, float] = {}
    for line in lines:
        if uuid not in line:
            continue
        if "Executing {'step': 'write_image'" in line:
            key = "step_start"
        elif "returned deploy command success" in line:
            key = "step_done"
        elif 'moved to provision state "wait call-back" from state "deploying"' in line:
            key = "wait"
        elif 'moved to provision state "active"' in line:
            key = "active"
        else:
            continue
        when = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
        if when < after or key in found or (key == "step_done" and "step_start" not in found):
            continue
        found[key] = when
    return found


# -- the bench --------------------------------------------------------------------------------

class Bench:
    def __init__(self, workdir: str, ref_agent: str) -> None:
        self.workdir = workdir
        self.images = os.path.join(workdir, "images")
        os.makedirs(self.images)
        self.ref_agent = ref_agent
        self.runner = ProcessRunner(reactor, reactor)
        self.cleanups: list[tuple[Any, ...]] = []
        self.sampler = Sampler()
        self.server: subprocess.Popen[bytes] | None = None
        self.port_file = os.path.join(workdir, "server-port")
        self.ironic: RealIronic | None = None
        self.states: dict[str, dict[str, Any]] = {}
        self._poller: task.LoopingCall | None = None
        self._log_offset = 0
        self._log_lines: list[str] = []
        self.ours_plugins, self.ref_plugins, self.ref_stubs = self._plugin_dirs()

    def _plugin_dirs(self) -> tuple[str, str, str]:
        ours = os.path.join(compare.SCRATCH, "ours-plugins")
        os.makedirs(os.path.join(ours, "twisted", "plugins"), exist_ok=True)
        shutil.copy(os.path.join(BENCH, "our_mac_manager.py"),
                    os.path.join(ours, "twisted", "plugins", "bench_mac.py"))
        ref = os.path.join(compare.SCRATCH, "ref-plugins")
        info = os.path.join(ref, "bench_loop_manager-1.0.dist-info")
        os.makedirs(info, exist_ok=True)
        shutil.copy(os.path.join(BENCH, "ref_loop_manager.py"),
                    os.path.join(ref, "bench_loop_manager.py"))
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write("Metadata-Version: 2.1\nName: bench-loop-manager\nVersion: 1.0\n")
        with open(os.path.join(info, "entry_points.txt"), "w") as f:
            f.write("[ironic_python_agent.hardware_managers]\n"
                    "bench_loop = bench_loop_manager:BenchLoopManager\n")
        stubs = os.path.join(compare.SCRATCH, "ref-sandbox-stubs")
        os.makedirs(stubs, exist_ok=True)
        for name in REF_STUBBED:
            with open(os.path.join(stubs, name), "w") as f:
                f.write("#!/bin/sh\n" + compare.STUB_OUTPUT.get(name, "") + "exit 0\n")
            os.chmod(os.path.join(stubs, name), 0o755)
        # fuser cannot stat PID 1's descriptors on this machine (a container's init): it
        # says so on stderr, which the reference takes for "device busy" and gives up.
        # The real fuser runs; only those lines are dropped.
        with open(os.path.join(stubs, "fuser"), "w") as f:
            f.write("#!/bin/bash\n{ %s \"$@\" 2>&1 1>&3 3>&- | grep -v '^Cannot stat file "
                    "/proc/1/' >&2; exit \"${PIPESTATUS[0]}\"; } 3>&1\n"
                    % (shutil.which("fuser") or "/usr/bin/fuser"))
        os.chmod(os.path.join(stubs, "fuser"), 0o755)
        return ours, ref, stubs

    # image server
    def start_server(self) -> None:
        self.server = subprocess.Popen([sys.executable, os.path.join(BENCH, "deploy.py"),
                                        "serve", self.images, self.port_file])
        deadline = time.monotonic() + 10
        while not os.path.exists(self.port_file):
            if time.monotonic() > deadline:
                raise RuntimeError("the image server did not start")
            time.sleep(0.05)
        with open(self.port_file) as f:
            self.server_port = int(f.read())

    def bytes_sent(self) -> int:
        try:
            with open(self.port_file + ".sent") as f:
                return sum(int(line) for line in f if line.strip())
        except FileNotFoundError:
            return 0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_port}/{name}"

    async def loops(self, sizes: Sequence[int]) -> list[LoopDevice]:
        return await attach_loop_devices(self.runner, os.path.join(self.workdir, "disks"),
                                         sizes, lambda *call: self.cleanups.append(call))

    async def fresh(self, loops: Sequence[LoopDevice]) -> None:
        """Write zeros over every block of ``loops``, so each side writes to disks in the same
        state, like a real disk's: every block of the sparse file allocated (writing a block
        the first time allocates it, which costs more than writing it again, and zeroing a
        range, as a qcow2 deploy does, punches it out of the file)."""
        for loop in loops:
            await self.runner.execute("dd", "if=/dev/zero", f"of={loop.path}", "bs=1M",
                                      f"count={loop.size // MiB}", "oflag=direct",
                                      "status=none", timeout=600)

    async def release_last_loop(self) -> None:
        """Detach the last loop device attached and remove its file."""
        for _ in range(2):   # its detach, then its file's removal
            call = self.cleanups.pop()
            result = call[0](*call[1:])
            if isinstance(result, Deferred):
                await result

    async def part(self, name: str, rows: Awaitable[list[dict[str, Any]]]
                   ) -> list[dict[str, Any]]:
        """``rows``, or when that part fails, one NOT MEASURED row, Ironic's nodes deleted
        and the agents stopped so that the next part starts clean."""
        try:
            return await rows
        except Exception as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log(f"{name} FAILED: {e}")
            for agent in list(self.sampler.agents):
                await agent.stop()
                self.sampler.agents.remove(agent)
            assert self.ironic is not None
            _, body = await self.ironic.request("GET", "/v1/nodes?fields=uuid")
            for node in body["nodes"]:
                await self.ironic.request("PUT", f"/v1/nodes/{node['uuid']}/maintenance",
                                          {"reason": "bench part failed"})
                await self.ironic.request("DELETE", f"/v1/nodes/{node['uuid']}")
            return [row(f"{name}: NOT MEASURED ({message[:70]})", [], [], target="runs",
                        max_ours=0.0)]

    async def close(self) -> None:
        for agent in list(self.sampler.agents):   # left running by a failed fleet
            await agent.stop()
        self.sampler.stop()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self.ironic is not None:
            await self.ironic.stop()
        for call in reversed(self.cleanups):
            result = call[0](*call[1:])
            if isinstance(result, Deferred):
                await result
        if self.server is not None:
            self.server.kill()
            self.server.wait()

    # agents
    def start_agent(self, side: str, loop: LoopDevice, mac: str | None = None) -> Agent:
        assert self.ironic is not None
        port = free_port()
        home = tempfile.mkdtemp(prefix=f"{side}-", dir=self.workdir)
        staging = os.path.join(home, "tmp")
        os.makedirs(staging)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "HOME": home, "LC_ALL": "C", "LANG": "C", "TMPDIR": staging,
               "PYTHONUNBUFFERED": "1"}
        if mac:
            env["BENCH_MAC"] = mac
        config = os.path.join(home, "agent.conf")
        if side == "ours":
            cmdline = os.path.join(home, "cmdline")
            with open(cmdline, "w") as f:
                f.write("\n")
            with open(config, "w") as f:
                f.write(f"[DEFAULT]\nadvertise_port = {port}\ninclude_loop_devices = true\n"
                        f"{SAFE_POWER}")
            # As the ramdisk starts it: twistd without its search for service makers.
            argv = LAUNCH + ["-n", "--pidfile=", "ipa", "--no-default-config-files",
                             "--config-file", config, "--cmdline-path", cmdline,
                             "--listen", f"127.0.0.1:{port}", "--api-url",
                             self.ironic.api_url]
            env["PYTHONPATH"] = ROOT + (os.pathsep + self.ours_plugins if mac else "")
        else:
            with open(config, "w") as f:
                f.write(f"[DEFAULT]\napi_url = {self.ironic.api_url}\n"
                        f"listen_host = 127.0.0.1\nlisten_port = {port}\n"
                        f"advertise_host = 127.0.0.1\nadvertise_port = {port}\n"
                        "use_stderr = True\ndebug = False\n"
                        # one look for the root disk: in the sandbox the generic manager
                        # sees none (ours, the bench's manager, answers for the loop)
                        "disk_wait_attempts = 1\n")
            # Its automatic TLS writes its key and certificate to /run/ironic-python-agent:
            # a private tmpfs there, or agents started together overwrite each other's.
            os.makedirs(REF_RUN, exist_ok=True)
            argv = ["/bin/sh", "-c", f"{shutil.which('mount')} -t tmpfs -o size=4m,mode=0700 "
                    f"tmpfs {REF_RUN} && exec \"$@\"", "sh", self.ref_agent,
                    "--config-file", config]
            env["PATH"] = self.ref_stubs + os.pathsep + env["PATH"]
            env["PYTHONPATH"] = self.ref_plugins
        wrapped = sandbox_argv([loop], argv)
        if shutil.which("setpriv"):   # killed if the bench dies first
            wrapped = ["setpriv", "--pdeathsig", "KILL", "--", *wrapped]
        wrapped[0] = shutil.which(wrapped[0]) or wrapped[0]
        agent = Agent(side, wrapped, env, staging)
        self.sampler.agents.append(agent)
        return agent

    async def _poll_states(self) -> None:
        """Every node's provision state and last error, in one request."""
        assert self.ironic is not None
        try:
            _, body = await self.ironic.request(
                "GET", "/v1/nodes?fields=uuid,provision_state,last_error", expect=[200])
        except Exception as e:   # Ironic busy: the next tick asks again
            log(f"polling Ironic: {e}")
            return
        self.states = {node["uuid"]: node for node in body["nodes"]}

    async def wait_state(self, uuid: str, state: str, timeout: float,
                         agent: Agent | None = None) -> float:
        """Wall time when the node is first seen in ``state`` (all nodes are polled
        together every 0.1 s)."""
        assert self.ironic is not None
        if self._poller is None:
            self._poller = task.LoopingCall(
                lambda: Deferred.fromCoroutine(self._poll_states()))
            self._poller.start(0.1)
        deadline = time.time() + timeout
        while True:
            node = self.states.get(uuid, {"provision_state": None, "last_error": None})
            if node["provision_state"] == state:
                return time.time()
            failed = node["provision_state"] in ("deploy failed", "error", "clean failed")
            if failed or time.time() > deadline or (agent and agent.ended.called):
                raise RuntimeError(
                    f"node {uuid}: {node['provision_state']!r} not {state!r}; last_error "
                    f"{node['last_error']!r}{self.ironic.log_excerpt(15)}"
                    + (f"\n--- agent ({agent.side}):\n{agent.tail()}" if agent else ""))
            await sleep(0.05)

    def ironic_times(self, uuid: str, after: float) -> dict[str, float]:
        """When the conductor logged, for ``uuid`` since ``after``: ``wait`` (first ``wait
        call-back``), ``step_start`` (write_image begins), ``step_done`` (a heartbeat
        found the agent's write_image done) and ``active``."""
        assert self.ironic is not None
        with open(self.ironic.log_path, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]   # whole lines only
        self._log_offset += len(data)
        self._log_lines.extend(line for line in data.decode(errors="replace").splitlines()
                               if " INFO " in line[:40])
        return conductor_times(self._log_lines, uuid, after)

    async def deploy(self, side: str, uuid: str, loop: LoopDevice, image: str,
                     disk_format: str, mac: str | None = None,
                     timeout: float = 900) -> dict[str, Any]:
        """One deploy of ``image`` to ``uuid`` through ``side``'s agent; its times, agent
        figures; the node is undeployed again after."""
        assert self.ironic is not None
        with open(os.path.join(self.images, image), "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        t: dict[str, Any] = {"request": time.time()}
        await self.ironic.deploy(uuid, {
            "image_source": self.url(image), "image_os_hash_algo": "sha256",
            "image_os_hash_value": digest, "image_disk_format": disk_format,
            "root_gb": max(1, -(-loop.size // GiB) - 1)})
        t["wait"] = await self.wait_state(uuid, "wait call-back", 120)
        agent = self.start_agent(side, loop, mac)
        try:
            t["active"] = await self.wait_state(uuid, "active", timeout, agent)
            self.sampler._tick()
            t.update(self.ironic_times(uuid, t["request"]))   # the conductor's own times
            t["cmd_start"] = agent.first(COMMAND_START[side]) or float("nan")
            t["cmd_done"] = agent.first(COMMAND_DONE[side]) or float("nan")
            t["image_bytes"] = agent.seconds(IMAGE_BYTES[side])
            t["idle_rss"] = agent.idle_rss / 1024
            t["peak_rss"] = agent.peak_rss / 1024
            t["staged"] = agent.peak_staged / MiB
            t["cpu"] = agent.cpu
        finally:
            await agent.stop()
            self.sampler.agents.remove(agent)
        await self.ironic.set_provision_state(uuid, "deleted")
        await self.wait_state(uuid, "available", 120)
        return t


# -- images -----------------------------------------------------------------------------------

def make_image(path: str, size: int, fill: float = 1.0, seed: int = 0) -> None:
    """A whole-disk image of ``size`` bytes with a GPT (one partition): random data
    throughout (``fill`` 1), or random 4 MiB pieces over ``fill`` of it, the rest sparse."""
    with open(path, "wb") as f:
        f.truncate(size)
        if fill >= 1:
            for _ in range(size // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        else:
            rng = random.Random(seed)
            for _ in range(int(size * fill) // (4 * MiB)):
                f.seek(rng.randrange(1, size // MiB - 5) * MiB)
                f.write(os.urandom(4 * MiB))
    subprocess.run(["sgdisk", "-o", "-n", "1:2048:0", "-t", "1:8300", path], check=True,
                   capture_output=True)


def to_qcow2(raw: str, qcow2: str) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2],
                   check=True)


# -- parts ------------------------------------------------------------------------------------

def row(measure: str, ours: list[float], theirs: list[float], fmt: str = "{:.1f}",
        **target: Any) -> dict[str, Any]:
    return {"measure": measure, "ours": ours, "theirs": theirs, "fmt": fmt, **target}


async def single_deploys(bench: Bench, size_gib: float, runs: int) -> list[dict[str, Any]]:
    assert bench.ironic is not None
    size = int(size_gib * GiB)
    log(f"deploy: making a {size_gib:g} GiB image with a GPT ...")
    make_image(os.path.join(bench.images, "disk.raw"), size)
    (loop,) = await bench.loops([size + 64 * MiB])
    uuid = await bench.ironic.enroll_node(
        physical_macs(), properties={"root_device": {"name": loop.path},
                                     "local_gb": -(-loop.size // GiB), "cpu_arch": "x86_64"})
    got: dict[str, dict[str, list[float]]] = {side: {} for side in SIDES}
    for run in range(runs):
        for side in SIDES:
            await bench.fresh([loop])
            t = await bench.deploy(side, uuid, loop, "disk.raw", "raw")
            with open(loop.path, "rb") as f:
                f.seek(size // 2)
                with open(os.path.join(bench.images, "disk.raw"), "rb") as g:
                    g.seek(size // 2)
                    if f.read(MiB) != g.read(MiB):
                        raise RuntimeError(f"{side}: the disk does not hold the image")
            values = {"total": t["active"] - t["request"],
                      "step": t["step_done"] - t["step_start"],
                      "peak_rss": t["peak_rss"], "cpu": t["cpu"]}
            for start, end, _ in BREAKDOWN:
                values[start] = t[end] - t[start]
            values["image_bytes"] = t["image_bytes"]
            values["disk_work"] = values["cmd_start"] - t["image_bytes"]
            for key, value in values.items():
                got[side].setdefault(key, []).append(value)
            log(f"  run {run + 1} {side}: " + ", ".join(f"{k} {v:.1f}"
                                                       for k, v in values.items()))
            with open(loop.path, "r+b") as f:   # the next run starts from a blank disk
                f.write(bytes(MiB))
    await bench.ironic.request("DELETE", f"/v1/nodes/{uuid}", expect=[204])
    o, r = got["ours"], got["reference"]
    name = f"Ironic: raw {size_gib:g} GiB+GPT,"
    rows = [row(f"{name} request -> active (s)", o["total"], r["total"], target="<= 0.4x",
                max_ratio=0.4),
            row("  write_image step, as the conductor sees it (s)", o["step"], r["step"])]
    rows += [row(label + " (s)", o[start], r[start]) for start, _, label in BREAKDOWN]
    at = [r["measure"] for r in rows].index(BREAKDOWN[2][2] + " (s)") + 1
    rows[at:at] = [row("    of which the image's bytes: download + write (s)",
                       o["image_bytes"], r["image_bytes"]),
                   row("    of which the disk's preparation and checks (s)", o["disk_work"],
                       r["disk_work"])]
    rows += [row("  agent peak RSS, with children (MiB)", o["peak_rss"], r["peak_rss"]),
             row("  agent CPU time (s)", o["cpu"], r["cpu"])]
    os.remove(os.path.join(bench.images, "disk.raw"))
    return rows


async def qcow2_deploys(bench: Bench, sizes: Sequence[float]) -> list[dict[str, Any]]:
    assert bench.ironic is not None
    rows: list[dict[str, Any]] = []
    for vsize_gib in sizes:
        vsize = int(vsize_gib * GiB)
        raw = os.path.join(bench.workdir, "q.raw")
        log(f"qcow2: making a {vsize_gib:g} GiB (virtual) image ...")
        make_image(raw, vsize, fill=1 / 16, seed=int(vsize_gib * 1000))
        to_qcow2(raw, os.path.join(bench.images, "disk.qcow2"))
        qsize = os.path.getsize(os.path.join(bench.images, "disk.qcow2"))
        (loop,) = await bench.loops([vsize + 64 * MiB])
        uuid = await bench.ironic.enroll_node(
            physical_macs(), properties={"root_device": {"name": loop.path},
                                         "local_gb": -(-loop.size // GiB),
                                         "cpu_arch": "x86_64"})
        got: dict[str, dict[str, list[float]]] = {side: {} for side in SIDES}
        for side in SIDES:
            await bench.fresh([loop])
            t = await bench.deploy(side, uuid, loop, "disk.qcow2", "qcow2")
            with open(loop.path, "rb") as f, open(raw, "rb") as g:
                # the GPT headers change: the agents move the backup GPT to the disk's end
                for offset in (MiB, vsize // 3, vsize - 8 * MiB):
                    f.seek(offset)
                    g.seek(offset)
                    if f.read(4 * MiB) != g.read(4 * MiB):
                        raise RuntimeError(f"{side}: qcow2 {vsize_gib:g} GiB: the disk "
                                           f"differs from the image at {offset}")
            got[side] = {"total": [t["active"] - t["request"]],
                         "write": [t["cmd_done"] - t["cmd_start"]],
                         "memory": [t["peak_rss"] + t["staged"]],
                         "rss": [t["peak_rss"]], "staged": [t["staged"]]}
            log(f"  {side}: " + ", ".join(f"{k} {v[0]:.1f}" for k, v in got[side].items()))
            with open(loop.path, "r+b") as f:
                f.write(bytes(MiB))
        await bench.ironic.request("DELETE", f"/v1/nodes/{uuid}", expect=[204])
        o, r = got["ours"], got["reference"]
        name = f"qcow2 {vsize_gib:g} GiB ({qsize / MiB:.0f} MiB)"
        rows += [row(f"{name}: request -> active (s)", o["total"], r["total"]),
                 row("  agent write (write_image step in the agent) (s)", o["write"], r["write"]),
                 row("  peak memory: RSS + staged in temp dir (MiB)", o["memory"],
                     r["memory"]),
                 row("    of which staged in temp dir (MiB)", o["staged"], r["staged"],
                     fmt="{:.0f}")]
        os.remove(raw)
        os.remove(os.path.join(bench.images, "disk.qcow2"))
        await bench.release_last_loop()
    return rows


async def floor_rss(bench: Bench, runs: int = 3, idle: float = 5.0,
                    in_use: bool = False) -> list[float]:
    """Idle RSS (MiB) of bench/bare_klein.py under twistd: the fixed stack's floor; with
    ``in_use``, serving HTTPS with a certificate made as ours makes it, with treq imported
    (see bench/bare_klein.py)."""
    found = []
    # The agents' locale (see Bench.start_agent): with the caller's UTF-8 locale the floor
    # would map the locale's files (0.15 MiB) that the agents, run with LC_ALL=C, do not.
    env = dict(os.environ, LC_ALL="C", LANG="C")
    if in_use:
        tls_dir = tempfile.mkdtemp(prefix="floor-tls-", dir=bench.workdir)
        subprocess.run([sys.executable, "-m", "ipa_twisted.certificates", "127.0.0.1",
                        tls_dir], check=True, env=dict(os.environ, PYTHONPATH=ROOT))
        env["BARE_KLEIN_TLS_DIR"] = tls_dir
    for _ in range(runs):
        port = free_port()
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                "--pidfile=", "-y", os.path.join(BENCH, "bare_klein.py")]
        child = subprocess.Popen(argv, env=dict(env, BARE_KLEIN_PORT=str(port)),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await sleep(idle)
        found.append(_status_kib(child.pid, "VmRSS") / 1024)
        child.terminate()
        while child.poll() is None:
            await sleep(0.1)
    return found


async def fleets(bench: Bench, sizes: Sequence[int], size_gib: float) -> list[dict[str, Any]]:
    assert bench.ironic is not None
    size = int(size_gib * GiB)
    log(f"fleet: making a {size_gib:g} GiB image with a GPT ...")
    make_image(os.path.join(bench.images, "fleet.raw"), size)
    loops = await bench.loops([size + 64 * MiB] * max(sizes))
    macs = [f"52:54:00:be:{i // 256:02x}:{i % 256:02x}" for i in range(len(loops))]
    uuids = [await bench.ironic.enroll_node(
        [mac], properties={"root_device": {"name": loop.path},
                           "local_gb": -(-loop.size // GiB), "cpu_arch": "x86_64"},
        name=f"bench-fleet-{i}") for i, (mac, loop) in enumerate(zip(macs, loops))]
    rows: list[dict[str, Any]] = []
    floor = await floor_rss(bench)
    floor_in_use = await floor_rss(bench, in_use=True)
    for k, n in enumerate(sizes):
        got: dict[str, dict[str, list[float]]] = {}
        # Each size starts with the other side, and every side with its disks emptied.
        for side in (SIDES if k % 2 == 0 else SIDES[::-1]):
            await bench.fresh(loops[:n])
            sent = bench.bytes_sent()
            started = time.time()
            results = await gatherResults([
                Deferred.fromCoroutine(bench.deploy(side, uuids[i], loops[i], "fleet.raw",
                                                    "raw", mac=macs[i]))
                for i in range(n)], consumeErrors=True)
            all_active = max(t["active"] for t in results) - started
            got[side] = {"all": [all_active],
                         "sent": [(bench.bytes_sent() - sent) / GiB],
                         "peak_max": [max(t["peak_rss"] for t in results)],
                         "peak": [t["peak_rss"] for t in results],
                         "cpu": [t["cpu"] for t in results],
                         "idle": [t["idle_rss"] for t in results]}
            log(f"  N={n} {side}: all active in {all_active:.1f} s, "
                f"{got[side]['sent'][0]:.2f} GiB sent, peak RSS max "
                f"{got[side]['peak_max'][0]:.0f} MiB, CPU median "
                f"{statistics.median(got[side]['cpu']):.1f} s")
        o, r = got["ours"], got["reference"]
        rows += [row(f"fleet N={n}, {size_gib:g} GiB each: all active (s)", o["all"],
                     r["all"]),
                 row("  image server bytes sent (GiB)", o["sent"], r["sent"], fmt="{:.2f}"),
                 row("  agent peak RSS, median (MiB)", o["peak"], r["peak"]),
                 row("  agent peak RSS, max (MiB)", o["peak_max"], r["peak_max"]),
                 row("  agent CPU time, median (s)", o["cpu"], r["cpu"]),
                 row("  agent idle RSS at first heartbeat, median (MiB)", o["idle"], r["idle"])]
        over = [statistics.median(o["idle"]) - statistics.median(floor)]
        rows += [row("  ours idle RSS over the floor (MiB)", over, [], target="ours <= 3",
                     max_ours=3.0),
                 row("  ours idle RSS over the floor in use (MiB)",
                     [statistics.median(o["idle"]) - statistics.median(floor_in_use)], [])]
    rows += [row("  floor: bare Klein app, twistd -y (MiB)", floor, []),
             row("  floor in use: + HTTPS, treq imported (MiB)", floor_in_use, [])]
    os.remove(os.path.join(bench.images, "fleet.raw"))
    return rows


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = tempfile.mkdtemp(prefix="ipa-bench-ironic-", dir=args.workdir)
    bench = Bench(workdir, compare.ensure_reference())
    rows: list[dict[str, Any]] = []
    only = set(args.only.split(","))
    try:
        bench.start_server()
        # Ironic's debug log off (the harness turns it on for tests): its INFO lines hold
        # what the bench reads, and 16 nodes' debug lines would slow its one process down.
        bench.ironic = RealIronic(os.path.join(workdir, "ironic"), restrict_lookup=True,
                                  heartbeat_timeout=args.heartbeat_timeout,
                                  options={"DEFAULT": {"debug": False}})
        await bench.ironic.start()
        if "deploy" in only and args.size_gib > 0:
            rows += await bench.part(f"Ironic: raw {args.size_gib:g} GiB",
                                     single_deploys(bench, args.size_gib, args.runs))
        sizes = [float(s) for s in args.qcow2_gib.split(",") if s.strip()]
        if "qcow2" in only and sizes:
            rows += await bench.part("qcow2", qcow2_deploys(bench, sizes))
        fleet = [int(s) for s in args.fleet.split(",") if s.strip()]
        if "fleet" in only and fleet:
            rows += await bench.part("fleet", fleets(bench, fleet, args.fleet_gib))
    finally:
        await bench.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def unavailable() -> str | None:
    """Why this cannot run here, or None."""
    for tool in ("qemu-img", "sgdisk"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not physical_macs():
        return "no physical network interface to look the node up by"
    return skip_reason() or loop_devices_unavailable()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--qcow2-gib", default="1,4,8")
    parser.add_argument("--fleet", default="8,16", help="fleet sizes, e.g. 8,16")
    parser.add_argument("--fleet-gib", type=float, default=1.0,
                        help="image size for the fleets (GiB)")
    parser.add_argument("--only", default="deploy,qcow2,fleet")
    parser.add_argument("--heartbeat-timeout", type=int, default=30,
                        help="Ironic's [api]ramdisk_heartbeat_timeout (the harness default)")
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        sys.exit(f"real_ironic.py cannot run here: {reason}")
    rows: list[dict[str, Any]] = []

    async def run(_: Any) -> None:
        rows.extend(await main(args))
        if args.json:
            print(json.dumps(rows), flush=True)
        else:
            for r in rows:
                ours = statistics.median(r["ours"]) if r["ours"] else float("nan")
                theirs = statistics.median(r["theirs"]) if r["theirs"] else float("nan")
                print(f"{r['measure']:<52} {ours:>9.2f} {theirs:>9.2f} "
                      f"{r.get('target', '')}", flush=True)

    task.react(lambda r: Deferred.fromCoroutine(run(r)))  # exits


if __name__ == "__main__":
    cli()
