"""Our agent side by side with the reference agent (ironic-python-agent from PyPI), and
our image pipeline against the best pipe and each stage's physical limit: one table.

Usage: .venv/bin/python bench/compare.py [--runs 5] [--idle 10] [--duration 5]
           [--only startup,wrk,deploy,ironic] [--size-gib 2] [--deploy-runs 3]
           [--ironic-runs 2] [--qcow2-gib 1,4,8] [--fleet 8,16] [--fleet-gib 1]
           [--boot-runs 3] [--only startup,wrk,deploy,ironic,boot]

Prints one table: measure | ours | baseline | ratio | target | met?, then one line naming
the rows that missed their target. ``startup`` and ``wrk`` are measured here (medians of
``--runs`` runs, ours and the reference's interleaved so that a busy machine slows both
alike); ``deploy`` runs ``bench/deploy.py`` and ``ironic`` runs ``bench/real_ironic.py``,
which print their rows as JSON. See bench/README.md for what each row measures and how.

The reference is installed on first use into ``bench/_scratch/ref-venv`` (git-ignored). It
has no standalone mode: it serves its API only after a lookup, so a FakeIronic
(``ipa_twisted.testing.fake_ironic``) on 127.0.0.1 answers it with our agent token. Its
hardware manager runs ``mdadm --assemble``, ``modprobe``, ``multipathd``...: those commands
are shadowed by no-op stubs on its PATH (``bench/_scratch/stubs``) so that it changes
nothing on this machine; read-only tools (``lsblk``, ``ip``) stay real. Ours runs
``--standalone`` with the same token from a config file.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess  # a benchmark driver, not agent code
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH = os.path.join(ROOT, "bench", "_scratch")
REF_VENV = os.path.join(SCRATCH, "ref-venv")
STUBS = os.path.join(SCRATCH, "stubs")
TOKEN = "bench-token-0123456789abcdef0123456789abcdef"
# Commands the reference's hardware managers would use to change this machine.
STUBBED = ("mdadm", "modprobe", "multipath", "multipathd", "iscsistart", "umount", "mount",
           "hwclock", "chronyd", "ntpdate", "ipmitool", "efibootmgr", "udevadm", "lshw",
           "dmidecode", "sgdisk", "parted", "wipefs", "dd", "reboot", "poweroff", "systemctl")

STUB_OUTPUT = {"lshw": "echo '{\"id\": \"bench\", \"class\": \"system\", "
                       "\"product\": \"bench\", \"vendor\": \"bench\", \"children\": []}'\n"}


# -- helpers ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """RSS of ``pid`` and its descendants (MiB)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), \
                        open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return total / 1024


def ensure_reference() -> str:
    python = os.path.join(REF_VENV, "bin", "python")
    if not os.path.exists(os.path.join(REF_VENV, "bin", "ironic-python-agent")):
        print("installing ironic-python-agent into", REF_VENV, file=sys.stderr)
        subprocess.run(["python3",
                        "-m", "venv", REF_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "ironic-python-agent"],
                       check=True)
    os.makedirs(STUBS, exist_ok=True)
    for name in STUBBED:
        path = os.path.join(STUBS, name)
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write("#!/bin/sh\n" + STUB_OUTPUT.get(name, "") + "exit 0\n")
            os.chmod(path, 0o755)
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install -y wrk")
    return os.path.join(REF_VENV, "bin", "ironic-python-agent")


def macs() -> list[str]:
    found = []
    for name in os.listdir("/sys/class/net"):
        with contextlib.suppress(OSError), open(f"/sys/class/net/{name}/address") as f:
            mac = f.read().strip()
            if mac and mac != "00:00:00:00:00:00":
                found.append(mac)
    return found


