"""Boot to API: from QEMU's start to the agent's first 200 on ``GET /``, our ramdisk against
the same ramdisk built around the reference agent, in the same emulated VM.

Usage: .venv/bin/python bench/boot.py [--runs 3] [--memory 1024] [--cpus 2] [--json]
                                      [--no-build]

Both ramdisks come from ``ramdisk/build.sh`` (``--agent reference``: ironic-python-agent
from the package index, installed into the same Debian initramfs the same way, bytecode
compiled alike), built first if they are not up to date. Each run boots one of them in
QEMU (TCG unless ``IPA_QEMU_ACCEL`` says otherwise; q35, ``--cpus`` vCPUs, ``--memory``
MiB, one 8 GiB sparse virtio disk, user-mode network with the agent's port 9999 forwarded to
127.0.0.1) and polls ``GET /`` every 0.2 s; ours and the reference alternate, and the table
shows the medians. Neither talks to an Ironic: ours runs with ``ipa-standalone=1``; the
reference, which has no standalone mode, is given no ``ipa-api-url`` and serves its API
after loading its hardware managers and finding a network interface, as it does when no
Ironic is configured. The console markers of ``ramdisk/init`` give when the guest reached
userspace (``kernel file systems mounted``) and started the agent, seen from the host (and
the guest's own uptime then, in parentheses). Both kernels boot ``quiet`` (each line the
kernel prints on the emulated serial console costs time under TCG; init's and the agents'
lines still show).

``--json`` prints the rows for ``bench/compare.py`` as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess  # a benchmark driver, not agent code
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "ramdisk", "build.sh")
OUTPUTS = {"ours": os.path.join(ROOT, ".cache", "ramdisk"),
           "reference": os.path.join(ROOT, ".cache", "ramdisk-reference")}
KERNEL_ARGS = {"ours": "ipa-standalone=1", "reference": ""}
USERSPACE = re.compile(rb"ipa-ramdisk: kernel file systems mounted at ([\d.]+) s")
AGENT_STARTED = re.compile(rb"ipa-ramdisk: starting the agent at ([\d.]+) s")
AGENT_PORT = 9999


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(agent: str, rebuild: bool = True) -> str:
    """Build (or find up to date) one ramdisk, unless ``rebuild`` is False; its manifest."""
    if not rebuild:
        with open(os.path.join(OUTPUTS[agent], "manifest.txt")) as f:
            return f.read()
    argv = ["bash", BUILD] + (["--agent", "reference"] if agent == "reference" else [])
    started = time.monotonic()
    subprocess.run(argv, check=True)
    print(f"ramdisk ({agent}) ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    with open(os.path.join(OUTPUTS[agent], "manifest.txt")) as f:
        return f.read()


@dataclass
class Boot:
    """One boot's times, seconds from QEMU's start (host clock)."""

    userspace: float = float("nan")
    userspace_guest: float = float("nan")
    agent_started: float = float("nan")
    agent_started_guest: float = float("nan")
    api: float = float("nan")
    console: bytearray = field(default_factory=bytearray)


def qemu_argv(agent: str, disk: str, port: int, memory: int, cpus: int) -> list[str]:
    accel = os.environ.get("IPA_QEMU_ACCEL", "tcg")
    accel = "tcg,thread=multi" if accel == "tcg" else accel
    output = OUTPUTS[agent]
    return ["qemu-system-x86_64", "-machine", "q35", "-accel", accel, "-cpu", "max",
            "-m", str(memory), "-smp", str(cpus),
            "-kernel", os.path.join(output, "vmlinuz"),
            "-initrd", os.path.join(output, "initrd.img"),
            "-append", f"console=ttyS0 quiet panic=-1 {KERNEL_ARGS[agent]}".strip(),
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-nic", f"user,model=virtio-net-pci,restrict=on,"
                    f"hostfwd=tcp:127.0.0.1:{port}-:{AGENT_PORT}",
            "-drive", f"file={disk},if=none,id=disk0,format=raw,cache=unsafe",
            "-device", "virtio-blk-pci,drive=disk0,serial=boot-bench-disk"]


def boot_once(agent: str, memory: int, cpus: int, timeout: float) -> Boot:
    """Boot ``agent``'s ramdisk until its API answers; the times seen."""
    result = Boot()
    with tempfile.TemporaryDirectory(prefix="ipa-boot-") as scratch:
        disk = os.path.join(scratch, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(8 << 30)   # sparse; both agents want a root disk of 4 GiB or more
        port = free_port()
        started = time.monotonic()
        child = subprocess.Popen(qemu_argv(agent, disk, port, memory, cpus),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)

        def read_console() -> None:
            assert child.stdout is not None
            for line in iter(child.stdout.readline, b""):
                now = time.monotonic() - started
                result.console += line
                found = USERSPACE.search(line)
                if found and result.userspace != result.userspace:
                    result.userspace, result.userspace_guest = now, float(found.group(1))
                found = AGENT_STARTED.search(line)
                if found and result.agent_started != result.agent_started:
                    result.agent_started = now
                    result.agent_started_guest = float(found.group(1))
        reader = threading.Thread(target=read_console, daemon=True)
        reader.start()
        try:
            while True:
                elapsed = time.monotonic() - started
                if child.poll() is not None:
                    raise RuntimeError(f"{agent}: QEMU ended ({child.returncode}):\n"
                                       + result.console[-3000:].decode("utf-8", "replace"))
                if elapsed > timeout:
                    raise RuntimeError(f"{agent}: no answer on GET / within {timeout:g} s:\n"
                                       + result.console[-3000:].decode("utf-8", "replace"))
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                        if r.status == 200:
                            result.api = time.monotonic() - started
                            break
                except OSError:
                    pass
                time.sleep(0.2)
        finally:
            child.kill()
            child.wait()
            reader.join(5)
    return result


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="boots of each, alternating")
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM (MiB)")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per boot")
    parser.add_argument("--json", action="store_true", help="rows for compare.py, last line")
    parser.add_argument("--no-build", action="store_true",
                        help="boot the ramdisks already built, even if their inputs changed")
    args = parser.parse_args()
    manifests = {agent: build(agent, not args.no_build) for agent in ("ours", "reference")}
    boots: dict[str, list[Boot]] = {"ours": [], "reference": []}
    for run in range(args.runs):
        for agent in (("ours", "reference") if run % 2 == 0 else ("reference", "ours")):
            boot = boot_once(agent, args.memory, args.cpus, args.timeout)
            boots[agent].append(boot)
            print(f"run {run + 1} {agent:<9}: userspace {boot.userspace:6.1f} s, agent "
                  f"started {boot.agent_started:6.1f} s, API {boot.api:6.1f} s",
                  file=sys.stderr)

    def med(agent: str, name: str) -> float:
        return median([getattr(boot, name) for boot in boots[agent]])
    rows = [("QEMU start -> guest userspace (s)", "userspace", "userspace_guest"),
            ("QEMU start -> agent started (s)", "agent_started", "agent_started_guest"),
            ("QEMU start -> API answers GET / (s)", "api", None)]
    print(f"boot to API, medians of {args.runs} boots each, alternating; "
          f"{args.cpus} vCPU, {args.memory} MiB, TCG unless IPA_QEMU_ACCEL")
    print(f"| {'measure':<38} | {'ours':>14} | {'reference':>14} | {'ratio':>5} |")
    print(f"|{'-' * 40}|{'-' * 16}|{'-' * 16}|{'-' * 7}|")
    for label, host, guest in rows:
        cells = []
        for agent in ("ours", "reference"):
            text = f"{med(agent, host):.1f}"
            if guest:
                text += f" ({med(agent, guest):.1f})"
            cells.append(text)
        ratio = med("ours", host) / med("reference", host)
        print(f"| {label:<38} | {cells[0]:>14} | {cells[1]:>14} | {ratio:5.2f} |")
    own = [med(agent, "api") - med(agent, "agent_started") for agent in ("ours", "reference")]
    print(f"| {'agent started -> API answers (s)':<38} | {own[0]:>14.1f} | {own[1]:>14.1f} | "
          f"{own[0] / own[1]:5.2f} |")
    for agent, manifest in manifests.items():
        size = re.search(r"initrd bytes: (\d+)", manifest)
        took = re.search(r"build seconds: ([\d.]+)", manifest)
        print(f"ramdisk {agent}: initrd {int(size.group(1)) / 2**20:.1f} MiB"
              if size else f"ramdisk {agent}:", f"built in {took.group(1)} s" if took else "")
    verdict = med("ours", "api") <= 0.5 * med("reference", "api")
    print(f"target: ours <= 0.5 x reference: {'met' if verdict else 'MISSED'}")
    if args.json:
        print(json.dumps([{
            "measure": "boot in QEMU (TCG) to API answering (s)", "fmt": "{:.1f}",
            "ours": [boot.api for boot in boots["ours"]],
            "theirs": [boot.api for boot in boots["reference"]],
            "target": "<= 0.5x", "max_ratio": 0.5}]))


if __name__ == "__main__":
    main()
