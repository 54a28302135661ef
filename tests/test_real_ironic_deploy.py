"""A real Ironic deploys images through our agent onto a loop device.

The agent runs in a private mount namespace whose /dev holds only the test's loop device
(``ipa_twisted.testing.sandbox``): whatever it is asked, it cannot reach this machine's
disks, reboot or power it off. Images come from a web server of the test on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.server import Site
from twisted.web.static import File

from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.sandbox import attach_loop_devices
from tests.images import mbr_disk_image
from tests.ironic.harness import skip_reason, start_agent, start_ironic
from tests.processes import Child, physical_macs

HEARTBEAT_TIMEOUT = 10
IMAGE_SIZE = 48 * 1024 * 1024
DISK_SIZE = 2 * 1024 * 1024 * 1024


class RealIronicDeployTests(TestCase):
    """Ironic's direct deploy, through our agent, of raw and qcow2 whole-disk images."""

    timeout = 300

    async def setUp(self) -> None:
        reason = skip_reason(macs=True, tools=("qemu-img",), loop_devices=True)
        if reason:
            raise self.skipTest(reason)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.dir, "images"))
        self.runner = ProcessRunner(reactor, reactor)
        self.loop = (await attach_loop_devices(self.runner, self.dir, [DISK_SIZE],
                                               self.addCleanup))[0]
        self.image = self.make_image()
        server = reactor.listenTCP(0, Site(File(os.path.join(self.dir, "images"))),
                                   interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        self.images_url = f"http://127.0.0.1:{server.getHost().port}"
        # The partition image gets GRUB for BIOS: Ironic's lookup answer must allow it
        # (off by default, the CVE-2026-43003 mitigation).
        self.ironic = await start_ironic(
            self, self.dir, restrict_lookup=True, heartbeat_timeout=HEARTBEAT_TIMEOUT,
            options={"agent": {"enable_bios_bootloader_install": True}})

    def make_image(self) -> bytes:
        """A whole-disk image (an MBR partition table), written to images/disk.raw."""
        image = mbr_disk_image(IMAGE_SIZE)
        with open(os.path.join(self.dir, "images", "disk.raw"), "wb") as f:
            f.write(image)
        return image

    async def make_qcow2(self) -> str:
        raw = os.path.join(self.dir, "images", "disk.raw")
        qcow2 = os.path.join(self.dir, "images", "disk.qcow2")
        await self.runner.execute("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw,
                                  qcow2, timeout=120)
        return qcow2

    def start_agent(self) -> Child:
        return start_agent(self, self.ironic, self.dir, sandbox=[self.loop])

    def read_disk(self, length: int) -> bytes:
        with open(self.loop.path, "rb") as f:
            return f.read(length)

    async def deploy(self, image_path: str, disk_format: str) -> tuple[dict[str, Any], Child]:
        with open(image_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        uuid = await self.ironic.enroll_node(
            physical_macs(), properties={"root_device": {"name": self.loop.path},
                                         "local_gb": 1, "cpu_arch": "x86_64"})
        started = reactor.seconds()
        await self.ironic.deploy(uuid, {
            "image_source": f"{self.images_url}/{os.path.basename(image_path)}",
            "image_os_hash_algo": "sha256", "image_os_hash_value": digest,
            "image_disk_format": disk_format, "root_gb": 1})
        await self.ironic.wait_for_state(uuid, "wait call-back", timeout=60)
        agent = self.start_agent()
        node = await self.ironic.wait_for_state(uuid, "active", timeout=240)
        print(f"\n  {disk_format}: deploy request to active in "
              f"{reactor.seconds() - started:.1f}s")
        return node, agent

    async def test_partition_image_with_configdrive(self) -> None:
        """A Debian root file system as a partition image: partitions made, image written,
        config drive partition, and GRUB installed by image.install_bootloader."""
        from tests import rootfs
        reason = rootfs.unavailable()
        if reason:
            raise self.skipTest(reason)
        tarball = await rootfs.debian_rootfs(self.runner)
        tree = os.path.join(self.dir, "tree")
        os.makedirs(tree)
        await self.runner.execute("tar", "--zstd", "-xf", tarball, "-C", tree, timeout=300)
        image = os.path.join(self.dir, "images", "root.img")
        await self.runner.execute("mke2fs", "-q", "-t", "ext4", "-L", "root", "-d", tree,
                                  image, "700M", timeout=300)
        shutil.rmtree(tree)
        configdrive_bytes = b"config-2 drive " * 4096
        import base64
        import gzip
        configdrive = base64.b64encode(gzip.compress(configdrive_bytes)).decode()
        with open(image, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        uuid = await self.ironic.enroll_node(
            physical_macs(), properties={"root_device": {"name": self.loop.path},
                                         "local_gb": 2, "cpu_arch": "x86_64",
                                         # this machine's kernel cannot mount an ESP (no
                                         # vfat): BIOS layout and GRUB for i386-pc
                                         "capabilities": "boot_mode:bios"})
        await self.ironic.deploy(uuid, {
            "image_source": f"{self.images_url}/root.img", "image_type": "partition",
            "image_os_hash_algo": "sha256", "image_os_hash_value": digest,
            "image_disk_format": "raw", "root_gb": 1}, configdrive=configdrive)
        await self.ironic.wait_for_state(uuid, "wait call-back", timeout=60)
        agent = self.start_agent()
        node = await self.ironic.wait_for_state(uuid, "active", timeout=280)
        self.assertIsNone(node["last_error"])
        self.assertIn(b"Executing command image.install_bootloader", agent.output)
        with open(self.loop.path, "rb") as f:
            mbr = f.read(512)
        self.assertIn(b"GRUB", mbr, "\n".join(
            line for line in agent.output.decode(errors="replace").splitlines()
            if "grub" in line.lower() or "bootloader" in line.lower())[-4000:])
        out, _ = await self.runner.execute("parted", "-s", "-m", self.loop.path, "unit", "B",
                                           "print")
        table = [line.rstrip(";").split(":") for line in out.decode().splitlines()[2:]]
        # number:start:end:size:fs:name:flags, sizes in bytes
        by_size = {int(p[3].rstrip("B")): (int(p[0]), int(p[1].rstrip("B"))) for p in table}
        self.assertIn(1024 ** 3, by_size, table)
        root = f"{self.loop.path}p{by_size[1024 ** 3][0]}"
        label, _ = await self.runner.execute("blkid", "-p", "-o", "value", "-s", "LABEL", root)
        self.assertEqual(label.strip(), b"root")
        # As ironic-lib lays it out: the config drive first, sized to its data (1 MiB).
        first = {int(p[0]): int(p[1].rstrip("B")) for p in table}[1]
        with open(self.loop.path, "rb") as f:
            f.seek(first)
            self.assertEqual(f.read(len(configdrive_bytes)), configdrive_bytes)

    async def test_raw_whole_disk(self) -> None:
        node, agent = await self.deploy(os.path.join(self.dir, "images", "disk.raw"), "raw")
        self.assertIsNone(node["last_error"])
        self.assertEqual(self.read_disk(IMAGE_SIZE), self.image)
        self.assertIn(b"Executing command deploy.execute_deploy_step", agent.output)

    async def test_qcow2_whole_disk(self) -> None:
        qcow2 = await self.make_qcow2()
        with open(self.loop.path, "r+b") as f:  # old data where the image has none
            f.write(b"\xee" * 4096)
        node, agent = await self.deploy(qcow2, "qcow2")
        self.assertIsNone(node["last_error"])
        self.assertEqual(self.read_disk(IMAGE_SIZE), self.image)
