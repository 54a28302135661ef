"""How far an erase is: each disk's method, state and the bytes the kernel has written to it
(from sysfs), shown on the running command and logged every ``PROGRESS_LOG_INTERVAL``
seconds."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

PROGRESS_LOG_INTERVAL = 60.0
SECTOR = 512
"""Unit of the sector counts in ``/sys/class/block/<dev>/stat``, whatever the disk's."""


# -- progress ---------------------------------------------------------------------------------

def sectors_written(sys_path: str, name: str) -> int | None:
    """Sectors (512 bytes) the kernel has written to block device ``name`` since boot."""
    try:
        with open(os.path.join(sys_path, "class", "block", name, "stat"),
                  encoding="ascii") as f:
            fields = f.read().split()
        return int(fields[6])
    except (OSError, IndexError, ValueError):
        return None


class DiskErase:
    """One disk's part of an erase: method, state, and what the kernel wrote to it."""

    def __init__(self, device: str, size: int, clock: IReactorTime, sys_path: str) -> None:
        self.device, self.size = device, size
        self._clock, self._sys_path = clock, sys_path
        self._kname = os.path.basename(device)
        self.state = "waiting"
        self.method: str | None = None
        self.bytes_to_write: int | None = None
        self.expected_seconds: float | None = None
        self.started: float | None = None
        self.finished: float | None = None
        self.error: str | None = None
        self._start_sectors: int | None = None
        self._end_sectors: int | None = None

    def start(self) -> None:
        self.state, self.started = "running", self._clock.seconds()
        self._start_sectors = sectors_written(self._sys_path, self._kname)

    def use(self, method: str, *, bytes_to_write: int | None = None,
            expected_seconds: float | None = None) -> None:
        """Record how the disk is erased (and how much there is to do)."""
        self.method, self.bytes_to_write = method, bytes_to_write
        self.expected_seconds = expected_seconds

    def finish(self, state: str, error: str | None = None) -> None:
        self._end_sectors = self._sectors_now()
        self.state, self.finished, self.error = state, self._clock.seconds(), error

    def _sectors_now(self) -> int | None:
        if self._end_sectors is not None:
            return self._end_sectors
        return sectors_written(self._sys_path, self._kname)

    @property
    def bytes_written(self) -> int | None:
        now = self._sectors_now()
        if now is None or self._start_sectors is None:
            return None
        return max(0, now - self._start_sectors) * SECTOR

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished if self.finished is not None else self._clock.seconds()) \
            - self.started

    @property
    def fraction(self) -> float | None:
        """How far along, 0 to 1, when it can be told."""
        if self.state == "done":
            return 1.0
        if self.state != "running":
            return None
        written, elapsed = self.bytes_written, self.elapsed
        if self.bytes_to_write and written is not None:
            return min(1.0, written / self.bytes_to_write)
        if self.expected_seconds and elapsed is not None:
            return min(0.99, elapsed / self.expected_seconds)
        return None

    def serialize(self) -> dict[str, Any]:
        fraction, elapsed = self.fraction, self.elapsed
        eta = None
        if fraction and elapsed and self.state == "running" and fraction < 1:
            eta = round(elapsed * (1 - fraction) / fraction, 1)
        return {"state": self.state, "method": self.method, "size": self.size,
                "bytes_written": self.bytes_written, "bytes_to_write": self.bytes_to_write,
                "percent": None if fraction is None else round(100 * fraction, 1),
                "elapsed": None if elapsed is None else round(elapsed, 1),
                "eta_seconds": eta, "error": self.error}


class EraseProgress:
    """The progress of an ``erase_devices`` run, shown on the running command."""

    log = Logger()

    def __init__(self, clock: IReactorTime, sys_path: str,
                 log_interval: float = PROGRESS_LOG_INTERVAL) -> None:
        self._clock, self._sys_path, self.log_interval = clock, sys_path, log_interval
        self.phase = "erasing"
        self.disks: dict[str, DiskErase] = {}
        self.started = clock.seconds()
        self._loop: LoopingCall | None = None

    def add(self, device: str, size: int) -> DiskErase:
        disk = self.disks[device] = DiskErase(device, size, self._clock, self._sys_path)
        return disk

    def serialize(self) -> dict[str, Any]:
        """The JSON-ready view the API exposes."""
        return {"phase": self.phase, "elapsed": round(self._clock.seconds() - self.started, 1),
                "devices": {name: disk.serialize() for name, disk in self.disks.items()}}

    def start(self) -> None:
        self._loop = LoopingCall(self._report)
        self._loop.clock = self._clock
        self._loop.start(self.log_interval, now=False)

    def _report(self) -> None:
        for disk in self.disks.values():
            if disk.state != "running":
                continue
            state = disk.serialize()
            self.log.info("Erasing {device} ({method}): {percent}% done, {written} bytes "
                          "written in {elapsed} s, ETA {eta} s", device=disk.device,
                          method=disk.method, percent=state["percent"],
                          written=state["bytes_written"], elapsed=state["elapsed"],
                          eta=state["eta_seconds"])

    def stop(self, phase: str) -> None:
        self.phase = phase
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
