"""execute_bootc_install (ipa_twisted.deploy.bootc and the generic manager's step).

bootc is not packaged in Debian 12, and ``bootc install to-disk`` writes a real disk, so these
tests run on recorded commands (a FakeRunner): they assert the exact argv the agent gives
podman, as the reference agent builds it. The ``parted`` output after the install
(``BOOTC_LAYOUT``) was written in parted's machine format for the layout bootc documents
for x86_64 (BIOS boot, 512 MiB EFI system partition, root), not captured from a bootc run.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted import errors
from ipa_twisted.config import AgentConfig
from ipa_twisted.context import HardwareContext
from ipa_twisted.deploy.bootc import (NO_PIVOT_ROOT_CONF, BootcInstaller, bootc_install_argv,
                                      container_reference)
from ipa_twisted.extensions.steps import execute_step, list_steps
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem
from tests.test_root_device import LSBLK

GiB = 1024 ** 3
IMAGE_SOURCE = "oci://quay.io/example/fedora-bootc:42"
IMAGE = "quay.io/example/fedora-bootc:42"
DEVICE = "/dev/sda"
# Ironic's image_pull_secret (here a registry token: base64 of "user:pass"), base64-encoded
# once more by Ironic's bootc deploy interface (oci_pull_secret).
REGISTRY_AUTH = base64.b64encode(b"user:pass").decode()
OCI_PULL_SECRET = base64.b64encode(REGISTRY_AUTH.encode()).decode()
BOOTC_LAYOUT = (
    "BYT;\n"
    "/dev/sda:10737418240B:scsi:512:512:gpt:QEMU QEMU HARDDISK:;\n"
    "1:17408B:1048575B:1031168B:free;\n"
    "1:1048576B:2097151B:1048576B::BIOS-BOOT:bios_grub;\n"
    "2:2097152B:538968063B:536870912B:fat16:EFI-SYSTEM:boot, esp;\n"
    "3:538968064B:10468982783B:9930014720B:xfs:root:;\n"
    "1:10468982784B:10737401343B:268418560B:free;\n")
EMPTY_DISK = "BYT;\n/dev/sda:10737418240B:scsi:512:512:unknown:QEMU QEMU HARDDISK:;\n"


def run_argv(*middle: str, size: str = "9472M", tail: tuple[str, ...] = ("--disable-selinux",),
             device: str = DEVICE) -> tuple[str, ...]:
    """The reference's podman command (10 GiB disk: 10240 - 768 MiB for the root)."""
    return ("podman", "--log-level=debug", "run", "--rm", "--privileged", "--pid=host",
            "--pull=never", "-v", "/var/lib/containers:/var/lib/containers",
            "-v", "/dev:/dev", *middle, IMAGE, "bootc", "install", "to-disk", "--wipe",
            "--skip-fetch-check", f"--root-size={size}", *tail, device)


class _Installer(SynchronousTestCase):
    """A BootcInstaller on a FakeRunner answering as a 10 GiB disk and bootc would."""

    def setUp(self) -> None:
        self.conf_dir = os.path.join(self.mktemp(), "containers.conf.d")
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.auth_seen: list[dict[str, Any]] = []
        self.keys_seen: list[str] = []
        self.runner = FakeRunner({
            ("podman", "pull"): self.answer_pull,
            ("blockdev", "--getsize64", DEVICE): b"10737418240\n",
            ("podman", "--log-level=debug", "run"): self.answer_run,
            ("parted", "-s", "-m", DEVICE, "unit", "B", "print", "free"): BOOTC_LAYOUT,
        }, missing={"getenforce"})
        self.patch(os, "environ", {"HTTPS_PROXY": "http://proxy:3128", "HOME": "/root"})

    def answer_pull(self, argv: tuple[str, ...]) -> bytes:
        for arg in argv:
            if arg.startswith("--authfile="):
                path = arg.split("=", 1)[1]
                self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
                with open(path) as f:
                    self.auth_seen.append(json.load(f))
        return b""

    def answer_run(self, argv: tuple[str, ...]) -> bytes:
        for arg in argv:
            if arg.startswith("--root-ssh-authorized-keys="):
                with open(arg.split("=", 1)[1]) as f:
                    self.keys_seen.append(f.read())
        return b"Installation complete!\n"

    reactor: Any = Clock()

    def install(self, image_source: Any = IMAGE_SOURCE, **kwargs: Any) -> Deferred[str]:
        config = AgentConfig(**kwargs.pop("config", {}))
        context = HardwareContext(config, self.runner, self.reactor, self.reactor)
        installer = BootcInstaller(context, containers_conf_dir=self.conf_dir,
                                   temp_dir=self.tmp)
        return Deferred.fromCoroutine(installer.install(DEVICE, image_source, **kwargs))



