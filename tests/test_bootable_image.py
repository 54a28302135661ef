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
import json
import os
import shutil
import time
import uuid

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from ipa_twisted.deploy.configdrive import decode_configdrive
from ipa_twisted.process import ProcessRunner
from tests import bootable_image
from tests.configdrive_iso import META_DATA, make_iso
from tests.processes import Child
from tests.qemu import QEMU

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

    async def _disk_with_config_drive(self, image: str, instance_uuid: str) -> str:
        """A disk file: the image from sector 0, and at the end of the disk a partition
        holding the config drive Ironic would send (placed and aligned as the agent does)."""
        files = dict(META_DATA)
        files["openstack/latest/meta_data.json"] = json.dumps(
            {"uuid": instance_uuid, "hostname": "e2e-node"}).encode()
        sent = base64.b64encode(gzip.compress(make_iso(files)))
        iso = decode_configdrive(sent, downloaded=False)
        disk = str(os.path.abspath(self.mktemp()))
        image_size = os.path.getsize(image)
        size = image_size + 64 * MiB
        with open(disk, "wb") as f:
            f.truncate(size)
        _copy_sparse(image, disk)
        end = size // MiB * MiB
        start = (end - len(iso)) // MiB * MiB
        await self.runner.execute("parted", "-s", disk, "--", "mkpart", "primary",
                                  f"{start // 512}s", f"{end // 512 - 1}s")
        with open(disk, "r+b") as f:
            f.seek(start)
            f.write(iso)
        return disk

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
        disk = await self._disk_with_config_drive(image, instance_uuid)
        argv = [QEMU, "-machine", "q35", "-accel", "tcg", "-m", "256",
                "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
                "-nic", "none",
                "-drive", f"file={disk},if=none,id=disk0,format=raw,cache=unsafe",
                "-device", "virtio-blk-pci,drive=disk0,serial=e2e-disk0"]
        booted = time.monotonic()
        guest = Child(argv)
        self.addCleanup(guest.stop, "KILL")
        await guest.wait_for(bootable_image.MARKER.encode(), timeout=BOOT_TIMEOUT)
        to_marker = time.monotonic() - booted
        found = await guest.wait_for(
            rb"IPA-E2E-CONFIGDRIVE (uuid=(\S+)|none)\r?\n", timeout=BOOT_TIMEOUT)
        self.assertEqual(found.group(2), instance_uuid.encode(), guest.output[-3000:])
        code = await guest.ended
        self.assertEqual(code, 0, guest.output[-3000:])
        self.assertIn(bootable_image.POWEROFF_MARKER.encode(), guest.output)
        print(f"\nbootable image: {os.path.getsize(image) // MiB} MiB, built in {built:.1f} s,"
              f" marker {to_marker:.1f} s after QEMU started, powered off after "
              f"{time.monotonic() - booted:.1f} s")
