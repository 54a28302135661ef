"""Tests for ipa_twisted.hardware.generic.erase on recorded hdparm, nvme-cli and lsblk outputs.

The ATA drive is played by ``AtaDrive``: it answers ``hdparm`` as a drive in a given
security state does (``hdparm -I`` output in the format recorded from real drives) and moves
between states on the password commands, so the whole password dance is exercised. The
QEMU outputs were recorded inside the ramdisk (tests/test_qemu_ramdisk.py boots it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.config import AgentConfig
from ipa_twisted.errors import BlockDeviceEraseError, ProtectedDeviceError
from ipa_twisted.blockdev import disks
from ipa_twisted.blockdev.drives import parse_ata_security, parse_nvme_id_ctrl
from ipa_twisted.hardware.generic.erase import EraseSettings, erase_clean_steps, shred_argv
from ipa_twisted.hardware.generic.erase_progress import PROGRESS_LOG_INTERVAL, EraseProgress
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.context import HardwareContext
from ipa_twisted.hardware.inventory import BlockDevice
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem
from ipa_twisted.testing.ramdisk_recordings import (HDPARM_QEMU_SATA, HDPARM_VIRTIO,
                                                  LSBLK_FS_RAID_MEMBER, NVME_QEMU)

_T = TypeVar("_T")
MiB = 1 << 20

# -- recorded outputs (of a real drive; QEMU's are in ramdisk_recordings) ---------------------

HDPARM_HEAD = """\

/dev/{name}:

ATA device, with non-removable media
\tModel Number:       Samsung SSD 860 EVO 500GB               
\tSerial Number:      S3Z1NB0K123456A     
\tFirmware Revision:  RVT04B6Q
\tTransport:          Serial, ATA8-AST, SATA 1.0a, SATA II Extensions, SATA Rev 3.0
Standards:
\tUsed: unknown (minor revision code 0x005e) 
\tSupported: 11 8 7 6 5 
Commands/features:
\tEnabled\tSupported:
\t   *\tSMART feature set
\t   *\tSecurity Mode feature set
\t   *\tWrite cache
"""
HDPARM_TAIL = """\
Logical Unit WWN Device Identifier: 5002538e40a1b2c3
\tNAA\t\t: 5
\tIEEE OUI\t: 002538
\tUnique ID\t: e40a1b2c3
Checksum: correct
"""

# nvme id-ctrl -o json of drives that can (or cannot) format.
NVME_CRYPTO = json.dumps({"oacs": 0x17, "fna": 0x7, "sanicap": 0x3})
NVME_NO_FORMAT = json.dumps({"oacs": 0x4, "fna": 0, "sanicap": 0})

def hdparm_output(name: str, security: str | None) -> str:
    if security is None:
        return HDPARM_HEAD.format(name=name) + HDPARM_TAIL
    return HDPARM_HEAD.format(name=name) + "Security: \n" + security + HDPARM_TAIL

def security_section(*, enabled: bool = False, locked: bool = False, frozen: bool = False,
                     enhanced: bool = True, minutes: tuple[int, int] | None = (2, 2)) -> str:
    def line(on: bool, text: str) -> str:
        return f"\t\t{text}\n" if on else f"\tnot\t{text}\n"
    lines = ("\tMaster password revision code = 65534\n\t\tsupported\n"
             + line(enabled, "enabled") + line(locked, "locked") + line(frozen, "frozen")
             + "\tnot\texpired: security count\n"
             + ("\t\tsupported: enhanced erase\n" if enhanced
                else "\tnot\tsupported: enhanced erase\n"))
    if enabled:
        lines += "\tSecurity level high\n"
    if minutes is not None:
        lines += (f"\t{minutes[0]}min for SECURITY ERASE UNIT. {minutes[1]}min for ENHANCED "
                  "SECURITY ERASE UNIT.\n")
    return lines

@dataclass
class AtaDrive:
    """A SATA drive answering hdparm: its security state changes with the commands.

    ``password`` is the user password once set (hdparm >= 9.51 passes "NULL" as the empty
    password); ``fail_erase`` makes the erase command fail after it locked the drive.
    """

    name: str
    supported: bool = True
    enabled: bool = False
    locked: bool = False
    frozen: bool = False
    enhanced: bool = True
    password: str | None = None
    fail_erase: bool = False
    erased: int = 0

    def __call__(self, argv: tuple[str, ...]) -> Any:
        if argv[1] == "-I":
            if not self.supported:
                return hdparm_output(self.name, None)
            return hdparm_output(self.name, security_section(
                enabled=self.enabled, locked=self.locked, frozen=self.frozen,
                enhanced=self.enhanced))
        assert argv[1:3] == ("--user-master", "u"), argv
        action, password = argv[3], "" if argv[4] == "NULL" else argv[4]
        if self.frozen:
            return Exit(5, b"", b"SECURITY_* command failed: Input/output error")
        if action == "--security-set-pass":
            self.enabled, self.password = True, password
            return b"security_password: \"\"\n"
        if action in ("--security-unlock", "--security-disable"):
            if password != self.password:
                return Exit(5, b"", b"SECURITY_UNLOCK: Input/output error")
            self.locked = False
            if action == "--security-disable":
                self.enabled, self.password = False, None
            return b""
        if action.startswith("--security-erase"):
            if not self.enabled or password != self.password:
                return Exit(5, b"", b"SECURITY_ERASE: Input/output error")
            if self.fail_erase:
                self.locked = True
                return Exit(5, b"", b"SECURITY_ERASE: Input/output error")
            self.enabled, self.locked, self.password = False, False, None
            self.erased += 1
            return b""
        raise AssertionError(argv)

# -- helpers ----------------------------------------------------------------------------------

class GatedRunner(FakeRunner):
    """Answers at once, except the erase commands themselves: those wait for ``finish``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: list[tuple[tuple[str, ...], Deferred[tuple[bytes, bytes]]]] = []

    @staticmethod
    def slow(argv: tuple[str, ...]) -> bool:
        return (argv[0] == "shred" or argv[:2] == ("nvme", "format")
                or (argv[0] == "hdparm" and len(argv) > 3
                    and argv[3].startswith("--security-erase")))

    def execute(self, *argv: str, **kwargs: Any) -> Deferred[tuple[bytes, bytes]]:
        answered = super().execute(*argv, **kwargs)
        if not self.slow(argv):
            return answered
        gate: Deferred[tuple[bytes, bytes]] = Deferred()
        self.waiting.append((argv, gate))
        self._answers_later = getattr(self, "_answers_later", {})
        self._answers_later[id(gate)] = answered
        return gate

    @property
    def running(self) -> list[tuple[str, ...]]:
        return [argv for argv, _ in self.waiting]

    def finish(self, index: int = 0) -> None:
        """Let the ``index``-th waiting erase command end (with its recorded answer)."""
        _, gate = self.waiting.pop(index)
        self._answers_later.pop(id(gate)).chainDeferred(gate)

