"""NVIDIA (Mellanox) NIC firmware: the ``update_nvidia_nic_firmware_image`` and
``update_nvidia_nic_firmware_settings`` steps the Mellanox manager offers (clean, deploy and
service, priority 0, reboot requested, not abortable), as the reference agent runs them.

Both first check the tools are there (``mstflint -v``, ``mstconfig -v``, ``mstfwreset -v``,
``lspci --version``: the mstflint package's tools, the open counterparts of MFT's
``flint``/``mlxconfig``/``mlxfwreset``), then find the NICs: ``lspci -Dn -d 15b3:`` lines of a
network class (``02xx``), each function's PSID and firmware version from
``mstflint -d <pci> -qq query``.

``images``: a list of ``{url, checksum, checksumType, componentFlavor, version}``; every
entry must have all five and a sha256 or sha512 checksum (md5 only with ``md5_enabled``).
Images whose ``componentFlavor`` (a PSID) no NIC has are ignored; two for one PSID are
refused. Each image wanted by a card is fetched once (``file://`` moved, ``http(s)://``
downloaded with the agent's HTTP client into memory, at most ``FIRMWARE_SIZE_LIMIT``), its
checksum checked, its PSID and version read with ``mstflint -i <file> query`` and compared
with the entry; then on each card of that PSID (once per card: its functions share the
firmware) whose version differs, a pending image is activated first
(``mstfwreset -d <pci> -y --sync 1 reset``) and the image burnt
(``mstflint -d <pci> -i <file> -y burn``).

``settings``: a list of ``{deviceID, globalConfig, function0Config, function1Config}`` (the
last three maps of mstconfig parameter to value); every entry needs a ``deviceID``, one
device ID at most once. For each NIC of a listed device ID: the card's global settings and
its function's (0 or other) settings; cards whose burnt firmware is not running yet are
reset first (a failed reset is logged); every parameter is checked against what ``mstconfig -d <pci> i`` knows and what
``mstconfig -d <pci> q`` shows (an array parameter ``NAME[i]`` or ``NAME[i..j]`` within the
``Array[first..last]`` shown), then those that differ are set in one
``mstconfig -d <pci> -y set NAME=value ...``.

Unlike the reference: an image is fetched once for all cards of its PSID (the reference's
second ``file://`` fetch fails: moved away), an array index may be the last one shown (the
reference refuses ``NAME[7]`` of ``Array[0..7]``), a parameter is known to ``mstconfig i``
when named there (not anywhere in its text), and errors say which device. Programs run
through the context's runner (tests: ``ipa_twisted/testing/nvidia_nic_recordings.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import CommandExecutionError, RESTError
from ipa_twisted.images.checksum import new_hash
from ipa_twisted.process import failures_as

log = Logger()

NVIDIA_VENDOR = "15b3"
QUERY_TIMEOUT = 120.0
BURN_TIMEOUT = 1800.0
"""Longest wait for ``mstflint burn`` (minutes on some cards)."""
RESET_TIMEOUT = 600.0
FIRMWARE_SIZE_LIMIT = 256 * 1024 * 1024
SUPPORTED_CHECKSUM_ALGORITHMS = ("sha256", "sha512")
TOOLS = (("mstflint", "-v"), ("mstconfig", "-v"), ("mstfwreset", "-v"), ("lspci", "--version"))

_FW_VERSION = re.compile(r"FW Version:\s*(?P<v>\d+\.\d+\.\d+)")
_RUNNING_FW_VERSION = re.compile(r"FW Version\(Running\):\s*(?P<v>\d+\.\d+\.\d+)")
_PSID = re.compile(r"PSID:\s*(?P<v>\w+)")
_ARRAY_PARAM = re.compile(r"^(?P<name>\w+)\[((?P<index>\d+)|"
                          r"((?P<first>\d+)\.\.(?P<last>\d+)))\]$")
_ARRAY_VALUE = re.compile(r"^Array\[(?P<first>\d+)\.\.(?P<last>\d+)\]$")
_NETWORK_CLASS = re.compile(r"^02[0-9a-fA-F]{2}$")
_TOOL_PARAM = re.compile(r"^\s*(\w+)=", re.MULTILINE)

IMAGES_ARGSINFO = {
    "images": {
        "description": "Json blob contains a list of images, where each image contains a "
                       "map of url: to firmware image (file://, http://), checksum: of the "
                       "provided image, checksumType: sha256/sha512, componentProfile: PSID "
                       "of the nic, version: of the FW",
        "required": True,
    }}
SETTINGS_ARGSINFO = {
    "settings": {
        "description": "Json blob contains a list of settings per device ID, where each "
                       "settings contains a map of deviceID: device ID globalConfig: global "
                       "config function0Config: function 0 config function1Config: function "
                       "1 config",
        "required": True,
    }}


def nvidia_nic_steps() -> list[dict[str, Any]]:
    """The two steps, as the reference lists them (the same for clean, deploy, service)."""
    return [
        {"step": "update_nvidia_nic_firmware_image", "priority": 0, "interface": "deploy",
         "reboot_requested": True, "abortable": False, "argsinfo": IMAGES_ARGSINFO},
        {"step": "update_nvidia_nic_firmware_settings", "priority": 0, "interface": "deploy",
         "reboot_requested": True, "abortable": False, "argsinfo": SETTINGS_ARGSINFO},
    ]


# -- errors (the reference's names and messages) ---------------------------------------------
class InvalidFirmwareImageConfig(RESTError):
    message = "Invalid firmware image config"


class InvalidFirmwareSettingsConfig(RESTError):
    message = "Invalid firmware settings config"


class MismatchChecksumError(RESTError):
    message = "Mismatch Checksum for the firmware image"


class MismatchComponentFlavor(RESTError):
    message = "Mismatch Component Flavor"


class MismatchFWVersion(RESTError):
    message = "Mismatch Firmware version"


class DuplicateComponentFlavor(RESTError):
    message = "Duplicate Component Flavor for the firmware image"


class DuplicateDeviceID(RESTError):
    message = "Duplicate Device ID for firmware settings"


class UnSupportedConfigByMstflintPackage(RESTError):
    message = "Unsupported config by mstflint package"


class UnSupportedConfigByFW(RESTError):
    message = "Unsupported config by Firmware"


class InvalidURLScheme(RESTError):
    message = "Invalid URL Scheme"


class InvalidChecksumAlgorithm(RESTError):
    message = "Invalid checksum algorithm"


# -- the tools' outputs ----------------------------------------------------------------------
def parse_mstflint_query(text: str) -> dict[str, str]:
    """``fw_ver``, ``running_fw_ver`` (when a burnt image awaits a reset) and ``psid`` of
    ``mstflint query`` (of a device or of an image file)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        for key, pattern in (("fw_ver", _FW_VERSION), ("running_fw_ver", _RUNNING_FW_VERSION),
                             ("psid", _PSID)):
            match = pattern.match(line)
            if match is not None:
                found[key] = match.group("v")
    return found


