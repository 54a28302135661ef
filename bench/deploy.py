"""The image pipeline against `curl | tee >(openssl dgst -sha256) | dd oflag=direct`.

Usage: .venv/bin/python bench/deploy.py [--size-gib 2] [--runs 3] [--qcow2-gib 1,4,8]
                                        [--workdir DIR]

1. A SIZE GiB incompressible raw image is served over HTTP on 127.0.0.1 (a small sendfile
   server in a child process, with Range support) and written to a loop device on a sparse
   file (as root with losetup, ``--direct-io=on`` unless ``--loop-buffered``: no page-cache
   copy of the backing file, as on a disk; else to a regular file, and the output says so) by
   ``write_image`` in a child process, sha256 verified on the stream and read back once;
   the pipe (``iflag=fullblock``, ``conv=fsync``, openssl waited for) writes the same
   device in the same run, and each stage's physical limit is measured between them (fio
   O_DIRECT writes at QD1 and QD``--depth``, hashlib sha256/sha512 on one core, curl to
   /dev/null). Medians of RUNS runs; our rate against the pipe's (target >= 1.0) and the
   lowest limit's (target >= 0.9). The CPU seconds per GiB of ours (the writing process,
   and by stage: the reactor, the hash thread, the write thread) and of the pipe's
   programs are printed too: on a machine shared with other work they move less than the
   rates, and they tell whether the stages, added up, fit the cores; so does the share of
   the wall time the hash thread spent waiting for a core (runnable, not running).
2. Peak RSS of ``write_image`` deploying a qcow2 of 1, 4 and 8 GiB virtual size (made by
   ``qemu-img convert`` from a sparse raw with random data spread through it, 1/16 of the
   virtual size), checked against that raw with ``cmp``.

Only loop devices this script attached to its own sparse files, or regular files, are
written; they are detached and the files removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess  # a benchmark driver, not agent code
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024
GiB = 1024 * MiB


# -- the image server (child process) --------------------------------------------------------

def serve(directory: str, port_file: str) -> None:
    """Serve ``directory`` over HTTP/1.1 with sendfile and Range support until killed;
    the bytes each answer sent are appended to ``port_file + ".sent"``, one line each."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.do_GET(body=False)

        def do_GET(self, body: bool = True) -> None:
            path = os.path.join(directory, os.path.basename(self.path.split("?")[0]))
            try:
                f = open(path, "rb")
            except OSError:
                self.send_error(404)
                return
            with f:
                size = os.fstat(f.fileno()).st_size
                start, end = 0, size - 1
                match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    end = min(end, int(match.group(2))) if match.group(2) else end
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")  # qemu-img's curl driver asks
                self.end_headers()
                self.wfile.flush()
                if not body:
                    return
                sent = self.connection.sendfile(f, start, end - start + 1)
                with open(port_file + ".sent", "a") as counter:  # one short O_APPEND write
                    counter.write(f"{sent}\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(port_file + ".tmp", port_file)
    server.serve_forever()


# -- our pipeline (child process) -------------------------------------------------------------

class ThreadCPU:
    """CPU seconds each of this process's threads used from now on, and seconds it waited
    for a core (runnable, not running: other threads held both), by Python thread name,
    sampled every ``interval`` s from /proc (a pool thread's figures are kept once it is
    gone)."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading
        self.seconds: dict[str, float] = {}
        self.waiting: dict[str, float] = {}
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self.sample(threading)
        self._before = dict(self.seconds)
        self._waited_before = dict(self.waiting)
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True,
                                        name="bench-sampler")
        self._thread.start()

    def _run(self, interval: float) -> None:
        import threading
        while not self._stop.wait(interval):
            self.sample(threading)

    def sample(self, threading: Any) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid, name in names.items():
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    waited = int(f.read().split()[1]) / 1e9
            except (OSError, IndexError):
                continue
            self.seconds[name] = (int(fields[11]) + int(fields[12])) / self._tick
            self.waiting[name] = waited

    def stop(self) -> tuple[dict[str, float], dict[str, float]]:
        """CPU seconds and seconds waiting for a core, by thread name."""
        import threading
        self.sample(threading)
        self._stop.set()
        self._thread.join()
        return ({name: seconds - self._before.get(name, 0.0)
                 for name, seconds in self.seconds.items()},
                {name: seconds - self._waited_before.get(name, 0.0)
                 for name, seconds in self.waiting.items()})


def machine_times() -> tuple[int, int]:
    """Clock ticks all cores spent busy (anything but idle and I/O wait), and in all."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def write(url: str, device: str, checksum: str | None, disk_format: str,
          permitted: tuple[str, ...] | None = None) -> None:
    """Run write_image once; print a JSON line: elapsed, RSS before and peak (KiB), the
    children's peak (KiB), CPU seconds (the whole process, and by stage: the reactor, the
    hash and the write threads). ``permitted``: the image formats allowed (default: the
    agent's)."""
    import resource
    import threading
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from ipa_twisted.config import AgentConfig
    from ipa_twisted.http import make_http_client
    from ipa_twisted.images.pipeline import write_image
    from ipa_twisted.process import ProcessRunner

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return -1

    result: dict[str, Any] = {}

    async def main() -> None:
        config = AgentConfig() if permitted is None else AgentConfig(
            permitted_image_formats=permitted)
        info: dict[str, Any] = {"id": "bench", "urls": [url], "disk_format": disk_format}
        if checksum:
            info.update(os_hash_algo="sha256", os_hash_value=checksum)
        result["rss_before_kib"] = status("VmRSS")
        sampler = ThreadCPU()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        machine = machine_times()
        started = time.monotonic()
        written = await write_image(info, device, http=make_http_client(reactor, config),
                                    reactor=reactor, runner=ProcessRunner(reactor, reactor),
                                    config=config)
        result["elapsed"] = time.monotonic() - started
        busy, total = (after - before for after, before in zip(machine_times(), machine))
        result["machine_busy"] = busy / total if total else float("nan")
        after = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu_s"] = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
        by_name, waited = sampler.stop()
        stages = {"reactor": threading.main_thread().name, "hash": "ipa-image-hash",
                  "write": "ipa-image-write"}
        result["stage_cpu_s"] = {stage: sum(s for name, s in by_name.items() if key in name)
                                 for stage, key in stages.items()}
        result["stage_wait_s"] = {stage: sum(s for name, s in waited.items() if key in name)
                                  for stage, key in stages.items()}
        result["peak_rss_kib"] = status("VmHWM")
        result["children_peak_rss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result["checksum"] = written.checksum
        result["size"] = written.size

    def run() -> None:
        done = Deferred.fromCoroutine(main())
        done.addErrback(lambda f: result.update(error=f.getErrorMessage()))
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    print(json.dumps(result))
    sys.exit(1 if "error" in result else 0)


# -- the driver -------------------------------------------------------------------------------

class Bench:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.loops: list[str] = []
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.direct_io: dict[str, bool] = {}

    def start_server(self) -> None:
        port_file = os.path.join(self.workdir, "port")
        self.server = subprocess.Popen([sys.executable, __file__, "serve", self.workdir,
                                        port_file])
        deadline = time.monotonic() + 10
        while not os.path.exists(port_file):
            if time.monotonic() > deadline:
                raise RuntimeError("the image server did not start")
            time.sleep(0.05)
        with open(port_file) as f:
            self.port = int(f.read())

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def target(self, name: str, size: int, direct_io: bool = True) -> tuple[str, bool]:
        """A loop device on a new sparse file (root), else the regular file itself.

        ``direct_io``: the loop driver writes its backing file with direct I/O, as a disk
        takes the data, instead of copying every byte into the file's page cache and
        writing that back on the same cores (a cost no real disk adds); whether it took is
        in ``self.direct_io[device]``."""
        backing = os.path.join(self.workdir, name)
        with open(backing, "wb") as f:
            f.truncate(size)
        if os.getuid() != 0 or shutil.which("losetup") is None:
            return backing, False
        device = subprocess.run(["losetup", "--find", "--show",
                                 f"--direct-io={'on' if direct_io else 'off'}", backing],
                                check=True, capture_output=True, text=True).stdout.strip()
        if not re.fullmatch(r"/dev/loop\d+", device):
            raise RuntimeError(f"losetup gave {device!r}")
        self.loops.append(device)
        listed, dio = subprocess.run(
            ["losetup", "--noheadings", "--raw", "-O", "BACK-FILE,DIO", device], check=True,
            capture_output=True, text=True).stdout.strip().rsplit(" ", 1)
        if os.path.realpath(listed) != os.path.realpath(backing):
            raise RuntimeError(f"{device} is backed by {listed}, not by our {backing}")
        self.direct_io[device] = dio == "1"
        return device, True

    def detach(self, device: str) -> None:
        if device in self.loops:
            subprocess.run(["losetup", "-d", device], check=False)
            self.loops.remove(device)

    def server_cpu(self) -> float:
        """CPU seconds the image server has used so far."""
        assert self.server is not None
        with open(f"/proc/{self.server.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def ours(self, url: str, device: str, checksum: str | None,
             disk_format: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, __file__, "write", url, device, checksum or "",
                              disk_format], capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"write_image failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def pipe(self, url: str, device: str, fullblock: bool = True) -> tuple[float, float]:
        """Seconds for ``curl | tee >(openssl dgst -sha256) | dd`` to write ``device``, and
        the CPU seconds its programs used.

        ``fullblock`` makes dd gather whole 4 MiB blocks from the pipe before each
        O_DIRECT write (without it each short pipe read is its own write); ``conv=fsync``
        ends it with an fsync, as our writer ends."""
        import resource
        iflag = " iflag=fullblock" if fullblock else ""
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        # tee >(openssl ...) through a named pipe: bash waits for openssl, so its time and
        # its CPU (counted once a child is reaped) are the pipe's
        fifo = os.path.join(self.workdir, "hash.fifo")
        if not os.path.exists(fifo):
            os.mkfifo(fifo)
        subprocess.run(["bash", "-o", "pipefail", "-c",
                        f"openssl dgst -sha256 <{fifo} >/dev/null & "
                        f"curl -sf {url} | tee {fifo} | "
                        f"dd of={device} bs=4M{iflag} oflag=direct conv=fsync status=none; "
                        "s=$?; wait $! || exit 1; exit $s"],
                       check=True)
        elapsed = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return elapsed, (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)

    def close(self) -> None:
        for device in list(self.loops):
            self.detach(device)
        if self.server is not None:
            self.server.kill()
            self.server.wait()


RATES = ("ours", "pipe", "pipe_plain", "fio_qd1", "fio_qdn", "sha256", "sha512", "curl")


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the JSON rows with --json)."""
    print(message, file=sys.stderr, flush=True)


def make_raw(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // (16 * MiB)):
            block = os.urandom(16 * MiB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def prefill(device: str, size: int) -> None:
    """Write ``size`` bytes of zeros to ``device`` and sync, before any timed write: the
    sparse file behind a loop device gets its blocks allocated once, so no side pays for
    that (the first timed write, ours, did: 250-660 MiB/s against about 900 after)."""
    import mmap
    zeros = mmap.mmap(-1, 16 * MiB)   # page-aligned, for O_DIRECT
    try:
        fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    except OSError:   # a regular file on a file system without O_DIRECT
        fd = os.open(device, os.O_WRONLY)
    try:
        for offset in range(0, size - size % len(zeros), len(zeros)):
            os.pwrite(fd, zeros, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
        zeros.close()


def device_sha256(device: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(device, "rb") as f:
        left = size
        while left:
            block = f.read(min(16 * MiB, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def tmpfs_used() -> int:
    used = 0
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "tmpfs":
                try:
                    usage = shutil.disk_usage(fields[1])
                except OSError:
                    continue
                used += usage.used
    return used


def fio_write(device: str, size: int, depth: int, block: int = 8 * MiB) -> float:
    """Sequential O_DIRECT write bandwidth of ``device`` (MiB/s): fio, libaio, ``depth``
    writes of ``block`` bytes in flight, an fsync at the end (as ours and the pipe do)."""
    out = subprocess.run(
        ["fio", "--name=seqwrite", f"--filename={device}", "--rw=write", f"--bs={block}",
         "--direct=1", "--ioengine=libaio", f"--iodepth={depth}", f"--size={size}",
         "--end_fsync=1", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    # with --end_fsync the job's run time includes the final fsync
    return float(job["write"]["io_bytes"]) / (float(job["job_runtime"]) / 1000) / MiB


def hash_rate(name: str, data: bytes, seconds: float = 1.0, update: int = MiB) -> float:
    """MiB/s of one core hashing ``data`` with hashlib (OpenSSL), ``update`` bytes per
    update: 1 MiB, the size of the socket reads our pipeline hashes."""
    view = memoryview(data)
    digest = hashlib.new(name)
    done, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        for offset in range(0, len(view), update):
            digest.update(view[offset:offset + update])
        done += len(view)
    return done / (time.monotonic() - started) / MiB


def curl_rate(url: str) -> float:
    """MiB/s of ``curl`` fetching ``url`` to /dev/null over loopback."""
    out = subprocess.run(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download} "
                          "%{time_total}", url], check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[0]) / float(out[1]) / MiB


def raw_bench(bench: Bench, size_gib: float, runs: int, depth: int,
              direct_io: bool = True) -> list[dict[str, Any]]:
    """Ours, the pipes and each stage's limit, interleaved per run; rows for compare.py."""
    size = int(size_gib * GiB)
    log(f"Making a {size_gib:g} GiB incompressible raw image ...")
    checksum = make_raw(os.path.join(bench.workdir, "image.raw"), size)
    os.sync()  # its write-back would slow the first run down
    device, is_loop = bench.target("raw-target", size + 64 * MiB, direct_io=direct_io)
    if not is_loop:
        log(f"Target: {device} (a REGULAR FILE: not root or no losetup, no loop device)")
    else:
        dio = bench.direct_io.get(device, False)
        log(f"Target: {device}, " + ("direct I/O to its backing file" if dio else
                                     "its backing file's page cache (buffered)")
            + ("" if dio == direct_io else ": direct I/O NOT TAKEN"))
    prefill(device, size)
    url = bench.url("image.raw")
    sample = os.urandom(256 * MiB)
    got: dict[str, list[float]] = {key: [] for key in (
        "ours", "pipe", "pipe_plain", "fio_qd1", "fio_qdn", "sha256", "sha512", "curl",
        "ours_cpu", "pipe_cpu", "hash_cpu", "reactor_cpu", "write_cpu", "hash_busy",
        "ours_rss", "ceiling", "hash_waiting", "machine_busy")}
    have_fio = shutil.which("fio") is not None and is_loop
    if not have_fio:
        log("no device limit: fio is not installed (apt-get install -y fio) or no loop device")
    for run in range(runs):
        served = bench.server_cpu()
        result = bench.ours(url, device, checksum, "raw")
        served = bench.server_cpu() - served
        if result["checksum"] != checksum:
            raise RuntimeError("checksum mismatch")
        got["ours"].append(size / result["elapsed"] / MiB)
        got["ours_cpu"].append(result["cpu_s"] / (size / GiB))
        for stage in ("hash", "reactor", "write"):
            got[f"{stage}_cpu"].append(result["stage_cpu_s"][stage] / (size / GiB))
        got["hash_busy"].append(result["stage_cpu_s"]["hash"] / result["elapsed"])
        got["hash_waiting"].append(result["stage_wait_s"]["hash"] / result["elapsed"])
        # every stage's CPU, ours and the server's, shared by the machine's cores (the
        # kernel's work for the loop device is left out: an upper bound)
        got["ceiling"].append((os.cpu_count() or 1) * size / MiB / (result["cpu_s"] + served))
        got["ours_rss"].append(result["peak_rss_kib"] / 1024)
        got["machine_busy"].append(result["machine_busy"])
        if run == 0:
            if device_sha256(device, size) != checksum:
                raise RuntimeError("the device does not hold the image")
            log("  read back from the device: sha256 matches")
        elapsed, cpu = bench.pipe(url, device, fullblock=True)
        got["pipe"].append(size / elapsed / MiB)
        got["pipe_cpu"].append(cpu / (size / GiB))
        got["pipe_plain"].append(size / bench.pipe(url, device, fullblock=False)[0] / MiB)
        if have_fio:
            got["fio_qd1"].append(fio_write(device, size, 1))
            got["fio_qdn"].append(fio_write(device, size, depth))
        got["sha256"].append(hash_rate("sha256", sample))
        got["sha512"].append(hash_rate("sha512", sample))
        got["curl"].append(curl_rate(url))
        log(f"  run {run + 1} (MiB/s): "
            + ", ".join(f"{k} {v[-1]:.0f}" for k, v in got.items() if v and k in RATES)
            + "; CPU s/GiB: " + ", ".join(f"{k[:-4]} {v[-1]:.2f}" for k, v in got.items()
                                           if v and k.endswith("_cpu"))
            + f"; hash thread busy {got['hash_busy'][-1]:.2f}, "
              f"waiting for a core {got['hash_waiting'][-1]:.2f}, "
              f"peak RSS {got['ours_rss'][-1]:.0f} MiB, "
              f"all cores busy {got['machine_busy'][-1]:.2f} of the write's wall time")
    bench.detach(device)
    os.remove(os.path.join(bench.workdir, "raw-target"))
    os.remove(os.path.join(bench.workdir, "image.raw"))
    med = {k: statistics.median(v) if v else float("nan") for k, v in got.items()}
    limits = {"sha256, one core": "sha256", "loopback HTTP": "curl"}
    if have_fio:
        limits[f"device, fio QD{depth}"] = "fio_qdn"
    lowest = min(limits, key=lambda name: med[limits[name]])
    target = (" (REGULAR FILE)" if not is_loop else
              "" if bench.direct_io.get(device) else " (buffered loop)")
    rows: list[dict[str, Any]] = [
        {"measure": f"raw {size_gib:g} GiB{target} (MiB/s) vs pipe, fullblock",
         "ours": got["ours"], "theirs": got["pipe"], "fmt": "{:.0f}", "target": ">= 1.0x",
         "min_ratio": 1.0},
        {"measure": f"  vs lowest limit: {lowest}", "ours": got["ours"],
         "theirs": got[limits[lowest]], "fmt": "{:.0f}", "target": ">= 0.9x",
         "min_ratio": 0.9},
        {"measure": "  vs pipe without fullblock (old baseline)", "ours": got["ours"],
         "theirs": got["pipe_plain"], "fmt": "{:.0f}"},
        {"measure": f"limit: device O_DIRECT 8M, fio QD1 | QD{depth}", "ours": got["fio_qd1"],
         "theirs": got["fio_qdn"], "fmt": "{:.0f}"},
        {"measure": "limit: one core, sha256 | sha512 (MiB/s)", "ours": got["sha256"],
         "theirs": got["sha512"], "fmt": "{:.0f}"},
        {"measure": "limit: loopback HTTP, curl to /dev/null", "ours": got["curl"],
         "theirs": [], "fmt": "{:.0f}"},
        {"measure": "CPU s per GiB written: ours | pipe, fullblock", "ours": got["ours_cpu"],
         "theirs": got["pipe_cpu"], "fmt": "{:.2f}", "target": "<= 1.0x", "max_ratio": 1.0},
        {"measure": "  ours by stage: hash thread | reactor", "ours": got["hash_cpu"],
         "theirs": got["reactor_cpu"], "fmt": "{:.2f}"},
        {"measure": "  ours by stage: write thread", "ours": got["write_cpu"], "theirs": [],
         "fmt": "{:.2f}"},
        {"measure": "  ours: hash thread's CPU | wait for a core / wall",
         "ours": got["hash_busy"], "theirs": got["hash_waiting"], "fmt": "{:.2f}"},
        {"measure": f"  ours vs the stages sharing {os.cpu_count()} cores (MiB/s)",
         "ours": got["ours"], "theirs": got["ceiling"], "fmt": "{:.0f}"},
        {"measure": "  ours: peak RSS of the writing process (MiB)", "ours": got["ours_rss"],
         "theirs": [], "fmt": "{:.0f}"},
    ]
    return rows


