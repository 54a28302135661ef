"""Peak memory and time of a vmdk and a vhdx deploy next to the raw and qcow2 ones.

Usage (root, for loop devices): .venv/bin/python bench/formats.py [--size-gib 8]
                                                                [--formats raw,qcow2,vmdk,vhdx]

A sparse raw of SIZE GiB (virtual) with random data in 1/16 of it is converted by qemu-img
to each format, served over HTTP on 127.0.0.1 (``bench/deploy.py``'s sendfile server, Range
support) and written by ``write_image`` in a child process to a loop device on a sparse
file, sha256 verified; the device is compared with the raw (``cmp``). Per format: elapsed
seconds, the agent's peak RSS (VmHWM) and its children's (qemu-img: ``ru_maxrss``), and how
much tmpfs grew (nothing is staged).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess  # a benchmark driver, not agent code
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.deploy import Bench, tmpfs_used  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
QEMU = {"raw": None, "qcow2": "qcow2", "vmdk": "vmdk", "vhdx": "vhdx", "vhd": "vpc",
        "vdi": "vdi"}


def write(url: str, device: str, checksum: str, disk_format: str) -> None:
    """Run write_image once with every format permitted; print a JSON line."""
    from bench import deploy
    deploy.write(url, device, checksum, disk_format, permitted=tuple(QEMU) + ("gpt",))


def make_raw(path: str, size: int) -> None:
    rng = random.Random(8)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(size // (16 * 4 * MiB)):   # 1/16 of it, 4 MiB pieces
            f.seek(rng.randrange(0, size // MiB - 4) * MiB)
            f.write(os.urandom(4 * MiB))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=float, default=8.0)
    parser.add_argument("--formats", default="raw,qcow2,vmdk,vhdx")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ipa-bench-formats-", dir="/var/tmp")
    size = int(args.size_gib * GiB)
    bench = Bench(workdir)
    rows = []
    try:
        bench.start_server()
        raw = os.path.join(workdir, "source.raw")
        make_raw(raw, size)
        for fmt in args.formats.split(","):
            name = f"image.{fmt}"
            path = os.path.join(workdir, name)
            qemu_fmt = QEMU[fmt]
            if qemu_fmt is None:
                os.link(raw, path)
            else:
                subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", qemu_fmt, raw,
                                path], check=True)
            with open(path, "rb") as f:
                checksum = hashlib.file_digest(f, "sha256").hexdigest()
            device, is_loop = bench.target("target", size)
            before = tmpfs_used()
            out = subprocess.run([sys.executable, __file__, "write", bench.url(name), device,
                                  checksum, fmt], capture_output=True, text=True)
            assert out.stdout is not None
            lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"{fmt}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
            result = json.loads(lines[-1])
            same = subprocess.run(["cmp", "-n", str(size), device, raw],
                                  capture_output=True).returncode == 0
            row = {"format": fmt, "file_mib": round(os.path.getsize(path) / MiB),
                   "seconds": round(result["elapsed"], 1),
                   "agent_peak_rss_mib": round(result["peak_rss_kib"] / 1024),
                   "qemu_img_peak_rss_mib": round(result["children_peak_rss_kib"] / 1024),
                   "tmpfs_grew_mib": round((tmpfs_used() - before) / MiB),
                   "identical": same, "loop_device": is_loop}
            print(json.dumps(row), flush=True)
            rows.append(row)
            bench.detach(device)
            os.remove(os.path.join(workdir, "target"))
            os.remove(path)
    finally:
        bench.close()
        for name in os.listdir(workdir):
            os.remove(os.path.join(workdir, name))
        os.rmdir(workdir)
    print(f"| format ({args.size_gib:g} GiB virtual) | file MiB | seconds | agent peak RSS MiB "
          "| qemu-img peak RSS MiB | tmpfs grew MiB | identical |")
    for r in rows:
        print(f"| {r['format']} | {r['file_mib']} | {r['seconds']} | {r['agent_peak_rss_mib']} "
              f"| {r['qemu_img_peak_rss_mib']} | {r['tmpfs_grew_mib']} | {r['identical']} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "write":
        write(*sys.argv[2:6])
    else:
        main()