def parse_mstconfig_query(text: str) -> dict[str, str]:
    """``{parameter: value}`` of ``mstconfig -d <pci> q`` (the lines after
    ``Configurations:``; a value like ``False(0)`` or ``Array[0..7]`` kept as shown)."""
    lines = [line for line in text.splitlines() if line.strip()]
    for number, line in enumerate(lines):
        if "Configurations:" in line:
            break
    else:
        return {}
    settings = {}
    for line in lines[number + 1:]:
        fields = line.split()
        if len(fields) >= 2:
            settings[fields[0]] = fields[1]
    return settings


def parse_lspci(text: str) -> list[tuple[str, str, str]]:
    """``(pci address, class, device id)`` of the network functions in ``lspci -Dn``."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or not fields[2].lower().startswith(NVIDIA_VENDOR + ":"):
            continue
        klass = fields[1].rstrip(":")
        if _NETWORK_CLASS.match(klass):
            found.append((fields[0], klass, fields[2].split(":", 1)[1]))
    return found


def tool_knows(tool_info: str, parameter: str) -> bool:
    """Whether ``mstconfig i``'s listing names ``parameter`` (an array's index ignored)."""
    array = _ARRAY_PARAM.match(parameter)
    name = array.group("name") if array else parameter
    return name in _TOOL_PARAM.findall(tool_info)


def firmware_has(current: Mapping[str, str], parameter: str) -> bool:
    """Whether the firmware's settings (``parse_mstconfig_query``) have ``parameter``; for
    ``NAME[i]`` or ``NAME[i..j]``, indexes within the ``Array[first..last]`` shown."""
    array = _ARRAY_PARAM.match(parameter)
    if array is None:
        return parameter in current
    shown = _ARRAY_VALUE.match(current.get(array.group("name"), ""))
    if shown is None:
        return False
    low, high = int(shown.group("first")), int(shown.group("last"))
    if array.group("index") is not None:
        return low <= int(array.group("index")) <= high
    first, last = int(array.group("first")), int(array.group("last"))
    return low <= first < last <= high


def _differs(wanted: Any, current: str | None) -> bool:
    """Whether ``wanted`` differs from mstconfig's ``current`` (``16``, ``False(0)``,
    ``ETH(2)``): numbers compared as numbers, else by name, case aside."""
    try:
        return int(wanted) != int(current)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(wanted).lower() not in str(current).lower()


@dataclass
class Nic:
    """One network function of an NVIDIA NIC."""

    pci: str
    device_id: str
    psid: str | None
    fw_ver: str | None
    running_fw_ver: str | None = None

    @property
    def card(self) -> str:
        """The PCI address without the function number: the functions of one card."""
        return self.pci[:-1]


class NvidiaNicFirmware:
    """The two steps on the machine ``context`` describes."""

    def __init__(self, context: HardwareContext) -> None:
        self.context = context

    async def _run(self, *argv: str, timeout: float = QUERY_TIMEOUT) -> str:
        out, _ = await self.context.runner.execute(*argv, timeout=timeout)
        return out.decode("utf-8", "replace")

    async def check_tools(self) -> None:
        """CommandExecutionError unless mstflint, mstconfig, mstfwreset and lspci run."""
        for argv in TOOLS:
            with failures_as(CommandExecutionError, "The NVIDIA NIC firmware steps need "
                             "mstflint, mstconfig, mstfwreset (the mstflint package) and "
                             "lspci: {error}"):
                await self._run(*argv)

    async def query(self, pci: str) -> dict[str, str]:
        """``mstflint -d <pci> -qq query``, parsed."""
        with failures_as(CommandExecutionError, f"Cannot query the firmware of {pci}"):
            return parse_mstflint_query(await self._run("mstflint", "-d", pci, "-qq", "query"))

    async def discover(self) -> list[Nic]:
        """The NVIDIA network functions, each with its PSID and firmware versions."""
        with failures_as(CommandExecutionError, "Cannot list the NVIDIA NICs"):
            listing = await self._run("lspci", "-Dn", "-d", f"{NVIDIA_VENDOR}:")
        nics = []
        for pci, _, device_id in parse_lspci(listing):
            info = await self.query(pci)
            nics.append(Nic(pci, device_id, info.get("psid"), info.get("fw_ver"),
                            info.get("running_fw_ver")))
        log.info("NVIDIA NICs: {nics}", nics=", ".join(
            f"{n.pci} ({n.device_id}, {n.psid}, {n.fw_ver})" for n in nics) or "none")
        return nics

    async def reset(self, nic: Nic, *, must: bool = True) -> None:
        """Activate the burnt firmware: ``mstfwreset ... reset``. A failure is logged, and
        raised (CommandExecutionError) when the reset ``must`` succeed (before a burn)."""
        log.info("Device {pci}: performing a firmware reset", pci=nic.pci)
        try:
            with failures_as(CommandExecutionError, f"Cannot reset the firmware of {nic.pci}"):
                await self._run("mstfwreset", "-d", nic.pci, "-y", "--sync", "1", "reset",
                                timeout=RESET_TIMEOUT)
        except CommandExecutionError as e:
            log.error("{error}", error=str(e))
            if must:
                raise

    # -- update_nvidia_nic_firmware_image --------------------------------------------------
    def _check_images(self, images: Any) -> None:
        if not isinstance(images, list):
            raise InvalidFirmwareImageConfig(f"The images must be a list of images, {images}")
        for image in images:
            if not isinstance(image, Mapping) or not all(
                    image.get(key) for key in ("url", "checksum", "checksumType",
                                               "componentFlavor", "version")):
                raise InvalidFirmwareImageConfig(
                    f"Invalid parameters for image {image}, please provide the following "
                    "parameters url, checksum, checksumType, componentFlavor, version")
            kind = image["checksumType"]
            if kind not in SUPPORTED_CHECKSUM_ALGORITHMS and not (
                    kind == "md5" and self.context.config.md5_enabled):
                raise InvalidFirmwareImageConfig(
                    f"Checksum algorithm {kind} is not supported for image {image['url']}. "
                    f"Supported algorithms are: {', '.join(SUPPORTED_CHECKSUM_ALGORITHMS)}")

    async def update_image(self, images: Any) -> None:
        """The ``update_nvidia_nic_firmware_image`` step (see the module)."""
        self._check_images(images)
        await self.check_tools()
        nics = await self.discover()
        psids = {nic.psid for nic in nics}
        wanted: dict[str, Mapping[str, Any]] = {}
        for image in images:
            flavor = image["componentFlavor"]
            if flavor not in psids:
                log.debug("No NIC has the PSID {psid} of image {url}", psid=flavor,
                          url=image["url"])
            elif flavor in wanted:
                raise DuplicateComponentFlavor(f"Duplicate componentFlavor {flavor}")
            else:
                wanted[flavor] = image
        cards: dict[str, list[Nic]] = {}             # per PSID, one function per card
        seen = set()
        for nic in nics:
            if nic.psid in wanted and nic.card not in seen:
                seen.add(nic.card)
                cards.setdefault(nic.psid or "", []).append(nic)
        for psid, targets in cards.items():
            image = wanted[psid]
            directory = tempfile.mkdtemp(prefix="nvidia_firmware")
            try:                                        # fetched once for all its cards
                path = await self._fetch(image, directory)
                await self._check_image(image, path)
                for nic in targets:
                    await self._update_if_needed(nic, image["version"], path)
            finally:
                await deferToThread(shutil.rmtree, directory, True)

    async def _fetch(self, image: Mapping[str, Any], directory: str) -> str:
        url = str(image["url"])
        parsed = urlparse(url)
        path = os.path.join(directory, os.path.basename(parsed.path) or "firmware.bin")
        if parsed.scheme == "file":
            log.info("Moving the firmware image {url} to {path}", url=url, path=path)
            try:
                await deferToThread(shutil.move, parsed.path, path)
            except OSError as e:
                raise InvalidFirmwareImageConfig(f"Cannot read the firmware image {url}: "
                                                 f"{e}") from e
        elif parsed.scheme in ("http", "https"):
            log.info("Downloading the firmware image {url}", url=url)
            config = self.context.config
            try:
                from ipa_twisted.images.download import fetch_small   # HTTP client: on use
                data = await fetch_small(url, self.context.http(), FIRMWARE_SIZE_LIMIT,
                                         timeout=config.image_download_connection_timeout,
                                         clock=self.context.clock)
            except Exception as e:
                raise InvalidFirmwareImageConfig(f"Cannot download the firmware image "
                                                 f"{url}: {e}") from e
            await deferToThread(FilePath(path).setContent, data)
        else:
            raise InvalidURLScheme(
                f"Firmware URL scheme {parsed.scheme} is not supported. The supported "
                "firmware URL schemes are (http://, https://, file://)")
        return path

    async def _check_image(self, image: Mapping[str, Any], path: str) -> None:
        kind = image["checksumType"]
        if kind == "md5":
            log.warn("Use of MD5 checksum is deprecated for firmware image validation. "
                     "Please use sha256 or sha512.")
        digest = await deferToThread(_digest, path, kind)
        if digest != str(image["checksum"]).strip().lower():
            raise MismatchChecksumError(
                f"Mismatch provided checksum {image['checksum']} for image {image['url']}")
        with failures_as(CommandExecutionError,
                         f"Cannot query the firmware image {image['url']}"):
            info = parse_mstflint_query(await self._run("mstflint", "-i", path, "query"))
        if info.get("psid") != image["componentFlavor"]:
            raise MismatchComponentFlavor(
                f"The provided psid {image['componentFlavor']} does not match the image "
                f"psid {info.get('psid')}")
        if info.get("fw_ver") != image["version"]:
            raise MismatchFWVersion(
                f"The provided firmware version {image['version']} does not match image "
                f"firmware version {info.get('fw_ver')}")

    async def _update_if_needed(self, nic: Nic, version: str, path: str) -> None:
        info = await self.query(nic.pci)
        log.info("Device {pci}: firmware {current}, image {version}", pci=nic.pci,
                 current=info.get("fw_ver"), version=version)
        if info.get("fw_ver") == version:
            log.info("Device {pci}: no firmware update needed", pci=nic.pci)
            return
        if "running_fw_ver" in info:
            await self.reset(nic)
        log.info("Device {pci}: burning the firmware image {path}", pci=nic.pci, path=path)
        with failures_as(CommandExecutionError,
                         f"Cannot burn the firmware image {path} on {nic.pci}"):
            await self._run("mstflint", "-d", nic.pci, "-i", path, "-y", "burn",
                            timeout=BURN_TIMEOUT)
        log.info("Device {pci}: firmware image updated", pci=nic.pci)

    # -- update_nvidia_nic_firmware_settings -----------------------------------------------
    async def update_settings(self, settings: Any) -> None:
        """The ``update_nvidia_nic_firmware_settings`` step (see the module)."""
        if not isinstance(settings, list):
            raise InvalidFirmwareSettingsConfig(
                f"The settings must be  list of settings, {settings}")
        await self.check_tools()
        nics = await self.discover()
        ids = {nic.device_id for nic in nics}
        by_id: dict[str, Mapping[str, Any]] = {}
        for setting in settings:
            device_id = setting.get("deviceID") if isinstance(setting, Mapping) else None
            if not device_id:
                raise InvalidFirmwareSettingsConfig(
                    "There is no deviceID provided for this settings")
            if device_id not in ids:
                log.debug("There are no devices with ID {id} on the system", id=device_id)
            elif device_id in by_id:
                raise DuplicateDeviceID(f"duplicate settings for device ID {device_id}")
            else:
                by_id[device_id] = setting
        to_reset: list[Nic] = []
        to_set: list[tuple[Nic, dict[str, Any]]] = []
        seen = set()
        for nic in nics:
            setting = by_id.get(nic.device_id)
            if setting is None:
                continue
            parameters: dict[str, Any] = {}
            if nic.card not in seen:
                seen.add(nic.card)
                parameters.update(setting.get("globalConfig") or {})
                info = await self.query(nic.pci)
                if "running_fw_ver" in info and info["running_fw_ver"] != info.get("fw_ver"):
                    to_reset.append(nic)
            key = "function0Config" if nic.pci.endswith("0") else "function1Config"
            parameters.update(setting.get(key) or {})
            if parameters:
                to_set.append((nic, parameters))
        for nic in to_reset:            # as the reference: settings go on after a failure
            await self.reset(nic, must=False)
        prepared = [(nic, parameters, await self._validate(nic, parameters))
                    for nic, parameters in to_set]
        for nic, parameters, current in prepared:
            await self._set(nic, parameters, current)

    async def _validate(self, nic: Nic, parameters: Mapping[str, Any]) -> dict[str, str]:
        """The device's current settings, once every parameter is known to be settable."""
        log.info("Validating config for device {pci}", pci=nic.pci)
        with failures_as(CommandExecutionError,
                         f"Cannot list the configuration mstconfig knows for {nic.pci}"):
            known = await self._run("mstconfig", "-d", nic.pci, "i")
        with failures_as(CommandExecutionError, f"Cannot query the configuration of {nic.pci}"):
            current = parse_mstconfig_query(await self._run("mstconfig", "-d", nic.pci, "q"))
        for name in parameters:
            if not tool_knows(known, name):
                raise UnSupportedConfigByMstflintPackage(
                    f"Configuration {name} is not supported by mstconfig, please update to "
                    "the latest mstflint package.")
            if not firmware_has(current, name):
                raise UnSupportedConfigByFW(
                    f"Configuration {name} for device {nic.pci} is not supported with "
                    "current fw")
        return current

    async def _set(self, nic: Nic, parameters: Mapping[str, Any],
                   current: Mapping[str, str]) -> None:
        changes = []
        for name, value in parameters.items():
            if _ARRAY_PARAM.match(name) or _differs(value, current.get(name)):
                changes.append(f"{name}={value}")
            else:
                log.info("{name} of device {pci} is already {value}", name=name,
                         pci=nic.pci, value=value)
        if not changes:
            log.info("Device {pci}: no configuration to change", pci=nic.pci)
            return
        with failures_as(CommandExecutionError,
                         f"Cannot set {' '.join(changes)} on {nic.pci}"):
            await self._run("mstconfig", "-d", nic.pci, "-y", "set", *changes)
        log.info("Device {pci}: set {changes}", pci=nic.pci, changes=" ".join(changes))


def _digest(path: str, algorithm: str) -> str:
    hashed = new_hash(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hashed.update(chunk)
    return str(hashed.hexdigest())

