# Over 500 lines: the step lists (clean, deploy, service), each step a thin delegation.
"""The generic hardware manager: its step lists, the install device, the metadata erase
and full sync, and delegation of the rest to its collaborators, each given the context:
``inventory`` (CPU, memory, network, BMC, system), ``disk_listing`` (lsblk, udev, sysfs:
what the install device, erasing and software RAID share), ``erase`` (disk erase steps),
``raid`` (software RAID), ``burnin`` (the burn-in steps), ``ipa_twisted.deploy``
(write_image, inject_files, execute_bootc_install).

Every path is under the configured roots (``sys_path``, ``proc_path``, ``dev_path``) and
every program runs through the context's runner, so tests use fake trees and recorded
outputs. Reading small /sys and /proc files happens synchronously; programs run
concurrently where they do not depend on each other. This module is imported by the
plugin dropin, so heavy imports (pyudev) wait until they are needed.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

from ipa_twisted.context import Deployment, HardwareContext
from ipa_twisted.errors import BlockDeviceEraseError, CommandExecutionError, DeviceNotFound
from ipa_twisted.hardware.generic.disk_listing import DiskListing, Listed, UdevLookup
from ipa_twisted.hardware.generic.inventory import InterfaceListing, LldpReader
from ipa_twisted.hardware.interface import HardwareManager, HardwareSupport
from ipa_twisted.hardware.inventory import (CPU, BlockDevice, BootInfo, Memory,
                                            NetworkInterface, SystemVendorInfo)
from ipa_twisted.process import ProcessExecutionError
from ipa_twisted.retry import GaveUp, fixed, retry

if TYPE_CHECKING:  # built on first use (below): an agent waiting for Ironic never loads them
    from ipa_twisted.hardware.generic.burnin import BurnIn
    from ipa_twisted.hardware.generic.erase import DiskEraser
    from ipa_twisted.hardware.generic.machine import MachineDetails
    from ipa_twisted.hardware.generic.raid import SoftwareRaid

log = Logger()
_Made = TypeVar("_Made")


EXECUTE_BOOTC_INSTALL_STEP: dict[str, Any] = {
    "step": "execute_bootc_install", "priority": 0, "interface": "deploy",
    "reboot_requested": False}
"""Called by Ironic's bootc deploy interface with ``image_source``, ``configdrive`` and
``oci_pull_secret`` (no ``argsinfo``, as in the reference)."""


class GenericHardwareManager(HardwareManager):
    """Inventory and (later) steps for any Linux machine; the fallback for every method."""

    HARDWARE_MANAGER_NAME = "generic_hardware_manager"
    HARDWARE_MANAGER_VERSION = "1.2"   # the reference's, since its service steps

    log = Logger()

    def __init__(self, udev: UdevLookup | None = None,
                 wipe: Callable[[str, Any], Awaitable[object]] | None = None,
                 writer: Callable[[Mapping[str, Any], str], Awaitable[object]] | None = None,
                 lldp: LldpReader | None = None,
                 containers_conf_dir: str | None = None) -> None:
        """For tests: ``udev`` replaces the pyudev lookup of block device properties,
        ``wipe`` the zeroing of a device's first and last MiB, ``writer`` the image
        pipeline (``writer(image_info, device)``), ``lldp`` the capture of LLDP frames,
        ``containers_conf_dir`` podman's drop-in directory (``execute_bootc_install``)."""
        self._containers_conf_dir = containers_conf_dir
        self._udev = udev
        self._wipe = wipe
        self._writer = writer
        self._lldp = lldp
        self._node: Any = None

    def evaluate_hardware_support(self) -> int:
        return HardwareSupport.GENERIC

    def bind(self, context: HardwareContext) -> None:
        """Bind the manager and its collaborators (interface and disk listings, the other
        inventory getters, erase, software RAID, burn-in) to ``context``; all but the
        listings are made when first used, so that their modules load only when needed
        (the agent's idle memory)."""
        super().bind(context)
        self._interfaces = InterfaceListing(context, lldp=self._lldp)
        self._disks = DiskListing(context, udev=self._udev)
        self._made: dict[str, Any] = {}

    def _collaborator(self, name: str, make: Callable[[], _Made]) -> _Made:
        """The collaborator ``name`` for the bound context, made by ``make`` the first time."""
        if name not in self._made:
            self._made[name] = make()
        return cast(_Made, self._made[name])

    @property
    def _machine(self) -> MachineDetails:
        from ipa_twisted.hardware.generic.machine import MachineDetails
        return self._collaborator("machine", lambda: MachineDetails(self.context))

    @property
    def _eraser(self) -> DiskEraser:
        from ipa_twisted.hardware.generic.erase import DiskEraser
        return self._collaborator("erase", lambda: DiskEraser(
            self.context, self, erase_metadata=self.erase_devices_metadata))

    @property
    def _software_raid(self) -> SoftwareRaid:
        from ipa_twisted.hardware.generic.raid import SoftwareRaid
        return self._collaborator("raid", lambda: SoftwareRaid(self.context, self,
                                                               wipe=self._wipe))

    @property
    def _burnin(self) -> BurnIn:
        from ipa_twisted.hardware.generic.burnin import BurnIn
        return self._collaborator("burnin", lambda: BurnIn(self.context, self))

    # -- inventory (ipa_twisted.hardware.generic.inventory and .machine) ---------------------
    async def get_cpus(self) -> CPU:
        """The CPU (``MachineDetails.get_cpus``)."""
        return await self._machine.get_cpus()

    async def get_memory(self) -> Memory:
        """The memory (``MachineDetails.get_memory``)."""
        return await self._machine.get_memory()

    async def list_network_interfaces(self) -> list[NetworkInterface]:
        """The network interfaces (``InterfaceListing.list_network_interfaces``)."""
        return await self._interfaces.list_network_interfaces()

    async def get_bmc_address(self) -> str | None:
        """The BMC's IPv4 address (``MachineDetails.get_bmc_address``)."""
        return await self._machine.get_bmc_address()

    async def get_bmc_mac(self) -> str | None:
        """The BMC's MAC address (``MachineDetails.get_bmc_mac``)."""
        return await self._machine.get_bmc_mac()

    async def get_bmc_v6address(self) -> str | None:
        """The BMC's IPv6 address (``MachineDetails.get_bmc_v6address``)."""
        return await self._machine.get_bmc_v6address()

    async def get_system_vendor_info(self) -> SystemVendorInfo:
        """Product, serial, manufacturer, firmware (``MachineDetails``)."""
        return await self._machine.get_system_vendor_info()

    def get_boot_info(self) -> BootInfo:
        """The boot mode and PXE MAC (``MachineDetails.get_boot_info``)."""
        return self._machine.get_boot_info()

    # -- erasing (ipa_twisted.hardware.generic.erase) ----------------------------------------
    async def erase_devices(self, node: Any, ports: Any) -> dict[str, Any]:
        """The ``erase_devices`` clean step (``DiskEraser.erase_devices``)."""
        return await self._eraser.erase_devices(node, ports)

    async def erase_block_device(self, node: Any, block_device: BlockDevice) -> str:
        """Erase one disk (``DiskEraser.erase_block_device``)."""
        return await self._eraser.erase_block_device(node, block_device)

    async def erase_devices_express(self, node: Any, ports: Any) -> dict[str, str]:
        """The ``erase_devices_express`` clean step (``DiskEraser.erase_devices_express``)."""
        return await self._eraser.erase_devices_express(node, ports)

    # -- firmware records (ipa_twisted.hardware.generic.pstore, .uefi_nvram) ----------------
    async def erase_pstore(self, node: Any, ports: Any) -> None:
        """The ``erase_pstore`` clean step (``pstore.erase_pstore``)."""
        from ipa_twisted.hardware.generic import pstore
        await pstore.erase_pstore(self.context)

    async def clean_uefi_nvram(self, node: Any, ports: Any,
                               match_patterns: Any = None) -> None:
        """The ``clean_uefi_nvram`` clean and deploy step (``uefi_nvram``)."""
        from ipa_twisted.hardware.generic import uefi_nvram
        await uefi_nvram.clean_uefi_nvram(self.context, match_patterns)

    # -- software RAID (ipa_twisted.hardware.generic.raid) -----------------------------------
    async def validate_configuration(self, raid_config: Any, node: Any) -> None:
        """Check a RAID configuration (``SoftwareRaid.validate_configuration``)."""
        await self._software_raid.validate_configuration(raid_config, node)

    async def create_configuration(self, node: Any, ports: Any) -> dict[str, Any]:
        """The ``raid.create_configuration`` clean step."""
        return await self._software_raid.create_configuration(node, ports)

    async def apply_configuration(self, node: Any, ports: Any, raid_config: Any,
                                  delete_existing: bool = True) -> dict[str, Any]:
        """The ``raid.apply_configuration`` deploy step."""
        return await self._software_raid.apply_configuration(node, ports, raid_config,
                                                             delete_existing)

    async def delete_configuration(self, node: Any, ports: Any) -> None:
        """The ``raid.delete_configuration`` clean step."""
        await self._software_raid.delete_configuration(node, ports)

    async def get_holder_disks(self, raid_device: str) -> list[str]:
        """The disks holding the md device ``raid_device``."""
        return await self._software_raid.get_holder_disks(raid_device)

    async def software_raid_install_device(self, node: Any) -> str | None:
        """The md device to install on, when the node's RAID config asks for one."""
        return await self._software_raid.software_raid_install_device(node)

    # -- burn-in (ipa_twisted.hardware.generic.burnin) ---------------------------------------
    async def burnin_cpu(self, node: Any, ports: Any) -> None:
        """The ``burnin_cpu`` step: stress-ng's cpu stressor (``BurnIn.stress_ng``)."""
        await self._burnin.stress_ng(node, "cpu")

    async def burnin_memory(self, node: Any, ports: Any) -> None:
        """The ``burnin_memory`` step: stress-ng's vm stressor (``BurnIn.stress_ng``)."""
        await self._burnin.stress_ng(node, "vm")

    async def burnin_disk(self, node: Any, ports: Any) -> None:
        """The ``burnin_disk`` step: fio on every disk (``BurnIn.fio_disk``)."""
        await self._burnin.fio_disk(node)

    async def burnin_network(self, node: Any, ports: Any) -> None:
        """The ``burnin_network`` step: fio's net engine with a partner (``fio_network``)."""
        await self._burnin.fio_network(node)

    async def burnin_gpu(self, node: Any, ports: Any) -> None:
        """The ``burnin_gpu`` step: gpu-burn (``BurnIn.gpu_burn``)."""
        await self._burnin.gpu_burn(node)

    def _proc(self, *parts: str) -> str:
        return os.path.join(self.context.config.proc_path, *parts)

    # -- disks -----------------------------------------------------------------------------
    async def list_block_devices(self, include_partitions: bool = False
                                 ) -> list[BlockDevice]:
        """Disks (and partitions if asked): ``DiskListing.list_block_devices``."""
        return await self._disks.list_block_devices(include_partitions)

    def is_read_only(self, name: str) -> bool:
        """Whether the kernel flags ``name`` read-only (``DiskListing.is_read_only``)."""
        return self._disks.is_read_only(name)

    def is_virtual_media(self, device: BlockDevice) -> bool:
        """Whether ``device`` is the BMC's virtual media (``DiskListing``)."""
        return self._disks.is_virtual_media(device)

    async def wait_for_disks(self) -> None:
        """Wait until at least one disk is listed, ``disk_wait_attempts`` times at most.

        Returns (logging a warning) when none appears: inspection and lookup go on.
        """
        config = self.context.config
        attempts = max(1, config.disk_wait_attempts)

        async def listed() -> None:
            if not await self.list_block_devices():
                raise _NoDiskYet("no disk listed yet")

        try:
            await retry(listed, self.context.clock, "Waiting for a disk",
                        backoff=fixed(config.disk_wait_delay), attempts=attempts,
                        log=self.log, level=LogLevel.info)
        except GaveUp:
            self.log.warn("No disk appeared after {attempts} attempts", attempts=attempts)

    # -- the install device ----------------------------------------------------------------
    def cache_node(self, node: Any) -> None:
        """Remember the Ironic node whose root device hints choose the install device."""
        self._node = node

    async def get_os_install_device(self, permit_refresh: bool = False, *,
                                    node: Any = None) -> str:
        """The path of the disk the instance goes on (``/dev/sda``).

        With root device hints (``node``'s, else the cached node's) the first disk they
        match, else the smallest disk of at least 4 GiB. Read-only disks and those the
        node's ``skip_block_devices`` protects (by device hints, or as members of a RAID
        volume it names) are never chosen; neither are those ``list_block_devices`` leaves
        out (ROMs, floppies, RAM disks, empty and, unless configured, loop devices).
        DeviceNotFound when no disk fits or ``skip_block_devices`` is invalid.

        ``permit_refresh`` is accepted for compatibility: the disks are listed afresh on
        every call, and refreshing the node from Ironic is the caller's business.
        """
        from ipa_twisted.hardware import root_device
        from ipa_twisted.hardware.generic.protection import protected_devices

        node = node if node is not None else self._node
        dev_path = self.context.config.dev_path
        listed = [listed.device for listed in await self._disks.list_devices(False)]
        try:
            protection = await protected_devices(self.context, node, listed)
        except root_device.RootDeviceHintError as e:
            raise DeviceNotFound(f"No install device was chosen: the node's "
                                 f"skip_block_devices is invalid: {e}") from e
        if not root_device.root_device_hints_from_node(node):
            raid_device = await self.software_raid_install_device(node)
            if raid_device is not None:
                protected = protection.reason(raid_device)
                if protected is not None:
                    raise DeviceNotFound(
                        f"The software RAID device {raid_device} of the node's RAID "
                        f"configuration is protected by skip_block_devices ({protected}): "
                        "not installing on it")
                self.log.info("Install device: {device} (software RAID)", device=raid_device)
                return raid_device
        candidates = []
        for device in listed:
            protected = protection.reason(device.name)
            if protected is not None:
                self.log.info("Not installing on {device}, protected by skip_block_devices: "
                              "{reason}", device=device.name, reason=protected)
            elif not self.is_read_only(os.path.basename(device.name)):
                candidates.append(device)
        hints = root_device.root_device_hints_from_node(node)
        try:
            if not hints:
                device = root_device.guess_root_disk(candidates)
            else:
                found = root_device.match_root_device_hints(candidates, hints,
                                                            dev_path=dev_path)
                if found is None:
                    hidden = root_device.find_devices_by_hints(
                        [d for d in listed if protection.reason(d.name) is not None], hints,
                        dev_path=dev_path)
                    names = [str(getattr(d, "name", "")) for d in hidden]
                    why = "".join(f"; {name} matches them but is protected by "
                                  f"skip_block_devices ({protection.reason(name)})"
                                  for name in names)
                    raise DeviceNotFound("No suitable device was found for deployment "
                                         f"using these hints {hints}{why}")
                assert isinstance(found, BlockDevice)
                device = found
        except root_device.RootDeviceHintError as e:
            raise DeviceNotFound(
                f"No devices could be found using the root device hints {hints} because "
                f"they failed to validate. Error: {e}") from e
        self.log.info("Install device: {device}", device=device.name)
        return device.name

    # -- erasure -----------------------------------------------------------------------------
    async def erase_devices_metadata(self, node: Any, ports: Any) -> None:
        """Erase partition tables and signatures (not data) from every writable disk.

        Disks are erased concurrently; on each, its partitions first (their file system
        signatures), then the disk itself (see ``disks.destroy_disk_metadata``).
        Read-only, removable and virtual media devices are skipped, and so are software
        RAID members (the disks holding them: their md device is erased, as the reference
        does) and the disks the node's ``skip_block_devices`` protects (each logged with
        the entry that protects it). If a disk to erase holds a shared cluster filesystem
        nothing is erased: ProtectedDeviceError (``guard_special_filesystems``).
        BlockDeviceEraseError naming every device that failed, after all were tried.
        """
        from ipa_twisted.blockdev.md import is_raid_member
        from ipa_twisted.hardware.generic.protection import (guard_special_filesystems,
                                                             log_protected,
                                                             protected_from_erasing)

        listed = await self._disks.list_devices(include_partitions=True)
        all_disks = [item for item in listed if item.kind != "part"]
        protection = await protected_from_erasing(self.context, node,
                                                  [item.device for item in all_disks])
        disks_ = []
        for disk in all_disks:
            protected = protection.reason(disk.device.name)
            if protected is not None:
                log_protected("erase_devices_metadata", disk.device.name, protected)
            else:
                disks_.append(disk)
        await guard_special_filesystems(
            self.context, [d.device.name for d in disks_ if self._skip_erasing(d) is None])
        reasons: dict[str, str | None] = {}
        for disk in disks_:
            reasons[disk.kname] = self._skip_erasing(disk)
            if reasons[disk.kname] is None and await is_raid_member(self.context,
                                                                    disk.device.name):
                reasons[disk.kname] = ("it is a software RAID member (its RAID device is "
                                       "erased instead)")
        jobs = []
        for disk in disks_:
            reason = reasons[disk.kname]
            if reason is not None:
                self.log.info("Skipping the metadata erase of {device}: {reason}",
                              device=disk.device.name, reason=reason)
                continue
            partitions = sorted((item for item in listed
                                 if item.kind == "part" and item.parent == disk.kname),
                                key=lambda item: item.kname, reverse=True)
            jobs.append(Deferred.fromCoroutine(self._erase_disk(disk, partitions)))
        failed: dict[str, Exception] = {}
        for job in jobs:
            failed.update(await job)
        if failed:
            raise BlockDeviceEraseError(
                "Failed to erase the metadata on the device(s): " + "; ".join(
                    f'"{name}": {error}' for name, error in sorted(failed.items())))

    def _skip_erasing(self, disk: Listed) -> str | None:
        if self.is_read_only(disk.kname):
            return "it is read-only"
        if self._disks.is_removable(disk.kname):
            return "it is removable"
        if self.is_virtual_media(disk.device):
            return "it is the virtual media device"
        return None

    async def _erase_disk(self, disk: Listed, partitions: list[Listed]
                          ) -> dict[str, Exception]:
        """Erase ``partitions`` then ``disk``; {device: error} of what failed."""
        from ipa_twisted.blockdev.disks import destroy_disk_metadata

        failed: dict[str, Exception] = {}
        for item in [*partitions, disk]:
            try:
                await destroy_disk_metadata(self.context, item.device.name,
                                            whole_disk=item is disk, wipe=self._wipe)
            except Exception as e:
                self.log.error("Failed to erase the metadata on device {device}: {error}",
                               device=item.device.name, error=str(e))
                failed[item.device.name] = e
        return failed

    # -- deployment --------------------------------------------------------------------------
    async def inject_files(self, node: Any, ports: Any, files: Any = None,
                           verify_ca: bool = True) -> None:
        """The ``inject_files`` deploy step (see ``ipa_twisted.deploy.inject``)."""
        from ipa_twisted.deploy import inject
        await inject.inject_files(
            self.context, node, ports, files, verify_ca,
            install_device=lambda: self.get_os_install_device(permit_refresh=True, node=node))

    async def write_image(self, node: Any, ports: Any, image_info: dict[str, Any],
                          configdrive: Any = None) -> Deployment:
        """The ``deploy.write_image`` step: the image (and config drive) to the install disk.

        Returns what it deployed (``standby`` keeps it for ``get_partition_uuids``).
        """
        node = node if node else self._node
        device = await self.get_os_install_device(permit_refresh=True, node=node)
        self.log.info("Writing image {image} to {device}", image=image_info.get("id"),
                      device=device)
        from ipa_twisted.deploy.write import write_image_to_disk
        uuids = await write_image_to_disk(self.context, device, image_info, configdrive,
                                          node=node, write=self._writer, wipe=self._wipe)
        return Deployment(image_id=image_info.get("id"), device=device, partition_uuids=uuids)

    async def execute_bootc_install(self, node: Any, ports: Any, image_source: Any = None,
                                    configdrive: Any = None,
                                    oci_pull_secret: Any = None) -> str:
        """The ``deploy.execute_bootc_install`` step of Ironic's bootc deploy interface:
        the container image ``image_source`` installs itself with its bootc on the install
        disk (``ipa_twisted.deploy.bootc``). Refused (CommandExecutionError) before
        anything runs when ``disable_bootc_deploy`` is set."""
        if self.context.config.disable_bootc_deploy:
            self.log.error("A bootc based deployment was requested for {image}, however "
                           "bootc based deployment is disabled (disable_bootc_deploy)",
                           image=image_source)
            raise CommandExecutionError("The bootc deploy interface is administratively "
                                        "disabled (disable_bootc_deploy). Deployment "
                                        "cannot proceed.")
        from ipa_twisted.deploy.bootc import CONTAINERS_CONF_DIR, BootcInstaller
        node = node if node else self._node
        device = await self.get_os_install_device(permit_refresh=True, node=node)
        installer = BootcInstaller(self.context, containers_conf_dir=(
            self._containers_conf_dir or CONTAINERS_CONF_DIR))
        return await installer.install(device, image_source, pull_secret=oci_pull_secret,
                                       instance_info=(node or {}).get("instance_info"),
                                       configdrive=configdrive)

    # -- buffers ---------------------------------------------------------------------------
    async def full_sync(self) -> None:
        """Flush everything to the disks before the machine is powered off from outside:
        ``sync``, then the kernel's caches dropped, then each disk's buffers
        (``blockdev --flushbufs``).

        CommandExecutionError if ``sync`` fails (the machine is then in no state to go
        on); a cache or disk that cannot be flushed is logged and the others still are.
        """
        runner = self.context.runner
        timeout = self.context.config.command_timeout
        try:
            await runner.execute("sync", timeout=timeout)
        except ProcessExecutionError as e:
            self.log.error("Flushing file system buffers failed: {error}", error=str(e))
            raise CommandExecutionError(f"Flushing file system buffers failed: {e}") from e
        drop_caches = self._proc("sys", "vm", "drop_caches")
        try:
            fd = os.open(drop_caches, os.O_WRONLY)   # never creates: it must be procfs's
            try:
                os.write(fd, b"3")
            finally:
                os.close(fd)
        except OSError as e:
            self.log.warn("Cannot tell the kernel to drop its caches ({path}): {error}",
                          path=drop_caches, error=str(e))
        dispatch = self.context.dispatch
        disks_ = await (dispatch("list_block_devices") if dispatch is not None
                        else self.list_block_devices())
        for disk in disks_:
            try:
                await runner.execute("blockdev", "--flushbufs", disk.name, timeout=timeout)
            except ProcessExecutionError as e:
                self.log.warn("Cannot flush the buffers of {device}: {error}",
                              device=disk.name, error=str(e))

    # -- steps -------------------------------------------------------------------------------
    def get_clean_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        from ipa_twisted.hardware.generic import pstore, uefi_nvram
        from ipa_twisted.hardware.generic.burnin import burnin_clean_steps
        from ipa_twisted.hardware.generic.erase import erase_clean_steps
        from ipa_twisted.hardware.generic.raid import raid_clean_steps
        return [{"step": "erase_devices_metadata", "priority": 99, "interface": "deploy",
                 "reboot_requested": False, "abortable": True},
                *erase_clean_steps(), dict(pstore.ERASE_PSTORE_STEP),
                uefi_nvram.clean_uefi_nvram_step(abortable=True), *raid_clean_steps(),
                *burnin_clean_steps()]

    def get_deploy_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        from ipa_twisted.deploy import inject   # the deploy code loads when first needed
        from ipa_twisted.hardware.generic import uefi_nvram
        from ipa_twisted.hardware.generic.raid import raid_deploy_steps
        return [
            {"step": "write_image", "priority": 0, "interface": "deploy",
             "reboot_requested": False,
             "argsinfo": {"image_info": {"description": "Image information dictionary",
                                         "required": True},
                          "configdrive": {"description": "Config drive: a URL, or its "
                                          "gzipped and base64-encoded content",
                                          "required": False}}},
            {"step": "erase_devices_metadata", "priority": 0, "interface": "deploy",
             "reboot_requested": False},
            uefi_nvram.clean_uefi_nvram_step(abortable=False),
            {**inject.INJECT_FILES_STEP, "priority": self.context.config.inject_files_priority},
            *raid_deploy_steps(),
            dict(EXECUTE_BOOTC_INSTALL_STEP),
        ]

    def get_service_steps(self, node: Any, ports: Any) -> list[dict[str, Any]]:
        """The steps Ironic may run on a deployed node (servicing), as the reference
        agent lists them, all at priority 0 (the operator orders them).

        ``write_image`` keeps its arguments' description, so that Ironic accepts the
        ``image_info`` a service request gives it. The erase steps are not offered: they
        would destroy the instance.
        """
        from ipa_twisted.deploy import inject
        from ipa_twisted.hardware.generic.burnin import burnin_service_steps
        from ipa_twisted.hardware.generic.raid import raid_clean_steps, raid_deploy_steps
        raid = {step["step"]: step for step in (*raid_clean_steps(), *raid_deploy_steps())}
        write_image = next(step for step in self.get_deploy_steps(node, ports)
                           if step["step"] == "write_image")
        steps = [raid["delete_configuration"], raid["apply_configuration"],
                 raid["create_configuration"], write_image, dict(inject.INJECT_FILES_STEP),
                 EXECUTE_BOOTC_INSTALL_STEP]
        return [{**step, "priority": 0} for step in (*steps, *burnin_service_steps())]


class _NoDiskYet(Exception):
    """``wait_for_disks``: the listing is still empty."""
