"""Burn-in steps of the generic manager: stress-ng on the CPUs and the memory, fio on every
disk (then, if asked, a SMART long self-test) and over the network between two nodes, and
gpu-burn on the GPUs.

Each step reads its settings from the node's ``driver_info`` (the reference agent's
``agent_burnin_*`` fields and defaults), runs its tool through the context's runner, logs
the tool's report and shows on the running command which tool runs and for how long
(``BurnInProgress``). A tool that fails or is missing fails the step with
CommandExecutionError; incomplete settings and failed SMART tests with CleaningError, as the
reference agent does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel

from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import CleaningError, CommandExecutionError
from ipa_twisted.hardware.generic.disk_source import DiskSource
from ipa_twisted.hardware.generic.protection import log_protected, protected_from_erasing
from ipa_twisted.process import ProcessExecutionError, failures_as
from ipa_twisted.retry import fixed, retry

log = Logger()

DEFAULT_TIMEOUT = 86400
"""stress-ng and gpu-burn run 24 hours unless the node says otherwise."""
DEFAULT_NETWORK_RUNTIME = 21600
NETWORK_PORT = "9000"
NETWORK_ROLES = frozenset({"writer", "reader"})
NETWORK_READER_CYCLE = 30.0
"""Seconds a reader waits before connecting again to a writer not listening yet."""
FIO_CONNECTION_FAILED = 16
"""fio's exit code when the reader's connection is refused or times out: fio exits with the
number of jobs that failed, and all 16 failed to connect."""
SMART_POLL_INTERVAL = 30.0
PROGRESS_LOG_INTERVAL = 60.0
GRACE = 120.0
"""Seconds a tool with a timeout of its own is given past it before the runner kills it."""

BURNIN_STEPS = ("burnin_cpu", "burnin_gpu", "burnin_disk", "burnin_memory", "burnin_network")


def burnin_clean_steps() -> list[dict[str, Any]]:
    """The burn-in clean steps, as the reference lists them (priority 0, no arguments)."""
    return [{"step": name, "priority": 0, "interface": "deploy", "reboot_requested": False,
             "abortable": True} for name in BURNIN_STEPS]


def burnin_service_steps() -> list[dict[str, Any]]:
    """The burn-in service steps: all but ``burnin_disk``, which would destroy the
    instance's data."""
    return [step for step in burnin_clean_steps() if step["step"] != "burnin_disk"]


