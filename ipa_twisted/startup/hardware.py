"""Stages that ready the machine: the hardware managers, then the clock."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ipa_twisted.agent import Agent
from ipa_twisted.clock_sync import sync_clock
from ipa_twisted.context import HardwareContext
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.retry import GaveUp, fixed, retry
from ipa_twisted.startup.tree import Stage
from ipa_twisted.when import When

log = Logger()

#: Present while the ramdisk's init is still announcing the devices to udev (``udevadm
#: trigger``), which it does beside the agent: until then ``udevadm settle`` could return
#: before the devices' events are even queued.
UDEV_TRIGGER_PENDING = "/run/ipa-ramdisk/udev-trigger-pending"
UDEV_TRIGGER_WAIT = 60.0     # seconds, at most
UDEV_TRIGGER_POLL = 0.1


class _TriggerPending(Exception):
    """The ramdisk's init has not finished ``udevadm trigger`` yet."""


async def udev_triggered(clock: IReactorTime, pending: str = UDEV_TRIGGER_PENDING) -> None:
    """Return once ``pending`` is gone (at once where it never was: outside the ramdisk),
    or after ``UDEV_TRIGGER_WAIT`` seconds (logged)."""
    async def gone() -> None:
        if os.path.exists(pending):
            raise _TriggerPending(pending)
    try:
        await retry(gone, clock, "Waiting for the ramdisk's udev trigger ({path})",
                    backoff=fixed(UDEV_TRIGGER_POLL), deadline=UDEV_TRIGGER_WAIT,
                    retry_on=_TriggerPending, log=log, level=LogLevel.debug,
                    fields={"path": pending})
    except GaveUp:
        log.warn("udev trigger still pending after {seconds}s ({path}); going on",
                 seconds=UDEV_TRIGGER_WAIT, path=pending)


async def settle_then_load(context: HardwareContext,
                           pending: str = UDEV_TRIGGER_PENDING) -> HardwareManagers:
    """The hardware managers, found and ranked once udev has handled the devices it knows
    of (the ramdisk's trigger done, then ``udevadm settle``, when udev is there): disks'
    serial numbers, WWNs and by-path links come from udev, and the ramdisk's init starts
    the agent without waiting for it, so that the API answers sooner."""
    from ipa_twisted.blockdev.udev import udev_settle
    await udev_triggered(context.clock, pending)
    await udev_settle(context)
    return await HardwareManagers.load(context)


class HardwareLoading(Stage[HardwareManagers]):
    """Once the configuration is resolved: waits ``hardware_initialization_delay``, then
    discovers and ranks the hardware managers (``load()``) and gives them to the agent
    (commands that need them were waiting)."""

    def __init__(self, agent: Agent, load: Callable[[], Awaitable[HardwareManagers]],
                 after: When[Any], clock: IReactorTime,
                 fatal: Callable[[Failure], object] | None = None) -> None:
        super().__init__(fatal)
        self._agent, self._load, self._after, self._clock = agent, load, after, clock

    async def run(self) -> HardwareManagers:
        await self._after.wait()
        delay = self._agent.config.hardware_initialization_delay
        if delay > 0:
            self.log.info("Waiting {delay}s for hardware to initialise", delay=delay)
            await deferLater(self._clock, delay)
        managers = await self._load()
        self._agent.set_managers(managers)
        self.log.info("Hardware managers: {managers}",
                      managers=managers.get_current_versions())
        return managers


class ClockSync(Stage[None]):
    """Once the managers are loaded: sets the clock from ``ntp_server`` when there is one
    (a failure stops start-up only with ``fail_if_clock_not_set``)."""

    def __init__(self, agent: Agent, after: When[Any],
                 fatal: Callable[[Failure], object] | None = None) -> None:
        super().__init__(fatal)
        self._agent, self._after = agent, after

    async def run(self) -> None:
        await self._after.wait()
        config = self._agent.config
        if config.ntp_server:
            await sync_clock(self._agent.runner, config,
                             ignore_errors=not config.fail_if_clock_not_set)
