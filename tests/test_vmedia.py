"""Tests for ipa_twisted.vmedia: agent parameters from a virtual media floppy.

Unit tests use a fake /dev and /sys tree and a FakeRunner whose ``mount`` puts a
``parameters.txt`` in the mount point. The real test (root) makes a FAT file system
labelled ``ir-vfd-dev`` on a loop device and reads it from inside the disk sandbox, where
only that loop device exists (on kernels without vfat, through fusefat: ``tests/fat.py``).
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipa_twisted.config import load_config
from ipa_twisted.errors import VirtualMediaBootError
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem
from ipa_twisted.testing.sandbox import (attach_loop_devices, loop_devices_unavailable,
                                         run_in_sandbox)
from ipa_twisted.vmedia import (booted_from_vmedia, get_vmedia_params, parse_parameters,
                                read_vmedia_params)
from tests.fat import fat_mount_dir

MiB = 1 << 20
PARAMETERS = "ipa-api-url=http://10.0.0.1:6385 BOOTIF=01-aa-bb-cc-dd-ee-ff\nipa-debug=1\n"


class VmediaTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake = FakeSystem(self.mktemp())
        self.config = self.fake.config()
        self.mounted: list[str] = []
        self.runner = FakeRunner({("mount",): self.mount, ("umount",): self.umount,
                                  ("blkid", "-L"): Exit(2)})
        self.content: bytes | None = PARAMETERS.encode()
        self.fake.write("dev/sdb", "")

    def mount(self, argv: tuple[str, ...]) -> bytes:
        directory = argv[-1]
        self.mounted.append(directory)
        if self.content is not None:
            with open(os.path.join(directory, "parameters.txt"), "wb") as f:
                f.write(self.content)
        return b""

    def umount(self, argv: tuple[str, ...]) -> bytes:
        directory = argv[-1]
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        return b""

    def read(self) -> dict[str, str]:
        params: dict[str, str] = self.successResultOf(Deferred.fromCoroutine(
            read_vmedia_params(self.runner, self.config)))
        return params

    def test_by_label_link(self) -> None:
        self.fake.symlink("dev/disk/by-label/ir-vfd-dev", "../../sdb")
        self.assertEqual(self.read(), {"ipa-api-url": "http://10.0.0.1:6385",
                                       "BOOTIF": "01-aa-bb-cc-dd-ee-ff", "ipa-debug": "1"})
        link = os.path.join(self.config.dev_path, "disk/by-label/ir-vfd-dev")
        self.assertEqual(self.runner.argvs, [("mount", "-o", "ro", link, self.mounted[0]),
                                             ("umount", self.mounted[0])])
        self.assertFalse(os.path.exists(self.mounted[0]))

    def test_upper_case_label(self) -> None:
        self.fake.symlink("dev/disk/by-label/IR-VFD-DEV", "../../sdb")
        self.assertEqual(self.read()["ipa-debug"], "1")

    def test_blkid(self) -> None:
        self.runner.answers[("blkid", "-L", "IR-VFD-DEV")] = "/dev/sdc\n"
        self.read()
        self.assertEqual(self.runner.argvs[:3], [
            ("blkid", "-L", "ir-vfd-dev"), ("blkid", "-L", "IR-VFD-DEV"),
            ("mount", "-o", "ro", "/dev/sdc", self.mounted[0])])

    def test_sysfs_model(self) -> None:
        self.fake.write("sys/class/block/sda/device/model", "QEMU HARDDISK\n")
        self.fake.write("sys/class/block/sr0/device/model", "Virtual Media   \n")
        self.read()
        self.assertIn(("mount", "-o", "ro", os.path.join(self.config.dev_path, "sr0"),
                       self.mounted[0]), self.runner.argvs)

    def test_not_found(self) -> None:
        """Booted from Redfish virtual media (an ISO, no parameters floppy): nothing to
        read, start-up goes on with the kernel command line."""
        result = self.successResultOf(Deferred.fromCoroutine(
            read_vmedia_params(self.runner, self.config)))
        self.assertEqual(result, {})
        self.assertEqual([argv[0] for argv in self.runner.argvs], ["blkid", "blkid"])

    def test_mount_fails(self) -> None:
        self.fake.symlink("dev/disk/by-label/ir-vfd-dev", "../../sdb")
        self.runner.answers[("mount",)] = Exit(32, b"", b"wrong fs type")
        failure = self.failureResultOf(Deferred.fromCoroutine(
            read_vmedia_params(self.runner, self.config)),
            VirtualMediaBootError)
        self.assertIn("Unable to mount virtual media device", str(failure.value))
        self.assertIn("wrong fs type", str(failure.value))

    def test_no_parameters_file_still_unmounts(self) -> None:
        self.fake.symlink("dev/disk/by-label/ir-vfd-dev", "../../sdb")
        self.content = None
        failure = self.failureResultOf(Deferred.fromCoroutine(
            read_vmedia_params(self.runner, self.config)),
            VirtualMediaBootError)
        self.assertIn("parameters.txt", str(failure.value))
        self.assertEqual(self.runner.argvs[-1], ("umount", self.mounted[0]))
        self.assertFalse(os.path.exists(self.mounted[0]))

    def test_only_when_booted_from_vmedia(self) -> None:
        self.fake.symlink("dev/disk/by-label/ir-vfd-dev", "../../sdb")
        self.fake.set_cmdline("BOOT_IMAGE=/vmlinuz ipa-debug=0")
        self.assertFalse(booted_from_vmedia(self.config))
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(
            get_vmedia_params(self.runner, self.config))), {})
        self.assertEqual(self.runner.argvs, [])
        self.fake.set_cmdline("BOOT_IMAGE=/vmlinuz boot_method=vmedia ipa-debug=0")
        params = self.successResultOf(Deferred.fromCoroutine(
            get_vmedia_params(self.runner, self.config)))
        self.assertEqual(params["ipa-debug"], "1")
        # load_config lets them win over the kernel command line, as the reference does.
        config, _ = load_config(cli={}, default_files=False,
                                cmdline_path=self.config.cmdline_path, vmedia_params=params)
        self.assertTrue(config.debug)
        self.assertEqual(config.api_url, "http://10.0.0.1:6385")

    def test_parse_parameters(self) -> None:
        self.assertEqual(parse_parameters("a=1 b\n c=x=y =z a=2\n"), {"a": "2", "c": "x=y"})


TOOLS = ("mkfs.vfat", "blkid", "mount", "umount")

WRITE = """set -e
dir=$(mktemp -d)
mount "$1" "$dir"
printf '%s' "$2" > "$dir/parameters.txt"
umount "$dir"
rmdir "$dir"
"""


class RealVmediaTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        reason = loop_devices_unavailable(TOOLS)
        if reason is not None:
            raise SkipTest(reason)
        self.runner = ProcessRunner(reactor, reactor)

    async def test_floppy_on_a_loop_device(self) -> None:
        wrappers = os.path.abspath(self.mktemp())
        os.makedirs(wrappers)
        fat_mount_dir(wrappers)
        env = {"PATH": wrappers + os.pathsep + os.environ.get("PATH", "")}
        loop, = await attach_loop_devices(self.runner, os.path.abspath(self.mktemp()),
                                          [4 * MiB], self.addCleanup)
        await self.runner.execute("mkfs.vfat", "-n", "ir-vfd-dev", loop.path)
        await run_in_sandbox(self.runner, [loop], ["sh", "-c", WRITE, "sh", loop.path,
                                                   PARAMETERS], env=env)
        cmdline = os.path.abspath(self.mktemp())
        with open(cmdline, "w") as f:
            f.write("BOOT_IMAGE=/vmlinuz boot_method=vmedia ipa-debug=0\n")
        spec = {"call": "vmedia", "config": {"cmdline_path": cmdline}}
        out, err = await run_in_sandbox(self.runner, [loop], [
            sys.executable, "-m", "tests.sandboxed_agent", json.dumps(spec)], env=env)
        lines = out.decode().strip().splitlines()
        self.assertTrue(lines, err.decode(errors="replace"))
        outcome = json.loads(lines[-1])
        self.assertEqual(outcome["status"], "SUCCEEDED", outcome)
        self.assertEqual(outcome["result"], {"ipa-api-url": "http://10.0.0.1:6385",
                                             "BOOTIF": "01-aa-bb-cc-dd-ee-ff",
                                             "ipa-debug": "1"})
