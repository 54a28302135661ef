"""Root device hints: which disk the instance goes on, as Ironic's node says.

Hints come from ``node["instance_info"]["root_device"]`` or, more usually,
``node["properties"]["root_device"]``: a dict of hint name to expression, such as
``{"size": ">= 100", "model": "<in> samsung", "rotational": false}``. The names, the
operators and the matching rules are the reference agent's (ironic-lib's root device hints):

- string hints (``model``, ``wwn``, ``serial``, ``vendor``, ``wwn_with_extension``,
  ``wwn_vendor_extension``, ``name``, ``hctl``, ``by_path``, ``tran``) take ``s==``
  (the default), ``s!=``, ``s>=``, ``s<=``, ``s>``, ``s<``, ``<in>`` (substring) and
  ``<or>`` (``"<or> a <or> b"``); comparisons ignore case and surrounding blanks;
- ``size`` is a positive whole number of GiB and takes ``==`` (the default), ``!=``, ``>=``,
  ``<=``, ``>``, ``<`` and ``<or>``; a device's size in GiB may have a fraction, so
  ``== 10`` means exactly 10 GiB;
- ``rotational`` is a boolean (``true``/``false``, ``yes``/``no``, ``1``/``0`` ...);
- ``name`` and ``by_path`` may leave out the leading ``/dev/``.

An invalid hint raises RootDeviceHintError (a ValueError) saying what is wrong.

The same hints protect disks: ``properties.skip_block_devices`` is a list of such hint
objects (or ``{"volume_name": ...}`` for software RAID volumes); ``skip_list_from_node``
checks it and ``SkipList.match`` tells which disks each entry protects (see
``hardware.generic.protection.protected_devices`` for RAID volumes and their holder disks).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union
from urllib.parse import quote, unquote

from twisted.logger import Logger

from ipa_twisted.errors import DeviceNotFound
from ipa_twisted.hardware.inventory import BlockDevice

log = Logger()

GiB = 1 << 30
MIN_ROOT_DISK_SIZE = 4 * GiB
"""Smallest disk ``guess_root_disk`` picks when no hints are given (the reference's 4 GiB)."""

VALID_ROOT_DEVICE_HINTS: dict[str, type] = {
    "size": int, "model": str, "wwn": str, "serial": str, "vendor": str,
    "wwn_with_extension": str, "wwn_vendor_extension": str, "name": str,
    "rotational": bool, "hctl": str, "by_path": str, "tran": str,
}
"""Every hint name and the type of its values."""

STRING_OPERATORS = ("s==", "s!=", "s>=", "s<=", "s>", "s<", "<in>", "<or>")
NUMBER_OPERATORS = ("==", "!=", ">=", "<=", ">", "<", "<or>")
_ALL_OPERATORS = frozenset(STRING_OPERATORS + NUMBER_OPERATORS)
_OPERATORS_LONGEST_FIRST = sorted(_ALL_OPERATORS, key=len, reverse=True)
_PATH_HINTS = ("name", "by_path")
_TRUE = frozenset({"1", "t", "true", "on", "y", "yes"})
_FALSE = frozenset({"0", "f", "false", "off", "n", "no"})

Device = Union[BlockDevice, Mapping[str, Any]]
"""A BlockDevice, or a dict with the same keys (a serialised one)."""


class RootDeviceHintError(ValueError):
    """A root device hint that cannot be used: unknown name, wrong type, bad operator."""


def parse_root_device_hints(hints: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate ``hints`` and give them in normal form.

    Each string or size hint becomes ``"<operator> <value>"`` with the default operator
    filled in, values lower-cased and URL-quoted (``"s== samsung%20ssd"``), and ``name``
    and ``by_path`` values given their ``/dev/`` prefix; ``rotational`` becomes a bool.
    Normal-form hints parse to themselves. ``None`` or ``{}`` gives ``{}``.
    """
    if not hints:
        return {}
    if not isinstance(hints, Mapping):
        raise RootDeviceHintError(
            f"Root device hints must be an object, not {type(hints).__name__}")
    invalid = sorted(str(name) for name in hints if name not in VALID_ROOT_DEVICE_HINTS)
    if invalid:
        raise RootDeviceHintError(
            f'The hints "{", ".join(invalid)}" are invalid. Valid hints are: '
            f'"{", ".join(VALID_ROOT_DEVICE_HINTS)}"')
    parsed: dict[str, Any] = {}
    for name, expression in hints.items():
        if VALID_ROOT_DEVICE_HINTS[name] is bool:
            parsed[name] = _parse_bool_hint(name, expression)
        else:
            op, values = _parse_expression(name, expression)
            parsed[name] = _format(op, values)
    return parsed


def find_devices_by_hints(devices: Iterable[Device], hints: Mapping[str, Any] | None, *,
                          dev_path: str = "/dev") -> list[Device]:
    """Every device in ``devices`` that satisfies all ``hints``, in order.

    ``dev_path`` is where the devices' nodes live (the agent's ``dev_path``): ``name``
    and ``by_path`` are compared as if it were ``/dev``. A device lacking a hinted
    attribute does not match. RootDeviceHintError if the hints are invalid.
    """
    parsed = {name: (value if isinstance(value, bool) else _parse_expression(name, value))
              for name, value in parse_root_device_hints(hints).items()}
    return [device for device in devices
            if all(_matches(device, name, hint, dev_path) for name, hint in parsed.items())]


def match_root_device_hints(devices: Sequence[Device], hints: Mapping[str, Any] | None, *,
                            dev_path: str = "/dev") -> Device | None:
    """The first device satisfying all ``hints``, or None (see find_devices_by_hints)."""
    found = find_devices_by_hints(devices, hints, dev_path=dev_path)
    if not found:
        log.warn("No device matches the root device hints {hints}", hints=dict(hints or {}))
        return None
    log.info("Device {device} matches the root device hints {hints}",
             device=_get(found[0], "name"), hints=dict(hints or {}))
    return found[0]


def guess_root_disk(devices: Iterable[BlockDevice],
                    min_size: int = MIN_ROOT_DISK_SIZE) -> BlockDevice:
    """The smallest device of at least ``min_size`` bytes (by size, then name).

    DeviceNotFound when there is none, with the reference agent's message.
    """
    for device in sorted(devices, key=lambda d: (d.size, d.name)):
        if device.size >= min_size:
            return device
    raise DeviceNotFound(
        "No suitable device was found for deployment - root device hints were not "
        f"provided and all found block devices are smaller than {min_size}B.")


def root_device_hints_from_node(node: Mapping[str, Any] | None) -> Any:
    """The node's hints: ``instance_info.root_device``, else ``properties.root_device``."""
    if not node:
        return None
    instance_info = node.get("instance_info") or {}
    properties = node.get("properties") or {}
    return instance_info.get("root_device") or properties.get("root_device") or None


VOLUME_NAME = "volume_name"
"""The ``skip_block_devices`` key naming a software RAID volume (``mdadm --name``)."""


@dataclass(frozen=True)
class SkipList:
    """The node's ``properties.skip_block_devices``, checked: devices no step may write.

    Each entry is either device hints (any root device hint: ``{"name": "/dev/sdb"}``,
    ``{"serial": "S1"}``, ``{"size": ">= 1000", "rotational": true}``) naming the disks it
    matches, or ``{"volume_name": NAME}`` naming a software RAID volume (the md device and
    its holder disks are then protected; see ``hardware.generic.protection.protected_devices``).
    """

    device_hints: tuple[Mapping[str, Any], ...] = ()
    """Device hint entries, as the node gives them (validated)."""
    volume_names: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.device_hints or self.volume_names)

    def match(self, devices: Sequence[Device], *, dev_path: str = "/dev") -> dict[str, str]:
        """``{device name: why it is skipped}`` for each device a device hint matches.

        The reason names the first entry that matches, as the node wrote it.
        """
        reasons: dict[str, str] = {}
        for hints in self.device_hints:
            for device in find_devices_by_hints(devices, hints, dev_path=dev_path):
                reasons.setdefault(str(_get(device, "name")),
                                   f"skip_block_devices entry {dict(hints)} matches it")
        return reasons


