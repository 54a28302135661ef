"""``dmidecode`` output as the ``dmi`` key of inspection data (the dmi-decode collector).

The result has the reference agent's shape, which Ironic's and Inspector's hooks read::

    {"bios": {field: value, ..., "Handle": "Handle 0x0000, DMI type 0, 24 bytes"},
     "cpu": [{field: value, ..., "Handle": ...}, ...],            # one per type 4 record
     "memory": {field: value, ...,                                # the first type 16 record,
                "Number Of Devices": <sum over every type 16>,    # without its Handle
                "devices": [{field: value, ..., "Handle": ...}, ...]}}  # type 17 records

A field whose value is on the following, more indented lines (``Characteristics:``,
``Flags:``) is a list of those lines. Records of other types are skipped; a record whose
``Handle`` line cannot be read is skipped with a warning.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import Logger

log = Logger()

BIOS, PROCESSOR, MEMORY_ARRAY, MEMORY_DEVICE = 0, 4, 16, 17
"""The SMBIOS record types the collector keeps."""

DMIDECODE_ARGV = ("dmidecode", "-t", "bios", "-t", "processor", "-t", "memory")
"""What the dmi-decode collector runs: type 0, type 4, and types 16 and 17 (and 5, 6 ...)."""

_HANDLE = re.compile(r"^Handle 0x[0-9A-Fa-f]+,\s*DMI type\s+(\d+)\s*,")


def parse_dmi(text: str) -> dict[str, Any]:
    """The ``dmi`` object from dmidecode's text output (see the module docstring)."""
    bios: dict[str, Any] = {}
    cpus: list[dict[str, Any]] = []
    arrays: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        lines = block.strip("\n").splitlines()
        if not lines or not lines[0].startswith("Handle "):
            continue
        match = _HANDLE.match(lines[0])
        if match is None:
            log.warn("Skipping a dmidecode record with an unreadable handle: {line}",
                     line=lines[0])
            continue
        record_type = int(match.group(1))
        if record_type not in (BIOS, PROCESSOR, MEMORY_ARRAY, MEMORY_DEVICE):
            continue
        record = _record(lines)
        if record_type == BIOS:
            bios = record
        elif record_type == PROCESSOR:
            cpus.append(record)
        elif record_type == MEMORY_ARRAY:
            arrays.append(record)
        else:
            devices.append(record)
    memory: dict[str, Any] = {"devices": []}
    if arrays:
        memory = {key: value for key, value in arrays[0].items() if key != "Handle"}
        memory["Number Of Devices"] = sum(_device_count(array) for array in arrays)
        memory["devices"] = []
    if devices:
        memory["devices"] = devices
    return {"bios": bios, "cpu": cpus, "memory": memory}


def _record(lines: list[str]) -> dict[str, Any]:
    """One record's fields; the title line (``BIOS Information``) is not a field."""
    record: dict[str, Any] = {"Handle": lines[0].strip()}
    open_list: list[str] | None = None
    list_indent = 0
    for raw in lines[1:]:
        line = raw.strip()
        if not line:
            continue
        key, colon, value = line.partition(":")
        if colon and key.strip() and (open_list is None or _indent(raw) <= list_indent):
            value = value.strip()
            if value:
                record[key.strip()] = value
                open_list = None
            else:
                open_list = record[key.strip()] = []
                list_indent = _indent(raw)
        elif open_list is not None:
            open_list.append(line)
    return record


def _indent(line: str) -> int:
    """Leading whitespace, a tab counting as 8 (dmidecode indents with tabs)."""
    return len(line.expandtabs(8)) - len(line.expandtabs(8).lstrip(" "))


def _device_count(array: dict[str, Any]) -> int:
    try:
        return int(str(array.get("Number Of Devices", "0")).strip())
    except ValueError:
        log.warn("Unreadable 'Number Of Devices' in a memory array: {value}",
                 value=array.get("Number Of Devices"))
        return 0
