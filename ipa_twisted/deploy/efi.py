"""UEFI boot entries: the loaders on an EFI system partition and their NVRAM records.

The loaders are found as the reference agent finds them: files named like the firmware's
default loaders (``BOOTLOADERS_EFI``, any case) that are executable on the mounted ESP; a
``.csv`` hint (``BOOTX64.CSV``, written by shim: UTF-16 ``loader,label,...``) wins over
them all. Each becomes an NVRAM boot record made with ``efibootmgr``, labelled
``ironic<N>`` (or the CSV's label); older records carrying the same label are removed first,
so repeated deployments do not pile up entries.

``efibootmgr`` is whatever program of that name is first on the runner's PATH: tests put a
recording fake there (the machines running them have no EFI variables to write).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.logger import Logger

from ipa_twisted.context import HardwareContext

log = Logger()

EFIBOOTMGR = "efibootmgr"
EFIBOOTMGR_TIMEOUT = 60.0

BOOTLOADERS_EFI = (
    "bootx64.csv",   # shim's hint (Ubuntu, Red Hat)
    "boot.csv",      # rEFInd, CentOS 7
    "bootia32.efi",
    "bootx64.efi",   # x86_64 default
    "bootia64.efi",
    "bootarm.efi",
    "bootaa64.efi",  # arm64 default
    "bootriscv32.efi",
    "bootriscv64.efi",
    "bootriscv128.efi",
    "grubaa64.efi",
    "winload.efi",
)
"""Loader file names (lower case) that make a boot record; 32-bit CSVs are left out."""

_RECORD = re.compile(r"^Boot([0-9a-fA-F]+)\*?\s(.*)$")


@dataclass(frozen=True)
class BootEntry:
    """A loader to register: its path on the ESP (``\\EFI\\BOOT\\BOOTX64.EFI``) and label."""

    loader: str
    label: str


def find_efi_loaders(esp_root: str) -> list[str]:
    """Loaders under the mounted ESP ``esp_root``, as paths relative to it (``/``-separated).

    A CSV hint, when found, is returned alone.
    """
    found: list[str] = []
    for directory, subdirectories, files in os.walk(esp_root):
        subdirectories.sort()
        for name in sorted(files):
            if name.lower() not in BOOTLOADERS_EFI:
                continue
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, esp_root).replace(os.sep, "/")
            if name.lower().endswith(".csv"):
                log.debug("{path} points to the boot loader", path=relative)
                return [relative]
            if os.access(path, os.X_OK):
                found.append(relative)
    return found


def _read_csv(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    for encoding in ("utf-16", "utf-16-le"):
        try:
            return data.decode(encoding)
        except UnicodeError:
            continue
    return data.decode("utf-8", "replace")


def boot_entries(esp_root: str, loaders: Sequence[str],
                 label_suffix: str = "") -> list[BootEntry]:
    """The records to make for ``loaders`` (from ``find_efi_loaders``)."""
    entries: list[BootEntry] = []
    for number, loader in enumerate(loaders, start=1):
        if loader.lower().endswith(".csv"):
            fields = _read_csv(os.path.join(esp_root, loader)).split(",", 3)
            target = "/".join([*loader.split("/")[:-1], fields[0].strip()])
            label = fields[1].strip() if len(fields) > 1 and fields[1].strip() \
                else f"ironic{number}"
        else:
            target, label = loader, f"ironic{number}"
        if label_suffix:
            label = f"{label} {label_suffix}"
        entries.append(BootEntry("\\" + target.replace("/", "\\"), label))
    return entries


def decode_efibootmgr(output: bytes) -> str:
    """``efibootmgr``'s output as text: some firmware records hold UTF-16; never fails."""
    if b"\x00" in output:
        return output.decode("utf-16-le", "replace").replace("\x00", "")
    return output.decode("utf-8", "replace")


async def boot_records(context: HardwareContext) -> list[tuple[str, str]]:
    """``(number, text)`` of every NVRAM boot record (``efibootmgr -v``)."""
    out, _ = await context.runner.execute(EFIBOOTMGR, "-v", timeout=EFIBOOTMGR_TIMEOUT)
    records = []
    for line in decode_efibootmgr(out).splitlines():
        match = _RECORD.match(line.strip())
        if match is not None:
            records.append((match.group(1), match.group(2)))
    return records


async def register(context: HardwareContext, device: str, partition: int,
                   entries: Sequence[BootEntry]) -> None:
    """Make a boot record for each entry on ``device``'s ``partition`` (its number).

    Existing records whose text holds an entry's label are removed first.
    ProcessExecutionError if efibootmgr fails.
    """
    records = await boot_records(context)
    for entry in entries:
        for number, text in records:
            if entry.label in text:
                log.info("Removing the old boot record {number} ({text})", number=number,
                         text=text)
                await context.runner.execute(EFIBOOTMGR, "-b", number, "-B",
                                             timeout=EFIBOOTMGR_TIMEOUT)
        log.info("Adding boot loader {loader} on partition {partition} of {device} as "
                 "{label}", loader=entry.loader, partition=partition, device=device,
                 label=entry.label)
        await context.runner.execute(EFIBOOTMGR, "-v", "-c", "-d", device, "-p",
                                     str(partition), "-w", "-L", entry.label, "-l",
                                     entry.loader, timeout=EFIBOOTMGR_TIMEOUT)
