"""Images qemu-img converts straight from their URL: vmdk, vhd (qemu's ``vpc``), vhdx, vdi,
and qcow2 with extended L2 entries or zstd-compressed clusters.

qemu-img reads the image through its curl block driver (HTTP Range requests, a few hundred
KiB in flight), so any size fits in bounded memory and nothing is staged; it writes the
device itself (``convert -n -O raw``). The pipeline reads the same URL once more, in order,
for the checksum (``pipeline._ImageJob``) and fails the write, wiping the partition tables,
when it does not match.

What the curl driver can carry, and what is refused (before anything runs):

- credentials: HTTP basic only (``username`` and ``password-secret``; the password reaches
  qemu-img on its standard input, never in argv). Another ``Authorization`` (a bearer token
  in ``image_request_authorization``) cannot be sent: refused, naming the format;
- TLS: ``insecure`` turns ``sslverify`` off; otherwise the system's CA store verifies the
  server. ``cafile`` and ``certfile`` cannot be handed to the driver: an HTTPS URL is refused
  while they are set. ``tls_min_version`` and ``tls_cipher_suites`` are libcurl's defaults;
- proxies: the one ``proxy_for`` picks is given as ``http_proxy``/``https_proxy``, and
  ``no_proxy=*`` otherwise, so qemu-img goes where the agent's own client would.

``qemu-img info`` over the URL runs first: a backing file, an external data file,
encryption or a vmdk extent outside the file are refused there too (qemu's parser, after
``formats.converted_refusal``'s).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger

from ipa_twisted import errors
from ipa_twisted.config import AgentConfig
from ipa_twisted.images import formats
from ipa_twisted.process import failures_as

log = Logger()

QEMU_DRIVERS = {formats.VMDK: "vmdk", formats.VHD: "vpc", formats.VHDX: "vhdx",
                formats.VDI: "vdi", formats.QCOW2: "qcow2"}
"""qemu's driver for each format the agent names."""
SECRET_ID = "ipa-image-password"
INFO_TIMEOUT = 120.0
COROUTINES = 1
"""``qemu-img convert -m``: fewer parallel reads than the curl driver's 8 connections (with
all 8 busy, qemu 7.2's driver can stop waking the read waiting for one: the convert hangs)."""


@dataclass(frozen=True)
class QemuSource:
    """How qemu-img reads one image URL: the ``json:`` filename, its secret and env."""

    fmt: str
    url: str
    filename: str
    secret: bytes | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def objects(self) -> list[str]:
        """The ``--object`` arguments (the password secret read from standard input)."""
        if self.secret is None:
            return []
        return ["--object", f"secret,id={SECRET_ID},file=/dev/stdin"]

    def shown(self, argv: list[str]) -> list[str]:
        """``argv`` as logged: the URL's query (it may hold a temporary token) left out."""
        parts = urlsplit(self.url)
        safe = parts._replace(query="...", fragment="").geturl() if parts.query else self.url
        return [a.replace(self.url, safe) if self.url in a else a for a in argv]


def _basic_credentials(authorization: str, fmt: str, image_id: str) -> tuple[str, str]:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise formats.ImageFormatRefused(
            image_id, f"{fmt} images are converted by qemu-img, whose curl driver can send "
            f"only HTTP basic credentials, not a {scheme or 'custom'} Authorization header "
            "(image_request_authorization); convert the image to raw or qcow2")
    try:
        user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
    except (binascii.Error, ValueError):
        user, sep, password = "", "", ""
    if not sep:
        raise formats.ImageFormatRefused(image_id, "the Basic Authorization header for the "
                                         "image does not hold user:password")
    return user, password


def qemu_source(fmt: str, url: str, *, authorization: str | None, proxy: str | None,
                config: AgentConfig, image_id: str = "") -> QemuSource:
    """The ``QemuSource`` for ``url``; ImageFormatRefused when qemu-img's curl driver cannot
    fetch it the way the agent's own client would (see the module's docstring)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise formats.ImageFormatRefused(
            image_id, f"{fmt} images are converted by qemu-img from an http or https URL, "
            f"not {scheme or 'a relative'} URL {url!r}")
    file: dict[str, Any] = {"driver": scheme, "url": url,
                            "timeout": max(1, int(config.image_download_connection_timeout))}
    if scheme == "https":
        if config.insecure:
            file["sslverify"] = False
        elif config.cafile or config.certfile:
            which = "cafile" if config.cafile else "certfile"
            raise formats.ImageFormatRefused(
                image_id, f"{fmt} images are converted by qemu-img, whose curl driver "
                f"verifies HTTPS with the system's CA store only: the agent's {which} "
                "cannot be given to it; serve the image over a server the system trusts, "
                "or convert it to raw or qcow2")
    secret = None
    if authorization:
        user, password = _basic_credentials(authorization, fmt, image_id)
        file["username"] = user
        file["password-secret"] = SECRET_ID
        secret = password.encode()
    options: dict[str, Any] = {"driver": QEMU_DRIVERS[fmt], "file": file}
    if fmt in (formats.QCOW2, formats.VMDK):
        options["backing"] = None   # never open a backing file, even one missed above
    env = ({"http_proxy": proxy, "https_proxy": proxy, "HTTPS_PROXY": proxy}
           if proxy else {"no_proxy": "*"})
    return QemuSource(fmt=fmt, url=url, filename="json:" + json.dumps(options),
                      secret=secret, env=env)


def _info_refusal(info: Mapping[str, Any]) -> str | None:
    if info.get("backing-filename") or info.get("full-backing-filename"):
        return "qemu-img reports a backing file"
    if info.get("encrypted"):
        return "qemu-img reports the image is encrypted"
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        return "qemu-img reports an external data file"
    extents = specific.get("extents") or []
    if len(extents) > 1:
        return f"qemu-img reports {len(extents)} vmdk extents"
    return None


async def inspect(runner: Any, source: QemuSource, image_id: str = "") -> int:
    """Run ``qemu-img info`` on the URL; the virtual size, or ImageFormatRefused."""
    argv = ["qemu-img", "info", "--output=json", *source.objects(), source.filename]
    where = source.shown([source.url])[0]
    with failures_as(make=lambda e: formats.ImageFormatRefused(
            image_id, f"qemu-img cannot read the {source.fmt} image at {where}: "
            f"{e.stderr_text.strip() or e}")):
        out, _ = await runner.execute(*argv, stdin=source.secret, env=source.env,
                                      timeout=INFO_TIMEOUT, log_argv=source.shown(argv))
    info = json.loads(out)
    reason = _info_refusal(info)
    if reason is not None:
        raise formats.ImageFormatRefused(image_id, reason)
    return int(info["virtual-size"])


async def convert(runner: Any, source: QemuSource, device: str, image_id: str = "") -> None:
    """``qemu-img convert`` the URL onto ``device`` (raw, no target created, the device's
    bytes past the image left alone); ImageWriteError when it fails."""
    cache = "none" if stat.S_ISBLK(os.stat(device).st_mode) else "writeback"
    argv = ["qemu-img", "convert", "-n", "-O", "raw", "-t", cache, "-m", str(COROUTINES),
            *source.objects(),
            source.filename, device]
    with failures_as(make=lambda e: errors.ImageWriteError(device, e.exit_code,
                                                           e.stdout_text, e.stderr_text)):
        await runner.execute(*argv, stdin=source.secret, env=source.env, timeout=None,
                             log_argv=source.shown(argv))
