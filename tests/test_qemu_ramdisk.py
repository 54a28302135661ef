"""Cleaning, secure erase and software RAID in the real ramdisk, booted in QEMU.

The recorded tool outputs the unit tests answer from (``ipa_twisted/testing/
ramdisk_recordings.py``) are re-checked on the way: their commands run in the guest (a shell
on its second serial port) once it holds the RAID-1, and each fresh output must have its
recording's shape and be read alike by the parsers.

One boot serves the whole sequence (the reactor must be clean between tests, so a VM
cannot outlive a test): the ramdisk of ramdisk/build.sh boots with two virtio disks, an NVMe
and a SATA disk (file-backed, 64 MiB), and the test drives the agent inside over its API
the way Ironic does, checking what landed on the disks from the host, by reading their
backing files. Disks are told apart by serial number (device names move between boots).

Skipped where QEMU cannot run or the ramdisk cannot be built (see tests/qemu.py). The
timings go to the test log and to ``.cache/qemu-timings.txt``; the guest's console to
``console.log`` in the test's directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
from typing import Any

from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from ipa_twisted.blockdev.md import parse_mdstat
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.ramdisk_recordings import RECORDINGS
from tests import qemu
from tests.image_server import ImageResource, serve

log = Logger()
MiB = 1 << 20
DISK_SIZE = 64 * MiB
NODE_UUID = "3f7b5a1e-5d2c-4a9e-9f5e-6b1c2d3e4f50"
MD_MAGIC = struct.pack("<I", 0xA92B4EFC)
FILL = b"tenant data! " * 7


def whole_disk_image(size: int = 8 * MiB) -> tuple[bytes, bytes]:
    """(a raw whole-disk image with an MBR and one partition at 1 MiB, a marker inside it)."""
    marker = hashlib.sha512(b"ipa-twisted raid image").digest() * 1024      # 64 KiB
    image = bytearray(size)
    entry = struct.pack("<B3sB3sII", 0x80, b"\0\0\0", 0x83, b"\0\0\0", 2048,
                        (size - MiB) // 512)
    image[446:462] = entry
    image[440:444] = struct.pack("<I", 0x1A2B3C4D)                           # disk id
    image[510:512] = b"\x55\xaa"
    image[MiB + 4096:MiB + 4096 + len(marker)] = marker
    return bytes(image), marker


class RamdiskInQemuTests(TestCase):
    """The agent in its ramdisk: erase, metadata erase, RAID create/delete, deploy on md."""

    timeout = 1500

    def setUp(self) -> None:
        reason = qemu.unavailable()
        if reason is not None:
            raise SkipTest(reason)
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.disks = {
            "IPA-VIRTIO-1": qemu.Disk(os.path.join(self.work, "virtio1.img"), "virtio",
                                      "IPA-VIRTIO-1", DISK_SIZE),
            "IPA-VIRTIO-2": qemu.Disk(os.path.join(self.work, "virtio2.img"), "virtio",
                                      "IPA-VIRTIO-2", DISK_SIZE),
            "IPA-NVME-1": qemu.Disk(os.path.join(self.work, "nvme.img"), "nvme",
                                    "IPA-NVME-1", DISK_SIZE),
            "IPA-SATA-1": qemu.Disk(os.path.join(self.work, "sata.img"), "sata",
                                    "IPA-SATA-1", DISK_SIZE),
        }
        self.timings: dict[str, float] = {}

    def node(self, **extra: Any) -> dict[str, Any]:
        return {"uuid": NODE_UUID, "driver_internal_info": {
            "agent_erase_devices_iterations": 1, "agent_erase_devices_zeroize": True,
            "agent_continue_if_secure_erase_failed": False,
            "agent_enable_nvme_secure_erase": True, "agent_enable_ata_secure_erase": True},
            "properties": {"capabilities": "boot_mode:bios,disk_label:gpt"}, **extra}

    async def prepare_disks(self) -> None:
        """Tenant data everywhere; a GPT with an ext4 file system on the first virtio disk."""
        for disk in self.disks.values():
            disk.create(FILL)
        runner = ProcessRunner(reactor, reactor)
        first = self.disks["IPA-VIRTIO-1"].path
        await runner.execute("sgdisk", "-n", "1:2048:+16M", "-n", "2:0:0", first)
        await runner.execute("mkfs.ext4", "-q", "-F", "-E", f"offset={MiB}", first, "16M")

    async def clean_step(self, vm: qemu.VirtualMachine, step: str, node: dict[str, Any],
                         versions: Any, **args: Any) -> tuple[dict[str, Any], list[Any]]:
        result, progress, seconds = await vm.run("clean.execute_clean_step", {
            "step": {"step": step, "priority": 0, "interface": "deploy", "args": args},
            "node": node, "ports": [], "clean_version": versions})
        self.timings[step] = round(seconds, 1)
        return result, progress

    async def deploy_step(self, vm: qemu.VirtualMachine, step: str, node: dict[str, Any],
                          versions: Any, interface: str = "deploy",
                          **args: Any) -> dict[str, Any]:
        result, _, seconds = await vm.run("deploy.execute_deploy_step", {
            "step": {"step": step, "priority": 0, "interface": interface, "args": args},
            "node": node, "ports": [], "deploy_version": versions})
        self.timings[f"deploy {step}"] = round(seconds, 1)
        return result

    def keep_console(self, vm: qemu.VirtualMachine) -> None:
        """The guest's console, kept beside the disks in the test's directory."""
        with open(os.path.join(self.work, "console.log"), "w") as f:
            f.write(vm.console)

    async def rerecord(self, vm: qemu.VirtualMachine, **devices: str) -> None:
        """Every recorded output the unit tests use (``ramdisk_recordings``), its command
        run again in the guest: the fresh output has the recording's shape and the parsers
        read it as they read the recording. Fresh outputs go to .cache/ramdisk-recordings/."""
        names = {kind: os.path.basename(path) for kind, path in devices.items()}
        _, mdstat = await vm.run_in_guest(["cat", "/proc/mdstat"])
        arrays = parse_mdstat(mdstat.decode())
        self.assertTrue(arrays, mdstat)
        names["md"] = arrays[0].name
        # The recordings were made once the mirror was in sync (exit 1: nothing to wait for).
        await vm.run_in_guest(["mdadm", "--wait", f"/dev/{names['md']}"], timeout=300)
        kept = os.path.join(qemu.ROOT, ".cache", "ramdisk-recordings")
        os.makedirs(kept, exist_ok=True)
        for recording in RECORDINGS:
            argv = [word.format(**names) for word in recording.command]
            code, output = await vm.run_in_guest(argv)
            text = output.decode("utf-8", "replace")
            with open(os.path.join(kept, f"{recording.name}.txt"), "w") as f:
                f.write(text)
            self.assertEqual(code, 0, f"{' '.join(argv)} exited {code}:\n{text}")
            self.assertEqual(recording.shape(text), recording.shape(recording.output),
                             f"{recording.name} ({' '.join(argv)}) has drifted:\n{text}")
            self.assertEqual(recording.parsed(text), recording.parsed(recording.output),
                             f"{recording.name}: the parser reads it differently:\n{text}")

    def succeeded(self, result: dict[str, Any], vm: qemu.VirtualMachine) -> Any:
        self.assertEqual(result["command_status"], "SUCCEEDED",
                         f"{result}\nconsole:\n{vm.console[-3000:]}")
        return result["command_result"]

    async def test_cleaning_raid_and_deploy(self) -> None:
        ramdisk = await qemu.build_ramdisk()
        self.timings["ramdisk build" if ramdisk.rebuilt else "ramdisk build (cached)"] = \
            round(ramdisk.seconds, 1)
        await self.prepare_disks()
        image, marker = whole_disk_image()
        http_port = serve(self, ImageResource(image))
        vm = qemu.VirtualMachine(ramdisk, list(self.disks.values()),
                                 http_port=http_port, probe=True)
        self.addCleanup(vm.stop)
        self.addCleanup(self.keep_console, vm)
        self.timings["boot to API"] = round(await vm.start(), 1)

        # -- the inventory: every disk, with its serial (udev runs in the ramdisk) -------
        inventory = self.succeeded(await vm.post("poll.get_hardware_info", {}), vm)
        devices = {d["serial"]: d["name"] for d in inventory["disks"]}
        self.assertEqual(set(devices) & set(self.disks), set(self.disks), inventory["disks"])
        nvme, sata = devices["IPA-NVME-1"], devices["IPA-SATA-1"]
        virtio = [devices["IPA-VIRTIO-1"], devices["IPA-VIRTIO-2"]]

        # -- the steps Ironic is offered ---------------------------------------------------
        listed = self.succeeded(await vm.post("clean.get_clean_steps", {
            "node": self.node(), "ports": []}), vm)
        versions = listed["hardware_manager_version"]
        steps = {s["step"]: s for group in listed["clean_steps"].values() for s in group}
        for name, priority, interface in [("erase_devices", 10, "deploy"),
                                          ("erase_devices_metadata", 99, "deploy"),
                                          ("erase_devices_express", 0, "deploy"),
                                          ("delete_configuration", 0, "raid"),
                                          ("create_configuration", 0, "raid")]:
            self.assertEqual((steps[name]["priority"], steps[name]["interface"],
                              steps[name]["abortable"], steps[name]["reboot_requested"]),
                             (priority, interface, True, False), name)
        deploy = self.succeeded(await vm.post("deploy.get_deploy_steps", {
            "node": self.node(), "ports": []}), vm)
        [apply] = [s for g in deploy["deploy_steps"].values() for s in g
                   if s["step"] == "apply_configuration"]
        self.assertEqual((apply["interface"], sorted(apply["argsinfo"])),
                         ("raid", ["delete_existing", "raid_config"]))

        # -- a version mismatch stops cleaning --------------------------------------------
        result, _ = await self.clean_step(vm, "erase_devices_metadata", self.node(),
                                          {"generic_hardware_manager": "0.1"})
        self.assertEqual(result["command_status"], "CLEAN_VERSION_MISMATCH")
        self.assertEqual(result["command_error"]["type"], "VersionMismatch")

        # -- erase_devices_metadata: tables and signatures go, data stays ----------------
        first = self.disks["IPA-VIRTIO-1"]
        self.assertEqual(first.read(512, 8), b"EFI PART")
        self.assertEqual(first.read(MiB + 1024 + 0x38, 2), b"\x53\xef")       # ext4 magic
        result, _ = await self.clean_step(vm, "erase_devices_metadata", self.node(), versions)
        self.succeeded(result, vm)
        self.assertEqual(first.read(0, MiB), bytes(MiB))
        self.assertEqual(first.read(DISK_SIZE - MiB, MiB), bytes(MiB))
        self.assertEqual(first.read(MiB + 1024 + 0x38, 2), b"\0\0")           # wiped first
        self.assertTrue(FILL in first.read(40 * MiB, MiB), "the data went too")  # not data

        # -- erase_devices: NVMe formatted, the others shredded, all at once --------------
        result, progress = await self.clean_step(vm, "erase_devices", self.node(), versions)
        erased = self.succeeded(result, vm)["clean_result"]
        self.assertEqual(erased[nvme], "nvme format --ses 1 (user data erase)")
        for device in [sata, *virtio]:
            self.assertEqual(erased[device], "shred: 1 random pass(es) and a pass of zeros")
        for serial, disk in self.disks.items():
            self.assertTrue(disk.is_zero(), f"{serial} ({disk.path}) still holds data")
        console = vm.console
        starts = [m.start() if (m := re.search(rf"\] Erasing {re.escape(device)}\s*$", console,
                                               re.MULTILINE)) else -1 for device in erased]
        ends = [m.start() for m in re.finditer(r"\] Erased \S+ \(", console)]
        self.assertNotIn(-1, starts, console[-3000:])
        self.assertEqual(len(ends), 4, console[-3000:])
        self.assertLess(max(starts), min(ends), "the disks were not erased concurrently")
        # While it ran, the command showed each disk's progress (when a poll caught it).
        for sample in progress:
            self.assertEqual(set(sample["devices"]), set(erased))
            self.assertIn(sample["phase"], ("erasing", "done"))
        if progress:
            self.assertGreater(max(sum(d["state"] == "running" for d in s["devices"].values())
                                   for s in progress), 1, progress)
        log.info("erase_devices progress samples: {progress}", progress=progress)

        # -- software RAID-1 across the two virtio disks (picked by serial) ---------------
        raid_node = self.node(target_raid_config={"logical_disks": [
            {"size_gb": "MAX", "raid_level": "1", "controller": "software",
             "volume_name": "root", "physical_disks": [{"serial": "IPA-VIRTIO-1"},
                                                       {"serial": "IPA-VIRTIO-2"}]}]})
        result, _ = await self.clean_step(vm, "create_configuration", raid_node, versions)
        self.assertEqual(self.succeeded(result, vm)["clean_result"],
                         raid_node["target_raid_config"])
        for serial in ("IPA-VIRTIO-1", "IPA-VIRTIO-2"):
            disk = self.disks[serial]
            self.assertEqual(disk.read(512, 8), b"EFI PART")
            # partition 2 (after the BIOS boot partition) holds the md superblock at 4 KiB
            self.assertEqual(disk.read(8 * MiB + 4096, 4), MD_MAGIC, serial)
        self.assertNotEqual(self.disks["IPA-NVME-1"].read(512, 8), b"EFI PART")

        # -- the recorded mdadm/hdparm/nvme/lsblk outputs, re-checked on the real tools ----
        await self.rerecord(vm, virtio=devices["IPA-VIRTIO-1"], sata=sata, nvme=nvme)

        result, _ = await self.clean_step(vm, "delete_configuration", raid_node, versions)
        self.succeeded(result, vm)
        for serial in ("IPA-VIRTIO-1", "IPA-VIRTIO-2"):
            disk = self.disks[serial]
            self.assertEqual(disk.read(0, MiB), bytes(MiB), serial)
            self.assertEqual(disk.read(8 * MiB + 4096, 4), b"\0\0\0\0", serial)

        # -- validation refuses what cannot be built ------------------------------------
        bad = {"logical_disks": [{"size_gb": "MAX", "raid_level": "0",
                                  "controller": "software"}]}
        result = await self.deploy_step(vm, "apply_configuration", raid_node, versions,
                                        interface="raid", raid_config=bad)
        self.assertEqual(result["command_status"], "FAILED")
        self.assertIn("RAID-1 for the first logical disk", str(result["command_error"]))

        # -- apply_configuration (a deploy step), then the image onto the md device --------
        result = await self.deploy_step(vm, "apply_configuration", raid_node, versions,
                                        interface="raid",
                                        raid_config=raid_node["target_raid_config"])
        self.succeeded(result, vm)
        image_info = {"id": "raid-image", "urls": [f"http://{qemu.GUEST_HTTP}/image.raw"],
                      "disk_format": "raw", "os_hash_algo": "sha256",
                      "os_hash_value": hashlib.sha256(image).hexdigest()}
        # No root device hints: with a software RAID configuration, its md device is the
        # install device (the disks are far below the 4 GiB a guessed root disk needs).
        result = await self.deploy_step(vm, "write_image", raid_node, versions,
                                        image_info=image_info)
        self.succeeded(result, vm)
        self.assertRegex(vm.console, r"Install device: /dev/md\d+ \(software RAID\)")
        offsets = {serial: self.disks[serial].find(marker)
                   for serial in ("IPA-VIRTIO-1", "IPA-VIRTIO-2")}
        # both mirrors hold the image: partition 2 at 8 MiB, md data 1 MiB into it
        self.assertEqual(set(offsets.values()), {8 * MiB + MiB + MiB + 4096}, offsets)
        self.assertEqual(self.disks["IPA-VIRTIO-1"].read(9 * MiB + 510, 2), b"\x55\xaa")
        self.assertEqual(self.disks["IPA-NVME-1"].find(marker), -1)

        result, _ = await self.clean_step(vm, "delete_configuration", raid_node, versions)
        self.succeeded(result, vm)
        self.assertEqual(self.disks["IPA-VIRTIO-2"].read(8 * MiB + 4096, 4), b"\0\0\0\0")

        summary = ", ".join(f"{name}: {seconds} s" for name, seconds in self.timings.items())
        log.info("QEMU ramdisk timings: {summary}", summary=summary)
        with open(os.path.join(qemu.ROOT, ".cache", "qemu-timings.txt"), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {summary}\n")