@contextlib.contextmanager
def fake_ironic(options: list[str] | None = None) -> Iterator[int]:
    """``ipa_twisted.testing.fake_ironic`` on 127.0.0.1 with ``options`` (default: our
    token, given at every lookup, and this machine's MACs); its port."""
    if options is None:
        options = ["--token", TOKEN, "--reissue-tokens"]
        for mac in macs():
            options += ["--mac", mac]
    args = [sys.executable, "-m", "ipa_twisted.testing.fake_ironic", "--port", "0", *options]
    child = subprocess.Popen(args, env=dict(os.environ, PYTHONPATH=ROOT),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        match = re.match(r"listening on (\d+)", line)
        if not match:
            raise RuntimeError(f"fake Ironic did not start: {line!r}")
        yield int(match.group(1))
    finally:
        child.terminate()
        child.wait(10)


@dataclass
class Agent:
    """How to start one agent on a given port."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int = 0
    child: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start; seconds from process start to the first 200 on GET /."""
        self.port = free_port()
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        started = time.monotonic()
        self.child = subprocess.Popen(argv, env=self.env, cwd=SCRATCH,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                with urllib.request.urlopen(self.url("/"), timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except OSError:
                time.sleep(0.005)
            if self.child.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.child.returncode}")
            if time.monotonic() - started > 60:
                raise RuntimeError(f"{self.name} did not answer within 60 s")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.child is not None:
            self.child.terminate()
            try:
                self.child.wait(10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
            self.child = None


def make_agents(fake_port: int, config_dir: str) -> tuple[Agent, Agent]:
    cmdline = os.path.join(config_dir, "cmdline")
    with open(cmdline, "w") as f:
        f.write("\n")
    ours_conf = os.path.join(config_dir, "ours.conf")
    with open(ours_conf, "w") as f:
        f.write(f"[DEFAULT]\nagent_token = {TOKEN}\n")
    # As the ramdisk starts it: twistd through our launcher, which skips twistd's search
    # for service makers (ipa_twisted/startup/launch.py).
    ours = Agent("ours", [
        sys.executable, "-m", "ipa_twisted.startup.launch", "-n", "--pidfile=", "ipa", "--standalone", "--no-default-config-files",
        "--config-file", ours_conf, "--cmdline-path", cmdline,
        "--listen", "127.0.0.1:{port}"], dict(os.environ, PYTHONPATH=ROOT))
    ref_conf = os.path.join(config_dir, "ref-{port}.conf")
    theirs = Agent("reference", [
        "/bin/sh", "-c",
        f"printf '[DEFAULT]\\napi_url = http://127.0.0.1:{fake_port}\\n"
        "listen_host = 127.0.0.1\\nlisten_port = {port}\\nenable_auto_tls = False\\n"
        "hardware_initialization_delay = 0\\nuse_stderr = True\\ndebug = False\\n"
        "lookup_interval = 1\\n' > " + ref_conf + " && exec " + ensure_reference()
        + " --config-file " + ref_conf],
        dict(os.environ, PATH=STUBS + ":" + os.environ.get("PATH", "/usr/bin:/bin")))
    return ours, theirs


def make_floors() -> list[Agent]:
    """Bare Klein apps (``bench/bare_klein.py``): the RSS floor of the fixed stack."""
    script = os.path.join(ROOT, "bench", "bare_klein.py")
    twistd = ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
    return [Agent("bare Klein app, plain reactor",
                  ["env", "BARE_KLEIN_PORT={port}", sys.executable, script], dict(os.environ)),
            Agent("bare Klein app, twistd -y",
                  ["env", "BARE_KLEIN_PORT={port}", sys.executable, *twistd, "-y", script],
                  dict(os.environ))]


# -- wrk -------------------------------------------------------------------------------------

@dataclass
class WrkResult:
    rps: float
    p50: float
    p99: float
    errors: int


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def wrk(url: str, connections: int, duration: float) -> WrkResult:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "2s",
         "--latency", url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"\s50%\s+(\S+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    errors = 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    return WrkResult(rps, _seconds(p50.group(1)) if p50 else float("nan"),
                     _seconds(p99.group(1)) if p99 else float("nan"), errors)


def collect_inventory(agent: Agent) -> float:
    """Seconds for POST /v1/commands/?wait=true poll.get_hardware_info to answer."""
    request = urllib.request.Request(
        agent.url(f"/v1/commands/?wait=true&agent_token={TOKEN}"), method="POST",
        data=b'{"name": "poll.get_hardware_info", "params": {}}',
        headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.loads(response.read())
    elapsed = time.monotonic() - started
    if body.get("command_status") != "SUCCEEDED":
        raise RuntimeError(f"{agent.name}: inventory failed: {body.get('command_error')}")
    return elapsed


# -- the table -------------------------------------------------------------------------------

@dataclass
class Row:
    measure: str
    ours: list[float] = field(default_factory=list)
    theirs: list[float] = field(default_factory=list)
    fmt: str = "{:.3f}"
    target: str = ""
    # ratio ours/theirs must be <= max_ratio, >= min_ratio, or ours <= max_ours
    max_ratio: float | None = None
    min_ratio: float | None = None
    max_ours: float | None = None
    use_max: bool = False   # errors: report the worst run, not the median

    def value(self, values: list[float]) -> float:
        if not values:
            return float("nan")
        return max(values) if self.use_max else statistics.median(values)

    def met(self) -> bool | None:
        """Whether the row meets its target (None: it has none)."""
        if not self.target:
            return None
        ours, theirs = self.value(self.ours), self.value(self.theirs)
        ratio = ours / theirs if theirs else float("nan")
        met = ours == ours   # a figure that was not measured does not meet its target
        if self.max_ratio is not None:
            met = met and ratio <= self.max_ratio
        if self.min_ratio is not None:
            met = met and ratio >= self.min_ratio
        if self.max_ours is not None:
            met = met and ours <= self.max_ours
        return met

    def line(self) -> str:
        ours, theirs = self.value(self.ours), self.value(self.theirs)
        ratio = ours / theirs if theirs else float("nan")
        met = self.met()
        verdict = "-" if met is None else "yes" if met else "NO"
        ratio_text = f"{ratio:.2f}" if ratio == ratio else "-"
        ours_text = self.fmt.format(ours) if ours == ours else "-"
        theirs_text = self.fmt.format(theirs) if theirs == theirs else "-"
        return (f"| {self.measure:<50} | {ours_text:>9} | {theirs_text:>9} | "
                f"{ratio_text:>6} | {self.target:<12} | {verdict:<4} |")


def script_rows(script: str, args: list[str]) -> list[Row]:
    """Run ``bench/<script> --json ARGS`` (its progress on our stderr); its rows."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--json",
                          *args], stdout=subprocess.PIPE, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
    if out.returncode != 0 or not lines:
        message = (out.stdout.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return [Row(f"{script}: NOT MEASURED ({message[:60]})", target="runs",
                    max_ours=0.0)]
    return [Row(**row) for row in json.loads(lines[-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds before RSS")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--only", default="startup,wrk,deploy,ironic,boot",
                        help="parts, comma-separated: startup, wrk, deploy (bench/deploy.py: "
                             "raw write against the pipe and each stage's limit), ironic "
                             "(bench/real_ironic.py: deploys, qcow2, fleets through a real "
                             "Ironic), boot (bench/boot.py: both ramdisks booted in QEMU to "
                             "their API, built first if needed)")
    parser.add_argument("--boot-runs", default="3", help="boots of each ramdisk per "
                        "configuration in boot")
    parser.add_argument("--size-gib", default="2", help="raw image size (deploy, ironic)")
    parser.add_argument("--deploy-runs", default="3", help="runs of each in deploy")
    parser.add_argument("--ironic-runs", default="2", help="deploys of each side in ironic")
    parser.add_argument("--qcow2-gib", default="1,4,8")
    parser.add_argument("--fleet", default="8,16", help="fleet sizes")
    parser.add_argument("--fleet-gib", default="1", help="image size in the fleets (GiB)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    ensure_reference()
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=SCRATCH) as config_dir, fake_ironic() as fake_port:
        ours, theirs = make_agents(fake_port, config_dir)
        if "startup" in parts:
            # Byte-compiled, as the ramdisk ships it and as pip leaves the reference and the
            # floor's packages: under PYTHONDONTWRITEBYTECODE our tree would be compiled
            # from source at every start, slower and with ~0.7 MiB more heap left behind.
            for tree in ("ipa_twisted", os.path.join("twisted", "plugins")):
                compileall.compile_dir(os.path.join(ROOT, tree), quiet=1)
            startup = Row("start-up to first 200 on GET / (s)", target="<= 0.5x",
                          max_ratio=0.5)
            rss = Row(f"idle RSS after {args.idle:g} s (MiB)", fmt="{:.1f}",
                      target="<= 0.75x", max_ratio=0.75)
            floors = make_floors()
            floor_rows = [Row(f"  floor: {floor.name} (MiB)", fmt="{:.1f}")
                          for floor in floors]
            rows += [startup, rss, *floor_rows]
            for _ in range(args.runs):
                runs: list[tuple[Agent, str, Row | None, Row]] = [
                    (ours, "ours", startup, rss), (theirs, "theirs", startup, rss)]
                runs += [(floor, "ours", None, row) for floor, row in zip(floors, floor_rows)]
                for agent, side, time_row, rss_row in runs:
                    try:
                        started = agent.start()
                        if time_row is not None:
                            getattr(time_row, side).append(started)
                        time.sleep(args.idle)
                        assert agent.child is not None
                        getattr(rss_row, side).append(rss_mib(agent.child.pid))
                    finally:
                        agent.stop()
            for row in floor_rows:  # each floor against the same reference runs
                row.theirs = rss.theirs
            over = Row("  ours idle RSS over the twistd floor (MiB)", fmt="{:.1f}",
                       target="ours <= 3", max_ours=3.0)
            if rss.ours and floor_rows[-1].ours:
                over.ours = [statistics.median(rss.ours)
                             - statistics.median(floor_rows[-1].ours)]
            rows.append(over)
            notes.append(f"start-up, RSS: medians of {args.runs} runs")
        if "wrk" in parts:
            loads: list[tuple[str, int, tuple[Row, Row, Row, Row]]] = []
            for path in ("/v1/status", "/v1/commands/"):
                for connections in (10, 200):
                    label = f"GET {path} c={connections}"
                    rps = Row(f"{label} req/s", fmt="{:.0f}")
                    p50, p99 = Row(f"{label} p50 (s)"), Row(f"{label} p99 (s)")
                    errs = Row(f"{label} errors", fmt="{:.0f}", use_max=True)
                    if connections == 10:
                        rps.target, rps.min_ratio = ">= 1.5x", 1.5
                    else:
                        p99.target, p99.max_ours = "ours <= 0.2", 0.2
                        errs.target, errs.max_ours = "ours 0", 0
                    rows += [rps, p50, p99, errs]
                    loads.append((path, connections, (rps, p50, p99, errs)))
            first = Row("inventory via API, first call (s)")
            inventory = Row("inventory via API, later calls (s)")
            rows += [first, inventory]
            try:
                ours.start()
                theirs.start()
                for _ in range(args.runs):
                    for path, connections, (rps, p50, p99, errs) in loads:
                        query = f"?agent_token={TOKEN}" if "commands" in path else ""
                        for agent, side in ((ours, "ours"), (theirs, "theirs")):
                            result = wrk(agent.url(path + query), connections, args.duration)
                            getattr(rps, side).append(result.rps)
                            getattr(p50, side).append(result.p50)
                            getattr(p99, side).append(result.p99)
                            getattr(errs, side).append(result.errors)
                # After wrk: GET /v1/commands/ above lists no results (inventories are big).
                for run in range(args.runs + 1):
                    for agent, side in ((ours, "ours"), (theirs, "theirs")):
                        row = first if run == 0 else inventory
                        getattr(row, side).append(collect_inventory(agent))
            finally:
                ours.stop()
                theirs.stop()
            notes.append(f"wrk, inventory: medians of {args.runs} runs (errors: worst run)")
    if "deploy" in parts:
        rows += script_rows("deploy.py", ["--size-gib", args.size_gib,
                                          "--runs", args.deploy_runs])
        notes.append(f"raw write and limits: medians of {args.deploy_runs} runs, "
                     "interleaved; 'limit:' rows compare the two limits they name")
    if "ironic" in parts:
        rows += script_rows("real_ironic.py", [
            "--size-gib", args.size_gib, "--runs", args.ironic_runs,
            "--qcow2-gib", args.qcow2_gib, "--fleet", args.fleet,
            "--fleet-gib", args.fleet_gib])
        notes.append(f"via Ironic: medians of {args.ironic_runs} deploys of each side, "
                     "alternating; qcow2 and fleets: one of each")
    if "boot" in parts:
        rows += script_rows("boot.py", ["--runs", args.boot_runs])
        notes.append(f"boot: medians of {args.boot_runs} boots of each ramdisk, alternating")
    print("; ".join(notes) + ". ratio = ours / baseline (the reference agent unless the "
          "row names another)")
    print(f"| {'measure':<50} | {'ours':>9} | {'baseline':>9} | {'ratio':>6} | "
          f"{'target':<12} | met? |")
    print(f"|{'-' * 52}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 14}|------|")
    for row in rows:
        print(row.line())
    missed, parent = [], ""
    for row in rows:   # an indented row's measure is read with the row above it
        if not row.measure.startswith(" "):
            parent = row.measure.split(" (")[0]
        if row.met() is False:
            missed.append(row.measure.strip() if row.measure == parent or not
                          row.measure.startswith(" ") else f"{parent} / {row.measure.strip()}")
    print("missed targets: " + ("; ".join(missed) if missed else "none")
          + f" ({sum(row.met() is not None for row in rows)} rows with a target)")


if __name__ == "__main__":
    main()