def skip_list_from_node(node: Mapping[str, Any] | None) -> SkipList:
    """The node's ``properties.skip_block_devices``, checked (an empty SkipList if none).

    RootDeviceHintError, saying which entry and why, unless it is a list of objects each
    either valid device hints or ``{"volume_name": "<non-empty string>"}``.
    """
    skip = ((node or {}).get("properties") or {}).get("skip_block_devices") or []
    if not isinstance(skip, list):
        raise RootDeviceHintError(
            "skip_block_devices must be a list of objects of device hints (such as "
            f'[{{"name": "/dev/sdb"}}, {{"volume_name": "data"}}]), not {skip!r}')
    hints: list[Mapping[str, Any]] = []
    volumes: list[str] = []
    for number, entry in enumerate(skip, 1):
        where = f"skip_block_devices entry {number} ({entry!r})"
        if not isinstance(entry, Mapping) or not entry:
            raise RootDeviceHintError(f"{where} must be a non-empty object of device hints "
                                      "or a volume_name")
        if VOLUME_NAME in entry:
            name = entry[VOLUME_NAME]
            if len(entry) > 1:
                raise RootDeviceHintError(
                    f"{where} names a RAID volume (volume_name) and device hints at once; "
                    "give them as separate entries")
            if not isinstance(name, str) or not name.strip():
                raise RootDeviceHintError(f"{where}: volume_name must be a non-empty string")
            volumes.append(name.strip())
            continue
        try:
            parse_root_device_hints(entry)
        except RootDeviceHintError as e:
            raise RootDeviceHintError(f"{where} is invalid: {e}") from None
        hints.append(dict(entry))
    return SkipList(tuple(hints), tuple(dict.fromkeys(volumes)))


def skipped_devices(devices: Sequence[Device], node: Mapping[str, Any] | None, *,
                    dev_path: str = "/dev") -> dict[str, str]:
    """``{name: why}`` of the devices the node's ``skip_block_devices`` hints match.

    RootDeviceHintError if the property is invalid (see ``skip_list_from_node``).
    """
    return skip_list_from_node(node).match(devices, dev_path=dev_path)


