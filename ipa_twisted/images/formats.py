"""Image formats told from their bytes, and the refusals made before anything is written.

The agent never trusts ``disk_format``: ``detect_format`` reads the first bytes of the image
(``HEAD_SIZE`` is enough for every magic looked for), ``inspect_qcow2`` parses a qcow2 header
and ``check_safe`` refuses what the agent will not write:

- a qcow2 with a backing file, an external data file, encryption, the corrupt bit or an
  unknown incompatible feature;
- a vmdk other than one monolithicSparse or streamOptimized file with a descriptor the
  agent understands (no extent naming another file), a differencing vhd or vdi
  (``converted_refusal``); a compressed container holding anything but raw (or ISO) bytes;
- bytes that do not match the declared ``disk_format`` (qcow2 declared but raw bytes, raw
  declared but qcow2 bytes, ...). A compressed raw image declared as ``raw`` is fine;
  ``unknown`` (OCI artifacts) declares nothing.

``check_permitted`` applies ``permitted_image_formats`` to the format's ``policy_name``
(``gpt`` for a raw image holding a GPT, as the reference's inspector names it). With
``disable_deep_image_inspection`` the pipeline skips the list and the declared-format check
and writes an image declared raw as it is, as the reference agent does.

Refusals are ``ImageFormatRefused`` (an ``ImageDownloadError``), raised before the device is
opened for writing.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ipa_twisted import errors

HEAD_SIZE = 64 * 1024
"""Bytes ``detect_format`` needs (ISO's last possible descriptor is at 0x9001)."""

RAW, ISO, QCOW2, VMDK, VHD, VHDX, VDI = "raw", "iso", "qcow2", "vmdk", "vhd", "vhdx", "vdi"
GZIP, XZ, ZSTD, BZIP2 = "gzip", "xz", "zstd", "bzip2"
COMPRESSED = frozenset({GZIP, XZ, ZSTD, BZIP2})
"""Stream compressions the agent undoes on the fly (the content must be raw or ISO)."""

CONVERTED = frozenset({VMDK, VHD, VHDX, VDI})
"""Formats written by ``qemu-img convert`` reading the image's URL (``images/qemu_source``):
random access through HTTP Range requests, so memory stays bounded and nothing is staged.
qcow2 images the streaming converter cannot read (``qcow2_streamable``) go that way too."""

_RAW_LIKE = frozenset({RAW, ISO})
DECLARED_RAW = frozenset({"raw", "gpt", "ami", "ari", "aki", "iso"})
GPT = "gpt"
"""The policy name of a raw image that holds a GPT (as the reference's format inspector)."""
UNKNOWN = "unknown"
"""``disk_format`` Ironic declares for OCI artifacts: the format comes from the bytes."""
_GPT_SIGNATURE = b"EFI PART"

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_HEADER_V2 = 72
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_KNOWN = (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE
                        | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)
QCOW2_COMPRESSION_ZLIB, QCOW2_COMPRESSION_ZSTD = 0, 1
QCOW2_MAX_L1_BYTES = 32 * 1024 * 1024  # qemu's own limit


class ImageFormatRefused(errors.ImageDownloadError):
    """The image's bytes are refused before anything is written; ``reason`` says why."""

    def __init__(self, image_id: str, reason: str) -> None:
        self.reason = reason
        super().__init__(image_id, f"image refused: {reason}")


@dataclass(frozen=True)
class Qcow2Info:
    """The fields of a qcow2 header the agent needs (all offsets in bytes)."""

    version: int
    virtual_size: int
    cluster_bits: int
    backing_file_offset: int
    backing_file_size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    nb_snapshots: int
    incompatible_features: int
    header_length: int
    compression_type: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def has_backing_file(self) -> bool:
        return self.backing_file_offset != 0

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_EXTL2)


def detect_format(head: bytes, size: int | None = None) -> str:
    """The format of an image whose first bytes are ``head`` (``HEAD_SIZE`` is enough).

    ``size`` is the whole image's size when known; an image shorter than a magic's offset
    cannot have it. Unknown bytes are ``raw``.
    """
    if head.startswith(QCOW2_MAGIC):
        return QCOW2
    if head.startswith(b"KDMV") or head.startswith(b"# Disk DescriptorFile"):
        return VMDK
    if head.startswith(b"vhdxfile"):
        return VHDX
    if head.startswith(b"conectix"):
        return VHD
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        return VDI
    if head.startswith(b"\x1f\x8b"):
        return GZIP
    if head.startswith(b"\xfd7zXZ\x00"):
        return XZ
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return ZSTD
    if head.startswith(b"BZh") and len(head) >= 4 and head[3:4] in b"123456789":
        return BZIP2
    for offset in (0x8001, 0x8801, 0x9001):
        if head[offset:offset + 5] == b"CD001" and (size is None or size >= offset + 5):
            return ISO
    return RAW