def qcow2_bench(bench: Bench, sizes_gib: list[float]) -> None:
    if shutil.which("qemu-img") is None:
        log("qcow2: skipped, qemu-img is not installed (Debian package qemu-utils)")
        return
    for vsize_gib in sizes_gib:
        vsize = int(vsize_gib * GiB)
        raw = os.path.join(bench.workdir, "q.raw")
        rng = random.Random(int(vsize_gib * 1000))
        with open(raw, "wb") as f:
            f.truncate(vsize)
            for _ in range(vsize // (16 * 4 * MiB)):  # 1/16 of it, 4 MiB pieces
                f.seek(rng.randrange(0, vsize // MiB - 4) * MiB)
                f.write(os.urandom(4 * MiB))
        qcow2 = os.path.join(bench.workdir, "image.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2],
                       check=True)
        with open(qcow2, "rb") as f:
            checksum = hashlib.file_digest(f, "sha256").hexdigest()
        device, is_loop = bench.target("qcow2-target", vsize)
        tmpfs_before = tmpfs_used()
        result = bench.ours(bench.url("image.qcow2"), device, checksum, "qcow2")
        tmpfs_delta = tmpfs_used() - tmpfs_before
        same = subprocess.run(["cmp", "-n", str(vsize), device, raw],
                              capture_output=True).returncode == 0
        log(f"qcow2 {vsize_gib:g} GiB virtual ({os.path.getsize(qcow2) / MiB:.0f} MiB file) "
              f"to {'a loop device' if is_loop else 'a regular file'}: "
              f"{result['elapsed']:.1f} s, peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB "
              f"(RSS before writing {result['rss_before_kib'] / 1024:.0f} MiB), "
              f"tmpfs grew {tmpfs_delta / MiB:.0f} MiB, "
              f"{'identical to' if same else 'DIFFERENT FROM'} the source raw")
        bench.detach(device)
        for name in ("q.raw", "image.qcow2", "qcow2-target"):
            os.remove(os.path.join(bench.workdir, name))
        if not same:
            raise RuntimeError("the converted image differs from its source")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--depth", type=int, default=16,
                        help="fio's queue depth for the device limit (default 16)")
    parser.add_argument("--qcow2-gib", default="",
                        help="virtual sizes for ours-only qcow2 memory runs, e.g. 1,4,8 "
                             "(bench/real_ironic.py compares qcow2 with the reference)")
    parser.add_argument("--workdir", default=None,
                        help="where images and targets go (default: a new dir in /var/tmp)")
    parser.add_argument("--loop-buffered", action="store_true",
                        help="attach the loop device without --direct-io (its backing "
                             "file's page cache copies and writes back every byte)")
    parser.add_argument("--json", action="store_true",
                        help="print the rows as one JSON list (for compare.py)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="ipa-bench-deploy-", dir=args.workdir or "/var/tmp")
    bench = Bench(workdir)
    rows: list[dict[str, Any]] = []
    try:
        bench.start_server()
        if args.size_gib > 0:
            rows = raw_bench(bench, args.size_gib, args.runs, args.depth,
                             direct_io=not args.loop_buffered)
        qcow2_bench(bench, [float(s) for s in args.qcow2_gib.split(",") if s.strip()])
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        ours = statistics.median(row["ours"]) if row["ours"] else float("nan")
        theirs = statistics.median(row["theirs"]) if row["theirs"] else float("nan")
        fmt = row.get("fmt", "{:.0f}")
        print(f"{row['measure']:<52} {fmt.format(ours):>8} {fmt.format(theirs):>8} "
              f"{ours / theirs:>6.2f} {row.get('target', '')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3], sys.argv[4] or None, sys.argv[5])
    else:
        main()
