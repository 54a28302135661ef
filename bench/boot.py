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

Two configurations are booted, each agent alternating with the other:

- ``standalone``: no Ironic. Ours runs with ``ipa-standalone=1``; the reference, which has
  no standalone mode, is given no ``ipa-api-url`` (its fastest path to serving its API).
- ``with Ironic`` (as deployed): both are given ``ipa-api-url`` of a fake Ironic on the host
  (``ipa_twisted.testing.fake_ironic``, whose answers the contract tests hold to Ironic 39's)
  that knows the VM's MAC, reached through QEMU's ``guestfwd`` (the guest can reach nothing
  else). The reference serves its API only after its lookup, as it does when deployed; ours
  serves it first. The rows add when the lookup was answered and when the first heartbeat
  reached the fake Ironic: from then on the conductor can drive the agent.

``--json`` prints the rows for ``bench/compare.py`` as its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import socket
import ssl
import statistics
import subprocess  # a benchmark driver, not agent code
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "ramdisk", "build.sh")
OUTPUTS = {"ours": os.path.join(ROOT, ".cache", "ramdisk"),
           "reference": os.path.join(ROOT, ".cache", "ramdisk-reference")}
KERNEL_ARGS = {"ours": "ipa-standalone=1", "reference": ""}
IRONIC_HOST, IRONIC_PORT = "10.0.2.100", 6385
"""Where the guest reaches the fake Ironic (QEMU's ``guestfwd`` to the host's port)."""
VM_MAC = "52:54:00:12:34:56"
CONFIGURATIONS = ("standalone", "with Ironic")
from compare import fake_ironic  # noqa: E402  (a sibling script: bench/ is on the path)

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
    lookup: float = float("nan")
    """The fake Ironic answered the agent's lookup (200)."""
    heartbeat: float = float("nan")
    """The fake Ironic accepted the agent's first heartbeat."""
    console: bytearray = field(default_factory=bytearray)


def qemu_argv(agent: str, disk: str, port: int, memory: int, cpus: int,
              ironic_port: int | None = None) -> list[str]:
    accel = os.environ.get("IPA_QEMU_ACCEL", "tcg")
    accel = "tcg,thread=multi" if accel == "tcg" else accel
    output = OUTPUTS[agent]
    kernel_args, forward = KERNEL_ARGS[agent], ""
    if ironic_port is not None:
        kernel_args = f"ipa-api-url=http://{IRONIC_HOST}:{IRONIC_PORT}"
        forward = f",guestfwd=tcp:{IRONIC_HOST}:{IRONIC_PORT}-tcp:127.0.0.1:{ironic_port}"
    return ["qemu-system-x86_64", "-machine", "q35", "-accel", accel, "-cpu", "max",
            "-m", str(memory), "-smp", str(cpus),
            "-kernel", os.path.join(output, "vmlinuz"),
            "-initrd", os.path.join(output, "initrd.img"),
            "-append", f"console=ttyS0 quiet panic=-1 {kernel_args}".strip(),
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-nic", f"user,model=virtio-net-pci,mac={VM_MAC},restrict=on,"
                    f"hostfwd=tcp:127.0.0.1:{port}-:{AGENT_PORT}{forward}",
            "-drive", f"file={disk},if=none,id=disk0,format=raw,cache=unsafe",
            "-device", "virtio-blk-pci,drive=disk0,serial=boot-bench-disk"]


def ironic_times(record: str, started_wall: float) -> tuple[float, float]:
    """(first answered lookup, first accepted heartbeat), seconds from ``started_wall``."""
    lookup = heartbeat = float("nan")
    try:
        with open(record, encoding="utf-8") as f:
            for line in f:
                entry = json.loads(line)
                at = entry["time"] - started_wall
                if entry["kind"] == "lookup" and entry["status"] == 200 and lookup != lookup:
                    lookup = at
                if entry["kind"] == "heartbeat" and entry["status"] in (200, 202) \
                        and heartbeat != heartbeat:
                    heartbeat = at
    except FileNotFoundError:
        pass
    return lookup, heartbeat


_UNVERIFIED = ssl._create_unverified_context()


def api_answers(port: int) -> bool:
    """``GET /`` answered 200, over HTTP or (the API once automatic TLS is on) HTTPS."""
    for scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/", timeout=2,
                                        context=_UNVERIFIED if scheme == "https" else None,
                                        ) as r:
                if r.status == 200:
                    return True
        except (OSError, http.client.HTTPException):
            pass
    return False


