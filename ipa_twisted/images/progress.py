"""What the API shows while an image is written: ``ImageProgress``."""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ipa_twisted.blockdev.writer import DeviceWriter


class ImageProgress:
    """Progress of one image: counters, rate over a sliding window, ETA; ``serialize``.

    ``bytes_received`` counts HTTP body bytes (refetched qcow2 ranges too), ``total`` is the
    image's size when the server gave it, ``bytes_written`` the bytes written to the device
    and ``bytes_zeroed`` the ranges zeroed there. ``rate`` (bytes/s) is that of
    ``bytes_received`` over the last ``window`` seconds.
    """

    log = Logger()
    log_interval = 5.0

    def __init__(self, clock: Any, window: float = 10.0) -> None:
        self._clock = clock
        self.window = window
        self.phase = "pending"
        self.url: str | None = None
        self.total: int | None = None
        self.bytes_received = 0
        self.bytes_written = 0
        self.bytes_zeroed = 0
        self.started: float | None = None
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._loop: LoopingCall | None = None
        self._last_log = 0.0
        self.writer: DeviceWriter | None = None

    def _refresh(self) -> None:
        if self.writer is not None:  # counters owned by the writer thread; reads are safe
            self.bytes_written = self.writer.bytes_written
            self.bytes_zeroed = self.writer.bytes_zeroed

    def sample(self) -> None:
        """Record ``bytes_received`` now (called every second while running)."""
        now = self._clock.seconds()
        self._refresh()
        self._samples.append((now, self.bytes_received))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    @property
    def rate(self) -> float | None:
        if not self._samples:
            return None
        now = self._clock.seconds()
        then, received = self._samples[0]
        if now - then <= 0:
            return None
        rate: float = max(0.0, (self.bytes_received - received) / (now - then))
        return rate

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        if self.total is None or not rate:
            return None
        return max(0.0, (self.total - self.bytes_received) / rate)

    @property
    def elapsed(self) -> float | None:
        return None if self.started is None else self._clock.seconds() - self.started

    def serialize(self) -> dict[str, Any]:
        """The JSON-ready view the API exposes."""
        self._refresh()
        rate, eta = self.rate, self.eta_seconds
        return {"phase": self.phase, "url": self.url, "total": self.total,
                "bytes_received": self.bytes_received, "bytes_written": self.bytes_written,
                "bytes_zeroed": self.bytes_zeroed,
                "rate": None if rate is None else round(rate, 1),
                "eta_seconds": None if eta is None else round(eta, 1),
                "elapsed": None if self.elapsed is None else round(self.elapsed, 1)}

    def start(self) -> None:
        """Sample every second and log every ``log_interval`` seconds, on the clock."""
        self.started = self._clock.seconds()
        self._last_log = self.started
        self._samples.clear()
        self.sample()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(1.0, now=False)

    def _tick(self) -> None:
        self.sample()
        now = self._clock.seconds()
        if now - self._last_log >= self.log_interval:
            self._last_log = now
            state = self.serialize()
            rate = state["rate"] or 0.0
            self.log.info("Image {phase}: {received} of {total} bytes received, {written} "
                          "written, {mib_per_s:.1f} MiB/s, ETA {eta} s", phase=self.phase,
                          received=self.bytes_received, total=self.total,
                          written=self.bytes_written, mib_per_s=rate / 2**20,
                          eta=state["eta_seconds"], rate=rate)

    def stop(self, phase: str) -> None:
        self.phase = phase
        self._refresh()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
