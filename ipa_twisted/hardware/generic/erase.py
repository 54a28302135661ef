# Over 500 lines: one class, DiskEraser, whose three steps share its ATA, NVMe and shred paths.
"""Erasing disks: ATA secure erase, NVMe format, shred; every disk at once.

``DiskEraser`` gives the generic hardware manager the ``erase_devices`` clean step (priority
10), ``erase_block_device`` (the per-disk method other managers may take over) and
``erase_devices_express`` (priority 0: a hardware erase where it is quick, else the metadata
erase). How to erase follows the node, as Ironic sends it in ``driver_internal_info`` (a value
in ``driver_info`` is used when Ironic sends none):

- ``agent_erase_devices_iterations`` (1): random passes of ``shred``;
- ``agent_erase_devices_zeroize`` (True): a final pass of zeros;
- ``agent_enable_ata_secure_erase`` / ``agent_enable_nvme_secure_erase`` (True);
- ``agent_continue_if_secure_erase_failed`` (else the older
  ``agent_continue_if_ata_erase_failed``; False): shred when a supported secure erase fails;
- ``agent_erase_skip_read_only`` (False): skip read-only disks instead of failing;
- ``disk_erasure_concurrency``: disks erased at once (default: the agent's
  ``disk_erasure_concurrency`` option, 0 meaning all of them).

A disk that supports neither hardware erase is shredded; one whose supported erase fails stops
the step unless shredding instead is allowed. Erasure is slow: ``EraseProgress`` shows on the
running command what each disk is doing and how far it got (``erase_progress``); what a drive
supports comes from ``ipa_twisted.blockdev.drives``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import DeferredSemaphore
from twisted.logger import Logger

from ipa_twisted.blockdev.drives import AtaSecurity, parse_ata_security, parse_nvme_id_ctrl
from ipa_twisted.blockdev.md import is_raid_member
from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import BlockDeviceEraseError
from ipa_twisted.hardware.generic.disk_source import DiskSource
from ipa_twisted.hardware.generic.erase_progress import DiskErase, EraseProgress
from ipa_twisted.hardware.generic.protection import (Protection, guard_special_filesystems,
                                                     log_protected, protected_from_erasing)
from ipa_twisted.hardware.inventory import BlockDevice
from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError, failures_as

log = Logger()

PROBE_TIMEOUT = 60.0
"""Longest wait for hdparm -I, smartctl, nvme id-ctrl and lsblk."""
SECURITY_COMMAND_TIMEOUT = 60.0
"""Longest wait for an ATA password command (set, unlock, disable)."""
NVME_FORMAT_TIMEOUT = 6 * 3600.0
"""Longest wait for ``nvme format`` (a user-data erase may overwrite the whole drive)."""
# -- what the node asks for ----------------------------------------------------------------

@dataclass(frozen=True)
class EraseSettings:
    """How to erase, from the node (see the module docstring for the keys)."""

    iterations: int = 1
    zeroize: bool = True
    enable_ata_secure_erase: bool = True
    enable_nvme_secure_erase: bool = True
    continue_if_secure_erase_failed: bool = False
    skip_read_only: bool = False
    concurrency: int = 0
    """Disks erased at once; 0 means all of them."""

    @classmethod
    def from_node(cls, node: Mapping[str, Any] | None,
                  default_concurrency: int = 0) -> EraseSettings:
        node = node or {}
        sources = [node.get("driver_internal_info") or {}, node.get("driver_info") or {}]

        def value(*keys: str) -> Any:
            for source in sources:
                for key in keys:
                    if isinstance(source, Mapping) and source.get(key) is not None:
                        return source[key]
            return None

        def flag(default: bool, *keys: str) -> bool:
            found = value(*keys)
            return default if found is None else _bool(found)

        iterations = value("agent_erase_devices_iterations")
        concurrency = value("disk_erasure_concurrency")
        return cls(
            iterations=max(0, int(iterations)) if iterations is not None else 1,
            zeroize=flag(True, "agent_erase_devices_zeroize"),
            enable_ata_secure_erase=flag(True, "agent_enable_ata_secure_erase"),
            enable_nvme_secure_erase=flag(True, "agent_enable_nvme_secure_erase",
                                          "agent_enable_nvme_erase"),
            continue_if_secure_erase_failed=flag(False, "agent_continue_if_secure_erase_failed",
                                                 "agent_continue_if_ata_erase_failed"),
            skip_read_only=flag(False, "agent_erase_skip_read_only"),
            concurrency=max(0, int(concurrency if concurrency is not None
                                   else default_concurrency or 0)),
        )


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


# -- shred -----------------------------------------------------------------------------------

def shred_argv(device: str, iterations: int, zeroize: bool) -> list[str]:
    """``shred --force [--zero] --verbose --iterations N DEVICE``."""
    argv = ["shred", "--force"]
    if zeroize:
        argv.append("--zero")
    return [*argv, "--verbose", "--iterations", str(iterations), device]


# -- the steps -----------------------------------------------------------------------------

Dispatcher = Callable[..., Awaitable[Any]]
"""``dispatch(method, *args)``: call a hardware-manager method on the best manager."""


class DiskEraser:
    """The disk erase steps of the generic hardware manager, given its context and its
    disk listing.

    ``erase_devices`` asks every disk's erase through ``context.dispatch`` when the
    context has one (so another manager's ``erase_block_device`` may take a disk over),
    else through its own; ``erase_devices_express`` ends with ``erase_metadata`` (the
    manager's ``erase_devices_metadata``).
    """

    log = Logger()
    _erase_progress: EraseProgress | None = None

    def __init__(self, context: HardwareContext, source: DiskSource,
                 erase_metadata: Callable[[Any, Any], Awaitable[None]]) -> None:
        self.context = context
        self.source = source
        self._erase_metadata = erase_metadata

    # -- the steps -------------------------------------------------------------------------
    async def erase_devices(self, node: Any, ports: Any) -> dict[str, Any]:
        """Erase every disk, concurrently: ``{device: what was done}``.

        Disks the node's ``skip_block_devices`` protects are left alone (and logged, each
        with the entry that protects it). If another disk holds a shared cluster filesystem
        nothing is erased: ProtectedDeviceError (``guard_special_filesystems``). Each
        other disk goes through ``erase_block_device`` (dispatched to the managers). Every
        disk is tried; then a failure is raised: the disk's own error when one failed,
        BlockDeviceEraseError naming them all when several did.
        """
        settings = self._erase_settings(node)
        listed, protection, devices = await self._disks_to_erase(node, "erase_devices")
        progress = EraseProgress(self.context.clock, self.context.config.sys_path)
        results: dict[str, Any] = {}
        for device in listed:
            disk = progress.add(device.name, device.size)
            reason = protection.reason(device.name)
            if reason is not None:
                disk.use("skipped")
                disk.finish("skipped", f"protected: {reason}")
                results[device.name] = f"skipped: protected by skip_block_devices: {reason}"
        self._erase_progress = progress
        self.context.report_progress(progress)
        progress.start()
        limit = settings.concurrency or max(1, len(devices))
        self.log.info("Erasing {count} disk(s), {limit} at a time: {devices}",
                      count=len(devices), limit=limit,
                      devices=", ".join(d.name for d in devices))
        semaphore = DeferredSemaphore(limit)
        dispatch: Dispatcher | None = self.context.dispatch

        async def erase(device: BlockDevice) -> Any:
            disk = progress.disks[device.name]
            disk.start()
            self.log.info("Erasing {device}", device=device.name)
            try:
                if dispatch is not None:
                    result = await dispatch("erase_block_device", node, device)
                else:
                    result = await self.erase_block_device(node, device)
            except Exception as e:
                disk.finish("failed", str(e))
                self.log.error("Erasing {device} failed: {error}", device=device.name,
                               error=str(e))
                raise
            disk.finish("skipped" if disk.method == "skipped" else "done")
            self.log.info("Erased {device} ({method}) in {elapsed:.1f} s",
                          device=device.name, method=disk.method or "by another manager",
                          elapsed=disk.elapsed or 0.0)
            return result

        jobs = [semaphore.run(erase, device) for device in devices]
        failures: dict[str, Exception] = {}
        for device, job in zip(devices, jobs):
            try:
                results[device.name] = await job
            except Exception as e:
                failures[device.name] = e
        progress.stop("failed" if failures else "done")
        self._erase_progress = None
        if len(failures) == 1:
            raise next(iter(failures.values()))
        if failures:
            raise BlockDeviceEraseError("Erasing failed on the device(s): " + "; ".join(
                f'"{name}": {error}' for name, error in sorted(failures.items())))
        return results

    async def erase_block_device(self, node: Any, block_device: BlockDevice) -> str:
        """Erase one disk the best way it supports; what was done, as text.

        Devices the node's ``skip_block_devices`` protects, virtual media and software RAID
        members are left alone; a read-only disk is left alone if the node allows it, else
        fails. NVMe: ``nvme format`` (crypto erase when
        supported, else user data erase). Others: ATA (enhanced) secure erase when the drive
        supports it. Otherwise, or when a secure erase failed and the node allows shredding
        instead: ``shred``. BlockDeviceEraseError on failure.
        """
        settings = self._erase_settings(node)
        name = block_device.name
        disk = self._progress_for(block_device)
        protected = (await protected_from_erasing(self.context, node, [block_device])).reason(name)
        if protected is not None:
            log_protected("erase_block_device", name, protected)
            disk.use("skipped")
            return f"skipped: protected by skip_block_devices: {protected}"
        skip = await self._erase_skip_reason(block_device, settings)
        if skip is not None:
            self.log.info("Not erasing {device}: {reason}", device=name, reason=skip)
            disk.use("skipped")
            return f"skipped: {skip}"
        try:
            if _is_nvme(name):
                if settings.enable_nvme_secure_erase:
                    done = await self._nvme_erase(block_device, disk)
                    if done is not None:
                        return done
            elif settings.enable_ata_secure_erase:
                done = await self._ata_erase(block_device, disk)
                if done is not None:
                    return done
        except BlockDeviceEraseError as e:
            if not settings.continue_if_secure_erase_failed:
                raise BlockDeviceEraseError(
                    f"Secure erase of {name} failed, and shredding instead is not enabled "
                    f"(agent_continue_if_secure_erase_failed): {e.details}") from e
            self.log.warn("Secure erase of {device} failed, shredding it instead: {error}",
                          device=name, error=e.details)
        return await self._shred(block_device, settings, disk)

    async def erase_devices_express(self, node: Any, ports: Any) -> dict[str, str]:
        """Quick erase: hardware erase where it is quick, then the metadata erase of all.

        Protected disks and shared cluster filesystems as for ``erase_devices``.

        NVMe drives are formatted (crypto or user data erase) and non-rotational ATA drives
        secure-erased when they support it (a failure there is logged, not fatal); then
        ``erase_devices_metadata`` runs on every disk. ``{device: what was done}``.
        """
        settings = self._erase_settings(node)
        listed, protection, devices = await self._disks_to_erase(node,
                                                                 "erase_devices_express")
        progress = EraseProgress(self.context.clock, self.context.config.sys_path)
        self._erase_progress = progress
        self.context.report_progress(progress)
        semaphore = DeferredSemaphore(settings.concurrency or max(1, len(devices)))
        skipped: dict[str, str] = {}
        for device in listed:
            reason = protection.reason(device.name)
            if reason is not None:
                disk = progress.add(device.name, device.size)
                disk.use("skipped")
                disk.finish("skipped", f"protected: {reason}")
                skipped[device.name] = f"skipped: protected by skip_block_devices: {reason}"

        async def fast_erase(device: BlockDevice) -> str:
            disk = progress.add(device.name, device.size)
            disk.start()
            skip = await self._erase_skip_reason(device, settings)
            try:
                done = None
                if skip is not None:
                    disk.use("skipped")
                    done = f"skipped: {skip}"
                elif _is_nvme(device.name) and settings.enable_nvme_secure_erase:
                    done = await self._nvme_erase(device, disk)
                elif (not _is_nvme(device.name) and not device.rotational
                      and settings.enable_ata_secure_erase):
                    done = await self._ata_erase(device, disk)
            except BlockDeviceEraseError as e:
                self.log.warn("Hardware erase of {device} failed; its metadata will be "
                              "erased: {error}", device=device.name, error=e.details)
                done = None
            disk.finish("done" if done is not None else "waiting")
            return done or "metadata erased"

        jobs = [semaphore.run(fast_erase, device) for device in devices]
        results = {device.name: await job for device, job in zip(devices, jobs)}
        results.update(skipped)
        progress.phase = "erasing metadata"
        try:
            await self._erase_metadata(node, ports)
        finally:
            progress.stop("done")
            self._erase_progress = None
        return results

    # -- methods -------------------------------------------------------------------------
    async def _ata_erase(self, device: BlockDevice, disk: DiskErase) -> str | None:
        """ATA (enhanced) secure erase; None when the drive cannot do it.

        The password dance: a drive left locked or with a password by an interrupted erase
        is unlocked first (the password is "NULL", then empty); a drive without one gets
        the user password "NULL" (security enabled); the erase clears it again. A failed
        erase unlocks and disables security, so the drive stays usable for ``shred``.
        """
        name = device.name
        security = await self._ata_security(name)
        if security is None or not security.supported:
            self.log.info("{device} does not support ATA secure erase", device=name)
            return None
        if not await self._smartctl_allows_security(name):
            return None
        if security.frozen:
            raise BlockDeviceEraseError(f"Block device {name} is frozen and cannot be erased "
                                        f"(ATA security state {security.state})")
        if security.locked:
            security = await self._ata_unlock(name) or security
            if security.locked:
                raise BlockDeviceEraseError(
                    f"Block device {name} already has a security password set")
        if not security.enabled:
            with failures_as(BlockDeviceEraseError,
                             f"Security password set failed for device {name}"):
                await self._hdparm("--user-master", "u", "--security-set-pass", "NULL", name)
        enhanced = security.enhanced_erase_supported
        option = "--security-erase-enhanced" if enhanced else "--security-erase"
        minutes = security.enhanced_erase_minutes if enhanced else security.erase_minutes
        method = "ata_enhanced_secure_erase" if enhanced else "ata_secure_erase"
        disk.use(method, expected_seconds=minutes * 60.0 if minutes else None)
        self.log.info("ATA {kind} secure erase of {device} (estimated {minutes} min)",
                      kind="enhanced" if enhanced else "normal", device=name, minutes=minutes)
        try:
            await self.context.runner.execute("hdparm", "--user-master", "u", option, "NULL",
                                              name, timeout=None)
        except ProcessExecutionError as e:
            await self._ata_unlock(name, disable=True)
            raise BlockDeviceEraseError(f"Erase failed for device {name}: {e}") from e
        after = await self._ata_security(name)
        if after is None or after.enabled:
            raise BlockDeviceEraseError(f"An unknown error occurred erasing block device "
                                        f"{name}: security is still enabled after the erase")
        return f"ATA {'enhanced ' if enhanced else ''}secure erase"

    async def _ata_security(self, device: str) -> AtaSecurity | None:
        try:
            out, _ = await self.context.runner.execute("hdparm", "-I", device,
                                                       timeout=PROBE_TIMEOUT)
        except CommandNotFoundError:
            self.log.info("hdparm is not installed: no ATA secure erase")
            return None
        except ProcessExecutionError as e:   # not an ATA drive (virtio, SCSI ...)
            self.log.debug("hdparm -I {device} failed: {error}", device=device, error=str(e))
            return None
        return parse_ata_security(out.decode("utf-8", "replace"))

    async def _smartctl_allows_security(self, device: str) -> bool:
        """False when smartctl says ATA security commands cannot reach the drive."""
        try:
            out, _ = await self.context.runner.execute(
                "smartctl", "-d", "ata", device, "-g", "security", timeout=PROBE_TIMEOUT,
                check_exit_code=[0, 127])
        except CommandNotFoundError:
            return True
        except ProcessExecutionError as e:
            self.log.warn("Not using ATA secure erase on {device}: direct ATA commands "
                          "through smartctl fail: {error}", device=device, error=str(e))
            return False
        if b"Unavailable" in out:
            self.log.info("smartctl reports ATA security unavailable on {device}",
                          device=device)
            return False
        return True

    async def _hdparm(self, *args: str) -> None:
        await self.context.runner.execute("hdparm", *args, timeout=SECURITY_COMMAND_TIMEOUT)

    async def _ata_unlock(self, device: str, disable: bool = False) -> AtaSecurity | None:
        """Unlock (and with ``disable``, clear the password of) a drive left by an erase."""
        security = await self._ata_security(device)
        for password in ("NULL", ""):
            if security is None or (not security.locked
                                    and not (disable and security.enabled)):
                break
            actions = (["--security-unlock"] if security.locked else []) + \
                (["--security-disable"] if disable else [])
            for action in actions:
                try:
                    await self._hdparm("--user-master", "u", action, password, device)
                except ProcessExecutionError as e:
                    self.log.info("{action} with password {password!r} failed on {device}: "
                                  "{error}", action=action, password=password, device=device,
                                  error=str(e))
            security = await self._ata_security(device)
        return security

    async def _nvme_erase(self, device: BlockDevice, disk: DiskErase) -> str | None:
        """``nvme format`` with a secure erase; None when the drive cannot format."""
        name = device.name
        try:
            out, _ = await self.context.runner.execute("nvme", "id-ctrl", name, "-o", "json",
                                                       timeout=PROBE_TIMEOUT)
            capabilities = parse_nvme_id_ctrl(out)
        except CommandNotFoundError:
            self.log.warn("nvme-cli is not installed: no NVMe secure erase for {device}",
                          device=name)
            return None
        except (ProcessExecutionError, ValueError) as e:
            raise BlockDeviceEraseError(
                f"Failed to fetch NVMe capabilities for device {name}: {e}") from e
        mode = capabilities.format_mode
        if mode is None:
            self.log.info("{device} does not support the NVMe Format command", device=name)
            return None
        kind = "crypto erase" if mode == 2 else "user data erase"
        disk.use("nvme_format_crypto_erase" if mode == 2 else "nvme_format_user_data_erase")
        self.log.info("Formatting {device} with NVMe secure erase (ses={mode}, {kind})",
                      device=name, mode=mode, kind=kind)
        with failures_as(BlockDeviceEraseError, f"Failed to nvme format device {name}"):
            await self.context.runner.execute("nvme", "format", name, "--ses", str(mode),
                                              "--force", timeout=NVME_FORMAT_TIMEOUT)
        return f"nvme format --ses {mode} ({kind})"

    async def _shred(self, device: BlockDevice, settings: EraseSettings,
                     disk: DiskErase) -> str:
        passes = settings.iterations + (1 if settings.zeroize else 0)
        disk.use("shred", bytes_to_write=device.size * passes)
        argv = shred_argv(device.name, settings.iterations, settings.zeroize)
        self.log.info("Shredding {device}: {iterations} random pass(es){zeros}",
                      device=device.name, iterations=settings.iterations,
                      zeros=" and zeros" if settings.zeroize else "")
        with failures_as(BlockDeviceEraseError,
                         f"Erasing block device {device.name} with shred failed"):
            await self.context.runner.execute(*argv, timeout=None)
        return (f"shred: {settings.iterations} random pass(es)"
                + (" and a pass of zeros" if settings.zeroize else ""))

    # -- helpers ---------------------------------------------------------------------------
    async def _disks_to_erase(self, node: Any, step: str
                              ) -> tuple[list[BlockDevice], Protection, list[BlockDevice]]:
        """Every disk, what the node protects, and the disks ``step`` may erase (logged);
        ProtectedDeviceError if one of those holds a shared cluster filesystem."""
        listed = await self.source.list_block_devices()
        protection = await protected_from_erasing(self.context, node, listed)
        devices = [d for d in listed if protection.reason(d.name) is None]
        for name, why in protection.devices.items():
            log_protected(step, name, why)
        await guard_special_filesystems(self.context, [d.name for d in devices])
        return listed, protection, devices

    def _erase_settings(self, node: Any) -> EraseSettings:
        default = getattr(self.context.config, "disk_erasure_concurrency", 0)
        return EraseSettings.from_node(node if isinstance(node, Mapping) else None,
                                       default_concurrency=int(default or 0))

    def _progress_for(self, device: BlockDevice) -> DiskErase:
        progress = self._erase_progress
        if progress is not None and device.name in progress.disks:
            return progress.disks[device.name]
        disk = DiskErase(device.name, device.size, self.context.clock,
                         self.context.config.sys_path)   # a lone call: nobody shows it
        disk.start()
        return disk

    async def _erase_skip_reason(self, device: BlockDevice,
                                 settings: EraseSettings) -> str | None:
        """Why ``device`` is left alone (None: erase it); BlockDeviceEraseError if it
        is read-only and the node does not allow skipping it."""
        name = os.path.basename(device.name)
        if self.source.is_virtual_media(device):
            return "it is the virtual media device"
        if await is_raid_member(self.context, device.name):
            return "it is a software RAID member (its RAID device is erased instead)"
        if self.source.is_read_only(name):
            if settings.skip_read_only:
                return "it is read-only"
            raise BlockDeviceEraseError(
                f"Failed to invoke erase of device {device.name} as the device is flagged "
                "read-only, and the conductor has not signaled this is a permitted case "
                "(agent_erase_skip_read_only).")
        return None



def _is_nvme(device: str) -> bool:
    return os.path.basename(device).startswith("nvme")


def erase_clean_steps() -> list[dict[str, Any]]:
    """The erase clean steps the generic manager advertises (the reference's priorities).

    ``erase_devices_metadata`` (99) is the generic manager's own and stays in its list.
    """
    return [
        {"step": "erase_devices", "priority": 10, "interface": "deploy",
         "reboot_requested": False, "abortable": True},
        {"step": "erase_devices_express", "priority": 0, "interface": "deploy",
         "reboot_requested": False, "abortable": True},
    ]