def _seconds(value: Any) -> float | None:
    """``value`` as seconds when it is a plain number (stress-ng also takes "2h")."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class BurnInProgress:
    """Which burn-in tool runs, since when, and for how long it is expected to."""

    log = Logger()

    def __init__(self, clock: IReactorTime, step: str, expected_seconds: float | None,
                 log_interval: float = PROGRESS_LOG_INTERVAL) -> None:
        self._clock, self.step, self.expected_seconds = clock, step, expected_seconds
        self.log_interval = log_interval
        self.started = clock.seconds()
        self.phase = "starting"
        self.command: list[str] | None = None
        self.state = "running"
        self._loop: LoopingCall | None = None

    def running(self, phase: str, argv: Sequence[str]) -> None:
        self.phase, self.command = phase, list(argv)

    @property
    def elapsed(self) -> float:
        return self._clock.seconds() - self.started

    def serialize(self) -> dict[str, Any]:
        """The JSON-ready view shown on the running command."""
        elapsed = self.elapsed
        percent = None
        if self.state == "done":
            percent = 100.0
        elif self.expected_seconds:
            percent = round(min(99.0, 100 * elapsed / self.expected_seconds), 1)
        return {"step": self.step, "phase": self.phase, "state": self.state,
                "command": self.command, "elapsed": round(elapsed, 1),
                "expected_seconds": self.expected_seconds, "percent": percent}

    def start(self) -> None:
        self._loop = LoopingCall(self._report)
        self._loop.clock = self._clock
        self._loop.start(self.log_interval, now=False)

    def _report(self) -> None:
        state = self.serialize()
        self.log.info("Burn-in {step}: {phase} running for {elapsed} s ({percent}% of the "
                      "expected {expected} s)", step=self.step, phase=self.phase,
                      elapsed=state["elapsed"], percent=state["percent"],
                      expected=self.expected_seconds)

    def stop(self, state: str) -> None:
        self.state = state
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


class BurnIn:
    """The ``burnin_*`` steps, given the context and the manager's disk listing."""

    log = Logger()
    reader_cycle = NETWORK_READER_CYCLE
    smart_poll_interval = SMART_POLL_INTERVAL

    def __init__(self, context: HardwareContext, disks: DiskSource) -> None:
        self.context, self._disks = context, disks

    # -- running a tool, with progress -------------------------------------------------------
    async def _run(self, progress: BurnInProgress, phase: str, argv: Sequence[str],
                   timeout: float | None, what: str) -> tuple[str, str]:
        """Run ``argv`` (shown as ``phase``); its (stdout, stderr), or CommandExecutionError
        saying ``what`` failed."""
        progress.running(phase, argv)
        self.log.info("Burn-in {step}: running {argv}", step=progress.step, argv=list(argv))
        with failures_as(CommandExecutionError, f"{what} failed with error {{error}}"):
            out, err = await self.context.runner.execute(*argv, timeout=timeout)
        return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def _progress(self, step: str, expected: float | None) -> BurnInProgress:
        progress = BurnInProgress(self.context.clock, step, expected)
        self.context.report_progress(progress)
        progress.start()
        return progress

    # -- stress-ng ------------------------------------------------------------------------------
    async def stress_ng(self, node: Any, stressor: str) -> None:
        """stress-ng's ``cpu`` or ``vm`` stressor for ``agent_burnin_<stressor>_timeout``
        seconds (24 hours by default), ``agent_burnin_cpu_cpu`` / ``agent_burnin_vm_vm``
        workers (0: one per CPU), ``agent_burnin_vm_vm-bytes`` of the memory (98%), its log
        also in ``agent_burnin_<stressor>_outputfile`` when set."""
        if stressor not in ("cpu", "vm"):
            raise ValueError(f"Unknown stressor type: {stressor}")
        info = _driver_info(node)
        count = info.get(f"agent_burnin_{stressor}_{stressor}", 0)
        timeout = info.get(f"agent_burnin_{stressor}_timeout", DEFAULT_TIMEOUT)
        outputfile = info.get(f"agent_burnin_{stressor}_outputfile")
        argv = ["stress-ng", f"--{stressor}", str(count), "--timeout", str(timeout)]
        if stressor == "vm":
            argv += ["--vm-bytes", str(info.get("agent_burnin_vm_vm-bytes", "98%"))]
        argv.append("--metrics-brief")
        if outputfile:
            argv += ["--log-file", str(outputfile)]
        seconds = _seconds(timeout)
        step = "burnin_cpu" if stressor == "cpu" else "burnin_memory"
        progress = self._progress(step, seconds)
        try:
            _, err = await self._run(progress, f"stress-ng ({stressor})", argv,
                                     None if seconds is None else seconds + GRACE,
                                     f"stress-ng ({stressor})")
        except Exception:
            progress.stop("failed")
            raise
        progress.stop("done")
        # stress-ng reports on stderr only
        self.log.info("Burn-in {step}: stress-ng ({stressor}) passed: {output}", step=step,
                      stressor=stressor, output=err.strip())

    # -- disks ----------------------------------------------------------------------------------
    async def fio_disk(self, node: Any) -> None:
        """fio's verified read-write job on every disk, ``agent_burnin_fio_disk_loops`` times
        (4) or for ``agent_burnin_fio_disk_runtime`` seconds, its JSON report also in
        ``agent_burnin_fio_disk_outputfile``; then, with ``agent_burnin_fio_disk_smart_test``,
        a SMART long self-test on each disk, the step failing if one does not pass.

        Disks the node's ``skip_block_devices`` protects are left out (logged)."""
        info = _driver_info(node)
        loops = info.get("agent_burnin_fio_disk_loops", 4)
        runtime = info.get("agent_burnin_fio_disk_runtime", 0)
        outputfile = info.get("agent_burnin_fio_disk_outputfile")
        argv = ["fio", "--rw", "readwrite", "--bs", "4k", "--direct", "1",
                "--ioengine", "libaio", "--iodepth", "32", "--verify", "crc32c",
                "--verify_dump", "1", "--continue_on_error", "verify",
                "--loops", str(loops), "--runtime", str(runtime), "--time_based"]
        if outputfile:
            argv += ["--output-format", "json", "--output", str(outputfile)]
        listed = await self._disks.list_block_devices()
        protection = await protected_from_erasing(self.context, node, listed)
        devices = []
        for device in listed:
            reason = protection.reason(device.name)
            if reason is not None:
                log_protected("burnin_disk", device.name, reason)
            else:
                devices.append(device.name)
        if not devices:
            raise CleaningError("fio (disk): no disk to burn in")
        for name in devices:
            argv += ["--name", name]
        seconds = _seconds(runtime)
        progress = self._progress("burnin_disk", seconds or None)
        try:
            out, _ = await self._run(progress, "fio (disk)", argv, None, "fio (disk)")
            # fio reports on stdout
            self.log.info("Burn-in burnin_disk: fio passed on {devices}: {output}",
                          devices=devices, output=out.strip())
            if info.get("agent_burnin_fio_disk_smart_test", False):
                await self._smart_test(progress, devices)
        except Exception:
            progress.stop("failed")
            raise
        progress.stop("done")

    async def _smart_status(self, device: str) -> str | None:
        """The self-test status smartctl reports for ``device``; None when unreadable."""
        try:
            out, _ = await self.context.runner.execute("smartctl", "-ja", device)
            return str(json.loads(out)["ata_smart_data"]["self_test"]["status"]["string"])
        except (ProcessExecutionError, ValueError, KeyError, TypeError) as e:
            self.log.error("SMART test on {device} failed with {error}", device=device,
                           error=str(e))
            return None

    async def _smart_test(self, progress: BurnInProgress, devices: list[str]) -> None:
        failed = []
        for device in devices:
            argv = ["smartctl", "-t", "long", device]
            progress.running("SMART self-test", argv)
            self.log.info("SMART self test command: {argv}", argv=argv)
            try:
                await self.context.runner.execute(*argv)
            except ProcessExecutionError as e:
                self.log.error("Starting SMART test on {device} failed with: {error}",
                               device=device, error=str(e))
                failed.append(device)
        if failed:
            raise CleaningError("fio (disk) failed to start SMART self test on "
                                + ", ".join(failed))
        waiting = list(devices)

        async def finished() -> None:
            for device in list(waiting):
                status = await self._smart_status(device)
                if status is None:
                    waiting.remove(device)
                elif "in progress" in status:
                    self.log.debug("SMART test still running on {device}", device=device)
                elif "completed without error" in status:
                    self.log.info("{device} passed SMART test", device=device)
                    waiting.remove(device)
                else:
                    self.log.warn("{device} failed SMART test with: {status}",
                                  device=device, status=status)
                    failed.append(device)
                    waiting.remove(device)
            if waiting:
                raise _StillTesting(waiting)

        # No attempt limit: the tests end on their own (the reference waits as long).
        await retry(finished, self.context.clock, "SMART tests on {devices}",
                    backoff=fixed(self.smart_poll_interval), retry_on=_StillTesting,
                    fields=lambda e: {"devices": list(waiting)}, log=self.log,
                    level=LogLevel.info)
        if failed:
            raise CleaningError("fio (disk) SMART test failed for " + " ".join(failed))

    # -- network --------------------------------------------------------------------------------
    async def fio_network(self, node: Any) -> None:
        """fio's net engine between this node and the partner of
        ``agent_burnin_fio_network_config`` (``{"role": "writer"|"reader", "partner":
        host}``), ``agent_burnin_fio_network_runtime`` seconds (6 hours) each way: the writer
        listens and writes, the reader connects and reads, then the roles swap. The reader
        connects 30 s after its writer partner starts (the reference connects at once, which
        can pair it with only part of the writer's jobs), and again every 30 s while the
        writer is not listening.

        Dynamic pairing through a coordination backend
        (``agent_burnin_fio_network_pairing_backend_url``) is refused with CleaningError:
        this agent has no coordination client."""
        info = _driver_info(node)
        runtime = info.get("agent_burnin_fio_network_runtime", DEFAULT_NETWORK_RUNTIME)
        outputfile = info.get("agent_burnin_fio_network_outputfile")
        config = info.get("agent_burnin_fio_network_config")
        if not config:
            if info.get("agent_burnin_fio_network_pairing_backend_url"):
                raise CleaningError(
                    "fio (network): dynamic pairing through a coordination backend "
                    "(agent_burnin_fio_network_pairing_backend_url) is not supported by "
                    "this agent; give the node's driver_info agent_burnin_fio_network_config "
                    '{"role": "writer" or "reader", "partner": "<host>"} instead')
            raise CleaningError("fio (network): dynamic pairing config is missing "
                                "agent_burnin_fio_network_pairing_backend_url (or give "
                                "agent_burnin_fio_network_config)")
        if not isinstance(config, Mapping):
            raise CleaningError("fio (network): agent_burnin_fio_network_config must be an "
                                f"object with role and partner, not {config!r}")
        role, partner = config.get("role"), config.get("partner")
        if role not in NETWORK_ROLES:
            raise CleaningError(f"fio (network) found an unknown role: {role}")
        if not partner:
            raise CleaningError("fio (network) failed to find partner")
        self.log.info("fio (network): partner {partner}, role is {role}", partner=partner,
                      role=role)
        seconds = _seconds(runtime)
        progress = self._progress("burnin_network", 2 * seconds if seconds else None)
        try:
            for writer in (role == "writer", role != "writer"):
                this = "writer" if writer else "reader"
                if not writer:
                    # The partner's writer starts its 16 listening jobs one by one: a reader
                    # connecting meanwhile pairs with only some of them, fails (fewer than
                    # 16 refusals, not retried) and leaves the writer waiting for ever.
                    progress.running("fio (network) waiting for the partner's writer", [])
                    await deferLater(self.context.clock, self.reader_cycle)
                await self._fio_network(progress, writer, runtime, str(partner),
                                        f"{outputfile}.{this}" if outputfile else None)
                self.log.debug("fio (network): {role} direction done", role=this)
        except Exception:
            progress.stop("failed")
            raise
        progress.stop("done")

    async def _fio_network(self, progress: BurnInProgress, writer: bool, runtime: Any,
                           partner: str, outputfile: str | None) -> None:
        argv = ["fio", "--ioengine", "net", "--port", NETWORK_PORT, "--fill_device", "1",
                "--group_reporting", "--gtod_reduce", "1", "--numjobs", "16"]
        if writer:
            argv += ["--name", "writer", "--rw", "write", "--runtime", str(runtime),
                     "--time_based", "--listen"]
        else:
            argv += ["--name", "reader", "--rw", "read", "--hostname", partner]
        if outputfile:
            argv += ["--output-format", "json", "--output", outputfile]
        phase = "fio (network) " + ("writer" if writer else "reader")

        async def run() -> tuple[bytes, bytes]:
            progress.running(phase, argv)
            self.log.info("Burn-in fio network command: {argv}", argv=argv)
            return await self.context.runner.execute(*argv, timeout=None)

        def partner_not_ready(e: BaseException) -> bool:
            # The reader's connection is refused (or times out) until the writer listens.
            return (not writer and isinstance(e, ProcessExecutionError)
                    and e.exit_code == FIO_CONNECTION_FAILED)

        # No attempt limit, as the reference: the partner may start its step much later.
        with failures_as(CommandExecutionError, "fio (network) failed with error {error}"):
            out, _ = await retry(run, self.context.clock,
                                 "fio (network): reader connecting to {partner}",
                                 backoff=fixed(self.reader_cycle), retry_on=partner_not_ready,
                                 fields={"partner": partner}, log=self.log,
                                 level=LogLevel.info)
        self.log.info("Burn-in burnin_network: {phase} passed: {output}", phase=phase,
                      output=out.decode("utf-8", "replace").strip())

    # -- GPUs -----------------------------------------------------------------------------------
    async def gpu_burn(self, node: Any) -> None:
        """gpu-burn from ``agent_burnin_gpu_install_dir`` (/opt/gpu-burn): first, when
        ``agent_burnin_gpu_count`` is set, a check that it sees that many GPUs
        (CleaningError if not), then a burn of ``agent_burnin_gpu_memory`` (95%) of their
        memory for ``agent_burnin_gpu_timeout`` seconds (24 hours).

        CommandExecutionError when gpu-burn is not installed there or fails (no GPU)."""
        info = _driver_info(node)
        install_dir = str(info.get("agent_burnin_gpu_install_dir", "/opt/gpu-burn"))
        timeout = info.get("agent_burnin_gpu_timeout", DEFAULT_TIMEOUT)
        memory = info.get("agent_burnin_gpu_memory", "95%")
        count = int(info.get("agent_burnin_gpu_count", 0) or 0)
        program = os.path.join(install_dir, "gpu_burn")
        if not os.access(program, os.X_OK):
            raise CommandExecutionError(
                f"gpu-burn failed with error: {program} is not installed (the node's "
                "agent_burnin_gpu_install_dir names where gpu-burn was built)")
        seconds = _seconds(timeout)
        progress = self._progress("burnin_gpu", seconds)
        # gpu-burn loads its kernel (compare.ptx) from the working directory.
        in_dir = ["env", f"--chdir={install_dir}", "./gpu_burn"]
        try:
            if count > 0:
                out, _ = await self._run(progress, "gpu-burn (count)", [*in_dir, "-l"],
                                         self.context.config.command_timeout, "gpu-burn")
                found = sum(1 for line in out.splitlines() if line.startswith("ID"))
                if found != count:
                    raise CleaningError("gpu-burn failed to find the correct number of gpus. "
                                        f"{found} found but {count} expected.")
            else:
                self.log.debug("Burn-in gpu skipping expected number of GPUs check as "
                               "'agent_burnin_gpu_count' set to 0")
            out, _ = await self._run(progress, "gpu-burn", [*in_dir, "-m", str(memory),
                                                            str(timeout)],
                                     None if seconds is None else seconds + GRACE, "gpu-burn")
        except Exception:
            progress.stop("failed")
            raise
        progress.stop("done")
        self.log.info("Burn-in burnin_gpu: gpu-burn passed: {output}", output=out.strip())


class _StillTesting(Exception):
    """SMART self-tests still running on some disks."""


def _driver_info(node: Any) -> Mapping[str, Any]:
    info = node.get("driver_info") if isinstance(node, Mapping) else None
    return info if isinstance(info, Mapping) else {}
