"""Test images built in memory, for the tests that deploy them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

MiB = 1 << 20


def mbr_disk_image(size: int, digest: Callable[[bytes], Any] = hashlib.sha256) -> bytes:
    """A whole-disk image of ``size`` bytes (whole MiB): an MBR with one bootable Linux
    partition from 1 MiB to the end, disk identifier 0 (so no boot loader is installed for
    it), and data that differs per MiB (``digest`` of the MiB's index, repeated)."""
    block = len(digest(b"").digest())
    image = bytearray(b"".join(digest(str(i).encode()).digest() * (MiB // block)
                               for i in range(size // MiB)))
    image[440:512] = bytes(72)
    image[510:512] = b"\x55\xaa"
    image[446:462] = bytes([0x80, 0, 2, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") \
        + (size // 512 - 2048).to_bytes(4, "little")
    return bytes(image)
