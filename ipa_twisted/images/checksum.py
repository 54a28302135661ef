"""The checksum an image must match, from image_info as Ironic sends it.

Order of preference:

1. ``os_hash_algo`` + ``os_hash_value`` (Glance's multihash): any algorithm hashlib has;
2. ``checksum``: ``algorithm:value``; a bare hex digest whose length tells the algorithm (32
   md5, 40 sha1, 64 sha256, 96 sha384, 128 sha512); or an http(s) URL of a checksums file,
   whose entry for the image's file name (the last path component of the image URL) is used.
   A checksums file may hold ``<hash>  <name>`` or ``<hash> *<name>`` lines (GNU coreutils),
   ``SHA256 (<name>) = <hash>`` lines (BSD / ``openssl dgst``), or a bare hash alone.

MD5 (by ``os_hash_algo``, length, ``md5:`` prefix or a checksums file entry) is used only
when ``md5_enabled`` (Ironic's ``agent_md5_checksum_enable``); otherwise a stronger
``checksum`` beside an MD5 ``os_hash_value`` is used, and an image with MD5 alone is refused
(``Md5Refused``) before anything is downloaded.

No checksum at all: the image is written unverified and a warning is logged, as the reference
agent does when Ironic sends none (Ironic requires one unless the operator disabled it).
``stream_raw_images`` is accepted and ignored: every image is streamed and verified on the way.

Hashing happens on the stream (``new_hash``) in a worker thread: hashlib releases the GIL for
large updates.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.logger import Logger

from ipa_twisted import errors

log = Logger()

CHECKSUM_FILE_LIMIT = 4 * 1024 * 1024
"""Largest checksums file the agent reads."""

_BY_LENGTH = {32: "md5", 40: "sha1", 64: "sha256", 96: "sha384", 128: "sha512"}
_HEX = re.compile(r"[0-9a-fA-F]+\Z")
_BSD_LINE = re.compile(r"^(?P<tag>[A-Za-z0-9_-]+)\s*\((?P<name>.*)\)\s*=\s*(?P<hash>[0-9a-fA-F]+)$")
_GNU_LINE = re.compile(r"^\\?(?P<hash>[0-9a-fA-F]+)\s+(?P<mode>[* ^U]?)(?P<name>.+)$")


@dataclass(frozen=True)
class ExpectedChecksum:
    """What the image must hash to: a hashlib algorithm name and a lowercase hex digest."""

    algorithm: str
    value: str
    source: str
    """Where it came from: ``os_hash_value``, ``checksum`` or the checksums file's URL."""


def new_hash(algorithm: str) -> Any:
    """A fresh hashlib object; ValueError for an algorithm hashlib does not have."""
    return hashlib.new(algorithm, usedforsecurity=False)


def hash_algorithm(name: str) -> str | None:
    """The hashlib name for ``name`` (``SHA256``, ``sha-256``, ``SHA2-256``, ``sha3-256``)."""
    key = name.strip().lower().replace("-", "_")
    if key.startswith("sha2_"):
        key = "sha" + key[5:]
    if key in hashlib.algorithms_available:
        return key
    compact = key.replace("_", "")
    if compact in hashlib.algorithms_available:
        return compact
    return None


def algorithm_for_length(value: str) -> str | None:
    """The algorithm a hex digest of this length belongs to, or None."""
    return _BY_LENGTH.get(len(value)) if _HEX.match(value) else None


def image_filename(url: str) -> str:
    """The file name an image URL names (last path component, unquoted)."""
    return unquote(os.path.basename(urlsplit(url).path))


def _entry_name(name: str) -> str:
    name = name.strip()
    return os.path.basename(name[2:] if name.startswith("./") else name)


def parse_checksum_file(text: str, filenames: Sequence[str]) -> tuple[str | None, str]:
    """The ``(algorithm or None, hex digest)`` for the first of ``filenames`` found in ``text``.

    Raises ValueError when the file is empty or has no entry for any of the names.
    """
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError("the checksums file is empty")
    if len(lines) == 1 and _HEX.match(lines[0]):
        return None, lines[0].lower()
    entries: dict[str, tuple[str | None, str]] = {}
    for line in lines:
        bsd = _BSD_LINE.match(line)
        if bsd:
            algorithm = hash_algorithm(bsd.group("tag"))
            entries.setdefault(_entry_name(bsd.group("name")),
                               (algorithm, bsd.group("hash").lower()))
            continue
        gnu = _GNU_LINE.match(line)
        if gnu:
            entries.setdefault(_entry_name(gnu.group("name")), (None, gnu.group("hash").lower()))
    for filename in filenames:
        if filename in entries:
            return entries[filename]
    raise ValueError(f"no checksum for {', '.join(filenames) or 'the image'} in the checksums "
                     f"file ({len(entries)} entries)")


