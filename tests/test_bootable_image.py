"""The bootable whole-disk test image (tests/bootable_image.py) boots in QEMU under SeaBIOS.

The image is put on a virtio disk with a config drive partition after it, as the agent
writes a whole-disk image and Ironic's config drive (an ISO 9660 labelled ``config-2``, sent
gzipped and base64-encoded); the deployed system prints its marker and the config drive's
uuid on the serial console, then powers off. Root only (building the image); QEMU runs the
guest with TCG, about 20 s.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from ipa_twisted.deploy.configdrive import decode_configdrive
from ipa_twisted.process import ProcessRunner
from tests import bootable_image
from tests.configdrive_iso import META_DATA, make_iso
from tests.processes import Child, sleep
from tests.qemu import OVMF_CODE, OVMF_VARS, QEMU, uefi_unavailable

log = Logger()
MiB = 1 << 20
BOOT_TIMEOUT = 240.0


def _copy_sparse(source: str, target: str) -> None:
    """Copy ``source`` to the start of ``target``, skipping zero blocks."""
    with open(source, "rb") as src, open(target, "r+b") as dst:
        offset = 0
        while chunk := src.read(MiB):
            if chunk.count(0) != len(chunk):
                dst.seek(offset)
                dst.write(chunk)
            offset += len(chunk)


class BootableImageTests(TestCase):
    timeout = 1800

    def setUp(self) -> None:
        reason = bootable_image.unavailable()
        if reason is None and shutil.which(QEMU) is None:
            reason = f"{QEMU} not installed (bash .ci/setup installs qemu-system-x86)"
        if reason is None:
            try:
                import pycdlib  # noqa: F401
            except ImportError:
                reason = "pycdlib is not installed (the test extra of pyproject.toml)"
        if reason is not None:
            raise SkipTest(reason)
        self.runner = ProcessRunner(reactor, reactor)

    async def _disk_with_config_drive(self, image: str, meta_data: dict[str, Any],
                                      gpt: bool = False) -> str:
        """A disk file: the image from sector 0, and at the end of the disk a partition
        holding the config drive Ironic would send (placed and aligned as the agent does)."""
        files = dict(META_DATA)
        files["openstack/latest/meta_data.json"] = json.dumps(meta_data).encode()
        sent = base64.b64encode(gzip.compress(make_iso(files)))
        iso = decode_configdrive(sent, downloaded=False)
        disk = str(os.path.abspath(self.mktemp()))
        image_size = os.path.getsize(image)
        size = image_size + 64 * MiB
        with open(disk, "wb") as f:
            f.truncate(size)
        _copy_sparse(image, disk)
        if gpt:                         # its backup table to the end of the larger disk
            await self.runner.execute("sgdisk", "-e", disk)
        end = (size - (MiB if gpt else 0)) // MiB * MiB      # GPT: its backup at the end
        start = (end - len(iso)) // MiB * MiB
        await self.runner.execute("parted", "-s", disk, "--", "mkpart", "primary",
                                  f"{start // 512}s", f"{end // 512 - 1}s")
        with open(disk, "r+b") as f:
            f.seek(start)
            f.write(iso)
        return disk

    def _boot(self, disk: str, machine: str, uefi: bool = False) -> Child:
        """QEMU (TCG; SeaBIOS, or OVMF with fresh NVRAM) booting ``disk`` on a virtio
        disk; killed at cleanup."""
        # GRUB for UEFI runs out of memory loading the kernel with 256 MiB under OVMF.
        argv = [QEMU, "-machine", machine, "-accel", "tcg", "-m", "512" if uefi else "256",
                "-display", "none", "-monitor", "none", "-serial", "stdio",
                "-no-reboot", "-nic", "none",
                "-drive", f"file={disk},if=none,id=disk0,format=raw,cache=unsafe",
                "-device", "virtio-blk-pci,drive=disk0,serial=e2e-disk0"]
        if uefi:
            nvram = os.path.abspath(self.mktemp())
            shutil.copyfile(OVMF_VARS, nvram)
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={nvram}"]
        guest = Child(argv)
        self.addCleanup(guest.stop, "KILL")
        return guest

    async def test_uefi_image_boots_and_reads_the_config_drive(self) -> None:
        """The UEFI variant (GPT, GRUB on the EFI system partition's removable-media
        path) under OVMF with empty NVRAM."""
        reason = uefi_unavailable() or bootable_image.unavailable(uefi=True)
        if reason is not None:
            raise SkipTest(reason)
        image = await bootable_image.build_bootable_image(uefi=True)
        out, _ = await self.runner.execute("blkid", "-p", "-o", "value", "-s", "UUID",
                                           "--offset", str((1 + bootable_image.ESP_MIB) * MiB),
                                           image)
        self.assertEqual(out.decode().strip(), bootable_image.ROOTFS_UUID)
        instance_uuid = str(uuid.uuid4())
        disk = await self._disk_with_config_drive(image, {"uuid": instance_uuid}, gpt=True)
        booted = time.monotonic()
        guest = self._boot(disk, "q35", uefi=True)
        await guest.wait_for(bootable_image.MARKER.encode(), timeout=BOOT_TIMEOUT)
        found = await guest.wait_for(rb"IPA-E2E-CONFIGDRIVE (uuid=(\S+)|none)\r?\n",
                                     timeout=BOOT_TIMEOUT)
        self.assertEqual(found.group(2), instance_uuid.encode(), guest.output[-3000:])
        self.assertEqual(await guest.ended, 0, guest.output[-3000:])
        log.info("Bootable UEFI image: {size} MiB; powered off {off:.1f} s after QEMU "
                 "started", size=os.path.getsize(image) // MiB,
                 off=time.monotonic() - booted)

    async def test_stays_up_when_the_config_drive_says_so(self) -> None:
        """With ``STAY_META_DATA`` in the meta_data, the system idles instead of powering
        off (as a deployed instance would stay up under Ironic); on QEMU's i440FX machine."""
        image = await bootable_image.build_bootable_image()
        instance_uuid = str(uuid.uuid4())
        disk = await self._disk_with_config_drive(
            image, {"uuid": instance_uuid, **bootable_image.STAY_META_DATA})
        guest = self._boot(disk, "pc")
        found = await guest.wait_for(rb"IPA-E2E-CONFIGDRIVE (uuid=(\S+)|none)\r?\n",
                                     timeout=BOOT_TIMEOUT)
        self.assertEqual(found.group(2), instance_uuid.encode(), guest.output[-3000:])
        await guest.wait_for(bootable_image.STAY_MARKER.encode(), timeout=60)
        await sleep(3)
        self.assertFalse(guest.ended.called, guest.output[-3000:])
        self.assertNotIn(bootable_image.POWEROFF_MARKER.encode(), guest.output)

    async def test_boots_and_reads_the_config_drive(self) -> None:
        started = time.monotonic()
        image = await bootable_image.build_bootable_image()
        built = time.monotonic() - started
        started = time.monotonic()
        again = await bootable_image.build_bootable_image()
        self.assertEqual(image, again)
        self.assertLess(time.monotonic() - started, 10, "the second build did not reuse "
                                                        "the cached image")
        out, _ = await self.runner.execute("blkid", "-p", "-o", "value", "-s", "UUID",
                                           "--offset", str(MiB), image)
        self.assertEqual(out.decode().strip(), bootable_image.ROOTFS_UUID)

        instance_uuid = str(uuid.uuid4())
        disk = await self._disk_with_config_drive(image, {"uuid": instance_uuid,
                                                          "hostname": "e2e-node"})
        booted = time.monotonic()
        guest = self._boot(disk, "q35")
        await guest.wait_for(bootable_image.MARKER.encode(), timeout=BOOT_TIMEOUT)
        to_marker = time.monotonic() - booted
        found = await guest.wait_for(
            rb"IPA-E2E-CONFIGDRIVE (uuid=(\S+)|none)\r?\n", timeout=BOOT_TIMEOUT)
        self.assertEqual(found.group(2), instance_uuid.encode(), guest.output[-3000:])
        code = await guest.ended
        self.assertEqual(code, 0, guest.output[-3000:])
        self.assertIn(bootable_image.POWEROFF_MARKER.encode(), guest.output)
        log.info("Bootable image: {size} MiB, built in {built:.1f} s; marker {marker:.1f} s "
                 "after QEMU started, powered off after {off:.1f} s",
                 size=os.path.getsize(image) // MiB, built=built, marker=to_marker,
                 off=time.monotonic() - booted)