def inspect_qcow2(head: bytes) -> Qcow2Info:
    """Parse the qcow2 header at the start of ``head``; ValueError if it is not one."""
    if len(head) < QCOW2_HEADER_V2 or not head.startswith(QCOW2_MAGIC):
        raise ValueError("not a qcow2 header (too short or bad magic)")
    (version, backing_offset, backing_size, cluster_bits, virtual_size, crypt, l1_size,
     l1_offset, refcount_offset, _refcount_clusters, nb_snapshots,
     _snapshots_offset) = struct.unpack_from(">IQIIQIIQQIIQ", head, 4)
    incompatible, header_length, compression = 0, QCOW2_HEADER_V2, QCOW2_COMPRESSION_ZLIB
    if version not in (2, 3):
        raise ValueError(f"unsupported qcow2 version {version}")
    if version == 3:
        if len(head) < 104:
            raise ValueError("qcow2 v3 header truncated")
        incompatible = struct.unpack_from(">Q", head, 72)[0]
        header_length = struct.unpack_from(">I", head, 100)[0]
        if header_length > 104:
            if len(head) < 105:
                raise ValueError("qcow2 v3 header truncated")
            compression = head[104]
    if not 9 <= cluster_bits <= 21:
        raise ValueError(f"qcow2 cluster_bits {cluster_bits} out of range")
    return Qcow2Info(version=version, virtual_size=virtual_size, cluster_bits=cluster_bits,
                     backing_file_offset=backing_offset, backing_file_size=backing_size,
                     crypt_method=crypt, l1_size=l1_size, l1_table_offset=l1_offset,
                     refcount_table_offset=refcount_offset, nb_snapshots=nb_snapshots,
                     incompatible_features=incompatible, header_length=header_length,
                     compression_type=compression)


