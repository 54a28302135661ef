"""What a drive says about its own erase features: the ATA security state (``hdparm -I``)
and the NVMe controller's format and sanitize capabilities (``nvme id-ctrl``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

NVME_FORMAT_SUPPORTED = 0b10
"""OACS bit 1: the controller supports the Format NVM command."""
NVME_CRYPTO_ERASE_SUPPORTED = 0b100
"""FNA bit 2: Format NVM can do a cryptographic erase."""
NVME_SANITIZE_CRYPTO, NVME_SANITIZE_BLOCK, NVME_SANITIZE_OVERWRITE = 0b1, 0b10, 0b100
"""SANICAP bits 0-2: the sanitize actions the controller supports."""


# -- hdparm ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AtaSecurity:
    """The ATA security state of a drive, as ``hdparm -I`` shows it."""

    supported: bool
    enabled: bool
    locked: bool
    frozen: bool
    count_expired: bool
    enhanced_erase_supported: bool
    erase_minutes: int | None
    enhanced_erase_minutes: int | None

    @property
    def state(self) -> str:
        """The ATA security state: SEC1 (no password) ... SEC6 (password set, frozen)."""
        if not self.enabled:
            return "SEC2" if self.frozen else "SEC1"
        if self.locked:
            return "SEC4"
        return "SEC6" if self.frozen else "SEC5"


_ERASE_TIME = re.compile(r"(\d+)\s*min\s+for\s+SECURITY ERASE UNIT", re.IGNORECASE)
_ENHANCED_ERASE_TIME = re.compile(r"(\d+)\s*min\s+for\s+ENHANCED SECURITY ERASE UNIT",
                                  re.IGNORECASE)


def security_lines(hdparm_output: str) -> list[str] | None:
    """The lines of the ``Security:`` section of ``hdparm -I``, whitespace collapsed.

    None when there is no such section (not an ATA drive, or no security feature set).
    """
    lines = hdparm_output.splitlines()
    for index, line in enumerate(lines):
        if line.strip() == "Security:":
            section = []
            for entry in lines[index + 1:]:
                if not entry.startswith(("\t", " ")) or not entry.strip():
                    break
                section.append(" ".join(entry.split()))
            return section
    return None


def parse_ata_security(hdparm_output: str) -> AtaSecurity | None:
    """The security state in ``hdparm -I`` output; None without a Security section."""
    lines = security_lines(hdparm_output)
    if lines is None:
        return None
    present = set(lines)
    text = " ".join(lines)
    erase = _ERASE_TIME.search(text.replace("ENHANCED SECURITY", "ENHANCED-SECURITY"))
    enhanced = _ENHANCED_ERASE_TIME.search(text)
    return AtaSecurity(
        supported="supported" in present,
        enabled="enabled" in present,
        locked="locked" in present,
        frozen="frozen" in present,
        count_expired="expired: security count" in present,
        enhanced_erase_supported="supported: enhanced erase" in present,
        erase_minutes=int(erase.group(1)) if erase else None,
        enhanced_erase_minutes=int(enhanced.group(1)) if enhanced else None,
    )


# -- nvme-cli --------------------------------------------------------------------------------

@dataclass(frozen=True)
class NvmeCapabilities:
    """What ``nvme id-ctrl -o json`` says about erasing."""

    format_supported: bool
    crypto_erase_supported: bool
    sanitize_crypto: bool
    sanitize_block: bool
    sanitize_overwrite: bool

    @property
    def format_mode(self) -> int | None:
        """``--ses`` for ``nvme format``: 2 (crypto erase), 1 (user data erase) or None."""
        if not self.format_supported:
            return None
        return 2 if self.crypto_erase_supported else 1


def parse_nvme_id_ctrl(output: bytes | str) -> NvmeCapabilities:
    """NvmeCapabilities from ``nvme id-ctrl DEVICE -o json``; ValueError if unreadable."""
    try:
        document = json.loads(output)
        oacs, fna = int(document["oacs"]), int(document.get("fna", 0))
        sanicap = int(document.get("sanicap", 0))
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"unexpected nvme id-ctrl output: {e}") from None
    return NvmeCapabilities(
        format_supported=bool(oacs & NVME_FORMAT_SUPPORTED),
        crypto_erase_supported=bool(fna & NVME_CRYPTO_ERASE_SUPPORTED),
        sanitize_crypto=bool(sanicap & NVME_SANITIZE_CRYPTO),
        sanitize_block=bool(sanicap & NVME_SANITIZE_BLOCK),
        sanitize_overwrite=bool(sanicap & NVME_SANITIZE_OVERWRITE))