class InstallerTests(_Installer):
    def test_commands_as_the_reference(self) -> None:
        result = self.successResultOf(self.install())
        self.assertEqual(result, f"Container image ({IMAGE_SOURCE}) written to device {DEVICE}")
        self.assertEqual(self.runner.argvs, [
            ("podman", "pull", "--retry-delay=5s", IMAGE),
            ("blockdev", "--getsize64", DEVICE),
            ("getenforce",),
            run_argv(),
            ("parted", "-s", "-m", DEVICE, "unit", "B", "print", "free")])
        with open(os.path.join(self.conf_dir, "01-ipa.conf")) as f:
            self.assertEqual(f.read(), NO_PIVOT_ROOT_CONF)
        pull, run = self.runner.calls[0], self.runner.calls[3]
        for call in (pull, run):
            self.assertEqual(call.kwargs["env"], {"HTTPS_PROXY": "http://proxy:3128"})
            self.assertIsNone(call.kwargs["timeout"])

    def test_pull_secret_only_during_the_pull(self) -> None:
        self.successResultOf(self.install(pull_secret=OCI_PULL_SECRET))
        self.assertEqual(self.auth_seen, [{"auths": {"quay.io": {"auth": REGISTRY_AUTH}}}])
        pull = self.runner.argvs[0]
        self.assertEqual(pull[:2], ("podman", "pull"))
        self.assertEqual(pull[3:], ("--retry-delay=5s", IMAGE))
        auth_path = pull[2].split("=", 1)[1]
        self.assertFalse(os.path.exists(auth_path))
        self.assertFalse(os.path.exists(os.path.dirname(auth_path)))
        self.assertFalse(any("authfile" in arg for arg in self.runner.argvs[3]))

    def test_auth_file_removed_when_the_pull_fails(self) -> None:
        self.runner.answers[("podman", "pull")] = lambda argv: (self.answer_pull(argv), Exit(
            125, b"", b"Error: initializing source: unauthorized"))[1]
        failure = self.failureResultOf(self.install(pull_secret=OCI_PULL_SECRET),
                                       errors.ImageDownloadError)
        self.assertIn("Failed to pull container image", str(failure.value))
        self.assertIn("unauthorized", str(failure.value))
        auth_path = self.runner.argvs[0][2].split("=", 1)[1]
        self.assertFalse(os.path.exists(os.path.dirname(auth_path)))
        self.assertEqual(len(self.runner.argvs), 1)

    def test_secret_not_base64(self) -> None:
        failure = self.failureResultOf(self.install(pull_secret="not base64!"),
                                       errors.ImageDownloadError)
        self.assertIn("not base64", str(failure.value))
        self.assertEqual(self.runner.argvs, [])

    def test_selinux_keys_and_tpm2(self) -> None:
        self.runner.missing = set()
        self.runner.answers[("getenforce",)] = b"Permissive\n"
        self.successResultOf(self.install(instance_info={
            "bootc_authorized_keys": "ssh-ed25519 AAAA op@example\n", "bootc_tpm2_luks": True}))
        run = self.runner.argvs[3]
        key_arg = [a for a in run if a.startswith("--root-ssh-authorized-keys=")][0]
        key_file = key_arg.split("=", 1)[1]
        self.assertEqual(run, run_argv("-v", "/tmp:/tmp", "--security-opt",
                                       "label=type:unconfined_t",
                                       tail=("--block-setup=tpm2-luks", key_arg)))
        self.assertEqual(os.path.dirname(key_file), self.tmp)
        self.assertEqual(self.keys_seen, ["ssh-ed25519 AAAA op@example\n"])
        self.assertFalse(os.path.exists(key_file))

    def test_disabled_selinux_outputs(self) -> None:
        self.runner.missing = set()
        for answer in (b"Disabled\n", Exit(1, b"", b"")):
            self.runner.answers[("getenforce",)] = answer
            self.successResultOf(self.install())
            self.assertEqual(self.runner.argvs[-2][-2], "--disable-selinux")

    def test_pull_failure(self) -> None:
        self.runner.answers[("podman", "pull")] = Exit(125, b"", b"manifest unknown")
        failure = self.failureResultOf(self.install(), errors.ImageDownloadError)
        self.assertIn(IMAGE, str(failure.value))
        self.assertEqual(len(self.runner.argvs), 1)

    def test_run_failure(self) -> None:
        self.runner.answers[("podman", "--log-level=debug", "run")] = Exit(
            1, b"", b"error: Installing to disk: wipefs failed")
        failure = self.failureResultOf(self.install(), errors.ImageWriteError)
        self.assertIn("exit code 1", str(failure.value))
        self.assertIn("wipefs failed", str(failure.value))
        self.assertIn(DEVICE, str(failure.value))

    def test_image_without_bootc(self) -> None:
        message = (b'Error: crun: executable file `bootc` not found in $PATH: No such file '
                   b'or directory: OCI runtime attempted to invoke a command that was not '
                   b'found\n')
        for answer in (Exit(127, b"", message), (message, b"")):
            self.runner.answers[("podman", "--log-level=debug", "run")] = answer
            failure = self.failureResultOf(self.install(), errors.ImageDownloadError)
            self.assertIn("does not contain the required bootc binary", str(failure.value))
            self.assertIn(IMAGE_SOURCE, str(failure.value))

    def test_no_partition_after_the_install(self) -> None:
        self.runner.answers[("parted", "-s", "-m", DEVICE, "unit", "B", "print",
                             "free")] = EMPTY_DISK
        self.failureResultOf(self.install(), errors.InstanceDeployFailure)

    def test_disk_too_small(self) -> None:
        self.runner.answers[("blockdev", "--getsize64", DEVICE)] = b"805306368\n"  # 768 MiB
        failure = self.failureResultOf(self.install(), errors.InstanceDeployFailure)
        self.assertIn("too small", str(failure.value))
        self.assertFalse(any(argv[1:3] == ("--log-level=debug", "run")
                             for argv in self.runner.argvs))

    def test_bad_image_source(self) -> None:
        for value in (None, "", 3, "oci://", "oci://quay.io", "quay.io/x:1"):
            self.failureResultOf(self.install(value), errors.InvalidCommandParamsError)
        self.assertEqual(self.runner.argvs, [])

    def test_argv_helper_and_reference(self) -> None:
        self.assertEqual(container_reference("oci://registry.local:5000/a/b@sha256:00"),
                         ("registry.local:5000", "registry.local:5000/a/b@sha256:00"))
        self.assertEqual(tuple(bootc_install_argv(IMAGE, DEVICE, 9472, selinux=False)),
                         run_argv())


