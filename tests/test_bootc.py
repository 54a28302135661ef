"""execute_bootc_install (ipa_twisted.deploy.bootc and the generic manager's step).

bootc is not packaged in Debian 12, and ``bootc install to-disk`` writes a real disk, so most
tests run on recorded commands (a FakeRunner): they assert the exact argv the agent gives
podman, as the reference agent builds it. ``RealPodmanBootcTests`` runs the step with real
podman (the image pulled with the pull secret from a registry the test starts, then run
privileged onto a loop device) and a stand-in for bootc inside the image. The ``parted`` output after the install
(``BOOTC_LAYOUT``) was written in parted's machine format for the layout bootc documents
for x86_64 (BIOS boot, 512 MiB EFI system partition, root), not captured from a bootc run.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

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

    def test_podman_without_retry_delay(self) -> None:
        """Debian 12's podman (4.3) has no ``pull --retry-delay`` (seen with the real one)."""
        def pull(argv: tuple[str, ...]) -> Any:
            if "--retry-delay=5s" in argv:
                return Exit(125, b"", b"Error: unknown flag: --retry-delay\nSee 'podman "
                            b"pull --help'\n")
            return self.answer_pull(argv)
        self.runner.answers[("podman", "pull")] = pull
        self.successResultOf(self.install(pull_secret=OCI_PULL_SECRET))
        self.assertEqual([argv[0:2] + argv[3:] for argv in self.runner.argvs[:2]],
                         [("podman", "pull", "--retry-delay=5s", IMAGE),
                          ("podman", "pull", IMAGE)])
        self.assertEqual(self.runner.argvs[0][2], self.runner.argvs[1][2])   # --authfile
        self.assertEqual(len(self.auth_seen), 1)
        self.assertEqual(self.runner.argvs[4], run_argv())

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


FAKE_BOOTC = """\
#!/bin/sh
# Stands in for bootc (not packaged in Debian): records how it was called and lays the disk
# out as bootc would, with the GPT (head and tail) the test made.
set -e
printf '%s\\n' "$@" > {dir}/bootc-argv
for arg in "$@"; do
  case "$arg" in --root-ssh-authorized-keys=*) cat "${{arg#*=}}" > {dir}/bootc-keys;; esac
  device="$arg"
done
dd if={dir}/head.img of="$device" bs=1048576 conv=notrunc 2>/dev/null
dd if={dir}/tail.img of="$device" bs=1048576 seek={tail_mib} conv=notrunc 2>/dev/null
"""



async def stand_in_layout(runner: Any, directory: str, size: int) -> None:
    """``head.img`` and ``tail.img`` in ``directory``: the first and last MiB of a disk of
    ``size`` bytes with the GPT a bootc install leaves, which the stand-in bootc writes."""
    layout = os.path.join(directory, "layout.img")
    with open(layout, "wb") as f:
        f.truncate(size)
    await runner.execute("parted", "-s", layout, "--", "mklabel", "gpt",
                         "mkpart", "BIOS-BOOT", "1MiB", "2MiB", "set", "1", "bios_grub", "on",
                         "mkpart", "EFI-SYSTEM", "fat32", "2MiB", "130MiB", "set", "2", "esp",
                         "on", "mkpart", "root", "xfs", "130MiB", "900MiB")
    with open(layout, "rb") as f:
        head = f.read(1024 * 1024)
        f.seek(size - 1024 * 1024)
        tail = f.read()
    os.remove(layout)
    for name, data in (("head.img", head), ("tail.img", tail)):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)

