"""The smallest RAM with which our ramdisk boots and deploys an 8 GiB qcow2 (mostly sparse).

Usage (root, QEMU installed): .venv/bin/python bench/small_node.py [--data-mib 256]
    [--start 512] [--floor 128] [--step 16] [--memory 512,384,320] [--rootfs tmpfs]

Each run boots ramdisk/build.sh's ramdisk in QEMU (TCG) with the RAM given and has the agent
deploy, through ``standby.prepare_image`` over REST, a qcow2 of 8 GiB virtual size holding
``--data-mib`` of random data spread over it, served over HTTP from this machine; the disk is
then compared byte for byte with ``qemu-img convert -O raw`` of the image (see
tests/test_qemu_small_node.py, which runs the same deploy once with 512 MiB). Without
``--memory``, the RAM is bisected between ``--floor`` (assumed too small) and ``--start``
(which must work) down to ``--step`` MiB. Prints one row per run (RAM, boot, deploy, seconds,
throughput, the guest's MemTotal, MemAvailable after boot and lowest while writing, the
agent's RSS after boot and peak), then the smallest RAM that boots and deploys.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer, task  # noqa: E402

from tests import qemu  # noqa: E402
from tests.test_qemu_small_node import (SmallNodeRun, SparseImage,  # noqa: E402
                                        deploy_on_small_node, make_image)

COLUMNS = ("RAM MiB", "boots", "deploys", "boot s", "deploy s", "MiB/s (qcow2)",
           "MiB/s (virtual)", "MemTotal MiB", "avail after boot", "lowest avail",
           "agent RSS", "agent peak RSS")


def _mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.0f}"


def row(run: SmallNodeRun, image: SparseImage) -> str:
    rates = run.throughput(image) if run.deployed else {}
    cells = [str(run.memory_mb), "yes" if run.booted else "no",
             ("yes" if run.verified else "WRONG BYTES") if run.deployed else "no",
             str(run.boot_seconds or "-"), str(run.deploy_seconds or "-"),
             str(rates.get("download_mib_s", "-")), str(rates.get("virtual_mib_s", "-")),
             _mib(run.mem_total_kb), _mib(run.available_after_boot_kb),
             _mib(run.lowest_available_kb), _mib(run.agent_rss_kb),
             _mib(run.agent_peak_rss_kb)]
    line = " | ".join(cells)
    return line + (f"   ({run.error})" if run.error else "")


async def main(reactor: Any, options: argparse.Namespace) -> None:
    reason = qemu.unavailable()
    if reason is not None:
        raise SystemExit(f"cannot run: {reason}")
    if options.ramdisk:
        ramdisk = qemu.Ramdisk(os.path.join(options.ramdisk, "vmlinuz"),
                               os.path.join(options.ramdisk, "initrd.img"), 0.0, False, "")
    else:
        ramdisk = await qemu.build_ramdisk()
    size = os.path.getsize(ramdisk.initrd)
    print(f"ramdisk: initrd {size / 1e6:.1f} MB compressed; root file system "
          f"{options.rootfs}", flush=True)
    work = tempfile.mkdtemp(prefix="ipa-small-node-", dir=options.work)
    try:
        image = await make_image(work, options.data_mib)
        print(f"image: qcow2 {image.size / 2**20:.0f} MiB, 8 GiB virtual, "
              f"{image.data_mib} MiB of data", flush=True)
        print(" | ".join(COLUMNS), flush=True)
        results: dict[int, bool] = {}

        async def attempt(memory: int) -> bool:
            run = await deploy_on_small_node(ramdisk, image, work, memory,
                                             rootfs=options.rootfs)
            print(row(run, image), flush=True)
            results[memory] = run.booted and run.deployed and run.verified
            return results[memory]

        if options.memory:
            for memory in options.memory:
                await attempt(memory)
        else:
            good, bad = options.start, options.floor
            if not await attempt(good):
                raise SystemExit(f"{good} MiB does not deploy: nothing to bisect from")
            while good - bad > options.step:
                middle = (good + bad) // 2 // options.step * options.step or options.step
                if middle in (good, bad):
                    break
                if await attempt(middle):
                    good = middle
                else:
                    bad = middle
        working = sorted(memory for memory, ok in results.items() if ok)
        print(f"smallest RAM that boots and deploys: "
              f"{f'{working[0]} MiB' if working else 'none of those tried'}"
              f" (tried {sorted(results)})", flush=True)
    finally:
        if options.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-mib", type=int, default=256)
    parser.add_argument("--start", type=int, default=512, help="RAM that must work (MiB)")
    parser.add_argument("--floor", type=int, default=128, help="RAM taken as too small")
    parser.add_argument("--step", type=int, default=16, help="bisect down to this (MiB)")
    parser.add_argument("--memory", type=lambda text: [int(m) for m in text.split(",")],
                        help="comma-separated RAM sizes to try instead of bisecting")
    parser.add_argument("--rootfs", choices=("ramfs", "tmpfs"), default="ramfs",
                        help="the initramfs's root: ramfs (rootfstype=ramfs) or the "
                             "kernel's default tmpfs (at most half the RAM)")
    parser.add_argument("--ramdisk", default=None,
                        help="a directory with a built vmlinuz and initrd.img to use "
                             "instead of building ramdisk/build.sh's")
    parser.add_argument("--work", default=None, help="directory for the image and disks")
    parser.add_argument("--keep", action="store_true", help="keep the image and consoles")
    return parser.parse_args(argv)


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parse(sys.argv[1:]))))