class ConfigDriveTests(_Installer, TestCase):
    """The config drive is decoded in a thread: the real reactor."""

    reactor = reactor

    async def test_bad_configdrive_changes_nothing(self) -> None:
        with self.assertRaises(errors.InstanceDeployFailure):
            await self.install(configdrive="this is not a config drive")
        self.assertEqual(self.runner.argvs, [])
        self.assertFalse(os.path.exists(self.conf_dir))

    async def test_configdrive_after_the_install(self) -> None:
        # The config drive partition itself is tested on loop devices
        # (tests/test_deploy_write.py); here: it is written after bootc, to the device.
        written: list[tuple[str, bytes]] = []

        async def partition(context: Any, device: str, drive: bytes) -> str:
            written.append((device, drive))
            return device + "4"
        from ipa_twisted.deploy import configdrive
        self.patch(configdrive, "create_config_drive_partition", partition)
        drive = b"\0" * 4096
        await self.install(configdrive=base64.b64encode(gzip.compress(drive)).decode())
        self.assertEqual(written, [(DEVICE, drive)])


class StepTests(SynchronousTestCase):
    """The generic manager's ``execute_bootc_install`` step, as Ironic calls it."""

    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        for name in ("sda", "sdb", "sdc", "nvme0n1", "md0", "loop0"):
            self.system.add_block_device(name)
            self.system.write(f"sys/class/block/{name}/ro", "0\n")
        self.device = f"{self.system.dev_path}/sdc"
        self.conf_dir = self.mktemp()
        self.runner = FakeRunner({
            ("lsblk", "-bia", "--json"): LSBLK,
            ("podman", "pull"): b"",
            ("blockdev", "--getsize64", self.device): b"10737418240\n",
            ("podman", "--log-level=debug", "run"): b"",
            ("parted", "-s", "-m", self.device, "unit", "B", "print", "free"): BOOTC_LAYOUT,
        }, missing={"getenforce"})
        self.node = {"uuid": "n1", "properties": {"root_device": {"serial": "BIG1"}},
                     "instance_info": {"image_source": IMAGE_SOURCE}}

    def managers(self, **config: Any) -> HardwareManagers:
        manager = GenericHardwareManager(udev=lambda name: {},
                                         containers_conf_dir=self.conf_dir)
        context = HardwareContext(self.system.config(**config), self.runner, Clock(), None)
        return self.successResultOf(Deferred.fromCoroutine(HardwareManagers.load(
            context, [manager])))

    def execute(self, managers: HardwareManagers, kind: str = "deploy") -> Deferred[Any]:
        failure = {"deploy": errors.DeploymentError, "service": errors.ServicingError}[kind]
        step = {"interface": "deploy", "step": "execute_bootc_install",
                "args": {"image_source": IMAGE_SOURCE, "configdrive": None,
                         "oci_pull_secret": OCI_PULL_SECRET}}
        return Deferred.fromCoroutine(execute_step(managers, kind, step, self.node, [],
                                                   None, {}, failure))

    def test_listed_for_deploy_and_service_not_clean(self) -> None:
        managers = self.managers()
        expected = {"step": "execute_bootc_install", "priority": 0, "interface": "deploy",
                    "reboot_requested": False}
        for kind, listed in (("deploy", True), ("service", True), ("clean", False)):
            steps = self.successResultOf(Deferred.fromCoroutine(list_steps(
                managers, kind, self.node, [])))["generic_hardware_manager"]
            found = [s for s in steps if s["step"] == "execute_bootc_install"]
            self.assertEqual(found, [expected] if listed else [], kind)

    def test_runs_on_the_install_device(self) -> None:
        for kind in ("deploy", "service"):
            self.runner.calls.clear()
            result = self.successResultOf(self.execute(self.managers(), kind))
            self.assertEqual(result, f"Container image ({IMAGE_SOURCE}) written to device "
                             f"{self.device}")
            argvs = [argv for argv in self.runner.argvs if argv[0] != "lsblk"]
            self.assertEqual(argvs[0][:2], ("podman", "pull"))
            self.assertTrue(argvs[0][2].startswith("--authfile="))
            self.assertEqual(argvs[3], run_argv(device=self.device))

    def test_disable_bootc_deploy(self) -> None:
        with capturedLogs() as events:
            failure = self.failureResultOf(self.execute(self.managers(
                disable_bootc_deploy=True)), errors.CommandExecutionError)
        self.assertIn("administratively disabled (disable_bootc_deploy)",
                      str(failure.value))
        self.assertEqual(self.runner.argvs, [])
        self.assertFalse(os.path.exists(self.conf_dir))
        self.assertTrue(any("bootc based deployment is disabled" in e["log_format"]
                            for e in events))