class RealPodmanBootcTests(TestCase):
    """execute_bootc_install with real podman: the image pulled with the pull secret from a
    registry that wants a password, then run privileged with the host's /dev onto a loop
    device. The image's bootc is a stand-in script (bootc is not in Debian) that records its
    arguments and writes a GPT; the partition check and config drive are the real ones."""

    timeout = 300
    DISK = 1024 * 1024 * 1024

    async def setUp(self) -> None:  # type: ignore[override]
        from ipa_twisted.process import ProcessRunner
        from ipa_twisted.testing.sandbox import (LoopOnlyRunner, attach_loop_devices,
                                                 loop_devices_unavailable)
        from tests.podman import PodmanBed
        reason = loop_devices_unavailable(("parted", "sgdisk", "mkfs.vfat", "blockdev"))
        if reason is not None:
            raise SkipTest(reason)
        self.bed = bed = await PodmanBed.start(self)
        # podman's own default storage directory, which the reference's command mounts.
        os.makedirs("/var/lib/containers", mode=0o700, exist_ok=True)
        real = ProcessRunner(reactor, reactor)
        [self.loop] = await attach_loop_devices(real, os.path.join(bed.dir, "disks"),
                                                [self.DISK], self.addCleanup)
        await stand_in_layout(real, bed.dir, self.DISK)
        await bed.build_image("localhost/ipa-test/bootc:1", {"/usr/bin/bootc": FAKE_BOOTC.format(
            dir=bed.dir, tail_mib=self.DISK // (1024 * 1024) - 1)}, ["/usr/bin/bootc"])
        host = await bed.start_registry(self, user="ipa", password="s3cret")
        self.image_source = f"oci://{host}/ipa-test/bootc:1"
        await bed.push("localhost/ipa-test/bootc:1", f"{host}/ipa-test/bootc:1",
                       creds="ipa:s3cret")
        self.runner = LoopOnlyRunner(bed.runner, [self.loop.path])
        manager = GenericHardwareManager(udev=lambda name: {}, containers_conf_dir=os.path.join(
            bed.dir, "containers.conf.d"))
        self.context = HardwareContext(AgentConfig(include_loop_devices=True), self.runner,
                                       reactor, reactor)
        self.managers = await HardwareManagers.load(self.context, [manager])
        self.node = {"uuid": "n1", "properties": {"root_device": {"name": self.loop.path}},
                     "instance_info": {"image_source": self.image_source,
                                       "bootc_authorized_keys": "ssh-ed25519 AAAAC3 op@ipa\n"}}

    def auth_dirs(self) -> list[str]:
        return sorted(name for name in os.listdir(tempfile.gettempdir())
                      if name.startswith("ipa-container-auth-"))

    async def deploy(self, password: str, configdrive: str | None = None) -> Any:
        secret = base64.b64encode(base64.b64encode(f"ipa:{password}".encode())).decode()
        step = {"interface": "deploy", "step": "execute_bootc_install",
                "args": {"image_source": self.image_source, "configdrive": configdrive,
                         "oci_pull_secret": secret}}
        return await execute_step(self.managers, "deploy", step, self.node, [], None, {},
                                  errors.DeploymentError)

    async def test_install(self) -> None:
        drive = os.path.join(self.bed.dir, "configdrive.img")
        with open(drive, "wb") as f:
            f.truncate(2 * 1024 * 1024)
        await self.bed.runner.execute("mkfs.vfat", "-n", "config-2", drive)
        with open(drive, "rb") as f:
            configdrive = base64.b64encode(gzip.compress(f.read())).decode()
        before = self.auth_dirs()
        result = await self.deploy("s3cret", configdrive)
        self.assertEqual(result, f"Container image ({self.image_source}) written to device "
                         f"{self.loop.path}")
        with open(os.path.join(self.bed.dir, "bootc-argv")) as f:
            argv = f.read().splitlines()
        self.assertEqual(argv[:5], ["install", "to-disk", "--wipe", "--skip-fetch-check",
                                    "--root-size=256M"])
        self.assertTrue(argv[5].startswith("--root-ssh-authorized-keys=/tmp/"), argv)
        self.assertEqual(argv[6:], ["--disable-selinux", self.loop.path])
        with open(os.path.join(self.bed.dir, "bootc-keys")) as f:
            self.assertEqual(f.read(), "ssh-ed25519 AAAAC3 op@ipa\n")
        self.assertFalse(os.path.exists(argv[5].split("=", 1)[1]))
        self.assertEqual(self.auth_dirs(), before)
        from ipa_twisted.blockdev import disks
        layout = await disks.read_layout(self.context, self.loop.path)
        self.assertEqual([p.name for p in layout.partitions],
                         ["BIOS-BOOT", "EFI-SYSTEM", "root", "config-2"])
        self.assertTrue(any('/manifests/1 HTTP/1.1" 200' in line
                            for line in self.bed.registry_requests()))

    async def test_wrong_pull_secret(self) -> None:
        with self.assertRaises(errors.ImageDownloadError) as caught:
            await self.deploy("wrong")
        self.assertIn("Failed to pull container image", str(caught.exception))
        self.assertFalse(os.path.exists(os.path.join(self.bed.dir, "bootc-argv")))
        from ipa_twisted.blockdev import disks
        layout = await disks.read_layout(self.context, self.loop.path)
        self.assertEqual(layout.partitions, ())