class Md5Refused(errors.ImageDownloadError):
    """The image's only checksum is MD5 and MD5 is disabled (``md5_enabled``)."""

    def __init__(self, image_id: str, msg: str) -> None:
        super().__init__(image_id, msg)
        self.type = "ImageDownloadError"


async def expected_checksum(image_info: Mapping[str, Any],
                            fetch: Callable[[str], Awaitable[bytes]], *,
                            md5_enabled: bool) -> ExpectedChecksum | None:
    """The checksum the image must match, or None when image_info has none.

    ``fetch(url)`` reads a checksums file (``download.fetch_small``). Errors are
    ImageDownloadError: the image is not downloaded when its checksum cannot be known.
    With ``md5_enabled`` False (the ``md5_enabled`` option, which Ironic's
    ``agent_md5_checksum_enable`` sets at lookup), an MD5 ``os_hash_value`` gives way to a
    non-MD5 ``checksum``; an image whose only checksum is MD5 (``os_hash_algo`` md5, a
    32-digit ``checksum``, or an MD5 entry in a checksums file) is Md5Refused.
    """
    found = await _expected(image_info, fetch, use_os_hash=True)
    if found is None or found.algorithm != "md5" or md5_enabled:
        return found
    image_id = str(image_info.get("id", ""))
    if found.source == "os_hash_value" and image_info.get("checksum"):
        other = await _expected(image_info, fetch, use_os_hash=False)
        if other is not None and other.algorithm != "md5":
            log.info("Image {image_id}: os_hash_algo is md5, which is disabled; verifying "
                     "its {algo} checksum instead", image_id=image_id, algo=other.algorithm)
            return other
    where = "os_hash_algo md5" if found.source == "os_hash_value" else (
        "a 32-digit 'checksum'" if found.source == "checksum" else
        f"an MD5 entry in {found.source}")
    raise Md5Refused(
        image_id, f"its only checksum is MD5 ({where}) and MD5 checksums are disabled "
        "(agent option md5_enabled is false; Ironic sets it from [agent] "
        "allow_md5_checksum as agent_md5_checksum_enable). Give the image a SHA-256 or "
        "SHA-512 checksum, or enable MD5.")


async def _expected(image_info: Mapping[str, Any], fetch: Callable[[str], Awaitable[bytes]],
                    *, use_os_hash: bool) -> ExpectedChecksum | None:
    image_id = str(image_info.get("id", ""))

    def fail(message: str) -> errors.ImageDownloadError:
        return errors.ImageDownloadError(image_id, message)

    algo_name, algo_value = image_info.get("os_hash_algo"), image_info.get("os_hash_value")
    if algo_name and algo_value and use_os_hash:
        algorithm = hash_algorithm(str(algo_name))
        if algorithm is not None:
            return ExpectedChecksum(algorithm, str(algo_value).strip().lower(), "os_hash_value")
        if not image_info.get("checksum"):
            raise fail(f"unsupported os_hash_algo {algo_name!r}")
        log.warn("Image {image_id}: os_hash_algo {algo!r} is not available; using checksum",
                 image_id=image_id, algo=algo_name)
    checksum = str(image_info.get("checksum") or "").strip()
    if not checksum:
        log.warn("Image {image_id} has no checksum: it is written WITHOUT verification",
                 image_id=image_id)
        return None
    if "://" in checksum:
        scheme = urlsplit(checksum).scheme.lower()
        if scheme not in ("http", "https"):
            raise fail(f"checksum URL scheme {scheme!r} is not supported")
        try:
            body = await fetch(checksum)
        except errors.RESTError:
            raise
        except Exception as e:
            raise fail(f"could not fetch the checksums file {checksum}: {e}") from e
        urls = [str(u) for u in image_info.get("urls") or []]
        names = list(dict.fromkeys(n for n in (image_filename(u) for u in urls) if n))
        try:
            algorithm_or_none, value = parse_checksum_file(body.decode("utf-8", "replace"),
                                                           names)
        except ValueError as e:
            raise fail(f"{e} ({checksum})") from e
        algorithm = algorithm_or_none or algorithm_for_length(value)
        if algorithm is None:
            raise fail(f"cannot tell the algorithm of the checksum in {checksum}")
        return ExpectedChecksum(algorithm, value, checksum)
    prefix, sep, rest = checksum.partition(":")
    if sep and hash_algorithm(prefix) is not None and _HEX.match(rest.strip()):
        return ExpectedChecksum(hash_algorithm(prefix) or prefix, rest.strip().lower(),
                                "checksum")
    algorithm = algorithm_for_length(checksum)
    if algorithm is None:
        raise fail(f"cannot tell the algorithm of checksum {checksum!r}")
    return ExpectedChecksum(algorithm, checksum.lower(), "checksum")
