"""The ``clean_uefi_nvram`` clean and deploy step: stale UEFI boot entries go.

``efibootmgr -v`` lists the NVRAM boot entries (``Boot0003* ubuntu<TAB>HD(1,GPT,...)/
File(\\EFI\\ubuntu\\shimx64.efi)``); each entry whose device path or label matches one of
``match_patterns`` (regular expressions, case-insensitive, searched anywhere) is removed
with ``efibootmgr -b <number> -B``. The default patterns are the reference agent's:
``^HD\\(`` (every entry booting from a disk partition), ``shim.*\\.efi``, ``grub.*\\.efi``.
Entries are read as the reference reads them: those whose device path starts with ``BBS``,
``HD``, ``FvFile``, ``FvVol``, ``PciRoot``, ``VenMsg``, ``VenHw`` or ``UsbClass``.

Two differences from the reference: the entry the machine booted from (``BootCurrent``) is
never removed, and a pattern may match the label as well as the device path (the reference
matches the path only; its default patterns match no label).

The machine must have booted in UEFI mode (``{sys_path}/firmware/efi``); else the step fails
saying so, as the reference's ``efibootmgr`` would.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from ipa_twisted.context import HardwareContext
from ipa_twisted.deploy.efi import EFIBOOTMGR, EFIBOOTMGR_TIMEOUT, decode_efibootmgr
from ipa_twisted.errors import CommandExecutionError, InvalidCommandParamsError
from ipa_twisted.process import failures_as

log = Logger()

DEFAULT_MATCH_PATTERNS = (r"^HD\(", r"shim.*\.efi", r"grub.*\.efi")

CLEAN_UEFI_NVRAM_ARGSINFO: dict[str, Any] = {
    "match_patterns": {
        "description": ("Json blob contains a list of regex patterns where any UEFI NVRAM "
                        "entry matching that pattern will be deleted. Default value is "
                        "'[\"" + '", "'.join(DEFAULT_MATCH_PATTERNS) + "\"]'"),
        "required": False,
    }
}
"""The step's arguments, worded as the reference agent words them."""

_ENTRY = re.compile(r"^Boot([0-9a-fA-F]+)\*?\s+(.*?)\s+"
                    r"((BBS|HD|FvFile|FvVol|PciRoot|VenMsg|VenHw|UsbClass)\(.*)$")
_CURRENT = re.compile(r"^BootCurrent:\s*([0-9a-fA-F]+)")


def clean_uefi_nvram_step(*, abortable: bool) -> dict[str, Any]:
    """The step as listed: clean steps are ``abortable``, deploy steps say nothing of it."""
    step: dict[str, Any] = {"step": "clean_uefi_nvram", "priority": 0, "interface": "deploy",
                            "reboot_requested": False}
    if abortable:
        step["abortable"] = True
    step["argsinfo"] = CLEAN_UEFI_NVRAM_ARGSINFO
    return step


@dataclass(frozen=True)
class BootEntry:
    """One NVRAM boot entry of ``efibootmgr -v``."""

    number: str
    label: str
    device_path: str


def parse_boot_entries(text: str) -> tuple[str | None, list[BootEntry]]:
    """(``BootCurrent``'s number or None, the entries) of ``efibootmgr -v``'s output."""
    current = None
    entries = []
    for line in text.splitlines():
        line = line.strip()
        found = _CURRENT.match(line)
        if found is not None:
            current = found.group(1).upper()
            continue
        match = _ENTRY.match(line)
        if match is not None:
            entries.append(BootEntry(match.group(1).upper(), match.group(2), match.group(3)))
    return current, entries


def compile_patterns(match_patterns: Any) -> list[re.Pattern[str]]:
    """``match_patterns`` (None: the defaults) compiled; InvalidCommandParamsError unless
    it is a list of valid regular expressions."""
    if match_patterns is None:
        match_patterns = list(DEFAULT_MATCH_PATTERNS)
    invalid = f"The match_patterns must be a list of strings: {match_patterns}"
    if not isinstance(match_patterns, list):
        raise InvalidCommandParamsError(invalid)
    patterns = []
    for item in match_patterns:
        if not isinstance(item, str):
            raise InvalidCommandParamsError(invalid)
        try:
            patterns.append(re.compile(item, flags=re.IGNORECASE))
        except re.error as e:
            raise InvalidCommandParamsError(f"{invalid} ({item!r}: {e})") from e
    return patterns


async def clean_uefi_nvram(context: HardwareContext, match_patterns: Any = None) -> None:
    """Remove the boot entries matching ``match_patterns``, keeping ``BootCurrent``.

    InvalidCommandParamsError for bad patterns (checked before anything runs);
    CommandExecutionError when the machine did not boot in UEFI mode or efibootmgr fails.
    """
    patterns = compile_patterns(match_patterns)
    efi = os.path.join(context.config.sys_path, "firmware", "efi")
    if not os.path.isdir(efi):
        raise CommandExecutionError(
            f"clean_uefi_nvram: this machine did not boot in UEFI mode (no {efi}): there "
            "are no UEFI NVRAM boot entries to clean")
    with failures_as(CommandExecutionError, "clean_uefi_nvram: cannot list the UEFI boot "
                     "entries with efibootmgr"):
        out, _ = await context.runner.execute(EFIBOOTMGR, "-v", timeout=EFIBOOTMGR_TIMEOUT)
    current, entries = parse_boot_entries(decode_efibootmgr(out))
    for entry in entries:
        matched = next((p for p in patterns if p.search(entry.device_path)
                        or p.search(entry.label)), None)
        if matched is None:
            continue
        if entry.number == current:
            log.info("Keeping the UEFI boot entry {number} ({label}): the machine booted "
                     "from it, though it matches {pattern}", number=entry.number,
                     label=entry.label, pattern=matched.pattern)
            continue
        log.info("Removing the UEFI boot entry {number} ({label}, {path}): it matches "
                 "{pattern}", number=entry.number, label=entry.label,
                 path=entry.device_path, pattern=matched.pattern)
        with failures_as(CommandExecutionError, f"clean_uefi_nvram: cannot remove the UEFI "
                         f"boot entry {entry.number} ({entry.label})"):
            await context.runner.execute(EFIBOOTMGR, "-b", entry.number, "-B",
                                         timeout=EFIBOOTMGR_TIMEOUT)