@dataclass(frozen=HardwareContext.__dataclass_params__.frozen)  # type: ignore[attr-defined]
class DispatchingContext(HardwareContext):
    """A context with a ``dispatch`` (what the agent's managers provide)."""

    dispatch: Any = None

def lsblk_json(*disks: dict[str, Any]) -> bytes:
    devices = []
    for disk in disks:
        entry = {"kname": disk["name"], "model": disk.get("model"), "size": disk["size"],
                 "rota": disk.get("rota", False), "type": disk.get("type", "disk"),
                 "uuid": None, "partuuid": None, "serial": disk.get("serial"), "wwn": None,
                 "vendor": None, "log-sec": 512, "phy-sec": 512, "tran": disk.get("tran")}
        if disk.get("children"):
            entry["children"] = [{"kname": child, "size": MiB, "type": "part",
                                  "rota": False} for child in disk["children"]]
        devices.append(entry)
    return json.dumps({"blockdevices": devices}).encode()

class EraseTestCase(SynchronousTestCase):
    """A machine with an NVMe drive, a SATA SSD and a virtio disk."""

    DISKS = [
        {"name": "nvme0n1", "size": 64 * MiB, "serial": "N1", "tran": "nvme"},
        {"name": "sda", "size": 64 * MiB, "serial": "S1", "tran": "sata"},
        {"name": "vda", "size": 32 * MiB, "serial": "V1", "rota": True},
    ]

    def setUp(self) -> None:
        self.system = FakeSystem(self.mktemp())
        for disk in self.DISKS:
            self.system.add_block_device(disk["name"])
            self.system.write(f"sys/class/block/{disk['name']}/stat",
                              "10 0 100 5 20 0 2048 9 0 0 0 0 0 0 0 0 0\n")
        self.drive = AtaDrive(self.dev("sda"))
        self.clock = Clock()
        self.progress: list[Any] = []
        self.wiped: list[str] = []

    def dev(self, name: str) -> str:
        return os.path.join(self.system.dev_path, name)

    def answers(self, extra: dict[tuple[str, ...], Any] | None = None
                ) -> dict[tuple[str, ...], Any]:
        answers: dict[tuple[str, ...], Any] = {
            ("lsblk", "-bia", "--json"): lsblk_json(*self.DISKS),
            ("lsblk", "--fs", "--noheadings"): lambda argv: argv[-1].split("/")[-1] + "\n",
            ("hdparm", "-I", self.dev("vda")): HDPARM_VIRTIO,
            ("hdparm",): self.drive,
            ("nvme", "id-ctrl"): NVME_QEMU,
            ("nvme", "format"): b"Success formatting namespace:1\n",
            ("shred",): (b"", b"shred: pass 1/2 (random)...\nshred: pass 2/2 (000000)...\n"),
            ("wipefs",): b"",
            ("blockdev", "--rereadpt"): b"",
            ("blkid", "-p"): Exit(2),               # nothing found on the disk itself
        }
        answers.update(extra or {})
        return answers

    def manager(self, runner: FakeRunner | None = None, dispatch: Any = None,
                **config: Any) -> GenericHardwareManager:
        self.runner = runner or FakeRunner(self.answers(), missing=["smartctl"])

        async def wipe(device: str, reactor: Any) -> None:
            self.wiped.append(device)
        manager = GenericHardwareManager(udev=lambda name: {}, wipe=wipe)
        manager.bind(DispatchingContext(self.system.config(**config), self.runner, self.clock,
                                        None, report_progress=self.progress.append,
                                        dispatch=dispatch))
        return manager

    def device(self, name: str, rotational: bool = False, size: int = 64 * MiB) -> BlockDevice:
        return BlockDevice(name=self.dev(name), model=None, size=size, rotational=rotational)

    def result(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return self.successResultOf(Deferred.fromCoroutine(coroutine))

    def failure(self, coroutine: Coroutine[Any, Any, Any], *kinds: type) -> Any:
        return self.failureResultOf(Deferred.fromCoroutine(coroutine), *kinds).value

    def ran(self, program: str) -> list[tuple[str, ...]]:
        return [argv for argv in self.runner.argvs if argv[0] == program]

# -- parsing ----------------------------------------------------------------------------------

class ParsingTests(SynchronousTestCase):
    def test_ata_security_states(self) -> None:
        idle = parse_ata_security(hdparm_output("sda", security_section()))
        assert idle is not None
        self.assertEqual((idle.supported, idle.enabled, idle.locked, idle.frozen,
                          idle.enhanced_erase_supported, idle.erase_minutes,
                          idle.enhanced_erase_minutes, idle.state),
                         (True, False, False, False, True, 2, 2, "SEC1"))
        frozen = parse_ata_security(hdparm_output("sda", security_section(frozen=True)))
        assert frozen is not None
        self.assertEqual((frozen.frozen, frozen.state), (True, "SEC2"))
        locked = parse_ata_security(hdparm_output(
            "sda", security_section(enabled=True, locked=True, enhanced=False,
                                    minutes=(508, 0))))
        assert locked is not None
        self.assertEqual((locked.enabled, locked.locked, locked.enhanced_erase_supported,
                          locked.erase_minutes, locked.state), (True, True, False, 508, "SEC4"))
        unlocked = parse_ata_security(hdparm_output(
            "sda", security_section(enabled=True, minutes=None)))
        assert unlocked is not None
        self.assertEqual((unlocked.state, unlocked.erase_minutes), ("SEC5", None))

    def test_no_security_section(self) -> None:
        self.assertIsNone(parse_ata_security(HDPARM_QEMU_SATA))
        self.assertIsNone(parse_ata_security(HDPARM_VIRTIO))
        self.assertIsNone(parse_ata_security(""))

    def test_nvme_capabilities(self) -> None:
        qemu = parse_nvme_id_ctrl(NVME_QEMU)
        self.assertEqual((qemu.format_supported, qemu.crypto_erase_supported,
                          qemu.sanitize_block, qemu.format_mode), (True, False, False, 1))
        crypto = parse_nvme_id_ctrl(NVME_CRYPTO.encode())
        self.assertEqual((crypto.format_mode, crypto.sanitize_crypto, crypto.sanitize_block,
                          crypto.sanitize_overwrite), (2, True, True, False))
        self.assertIsNone(parse_nvme_id_ctrl(NVME_NO_FORMAT).format_mode)
        for bad in (b"", b"[]", b'{"fna": 1}', b"not json"):
            with self.assertRaises(ValueError):
                parse_nvme_id_ctrl(bad)

    def test_shred_argv(self) -> None:
        self.assertEqual(shred_argv("/dev/sda", 1, True),
                         ["shred", "--force", "--zero", "--verbose", "--iterations", "1",
                          "/dev/sda"])
        self.assertEqual(shred_argv("/dev/sda", 3, False),
                         ["shred", "--force", "--verbose", "--iterations", "3", "/dev/sda"])

    def test_settings_from_node(self) -> None:
        self.assertEqual(EraseSettings.from_node(None), EraseSettings())
        self.assertEqual(EraseSettings.from_node({}, default_concurrency=3).concurrency, 3)
        settings = EraseSettings.from_node({"driver_internal_info": {
            "agent_erase_devices_iterations": 2, "agent_erase_devices_zeroize": False,
            "agent_continue_if_ata_erase_failed": True, "agent_enable_nvme_secure_erase":
            "false", "agent_enable_ata_secure_erase": False, "agent_erase_skip_read_only":
            "True", "disk_erasure_concurrency": 1}}, default_concurrency=8)
        self.assertEqual(settings, EraseSettings(
            iterations=2, zeroize=False, enable_ata_secure_erase=False,
            enable_nvme_secure_erase=False, continue_if_secure_erase_failed=True,
            skip_read_only=True, concurrency=1))
        # the newer key wins over the older; Ironic's driver_internal_info over driver_info
        settings = EraseSettings.from_node({
            "driver_internal_info": {"agent_continue_if_secure_erase_failed": False,
                                     "agent_continue_if_ata_erase_failed": True},
            "driver_info": {"agent_erase_devices_iterations": 5,
                            "agent_continue_if_secure_erase_failed": True}})
        self.assertEqual((settings.continue_if_secure_erase_failed, settings.iterations),
                         (False, 5))

    def test_clean_steps(self) -> None:
        self.assertEqual(erase_clean_steps(), [
            {"step": "erase_devices", "priority": 10, "interface": "deploy",
             "reboot_requested": False, "abortable": True},
            {"step": "erase_devices_express", "priority": 0, "interface": "deploy",
             "reboot_requested": False, "abortable": True}])

# -- one disk ---------------------------------------------------------------------------------

class EraseBlockDeviceTests(EraseTestCase):
    def test_nvme_is_formatted_with_user_data_erase(self) -> None:
        manager = self.manager()
        done = self.result(manager.erase_block_device({}, self.device("nvme0n1")))
        self.assertEqual(done, "nvme format --ses 1 (user data erase)")
        self.assertIn(("nvme", "format", self.dev("nvme0n1"), "--ses", "1", "--force"),
                      self.runner.argvs)
        self.assertEqual(self.ran("shred"), [])

    def test_nvme_crypto_erase_when_supported(self) -> None:
        manager = self.manager(FakeRunner(self.answers({("nvme", "id-ctrl"): NVME_CRYPTO})))
        self.assertEqual(self.result(manager.erase_block_device({}, self.device("nvme0n1"))),
                         "nvme format --ses 2 (crypto erase)")

    def test_nvme_without_format_is_shredded(self) -> None:
        manager = self.manager(FakeRunner(self.answers({("nvme", "id-ctrl"): NVME_NO_FORMAT})))
        done = self.result(manager.erase_block_device({}, self.device("nvme0n1")))
        self.assertEqual(done, "shred: 1 random pass(es) and a pass of zeros")
        self.assertEqual(self.ran("shred"), [tuple(shred_argv(self.dev("nvme0n1"), 1, True))])

    def test_failed_nvme_format_fails_unless_shredding_is_allowed(self) -> None:
        answers = self.answers({("nvme", "format"): Exit(
            1, b"", b"NVMe status: FORMAT_IN_PROGRESS")})
        manager = self.manager(FakeRunner(answers))
        error = self.failure(manager.erase_block_device({}, self.device("nvme0n1")),
                             BlockDeviceEraseError)
        self.assertIn("FORMAT_IN_PROGRESS", str(error))
        self.assertIn("agent_continue_if_secure_erase_failed", str(error))
        self.assertEqual(self.ran("shred"), [])
        node = {"driver_internal_info": {"agent_continue_if_secure_erase_failed": True,
                                         "agent_erase_devices_iterations": 2}}
        self.assertEqual(self.result(manager.erase_block_device(node,
                                                                self.device("nvme0n1"))),
                         "shred: 2 random pass(es) and a pass of zeros")
        self.assertEqual(self.ran("shred"), [tuple(shred_argv(self.dev("nvme0n1"), 2, True))])

    def test_nvme_erase_disabled(self) -> None:
        manager = self.manager()
        node = {"driver_internal_info": {"agent_enable_nvme_secure_erase": False,
                                         "agent_erase_devices_zeroize": False}}
        self.assertEqual(self.result(manager.erase_block_device(node, self.device("nvme0n1"))),
                         "shred: 1 random pass(es)")
        self.assertEqual(self.ran("nvme"), [])

    def test_ata_secure_erase_password_dance(self) -> None:
        manager = self.manager()
        done = self.result(manager.erase_block_device({}, self.device("sda")))
        self.assertEqual(done, "ATA enhanced secure erase")
        sda = self.dev("sda")
        self.assertEqual(self.ran("hdparm"), [
            ("hdparm", "-I", sda),
            ("hdparm", "--user-master", "u", "--security-set-pass", "NULL", sda),
            ("hdparm", "--user-master", "u", "--security-erase-enhanced", "NULL", sda),
            ("hdparm", "-I", sda)])
        self.assertEqual((self.drive.erased, self.drive.enabled), (1, False))
        self.assertEqual(self.ran("shred"), [])

    def test_normal_erase_without_enhanced(self) -> None:
        self.drive.enhanced = False
        manager = self.manager()
        self.assertEqual(self.result(manager.erase_block_device({}, self.device("sda"))),
                         "ATA secure erase")
        self.assertIn("--security-erase", [a[3] for a in self.ran("hdparm") if len(a) > 3])

    def test_recovers_a_drive_locked_by_an_interrupted_erase(self) -> None:
        # A previous erase set the (empty) password and the machine lost power: the drive
        # comes back locked (SEC4). It is unlocked with the empty password, then erased.
        self.drive.enabled, self.drive.locked, self.drive.password = True, True, ""
        manager = self.manager()
        self.assertEqual(self.result(manager.erase_block_device({}, self.device("sda"))),
                         "ATA enhanced secure erase")
        actions = [a[3] for a in self.ran("hdparm") if len(a) > 3]
        self.assertEqual(actions, ["--security-unlock", "--security-erase-enhanced"])
        self.assertEqual((self.drive.erased, self.drive.locked, self.drive.enabled),
                         (1, False, False))

    def test_drive_locked_with_another_password_is_refused(self) -> None:
        self.drive.enabled, self.drive.locked, self.drive.password = True, True, "secret"
        manager = self.manager()
        error = self.failure(manager.erase_block_device({}, self.device("sda")),
                             BlockDeviceEraseError)
        self.assertIn("already has a security password set", str(error))
        self.assertEqual([a[4] for a in self.ran("hdparm") if len(a) > 4],
                         ["NULL", ""])                      # both unlock attempts
        self.assertEqual(self.ran("shred"), [])

    def test_frozen_drive(self) -> None:
        self.drive.frozen = True
        manager = self.manager()
        error = self.failure(manager.erase_block_device({}, self.device("sda")),
                             BlockDeviceEraseError)
        self.assertIn("frozen", str(error))
        self.assertEqual(self.ran("shred"), [])
        node = {"driver_internal_info": {"agent_continue_if_ata_erase_failed": True}}
        with capturedLogs() as events:
            done = self.result(manager.erase_block_device(node, self.device("sda")))
        self.assertTrue(done.startswith("shred"))
        self.assertTrue(any("shredding it instead" in e.get("log_format", "")
                            for e in events))

    def test_failed_erase_leaves_the_drive_unlocked_and_without_password(self) -> None:
        self.drive.fail_erase = True
        manager = self.manager()
        node = {"driver_internal_info": {"agent_continue_if_secure_erase_failed": True}}
        done = self.result(manager.erase_block_device(node, self.device("sda")))
        self.assertTrue(done.startswith("shred"))
        self.assertEqual((self.drive.locked, self.drive.enabled), (False, False))
        actions = [a[3] for a in self.ran("hdparm") if len(a) > 3]
        self.assertEqual(actions, ["--security-set-pass", "--security-erase-enhanced",
                                   "--security-unlock", "--security-disable"])

    def test_without_security_feature_set_the_disk_is_shredded(self) -> None:
        self.drive.supported = False
        manager = self.manager(FakeRunner(self.answers({("hdparm", "-I"): HDPARM_QEMU_SATA})))
        self.assertTrue(self.result(manager.erase_block_device(
            {}, self.device("sda"))).startswith("shred"))
        manager = self.manager()
        self.assertTrue(self.result(manager.erase_block_device(
            {}, self.device("vda", rotational=True))).startswith("shred"))

    def test_smartctl_may_veto_ata_commands(self) -> None:
        answers = self.answers({("smartctl",): b"ATA Security is:  Unavailable\n"})
        manager = self.manager(FakeRunner(answers))
        self.assertTrue(self.result(manager.erase_block_device(
            {}, self.device("sda"))).startswith("shred"))
        self.assertEqual(self.drive.erased, 0)

    def test_skipped_devices(self) -> None:
        manager = self.manager(FakeRunner(self.answers(
            {("lsblk", "--fs", "--noheadings"): LSBLK_FS_RAID_MEMBER})))
        self.assertIn("RAID member", self.result(manager.erase_block_device(
            {}, self.device("vda"))))
        manager = self.manager()
        self.system.symlink("dev/disk/by-label/ir-vfd-dev", "../../vda")
        self.assertIn("virtual media", self.result(manager.erase_block_device(
            {}, self.device("vda"))))
        self.assertEqual(self.ran("shred"), [])

    def test_read_only_devices(self) -> None:
        self.system.write("sys/class/block/vda/ro", "1\n")
        manager = self.manager()
        error = self.failure(manager.erase_block_device({}, self.device("vda")),
                             BlockDeviceEraseError)
        self.assertIn("read-only", str(error))
        node = {"driver_internal_info": {"agent_erase_skip_read_only": True}}
        self.assertEqual(self.result(manager.erase_block_device(node, self.device("vda"))),
                         "skipped: it is read-only")

    def test_shred_failure(self) -> None:
        manager = self.manager(FakeRunner(self.answers(
            {("shred",): Exit(1, b"", b"shred: /dev/vda: error writing at offset 4096")})))
        error = self.failure(manager.erase_block_device({}, self.device("vda")),
                             BlockDeviceEraseError)
        self.assertIn("error writing at offset", str(error))

# -- every disk ---------------------------------------------------------------------------------

class EraseDevicesTests(EraseTestCase):
    def test_all_disks_at_once(self) -> None:
        runner = GatedRunner(self.answers(), missing=["smartctl"])
        manager = self.manager(runner)
        erasing = Deferred.fromCoroutine(manager.erase_devices({}, []))
        self.assertEqual(sorted(argv[0] for argv in runner.running), ["hdparm", "nvme", "shred"])
        [progress] = self.progress
        state = progress.serialize()
        self.assertEqual(state["phase"], "erasing")
        self.assertEqual({name: (d["state"], d["method"])
                          for name, d in state["devices"].items()},
                         {self.dev("nvme0n1"): ("running", "nvme_format_user_data_erase"),
                          self.dev("sda"): ("running", "ata_enhanced_secure_erase"),
                          self.dev("vda"): ("running", "shred")})
        # what the kernel wrote so far counts: 16 MiB of the 64 MiB shred has to write
        self.system.write("sys/class/block/vda/stat",
                          f"10 0 100 5 20 0 {2048 + 32768} 9 0 0 0 0 0 0 0 0 0\n")
        self.clock.advance(8)
        vda = progress.serialize()["devices"][self.dev("vda")]
        self.assertEqual((vda["bytes_written"], vda["bytes_to_write"], vda["percent"],
                          vda["eta_seconds"]), (16 * MiB, 64 * MiB, 25.0, 24.0))
        sda = progress.serialize()["devices"][self.dev("sda")]
        self.assertEqual(sda["percent"], round(100 * 8 / 120, 1))   # of hdparm's 2 minutes
        while runner.waiting:
            runner.finish()
        result = self.successResultOf(erasing)
        self.assertEqual(result, {self.dev("nvme0n1"): "nvme format --ses 1 (user data erase)",
                                  self.dev("sda"): "ATA enhanced secure erase",
                                  self.dev("vda"): "shred: 1 random pass(es) and a pass of "
                                                   "zeros"})
        final = progress.serialize()
        self.assertEqual(final["phase"], "done")
        self.assertEqual({d["state"] for d in final["devices"].values()}, {"done"})

    def test_concurrency_from_the_node(self) -> None:
        runner = GatedRunner(self.answers(), missing=["smartctl"])
        manager = self.manager(runner)
        node = {"driver_internal_info": {"disk_erasure_concurrency": 2}}
        erasing = Deferred.fromCoroutine(manager.erase_devices(node, []))
        seen = []
        while runner.waiting:
            self.assertLessEqual(len(runner.waiting), 2)
            seen.append(len(runner.waiting))
            runner.finish()
        self.assertEqual(seen, [2, 2, 1])
        self.assertEqual(len(self.successResultOf(erasing)), 3)

    def test_concurrency_from_the_agent_config(self) -> None:
        @dataclass(frozen=AgentConfig.__dataclass_params__.frozen)  # type: ignore
        class Config(AgentConfig):
            disk_erasure_concurrency: int = 1
        runner = GatedRunner(self.answers(), missing=["smartctl"])
        manager = self.manager(runner)
        paths = {f: getattr(manager.context.config, f) for f in (
            "sys_path", "proc_path", "dev_path", "etc_path", "cmdline_path")}
        manager.bind(DispatchingContext(Config(**paths), runner, self.clock, None))
        erasing = Deferred.fromCoroutine(manager.erase_devices({}, []))
        for _ in range(3):
            self.assertEqual(len(runner.waiting), 1)
            runner.finish()
        self.assertEqual(len(self.successResultOf(erasing)), 3)

    def test_dispatch_lets_another_manager_take_a_disk(self) -> None:
        calls: list[str] = []

        async def dispatch(method: str, node: Any, device: BlockDevice) -> Any:
            calls.append(device.name)
            if device.name.endswith("vda"):
                return "erased by the vendor tool"
            return await manager.erase_block_device(node, device)
        manager = self.manager(dispatch=dispatch)
        result = self.result(manager.erase_devices({}, []))
        self.assertEqual(result[self.dev("vda")], "erased by the vendor tool")
        self.assertEqual(sorted(calls), sorted(self.dev(d["name"]) for d in self.DISKS))
        self.assertEqual(self.ran("shred"), [])

    def test_every_disk_is_tried_before_failing(self) -> None:
        answers = self.answers({("shred",): Exit(1, b"", b"I/O error")})
        manager = self.manager(FakeRunner(answers, missing=["smartctl"]))
        error = self.failure(manager.erase_devices({}, []), BlockDeviceEraseError)
        self.assertIn("I/O error", str(error))
        self.assertEqual(self.drive.erased, 1)                    # sda was still erased
        self.assertIn(("nvme", "format", self.dev("nvme0n1"), "--ses", "1", "--force"),
                      self.runner.argvs)
        self.assertEqual(self.progress[0].serialize()["phase"], "failed")
        self.flushLoggedErrors()

    def test_several_failures_are_named_together(self) -> None:
        answers = self.answers({("shred",): Exit(1, b"", b"I/O error"),
                                ("nvme", "format"): Exit(1, b"", b"Invalid Field")})
        manager = self.manager(FakeRunner(answers, missing=["smartctl"]))
        node = {"driver_internal_info": {"agent_continue_if_secure_erase_failed": True}}
        error = self.failure(manager.erase_devices(node, []), BlockDeviceEraseError)
        self.assertIn(self.dev("vda"), str(error))
        self.assertIn(self.dev("nvme0n1"), str(error))

    def test_progress_is_logged(self) -> None:
        runner = GatedRunner(self.answers(), missing=["smartctl"])
        manager = self.manager(runner)
        erasing = Deferred.fromCoroutine(manager.erase_devices({}, []))
        with capturedLogs() as events:
            self.clock.advance(PROGRESS_LOG_INTERVAL)
        logged = {e.get("device") for e in events if "percent" in e}
        self.assertEqual(logged, {self.dev(d["name"]) for d in self.DISKS})
        while runner.waiting:
            runner.finish()
        self.successResultOf(erasing)
        with capturedLogs() as events:
            self.clock.advance(PROGRESS_LOG_INTERVAL)
        self.assertEqual([e for e in events if "percent" in e], [])

class ExpressTests(EraseTestCase):
    DISKS = EraseTestCase.DISKS + [
        {"name": "sdb", "size": 64 * MiB, "serial": "S2", "rota": True, "tran": "sata",
         "children": ["sdb1"]}]

    def setUp(self) -> None:
        super().setUp()
        self.system.add_block_device("sdb1")

    def test_hardware_erase_where_quick_then_metadata(self) -> None:
        manager = self.manager()
        result = self.result(manager.erase_devices_express({}, []))
        self.assertEqual(result, {
            self.dev("nvme0n1"): "nvme format --ses 1 (user data erase)",
            self.dev("sda"): "ATA enhanced secure erase",
            self.dev("vda"): "metadata erased",
            self.dev("sdb"): "metadata erased"})
        self.assertEqual(self.drive.erased, 1)
        self.assertEqual(self.ran("shred"), [])
        # the metadata erase covers every disk (and partitions before their disk)
        wiped = [argv[-1] for argv in self.ran("wipefs")]
        self.assertEqual(sorted(set(wiped)), sorted(
            self.dev(n) for n in ("nvme0n1", "sda", "vda", "sdb", "sdb1")))
        self.assertLess(wiped.index(self.dev("sdb1")), wiped.index(self.dev("sdb")))
        self.assertEqual(self.progress[0].serialize()["phase"], "done")

    def test_failed_hardware_erase_falls_back_to_metadata(self) -> None:
        self.drive.frozen = True
        manager = self.manager(FakeRunner(self.answers(
            {("nvme", "format"): Exit(1, b"", b"Invalid Field")}), missing=["smartctl"]))
        result = self.result(manager.erase_devices_express({}, []))
        self.assertEqual(set(result.values()), {"metadata erased"})
        self.assertIn(self.dev("sda"), [argv[-1] for argv in self.ran("wipefs")])

class ProgressTests(SynchronousTestCase):
    def test_serialize(self) -> None:
        clock = Clock()
        progress = EraseProgress(clock, "/nonexistent")
        disk = progress.add("/dev/sdx", 10 * MiB)
        self.assertEqual(progress.serialize()["devices"]["/dev/sdx"]["state"], "waiting")
        disk.start()
        disk.use("nvme_format_user_data_erase")
        clock.advance(3)
        view = progress.serialize()["devices"]["/dev/sdx"]
        self.assertEqual((view["state"], view["percent"], view["elapsed"],
                          view["bytes_written"]), ("running", None, 3.0, None))
        disk.finish("done")
        clock.advance(5)
        view = progress.serialize()["devices"]["/dev/sdx"]
        self.assertEqual((view["state"], view["percent"], view["elapsed"]),
                         ("done", 100.0, 3.0))
        self.assertEqual(progress.serialize()["elapsed"], 8.0)

# -- protected disks: skip_block_devices and shared cluster filesystems -----------------------

VMFS_GPT = "AA31E02A-400F-11DB-9590-000C2911D1B8"

class ProtectedDiskTests(EraseTestCase):
    """Every erase step leaves what ``skip_block_devices`` names, and stops before a shared
    cluster filesystem."""

    DISKS = ExpressTests.DISKS

    def setUp(self) -> None:
        super().setUp()
        self.system.add_block_device("sdb1")
        self.found: dict[str, dict[str, Any]] = {}     # kname → what lsblk reports on it

    def guard_lsblk(self, argv: tuple[str, ...]) -> bytes:
        """``lsblk -o KNAME,FSTYPE,...`` of the devices asked, with their partitions."""
        rows = []
        for device in argv[5:]:
            kname = os.path.basename(device)
            [disk] = [d for d in self.DISKS if d["name"] == kname]
            children = [{"kname": child, "fstype": None, "parttype": None,
                         **self.found.get(child, {})} for child in disk.get("children", [])]
            rows.append({"kname": kname, "fstype": None, "uuid": None, "ptuuid": None,
                         "parttype": None, "partuuid": None, **self.found.get(kname, {}),
                         **({"children": children} if children else {})})
        return json.dumps({"blockdevices": rows}).encode()

    def answers(self, extra: dict[tuple[str, ...], Any] | None = None
                ) -> dict[tuple[str, ...], Any]:
        return super().answers({("lsblk", "-bia", "--json", "-o", disks.GUARD_LSBLK_COLUMNS):
                                self.guard_lsblk, **(extra or {})})

    def writes(self) -> set[str]:
        """Devices a program that changes disks was run on."""
        return {argv[-1] for argv in self.runner.argvs
                if argv[0] in ("wipefs", "sgdisk", "shred")
                or argv[:2] in (("nvme", "format"),)
                or (argv[0] == "hdparm" and "-I" not in argv)} | set(self.wiped)

    def protect(self, *entries: Any) -> dict[str, Any]:
        return {"uuid": "n1", "properties": {"skip_block_devices": list(entries)}}

    # -- skip_block_devices ----------------------------------------------------------------
    def test_erase_devices_leaves_protected_disks(self) -> None:
        manager = self.manager()
        with capturedLogs() as events:
            result = self.result(manager.erase_devices(
                self.protect({"serial": "S1"}, {"name": "/dev/nvme0n1"}), []))
        reason = "skip_block_devices entry {'serial': 'S1'} matches it"
        self.assertEqual(result[self.dev("sda")],
                         f"skipped: protected by skip_block_devices: {reason}")
        self.assertIn("skipped: protected", result[self.dev("nvme0n1")])
        self.assertEqual(result[self.dev("vda")],
                         "shred: 1 random pass(es) and a pass of zeros")
        self.assertEqual(self.writes(), {self.dev("vda"), self.dev("sdb")})
        self.assertEqual([a for a in self.runner.argvs if self.dev("sda") in a], [])
        logged = {(e["device"], e["reason"]) for e in events if e.get("step") == "erase_devices"}
        self.assertEqual(logged, {(self.dev("sda"), reason), (
            self.dev("nvme0n1"), "skip_block_devices entry {'name': '/dev/nvme0n1'} matches it")})
        devices = self.progress[0].serialize()["devices"]
        self.assertEqual(devices[self.dev("sda")]["state"], "skipped")
        # the guard looked only at the disks to erase
        [guard] = [a for a in self.runner.argvs if disks.GUARD_LSBLK_COLUMNS in a]
        self.assertEqual(guard[5:], (self.dev("vda"), self.dev("sdb")))

    def test_erase_block_device_alone_checks_too(self) -> None:
        manager = self.manager()
        result = self.result(manager.erase_block_device(self.protect({"name": "vda"}),
                                                        self.device("vda", rotational=True)))
        self.assertEqual(result, "skipped: protected by skip_block_devices: skip_block_devices"
                                 " entry {'name': 'vda'} matches it")
        self.assertEqual(self.writes(), set())

    def test_metadata_erase_leaves_protected_disks_and_their_partitions(self) -> None:
        manager = self.manager()
        with capturedLogs() as events:
            self.result(manager.erase_devices_metadata(
                self.protect({"size": "<= 1", "rotational": True}), []))
        # sdb is 64 MiB and rotational (and so is vda): both protected, partitions included
        self.assertEqual(self.writes(), {self.dev("nvme0n1"), self.dev("sda")})
        self.assertEqual({e["device"] for e in events
                          if e.get("step") == "erase_devices_metadata"},
                         {self.dev("vda"), self.dev("sdb")})

    def test_metadata_erase_leaves_raid_members(self) -> None:
        """As the reference: a disk holding an md member keeps its partition table and the
        member its superblock, so an array built by manual cleaning survives the metadata
        erase of automated cleaning (a real Ironic runs them in that order)."""
        members = {self.dev("vda"), self.dev("sdb")}

        def lsblk_fs(argv: tuple[str, ...]) -> str:
            if argv[-1] in members:
                return LSBLK_FS_RAID_MEMBER
            return argv[-1].split("/")[-1] + "\n"
        manager = self.manager(FakeRunner(self.answers(
            {("lsblk", "--fs", "--noheadings"): lsblk_fs}), missing=["smartctl"]))
        with capturedLogs() as events:
            self.result(manager.erase_devices_metadata({"uuid": "n1"}, []))
        self.assertEqual(self.writes(), {self.dev("nvme0n1"), self.dev("sda")})
        skipped = {e["device"] for e in events if "RAID member" in str(e.get("reason"))}
        self.assertEqual(skipped, members)

    def test_metadata_erase_leaves_members_of_running_arrays_udev_has_not_seen(self) -> None:
        """A member of an array the kernel runs is left even when lsblk, reading udev's
        database, does not show it yet (seen with a real Ironic: one of two members just
        built by mdadm was wiped)."""
        self.system.write("proc/mdstat", "Personalities : [raid1]\n"
                          "md0 : active raid1 sdb1[1] vda1[0]\n"
                          "      1046528 blocks super 1.2 [2/2] [UU]\n\n"
                          "unused devices: <none>\n")
        manager = self.manager()
        with capturedLogs() as events:
            self.result(manager.erase_devices_metadata({"uuid": "n1"}, []))
        self.assertEqual(self.writes(), {self.dev("nvme0n1"), self.dev("sda")})
        skipped = {e["device"] for e in events if "RAID member" in str(e.get("reason"))}
        self.assertEqual(skipped, {self.dev("vda"), self.dev("sdb")})

    def test_express_leaves_protected_disks(self) -> None:
        manager = self.manager()
        result = self.result(manager.erase_devices_express(
            self.protect({"tran": "nvme"}, {"name": "sdb"}), []))
        self.assertIn("skipped: protected", result[self.dev("nvme0n1")])
        self.assertIn("skipped: protected", result[self.dev("sdb")])
        self.assertEqual(self.ran("nvme"), [])
        self.assertEqual(self.writes(), {self.dev("sda"), self.dev("vda")})

    def test_invalid_skip_list_erases_nothing(self) -> None:
        for step in ("erase_devices", "erase_devices_metadata", "erase_devices_express"):
            manager = self.manager()
            error = self.failure(getattr(manager, step)(
                self.protect({"serial": "S1"}, {"colour": "red"}), []), BlockDeviceEraseError)
            self.assertIn("Invalid skip_block_devices in the node's properties, nothing was "
                          "erased: skip_block_devices entry 2 ({'colour': 'red'}) is invalid",
                          str(error))
            self.assertEqual(self.writes(), set(), step)

    # -- shared cluster filesystems --------------------------------------------------------
    def test_each_shared_filesystem_stops_every_erase_step(self) -> None:
        cases = [
            ("sdb1", {"parttype": VMFS_GPT}, "VMware VMFS Partition (GPT)"),
            ("sdb1", {"parttype": VMFS_GPT.lower()}, "VMware VMFS Partition (GPT)"),
            ("sdb1", {"parttype": "0xfb"}, "VMware VMFS Partition (MBR)"),
            ("sdb1", {"parttype": "37AFFC90-EF7D-4E96-91C3-2D7AE055B174"},
             "IBM GPFS Partition"),
            ("sdb1", {"fstype": "gfs2"}, "Red Hat Global File System 2"),
            ("sdb1", {"fstype": "ocfs2"}, "Oracle Cluster File System 2"),
            ("vda", {"fstype": "VMFS_volume_member"}, "VMware VMFS volume member"),
        ]
        for step in ("erase_devices", "erase_devices_metadata", "erase_devices_express"):
            for kname, fields, what in cases:
                self.found = {kname: fields}
                self.wiped.clear()
                manager = self.manager()
                error = self.failure(getattr(manager, step)({"uuid": "n1"}, []),
                                     ProtectedDeviceError)
                disk = "vda" if kname == "vda" else "sdb"
                on = "" if kname == disk else f" (on {self.dev(kname)})"
                self.assertEqual(error.device, self.dev(disk))
                self.assertEqual(error.what, what + on)
                self.assertIn(f"Protected {what}{on} located on device {self.dev(disk)}",
                              str(error))
                self.assertIn("guard_special_filesystems", str(error))
                self.assertEqual(error.serialize()["type"], "ProtectedDeviceError")
                self.assertEqual(self.writes(), set(), (step, kname, fields))
        self.flushLoggedErrors()

    def test_found_by_blkid_where_udev_told_lsblk_nothing(self) -> None:
        for blkid, what in (("PART_ENTRY_SCHEME=gpt\nPART_ENTRY_TYPE=aa31e02a-400f-11db-"
                             "9590-000c2911d1b8\n", "VMware VMFS Partition (GPT)"),
                            ("TYPE=gfs2\nUUID=0d2e\n", "Red Hat Global File System 2"),
                            ("PART_ENTRY_SCHEME=dos\nPART_ENTRY_TYPE=0xfb\n",
                             "VMware VMFS Partition (MBR)")):
            manager = self.manager(FakeRunner(self.answers({
                ("blkid", "-p", "-o", "export", self.dev("sdb1")): blkid}),
                missing=["smartctl"]))
            error = self.failure(manager.erase_devices({"uuid": "n1"}, []),
                                 ProtectedDeviceError)
            self.assertEqual((error.device, error.what),
                             (self.dev("sdb"), f"{what} (on {self.dev('sdb1')})"))
            self.assertEqual(self.writes(), set())
        probed = [argv[-1] for argv in self.ran("blkid")]
        self.assertEqual(probed, [self.dev(n) for n in ("nvme0n1", "sda", "vda", "sdb",
                                                        "sdb1")])
        self.flushLoggedErrors()

    def test_ordinary_filesystems_pass(self) -> None:
        self.found = {"sdb1": {"fstype": "ext4", "parttype":
                               "0fc63daf-8483-4772-8e79-3d69d8477de4"},
                      "vda": {"fstype": "linux_raid_member"}}
        self.result(self.manager().erase_devices_metadata({"uuid": "n1"}, []))
        self.assertIn(self.dev("sdb"), self.writes())

    def test_guard_off(self) -> None:
        self.found = {"sdb1": {"fstype": "gfs2"}}
        manager = self.manager(guard_special_filesystems=False)
        self.result(manager.erase_devices_metadata({"uuid": "n1"}, []))
        self.assertIn(self.dev("sdb"), self.writes())
        self.assertEqual([a for a in self.runner.argvs if disks.GUARD_LSBLK_COLUMNS in a], [])

    def test_a_protected_disk_is_not_guarded(self) -> None:
        self.found = {"sdb1": {"fstype": "gfs2"}}
        self.result(self.manager().erase_devices_metadata(self.protect({"name": "sdb"}), []))
        self.assertNotIn(self.dev("sdb"), self.writes())
        self.assertIn(self.dev("vda"), self.writes())

    def test_unreadable_guard_erases_nothing(self) -> None:
        manager = self.manager(FakeRunner(self.answers({
            ("lsblk", "-bia", "--json", "-o", disks.GUARD_LSBLK_COLUMNS):
            Exit(1, b"", b"lsblk: broken")}), missing=["smartctl"]))
        error = self.failure(manager.erase_devices({"uuid": "n1"}, []), BlockDeviceEraseError)
        self.assertIn("for shared cluster filesystems before erasing "
                      "(guard_special_filesystems)", str(error))
        self.assertIn("lsblk: broken", str(error))
        self.assertEqual(self.writes(), set())
