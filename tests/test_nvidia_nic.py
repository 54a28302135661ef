"""The NVIDIA NIC firmware steps of the Mellanox manager, on recorded tool outputs.

No such NIC is here: lspci, mstflint, mstconfig and mstfwreset answer from
``ipa_twisted/testing/nvidia_nic_recordings.py`` (whose docstring says where they come from).
Firmware images are served by a local HTTP server or given as ``file://`` URLs.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import CommandExecutionError
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.hardware.interface import HardwareSupport
from ipa_twisted.hardware.vendors import nvidia_nic
from ipa_twisted.hardware.vendors.mellanox import MellanoxDeviceHardwareManager
from ipa_twisted.http import make_http_client, make_pool
from ipa_twisted.testing import nvidia_nic_recordings as rec
from ipa_twisted.testing.fake_process import Answer, Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem

FIRMWARE = b"\x7fCX6 firmware image " * 4096
CX6_IMAGE = {"url": "", "checksum": hashlib.sha256(FIRMWARE).hexdigest(),
             "checksumType": "sha256", "componentFlavor": rec.CX6_PSID,
             "version": "20.36.1012"}
SETTINGS = [{"deviceID": "101b",
             "globalConfig": {"NUM_OF_VFS": 127, "SRIOV_EN": True},
             "function0Config": {"PF_TOTAL_SF": 500, "ESWITCH_HAIRPIN_TOT_BUFFER_SIZE[7]": 16},
             "function1Config": {"PF_TOTAL_SF": 600, "LINK_TYPE_P1": "ETH"}}]


class Parsers(TestCase):
    def test_mstflint_query(self) -> None:
        self.assertEqual(nvidia_nic.parse_mstflint_query(rec.MSTFLINT_QUERY_CX6),
                         {"fw_ver": "20.35.1012", "psid": rec.CX6_PSID})
        self.assertEqual(nvidia_nic.parse_mstflint_query(rec.MSTFLINT_QUERY_CX6_PENDING),
                         {"fw_ver": "20.35.1012", "running_fw_ver": "20.34.1002",
                          "psid": rec.CX6_PSID})
        self.assertEqual(nvidia_nic.parse_mstflint_query(""), {})

    def test_mstconfig_query(self) -> None:
        self.assertEqual(nvidia_nic.parse_mstconfig_query(rec.MSTCONFIG_QUERY), {
            "NUM_OF_VFS": "0", "SRIOV_EN": "False(0)", "PF_TOTAL_SF": "0",
            "LINK_TYPE_P1": "ETH(2)", "ESWITCH_HAIRPIN_TOT_BUFFER_SIZE": "Array[0..7]"})
        self.assertEqual(nvidia_nic.parse_mstconfig_query(""), {})

    def test_lspci(self) -> None:
        self.assertEqual(nvidia_nic.parse_lspci(rec.LSPCI), [
            ("0000:06:00.0", "0200", "101b"), ("0000:06:00.1", "0207", "101b"),
            ("0000:03:00.0", "0207", "1017"), ("0000:03:00.1", "0207", "1017")])

    def test_what_mstconfig_and_the_firmware_support(self) -> None:
        for name in ("SRIOV_EN", "PF_TOTAL_SF", "ESWITCH_HAIRPIN_TOT_BUFFER_SIZE[0]"):
            self.assertTrue(nvidia_nic.tool_knows(rec.MSTCONFIG_INFO, name), name)
        # "SF" and "PER_PF_NUM_SF" appear in descriptions only
        for name in ("UNSUPPORTED_PARAM", "SF", "PER_PF_NUM_SF"):
            self.assertFalse(nvidia_nic.tool_knows(rec.MSTCONFIG_INFO, name), name)
        current = nvidia_nic.parse_mstconfig_query(rec.MSTCONFIG_QUERY)
        for name, expected in [("SRIOV_EN", True), ("PF_TOTAL_SF", True),
                               ("ESWITCH_HAIRPIN_TOT_BUFFER_SIZE[0]", True),
                               ("ESWITCH_HAIRPIN_TOT_BUFFER_SIZE[7]", True),
                               ("ESWITCH_HAIRPIN_TOT_BUFFER_SIZE[0..3]", True),
                               ("ESWITCH_HAIRPIN_TOT_BUFFER_SIZE[8]", False),
                               ("ESWITCH_HAIRPIN_TOT_BUFFER_SIZE[0..8]", False),
                               ("ESWITCH_HAIRPIN_TOT_BUFFER_SIZE[3..1]", False),
                               ("SRIOV_EN[0]", False), ("UNSUPPORTED_PARAM", False)]:
            self.assertEqual(nvidia_nic.firmware_has(current, name), expected, name)


class Steps(TestCase):
    """The steps through the Mellanox manager, on a machine with the recorded NICs."""

    def setUp(self) -> None:
        self.fake = FakeSystem(self.mktemp())
        self.fake.add_interface("ens6f0", "04:3f:72:f0:4c:46", vendor="0x15b3",
                                driver="mlx5_core", pci_address="0000:06:00.0")
        self.queries = {"0000:06:00.0": rec.MSTFLINT_QUERY_CX6,
                        "0000:06:00.1": rec.MSTFLINT_QUERY_CX6,
                        "0000:03:00.0": rec.MSTFLINT_QUERY_CX5,
                        "0000:03:00.1": rec.MSTFLINT_QUERY_CX5}
        answers: dict[tuple[str, ...], Answer] = dict(rec.TOOL_VERSIONS)
        self.runner = FakeRunner({
            **answers,
            ("lspci", "-Dn", "-d", "15b3:"): rec.LSPCI,
            ("mstflint", "-d"): self.mstflint,
            ("mstflint", "-i"): rec.MSTFLINT_IMAGE_QUERY_CX6,
            ("mstfwreset",): b"",
            ("mstconfig", "-d"): self.mstconfig})
        self.burnt: list[str] = []
        self.config = self.fake.config()

    def mstflint(self, argv: tuple[str, ...]) -> Any:
        pci = argv[2]
        if argv[-1] == "burn":
            with open(argv[4], "rb") as f:
                self.assertEqual(f.read(), FIRMWARE)      # the file burnt is the image
            self.burnt.append(pci)
            return b""
        return self.queries[pci]

    def mstconfig(self, argv: tuple[str, ...]) -> Any:
        return {"i": rec.MSTCONFIG_INFO, "q": rec.MSTCONFIG_QUERY}.get(argv[3], b"")

    def manager(self) -> MellanoxDeviceHardwareManager:
        pool = make_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        manager = MellanoxDeviceHardwareManager()
        manager.bind(HardwareContext(
            self.config, self.runner, reactor, reactor,
            http_client=lambda **kw: make_http_client(reactor, self.config, pool=pool)))
        return manager

    def run_step(self, name: str, **args: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(getattr(self.manager(), name)({}, [], **args))

    def serve(self, data: bytes) -> str:
        root = Resource()
        root.putChild(b"fw.bin", Data(data, "application/octet-stream"))
        port: Any = reactor.listenTCP(0, Site(root),  # type: ignore[arg-type]
                                      interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/fw.bin"

    def commands(self, program: str) -> list[tuple[str, ...]]:
        """What ran of ``program``, its version check aside."""
        return [argv for argv in self.runner.argvs
                if argv[0] == program and argv not in rec.TOOL_VERSIONS]

    # -- the lists -------------------------------------------------------------------------
    def test_listed_for_clean_deploy_and_service_as_the_reference(self) -> None:
        manager = self.manager()
        self.assertEqual(manager.evaluate_hardware_support(), HardwareSupport.MAINLINE)
        for kind in ("clean", "deploy", "service"):
            steps = getattr(manager, f"get_{kind}_steps")({}, [])
            self.assertEqual([(s["step"], s["priority"], s["interface"], s["reboot_requested"],
                               s["abortable"], list(s["argsinfo"])) for s in steps], [
                ("update_nvidia_nic_firmware_image", 0, "deploy", True, False, ["images"]),
                ("update_nvidia_nic_firmware_settings", 0, "deploy", True, False,
                 ["settings"])], kind)
            self.assertTrue(all(s["argsinfo"][a]["required"] for s in steps
                                for a in s["argsinfo"]))

    async def test_offered_only_with_an_nvidia_nic(self) -> None:
        context = HardwareContext(self.config, self.runner, reactor, reactor)
        managers = await HardwareManagers.load(context, [MellanoxDeviceHardwareManager(),
                                                         GenericHardwareManager()])
        steps = await managers.dispatch_to_all_managers("get_service_steps", {}, [])
        self.assertEqual([s["step"] for s in steps["MellanoxDeviceHardwareManager"]],
                         ["update_nvidia_nic_firmware_image",
                          "update_nvidia_nic_firmware_settings"])
        self.fake.write("sys/devices/pci0000:00/0000:06:00.0/vendor", "0x8086\n")
        managers = await HardwareManagers.load(context, [MellanoxDeviceHardwareManager(),
                                                         GenericHardwareManager()])
        steps = await managers.dispatch_to_all_managers("get_service_steps", {}, [])
        self.assertEqual(list(steps), ["generic_hardware_manager"])

    # -- images ----------------------------------------------------------------------------
    async def test_image_over_http_burnt_once_per_card(self) -> None:
        url = self.serve(FIRMWARE)
        await self.run_step("update_nvidia_nic_firmware_image",
                            images=[{**CX6_IMAGE, "url": url},
                                    {**CX6_IMAGE, "url": url, "componentFlavor": "MT_NONE"}])
        self.assertEqual(self.runner.argvs[:4], list(rec.TOOL_VERSIONS))
        self.assertEqual(self.burnt, ["0000:06:00.0"])    # one card; the CX-5 has no image
        [burn] = [a for a in self.commands("mstflint") if a[-1] == "burn"]
        self.assertEqual(burn[:3] + burn[5:], ("mstflint", "-d", "0000:06:00.0", "-y", "burn"))
        self.assertTrue(burn[4].endswith("/fw.bin"))
        self.assertFalse(os.path.exists(os.path.dirname(burn[4])), "temporary image kept")
        self.assertEqual(self.commands("mstfwreset"), [])
        [call] = [c for c in self.runner.calls if c.argv[-1] == "burn"]
        self.assertEqual(call.kwargs["timeout"], nvidia_nic.BURN_TIMEOUT)

    async def test_pending_burn_activated_before_the_new_one(self) -> None:
        self.queries["0000:06:00.0"] = rec.MSTFLINT_QUERY_CX6_PENDING
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(FIRMWARE)
        await self.run_step("update_nvidia_nic_firmware_image",
                            images=[{**CX6_IMAGE, "url": f"file://{path}",
                                     "checksumType": "sha512",
                                     "checksum": hashlib.sha512(FIRMWARE).hexdigest()}])
        self.assertEqual(self.commands("mstfwreset"),
                         [("mstfwreset", "-d", "0000:06:00.0", "-y", "--sync", "1", "reset")])
        self.assertEqual(self.burnt, ["0000:06:00.0"])
        self.assertFalse(os.path.exists(path))            # moved, as the reference does

    async def test_file_image_fetched_once_for_every_card_of_its_psid(self) -> None:
        self.runner.answers[("lspci", "-Dn", "-d", "15b3:")] = rec.LSPCI + \
            "0000:81:00.0 0200: 15b3:101b\n0000:81:00.1 0200: 15b3:101b\n"
        self.queries["0000:81:00.0"] = self.queries["0000:81:00.1"] = rec.MSTFLINT_QUERY_CX6
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(FIRMWARE)
        await self.run_step("update_nvidia_nic_firmware_image",
                            images=[{**CX6_IMAGE, "url": f"file://{path}"}])
        self.assertEqual(self.burnt, ["0000:06:00.0", "0000:81:00.0"])
        self.assertEqual(len([a for a in self.commands("mstflint") if a[1] == "-i"]), 1)

    async def test_same_version_not_burnt(self) -> None:
        self.queries["0000:06:00.0"] = rec.MSTFLINT_QUERY_CX6.replace("20.35.1012",
                                                                      "20.36.1012")
        await self.run_step("update_nvidia_nic_firmware_image",
                            images=[{**CX6_IMAGE, "url": self.serve(FIRMWARE)}])
        self.assertEqual(self.burnt, [])

    async def assert_image_refused(self, images: Any, error: type, text: str) -> None:
        with self.assertRaises(error) as raised:
            await self.run_step("update_nvidia_nic_firmware_image", images=images)
        self.assertIn(text, str(raised.exception))
        self.assertEqual(self.burnt, [])

    async def test_images_refused(self) -> None:
        await self.assert_image_refused({"url": "x"}, nvidia_nic.InvalidFirmwareImageConfig,
                                        "The images must be a list of images")
        await self.assert_image_refused([{"url": "http://x/fw.bin"}],
                                        nvidia_nic.InvalidFirmwareImageConfig,
                                        "please provide the following parameters url")
        await self.assert_image_refused([{**CX6_IMAGE, "url": "x", "checksumType": "md5"}],
                                        nvidia_nic.InvalidFirmwareImageConfig,
                                        "Checksum algorithm md5 is not supported")
        self.assertEqual(self.runner.argvs, [])          # refused before anything ran
        url = self.serve(FIRMWARE)
        await self.assert_image_refused([{**CX6_IMAGE, "url": url}] * 2,
                                        nvidia_nic.DuplicateComponentFlavor,
                                        f"Duplicate componentFlavor {rec.CX6_PSID}")
        await self.assert_image_refused([{**CX6_IMAGE, "url": "ftp://h/fw.bin"}],
                                        nvidia_nic.InvalidURLScheme, "scheme ftp")
        await self.assert_image_refused([{**CX6_IMAGE, "url": url, "checksum": "0" * 64}],
                                        nvidia_nic.MismatchChecksumError,
                                        "Mismatch provided checksum")
        await self.assert_image_refused([{**CX6_IMAGE, "url": url, "version": "20.37.1"}],
                                        nvidia_nic.MismatchFWVersion,
                                        "does not match image firmware version 20.36.1012")
        self.runner.answers[("mstflint", "-i")] = rec.MSTFLINT_IMAGE_QUERY_CX6.replace(
            rec.CX6_PSID, rec.CX5_PSID)
        await self.assert_image_refused([{**CX6_IMAGE, "url": url}],
                                        nvidia_nic.MismatchComponentFlavor,
                                        f"does not match the image psid {rec.CX5_PSID}")

    async def test_md5_when_enabled(self) -> None:
        self.config = self.fake.config(md5_enabled=True)
        await self.run_step("update_nvidia_nic_firmware_image", images=[
            {**CX6_IMAGE, "url": self.serve(FIRMWARE), "checksumType": "md5",
             "checksum": hashlib.md5(FIRMWARE).hexdigest()}])
        self.assertEqual(self.burnt, ["0000:06:00.0"])

    async def test_missing_tool_fails_clearly(self) -> None:
        self.runner.missing.add("mstfwreset")
        with self.assertRaises(CommandExecutionError) as raised:
            await self.run_step("update_nvidia_nic_firmware_settings", settings=SETTINGS)
        self.assertIn("need mstflint, mstconfig, mstfwreset (the mstflint package) and lspci",
                      str(raised.exception))
        self.assertIn("mstfwreset", str(raised.exception))

    # -- settings --------------------------------------------------------------------------
    async def test_settings_set_per_function(self) -> None:
        await self.run_step("update_nvidia_nic_firmware_settings",
                            settings=[*SETTINGS, {"deviceID": "abcd", "globalConfig": {}}])
        sets = [a for a in self.commands("mstconfig") if "set" in a]
        self.assertEqual(sets, [
            ("mstconfig", "-d", "0000:06:00.0", "-y", "set", "NUM_OF_VFS=127", "SRIOV_EN=True",
             "PF_TOTAL_SF=500", "ESWITCH_HAIRPIN_TOT_BUFFER_SIZE[7]=16"),
            # LINK_TYPE_P1 is ETH(2) already
            ("mstconfig", "-d", "0000:06:00.1", "-y", "set", "PF_TOTAL_SF=600")])
        self.assertEqual(self.commands("mstfwreset"), [])
        # Every device validated before the first is set.
        first_set = self.runner.argvs.index(sets[0])
        self.assertEqual([a[2] for a in self.runner.argvs[:first_set]
                          if a[0] == "mstconfig" and a[-1] == "q"],
                         ["0000:06:00.0", "0000:06:00.1"])

    async def test_pending_firmware_reset_first_and_its_failure_logged(self) -> None:
        self.queries["0000:06:00.0"] = rec.MSTFLINT_QUERY_CX6_PENDING
        self.runner.answers[("mstfwreset",)] = Exit(1, b"", b"-E- reset not supported")
        await self.run_step("update_nvidia_nic_firmware_settings", settings=SETTINGS)
        self.assertEqual(self.commands("mstfwreset"),
                         [("mstfwreset", "-d", "0000:06:00.0", "-y", "--sync", "1", "reset")])
        self.assertEqual(len([a for a in self.commands("mstconfig") if "set" in a]), 2)
        self.flushLoggedErrors()

    async def test_settings_refused(self) -> None:
        async def refused(settings: Any, error: type, text: str) -> None:
            with self.assertRaises(error) as raised:
                await self.run_step("update_nvidia_nic_firmware_settings", settings=settings)
            self.assertIn(text, str(raised.exception))
        await refused({"deviceID": "101b"}, nvidia_nic.InvalidFirmwareSettingsConfig,
                      "The settings must be  list of settings")
        await refused([{"globalConfig": {}}], nvidia_nic.InvalidFirmwareSettingsConfig,
                      "There is no deviceID provided")
        await refused(SETTINGS * 2, nvidia_nic.DuplicateDeviceID,
                      "duplicate settings for device ID 101b")
        await refused([{"deviceID": "101b", "globalConfig": {"NO_SUCH": 1}}],
                      nvidia_nic.UnSupportedConfigByMstflintPackage,
                      "Configuration NO_SUCH is not supported by mstconfig")
        await refused([{"deviceID": "101b",
                        "globalConfig": {"ESWITCH_HAIRPIN_TOT_BUFFER_SIZE[8]": 1}}],
                      nvidia_nic.UnSupportedConfigByFW,
                      "for device 0000:06:00.0 is not supported with current fw")
        self.assertEqual([a for a in self.commands("mstconfig") if "set" in a], [])