def boot_once(agent: str, memory: int, cpus: int, timeout: float,
              configuration: str = "standalone") -> Boot:
    """Boot ``agent``'s ramdisk until its API answers (and, with Ironic, its first heartbeat
    arrived); the times seen."""
    result = Boot()
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="ipa-boot-"))
        record = os.path.join(scratch, "ironic.jsonl")
        ironic_port = (stack.enter_context(fake_ironic(["--mac", VM_MAC, "--record", record]))
                       if configuration == "with Ironic" else None)
        disk = os.path.join(scratch, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(8 << 30)   # sparse; both agents want a root disk of 4 GiB or more
        port = free_port()
        started = time.monotonic()
        started_wall = time.time()
        child = subprocess.Popen(qemu_argv(agent, disk, port, memory, cpus, ironic_port),
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
                    raise RuntimeError(f"{agent} ({configuration}): not up within "
                                       f"{timeout:g} s:\n"
                                       + result.console[-3000:].decode("utf-8", "replace"))
                if result.api != result.api and api_answers(port):
                    result.api = time.monotonic() - started
                if ironic_port is not None:
                    result.lookup, result.heartbeat = ironic_times(record, started_wall)
                if result.api == result.api and (ironic_port is None
                                                 or result.heartbeat == result.heartbeat):
                    break
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
    parser.add_argument("--configuration", choices=CONFIGURATIONS, action="append",
                        help="boot only this configuration (repeat; default: both)")
    args = parser.parse_args()
    configurations = args.configuration or list(CONFIGURATIONS)
    manifests = {agent: build(agent, not args.no_build) for agent in ("ours", "reference")}
    boots: dict[tuple[str, str], list[Boot]] = {
        (c, a): [] for c in configurations for a in ("ours", "reference")}
    for run in range(args.runs):
        for configuration in configurations:
            for agent in (("ours", "reference") if run % 2 == 0 else ("reference", "ours")):
                boot = boot_once(agent, args.memory, args.cpus, args.timeout, configuration)
                boots[configuration, agent].append(boot)
                print(f"run {run + 1} {configuration:<11} {agent:<9}: userspace "
                      f"{boot.userspace:6.1f} s, agent started {boot.agent_started:6.1f} s, "
                      f"API {boot.api:6.1f} s, lookup {boot.lookup:6.1f} s, heartbeat "
                      f"{boot.heartbeat:6.1f} s", file=sys.stderr)

    def med(configuration: str, agent: str, name: str) -> float:
        return median([getattr(boot, name) for boot in boots[configuration, agent]])

    def row(label: str, values: tuple[float, float], guest: tuple[float, float] | None = None,
            ) -> None:
        cells = [f"{v:.1f}" + (f" ({g:.1f})" if guest else "")
                 for v, g in zip(values, guest or values)]
        ratio = values[0] / values[1] if values[1] else float("nan")
        print(f"| {label:<46} | {cells[0]:>14} | {cells[1]:>14} | {ratio:5.2f} |")

    print(f"boot to API, medians of {args.runs} boots each, alternating; "
          f"{args.cpus} vCPU, {args.memory} MiB, TCG unless IPA_QEMU_ACCEL")
    print(f"| {'measure':<46} | {'ours':>14} | {'reference':>14} | {'ratio':>5} |")
    print(f"|{'-' * 48}|{'-' * 16}|{'-' * 16}|{'-' * 7}|")
    both = ("ours", "reference")
    for configuration in configurations:
        c = configuration
        row(f"{c}: QEMU start -> guest userspace (s)",
            tuple(med(c, a, "userspace") for a in both),      # type: ignore[arg-type]
            tuple(med(c, a, "userspace_guest") for a in both))  # type: ignore[arg-type]
        row(f"{c}: QEMU start -> agent started (s)",
            tuple(med(c, a, "agent_started") for a in both),   # type: ignore[arg-type]
            tuple(med(c, a, "agent_started_guest") for a in both))  # type: ignore[arg-type]
        row(f"{c}: QEMU start -> API answers GET / (s)",
            tuple(med(c, a, "api") for a in both))  # type: ignore[arg-type]
        row(f"{c}: agent started -> API answers (s)",
            tuple(med(c, a, "api") - med(c, a, "agent_started")  # type: ignore[arg-type]
                  for a in both))
        if c == "with Ironic":
            row(f"{c}: QEMU start -> lookup answered (s)",
                tuple(med(c, a, "lookup") for a in both))  # type: ignore[arg-type]
            row(f"{c}: QEMU start -> first heartbeat (s)",
                tuple(med(c, a, "heartbeat") for a in both))  # type: ignore[arg-type]
    for agent, manifest in manifests.items():
        size = re.search(r"initrd bytes: (\d+)", manifest)
        took = re.search(r"build seconds: ([\d.]+)", manifest)
        print(f"ramdisk {agent}: initrd {int(size.group(1)) / 2**20:.1f} MiB"
              if size else f"ramdisk {agent}:", f"built in {took.group(1)} s" if took else "")
    for c in configurations:
        verdict = med(c, "ours", "api") <= 0.5 * med(c, "reference", "api")
        print(f"target ({c}): API, ours <= 0.5 x reference: {'met' if verdict else 'MISSED'}")
    if args.json:
        def values(c: str, agent: str, f: Any) -> list[float]:
            return [f(boot) for boot in boots[c, agent]]
        rows: list[dict[str, Any]] = []
        for c in configurations:
            rows.append({"measure": f"boot in QEMU (TCG), {c}: start -> API (s)",
                         "fmt": "{:.1f}", "ours": values(c, "ours", lambda b: b.api),
                         "theirs": values(c, "reference", lambda b: b.api),
                         "target": "<= 0.5x", "max_ratio": 0.5})
            rows.append({"measure": "  QEMU start -> agent started (s)", "fmt": "{:.1f}",
                         "ours": values(c, "ours", lambda b: b.agent_started),
                         "theirs": values(c, "reference", lambda b: b.agent_started)})
            rows.append({"measure": "  agent started -> API answers (s)", "fmt": "{:.1f}",
                         "ours": values(c, "ours", lambda b: b.api - b.agent_started),
                         "theirs": values(c, "reference",
                                          lambda b: b.api - b.agent_started)})
            if c == "with Ironic":
                rows.append({"measure": "  QEMU start -> first heartbeat (s)",
                             "fmt": "{:.1f}", "ours": values(c, "ours", lambda b: b.heartbeat),
                             "theirs": values(c, "reference", lambda b: b.heartbeat)})
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