class RaidDeployBootTests(TestCase):
    """The image deployed by our ramdisk onto a software RAID 1 (metadata 1.2 over a
    partition of each of two virtio disks), its config drive added and GRUB installed onto
    both holder disks from the image (``image.install_bootloader`` with ``ROOTFS_UUID``, as
    Ironic asks for software RAID); the VM then boots from the first disk under SeaBIOS.
    About 4 minutes under TCG (2 cores shared): run only with ``IPA_BOOTABLE_IMAGE_RAID=1``.
    """

    timeout = 1800

    def setUp(self) -> None:
        if os.environ.get("IPA_BOOTABLE_IMAGE_RAID") != "1":
            raise SkipTest("long (a ramdisk deploy onto software RAID under TCG): "
                           "set IPA_BOOTABLE_IMAGE_RAID=1 to run it")
        from tests import qemu
        reason = bootable_image.unavailable() or qemu.unavailable()
        if reason is not None:
            raise SkipTest(reason)

    async def test_deployed_onto_raid_1_boots_from_its_disks(self) -> None:
        """Holder disks with MBR tables (BIOS's default): GRUB in the gap before 1 MiB."""
        await self._deploy_and_boot("boot_mode:bios")

    async def test_raid_1_on_gpt_holders_boots_from_its_disks(self) -> None:
        """Holder disks with GPT (``disk_label:gpt``): GRUB in their BIOS boot partitions."""
        await self._deploy_and_boot("boot_mode:bios,disk_label:gpt")

    async def _deploy_and_boot(self, capabilities: str) -> None:
        from twisted.web.server import Site
        from twisted.web.static import File

        from tests import qemu
        image = await bootable_image.build_bootable_image()
        ramdisk = await qemu.build_ramdisk()
        server: Any = reactor.listenTCP(0, Site(File(os.path.dirname(image))),  # type: ignore[arg-type]
                                        interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        size = (os.path.getsize(image) // MiB + 128) * MiB
        disks = [qemu.Disk(os.path.join(work, f"virtio{n}.img"), "virtio",
                           f"IPA-E2E-{n}", size) for n in (1, 2)]
        for disk in disks:
            disk.create()
        vm = qemu.VirtualMachine(ramdisk, disks, http_port=server.getHost().port,
                                 kernel_args="ipa-standalone=1 "
                                             "ipa-enable-bios-bootloader-install=1")
        self.addCleanup(vm.stop)
        timings = {"boot to API": await vm.start()}
        node = {"uuid": "0d3b8c52-8f1e-4c55-9f0a-2a1e5b7c9d11", "driver_internal_info": {},
                "instance_info": {"image_rootfs_uuid": bootable_image.ROOTFS_UUID},
                "properties": {"capabilities": capabilities},
                "target_raid_config": {"logical_disks": [
                    {"size_gb": "MAX", "raid_level": "1", "controller": "software",
                     "physical_disks": [{"serial": d.serial} for d in disks]}]}}
        listed = await vm.post("clean.get_clean_steps", {"node": node, "ports": []})
        versions = listed["command_result"]["hardware_manager_version"]

        async def step(kind: str, name: str, interface: str, **args: Any) -> None:
            result, _, seconds = await vm.run(f"{kind}.execute_{kind}_step", {
                "step": {"step": name, "priority": 0, "interface": interface, "args": args},
                "node": node, "ports": [], f"{kind}_version": versions}, timeout=900)
            timings[name] = seconds
            self.assertEqual(result["command_status"], "SUCCEEDED",
                             f"{name}: {result}\nconsole:\n{vm.console[-3000:]}")

        await step("clean", "create_configuration", "raid")
        instance_uuid = str(uuid.uuid4())
        files = dict(META_DATA)
        files["openstack/latest/meta_data.json"] = json.dumps({"uuid": instance_uuid}).encode()
        configdrive = base64.b64encode(gzip.compress(make_iso(files))).decode()
        with open(image, "rb") as f:
            digest = hashlib.sha256()
            while chunk := f.read(MiB):
                digest.update(chunk)
        await step("deploy", "write_image", "deploy", configdrive=configdrive, image_info={
            "id": "bootable", "urls": [f"http://{qemu.GUEST_HTTP}/{os.path.basename(image)}"],
            "disk_format": "raw", "os_hash_algo": "sha256",
            "os_hash_value": digest.hexdigest()})
        result, _, timings["install_bootloader"] = await vm.run(
            "image.install_bootloader", {"root_uuid": bootable_image.ROOTFS_UUID,
                                         "target_boot_mode": "bios"}, timeout=900)
        self.assertEqual(result["command_status"], "SUCCEEDED",
                         f"{result}\nconsole:\n{vm.console[-3000:]}")
        await vm.post("standby.power_off", {}, wait=False)
        assert vm.child is not None
        await vm.child.ended

        argv = [QEMU, "-machine", "q35", "-accel", "tcg", "-m", "256",
                "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
                "-nic", "none"]
        for number, disk in enumerate(disks):
            argv += ["-drive", f"file={disk.path},if=none,id=disk{number},format=raw",
                     "-device", f"virtio-blk-pci,drive=disk{number},serial={disk.serial}"]
        booted = time.monotonic()
        guest = Child(argv)
        self.addCleanup(guest.stop, "KILL")
        await guest.wait_for(bootable_image.MARKER.encode(), timeout=BOOT_TIMEOUT)
        found = await guest.wait_for(
            rb"IPA-E2E-CONFIGDRIVE (uuid=(\S+)|none)\r?\n", timeout=BOOT_TIMEOUT)
        self.assertEqual(found.group(2), instance_uuid.encode(), guest.output[-3000:])
        self.assertRegex(guest.output, rb"config drive on /dev/md\w+p2\b")
        self.assertEqual(await guest.ended, 0, guest.output[-3000:])
        timings["disk boot to power off"] = time.monotonic() - booted
        log.info("RAID deploy ({capabilities}) and boot: {timings}", capabilities=capabilities,
                 timings=", ".join(
            f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