# -- parsing ------------------------------------------------------------------------------------

def _parse_bool_hint(name: str, expression: Any) -> bool:
    if isinstance(expression, bool):
        return expression
    word = str(expression).strip().lower() if isinstance(expression, (str, int)) else None
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise RootDeviceHintError(f'Root device hint "{name}" is not a Boolean value. '
                              f"Current value: {expression!r}")


def _parse_expression(name: str, expression: Any) -> tuple[str, tuple[str, ...]]:
    """(operator, values) of one string or size hint, checked and normalised."""
    numeric = VALID_ROOT_DEVICE_HINTS[name] is int
    if numeric:
        if isinstance(expression, bool) or not isinstance(expression, (int, str)):
            raise RootDeviceHintError(
                f'Root device hint "{name}" is not an integer value. '
                f"Current value: {expression!r}")
    elif not isinstance(expression, str):
        raise RootDeviceHintError(f'Root device hint "{name}" is not a string value. '
                                  f"Hint expression: {expression!r}")
    text = str(expression).strip().lower()
    if not text:
        raise RootDeviceHintError(f"Root device hint {name} expression is empty")
    op = next((o for o in _OPERATORS_LONGEST_FIRST if text.startswith(o)), "")
    if op:
        if op == "<or>":
            values = [v.strip() for v in text.split("<or>") if v.strip()]
        else:
            rest = text[len(op):].strip()
            values = [rest] if rest else []
        if not values:
            raise RootDeviceHintError(
                f'Root device hint "{name}" has the operator {op} but no value')
    else:
        op, values = ("==" if numeric else "s=="), [text]
    allowed = NUMBER_OPERATORS if numeric else STRING_OPERATORS
    if op not in allowed:
        kind = "numeric" if numeric else "string"
        raise RootDeviceHintError(
            f'Operator {op} is not valid for the {kind} root device hint "{name}"; '
            f"use one of {', '.join(allowed)}")
    if numeric:
        for value in values:
            try:
                number = int(value)
            except ValueError:
                raise RootDeviceHintError(
                    f'Root device hint "{name}" is not an integer value. '
                    f"Current value: {expression!r}") from None
            if number <= 0:
                raise RootDeviceHintError(
                    f'Root device hint "{name}" should be a positive integer. '
                    f"Current value: {expression!r}")
        return op, tuple(str(int(v)) for v in values)
    normal = [_normal_string(v) for v in values]
    if name in _PATH_HINTS and op != "<in>":
        normal = [v if v.startswith("/dev/") else "/dev/" + v.lstrip("/") for v in normal]
    return op, tuple(normal)


def _normal_string(value: str) -> str:
    """Lower-cased, stripped and URL-quoted (idempotent: quoted text stays as it is)."""
    return quote(unquote(value.strip().lower()))


def _format(op: str, values: tuple[str, ...]) -> str:
    if op == "<or>":
        return " ".join(f"<or> {v}" for v in values)
    return f"{op} {values[0]}"


# -- matching -----------------------------------------------------------------------------------

def _get(device: Device, attribute: str) -> Any:
    if isinstance(device, Mapping):
        return device.get(attribute)
    return getattr(device, attribute, None)


def _device_path(value: str, dev_path: str) -> str:
    """``value`` as if the device nodes were under /dev (they are under ``dev_path``)."""
    base = os.path.normpath(dev_path)
    if base != "/dev" and (value == base or value.startswith(base + "/")):
        return "/dev" + value[len(base):]
    return value


def _matches(device: Device, name: str, hint: Any, dev_path: str) -> bool:
    value = _get(device, name)
    if isinstance(hint, bool):
        if isinstance(value, str):
            word = value.strip().lower()
            value = True if word in _TRUE else False if word in _FALSE else None
        return isinstance(value, bool) and value == hint
    op, values = hint
    if VALID_ROOT_DEVICE_HINTS[name] is int:
        if value is None or isinstance(value, bool):
            return False
        try:
            size = float(value) / GiB
        except (TypeError, ValueError):
            return False
        return _compare_numbers(op, size, [float(v) for v in values])
    if value is None or not str(value).strip():
        return False
    text = str(value)
    if name in _PATH_HINTS:
        text = _device_path(text, dev_path)
    return _compare_strings(op, _normal_string(text), values)


def _compare_numbers(op: str, value: float, wanted: list[float]) -> bool:
    if op == "<or>":
        return value in wanted
    other = wanted[0]
    return {"==": value == other, "!=": value != other, ">=": value >= other,
            "<=": value <= other, ">": value > other, "<": value < other}[op]


def _compare_strings(op: str, value: str, wanted: tuple[str, ...]) -> bool:
    if op == "<or>":
        return value in wanted
    other = wanted[0]
    return {"s==": value == other, "s!=": value != other, "s>=": value >= other,
            "s<=": value <= other, "s>": value > other, "s<": value < other,
            "<in>": other in value}[op]
