"""Start-up time (process start → first 200 on GET /) and idle RSS of the agent, started as
the ramdisk starts it (`python -m ipa_twisted.startup.launch -n ipa`: twistd without its
search for service makers).

Usage: .venv/bin/python bench/startup.py [--runs 5] [--idle 10]
Prints the median of the runs. The agent runs standalone on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import compileall
import os
import socket
import statistics
import subprocess  # a benchmark driver, not agent code
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_run(idle: float) -> tuple[float, float]:
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".cmdline") as cmdline:
        cmdline.write("\n")
        cmdline.flush()
        env = dict(os.environ, PYTHONPATH=ROOT)
        started = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, "-m", "ipa_twisted.startup.launch", "-n", "--pidfile=", "ipa", "--standalone", "--no-default-config-files",
             "--cmdline-path", cmdline.name, "--listen", f"127.0.0.1:{port}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.005)
                if time.monotonic() - started > 30:
                    raise RuntimeError("agent did not answer within 30 s")
            startup = time.monotonic() - started
            time.sleep(idle)
            return startup, rss_mib(child.pid)
        finally:
            child.terminate()
            child.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    # Byte-compiled, as the ramdisk ships it (see compare.py)
    for tree in ("ipa_twisted", os.path.join("twisted", "plugins")):
        compileall.compile_dir(os.path.join(ROOT, tree), quiet=1)
    results = [one_run(args.idle) for _ in range(args.runs)]
    startups = [r[0] for r in results]
    rss = [r[1] for r in results]
    print(f"{'measure':<32}{'median':>10}{'min':>10}{'max':>10}")
    print(f"{'start-up to first 200 (s)':<32}{statistics.median(startups):>10.3f}"
          f"{min(startups):>10.3f}{max(startups):>10.3f}")
    print(f"{'idle RSS after %gs (MiB)' % args.idle:<32}{statistics.median(rss):>10.1f}"
          f"{min(rss):>10.1f}{max(rss):>10.1f}")


if __name__ == "__main__":
    main()