def qcow2_refusal(info: Qcow2Info) -> str | None:
    """Why the agent will not convert this qcow2, or None."""
    if info.has_backing_file:
        return "qcow2 image has a backing file"
    if info.has_data_file:
        return "qcow2 image has an external data file"
    if info.crypt_method != 0:
        return "qcow2 image is encrypted"
    if info.incompatible_features & QCOW2_INCOMPAT_CORRUPT:
        return "qcow2 image is marked corrupt"
    unknown = info.incompatible_features & ~QCOW2_INCOMPAT_KNOWN
    if unknown:
        return f"qcow2 image has unknown incompatible features {unknown:#x}"
    if info.compression_type not in (QCOW2_COMPRESSION_ZLIB, QCOW2_COMPRESSION_ZSTD):
        return f"qcow2 image uses an unknown compression type {info.compression_type}"
    l1_needed = -(-info.virtual_size // (info.cluster_size * (info.cluster_size // 8)))
    if info.l1_size < l1_needed or info.l1_size * 8 > QCOW2_MAX_L1_BYTES:
        return f"qcow2 L1 table size {info.l1_size} is invalid for its virtual size"
    if info.l1_size and (info.l1_table_offset < info.cluster_size
                         or info.l1_table_offset % info.cluster_size):
        return "qcow2 L1 table offset is invalid"
    return None


def qcow2_streamable(info: Qcow2Info) -> bool:
    """True when ``qcow2.Qcow2Converter`` reads this (safe) qcow2 as it streams; else it is
    converted by qemu-img like ``CONVERTED`` formats (extended L2 entries, zstd clusters)."""
    return not info.extended_l2 and info.compression_type == QCOW2_COMPRESSION_ZLIB


VMDK_DESCRIPTOR_OFFSET = 0x200
VMDK_TYPES = ("monolithicsparse", "streamoptimized")
VHD_DIFFERENCING = 4
VDI_TYPES = {1: "dynamic", 2: "static"}


def _vmdk_refusal(head: bytes) -> str | None:
    """Why this vmdk is refused (as the reference's format inspector), or None."""
    if not head.startswith(b"KDMV"):
        return ("vmdk descriptor file: its extents are other files (only monolithicSparse "
                "and streamOptimized single-file images are written)")
    if len(head) < 64:
        return "vmdk header truncated"
    version, desc_sector, desc_sectors = (struct.unpack_from("<I", head, 4)[0],
                                          *struct.unpack_from("<QQ", head, 28))
    if version not in (1, 2, 3):
        return f"unsupported vmdk version {version}"
    if desc_sector * 512 != VMDK_DESCRIPTOR_OFFSET:
        return "vmdk descriptor is not where qemu and the inspector expect it (sector 1)"
    end = VMDK_DESCRIPTOR_OFFSET + min(desc_sectors * 512, (1 << 20) - 1)
    if end > len(head):
        return f"vmdk descriptor larger than the {len(head)} bytes inspected"
    desc = head[VMDK_DESCRIPTOR_OFFSET:end].split(b"\0", 1)[0]
    try:
        text = desc.decode("ascii").lower()
    except UnicodeDecodeError:
        return "vmdk descriptor is not ASCII text"
    kind = text.partition('createtype="')[2].partition('"')[0]
    if kind not in VMDK_TYPES:
        return f"vmdk createType {kind or 'missing'!r} (only monolithicSparse and " \
            "streamOptimized are written)"
    extents = 0
    for line in (x.strip() for x in text.split("\n")):
        if not line or line.startswith("#") or line.startswith("ddb"):
            continue
        if line.split(" ")[0] in ("rw", "rdonly", "noaccess"):
            if "/" in line:
                return "vmdk extent names a file path"
            extents += 1
        elif "=" not in line or " " in line.split("=")[0]:
            return "vmdk descriptor holds a line the inspector does not understand"
        elif line.startswith("parentfilenamehint") or (
                line.startswith("parentcid") and line.split("=")[1].strip('" ') != "ffffffff"):
            return "vmdk image has a parent (backing) image"
    if extents != 1:
        return f"vmdk descriptor names {extents} extents (one, in the file itself, is written)"
    return None


def converted_refusal(detected: str, head: bytes) -> str | None:
    """Why the agent will not let qemu-img convert this image (``detected`` is one of
    ``CONVERTED``; ``head`` its first ``HEAD_SIZE`` bytes), or None.

    Parents and external files are refused here; qemu-img's own view (``qemu-img info``
    over the URL) is checked again before anything is written.
    """
    if detected == VMDK:
        return _vmdk_refusal(head)
    if detected == VHD:
        if len(head) < 64:
            return "vhd footer truncated"
        if struct.unpack_from(">I", head, 60)[0] == VHD_DIFFERENCING:
            return "vhd image is a differencing disk (it has a parent)"
    if detected == VDI:
        if len(head) < 0x50:
            return "vdi header truncated"
        kind = struct.unpack_from("<I", head, 0x4C)[0]
        if kind not in VDI_TYPES:
            return f"vdi image type {kind} (only dynamic and static images are written)"
    return None


def check_safe(detected: str, info: Qcow2Info | None, declared: str | None,
               image_id: str = "", *, inner: str | None = None, head: bytes = b"") -> None:
    """Refuse (ImageFormatRefused) what the agent must not write.

    ``detected`` is ``detect_format`` of the downloaded bytes; ``info`` the qcow2 header when
    they are qcow2; ``declared`` Ironic's ``disk_format`` (None: anything supported);
    ``inner`` the format of a compressed image's content, once known; ``head`` the image's
    first bytes (for the ``CONVERTED`` formats' headers).
    """
    declared = declared.lower() if declared else None
    effective = detected

    def refuse(reason: str) -> None:
        raise ImageFormatRefused(image_id, reason)

    if detected in COMPRESSED:
        if inner is None:  # only the container is known yet
            if declared is not None and declared not in DECLARED_RAW:
                refuse(f"declared disk_format {declared!r} but the bytes are "
                       f"{detected}-compressed (only compressed raw images are supported)")
            return
        if inner not in _RAW_LIKE:
            refuse(f"{detected}-compressed {inner} image: only raw images may be compressed "
                   f"as a whole (use the format's own compression)")
        effective = inner
    if declared is not None:
        if declared in DECLARED_RAW:
            if effective not in _RAW_LIKE:
                refuse(f"declared disk_format {declared!r} but the bytes are {effective}")
        elif declared in (QCOW2, VMDK, VHD, VHDX, VDI):
            if effective != declared:
                refuse(f"declared disk_format {declared!r} but the bytes are {effective}")
        else:
            refuse(f"disk_format {declared!r} is not supported")
    if effective in CONVERTED:
        reason = converted_refusal(effective, head)
        if reason is not None:
            refuse(reason)
    if effective == QCOW2:
        if info is None:
            refuse("qcow2 header could not be read")
        else:
            reason = qcow2_refusal(info)
            if reason is not None:
                refuse(reason)


def declared_format(image_info: Mapping[str, Any]) -> str | None:
    """``disk_format`` from image_info, or None when Ironic sent none or ``unknown``."""
    value = image_info.get("disk_format")
    if not value or str(value).lower() == UNKNOWN:
        return None
    return str(value)


def gpt_sector_size(head: bytes) -> int | None:
    """The sector size (512 or 4096) at which ``head`` holds a GPT header, or None."""
    for sector in (512, 4096):
        if head[sector:sector + 8] == _GPT_SIGNATURE:
            return sector
    return None


def policy_name(detected: str, head: bytes) -> str:
    """The name ``permitted_image_formats`` knows the image by.

    ``detected`` is ``detect_format`` of ``head`` (for a compressed image: of its
    decompressed head): a raw image holding a GPT is ``gpt``, as the reference's format
    inspector names it; the others keep their names (raw, iso, qcow2, vmdk, ...).
    """
    if detected == RAW and gpt_sector_size(head) is not None:
        return GPT
    return detected


def check_permitted(name: str, permitted: tuple[str, ...] | list[str], image_id: str = ""
                    ) -> None:
    """ImageFormatRefused unless the ``policy_name`` ``name`` is in ``permitted``.

    ``gpt`` (raw with a GPT) is also permitted by ``raw``: the reference agent writes any
    image declared raw without inspecting it.
    """
    allowed = {str(p).strip().lower() for p in permitted}
    if name in allowed or (name == GPT and RAW in allowed):
        return
    raise ImageFormatRefused(
        image_id, f"the image's format is {name!r}, which is not in permitted_image_formats "
        f"({', '.join(permitted) or 'empty'}); Ironic sets that list from [conductor] "
        "permitted_image_formats")
