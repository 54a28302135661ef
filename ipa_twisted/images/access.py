"""Where an image is fetched through and with which credentials: the ``Authorization``
header of its requests and the proxy for each URL."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ipa_twisted import errors
from ipa_twisted.config import AgentConfig


def _basic(user: Any, password: Any, image_id: str, where: str) -> str:
    missing = [name for name, value in (("user", user), ("password", password)) if not value]
    if missing:
        raise errors.ImageDownloadError(
            image_id, f"image_server_auth_strategy is http_basic but {where} has no "
            f"{' or '.join('image_server_' + m for m in missing)}")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def authorization_header(image_info: Mapping[str, Any], config: AgentConfig) -> str | None:
    """The ``Authorization`` value for the image's URLs (and its checksums file), or None.

    ImageDownloadError when ``image_request_authorization`` is not base64 or http_basic
    lacks a user or password.
    """
    image_id = str(image_info.get("id", ""))
    supplied = image_info.get("image_request_authorization")
    if supplied:
        raw = supplied.encode("ascii", "replace") if isinstance(supplied, str) else supplied
        try:
            value = base64.b64decode(raw, validate=True).decode("utf-8")
        except (binascii.Error, ValueError, TypeError):
            raise errors.ImageDownloadError(
                image_id, "image_request_authorization is not base64 (Ironic encodes the "
                "Authorization header value it sends)") from None
        if not value or "\n" in value or "\r" in value:
            raise errors.ImageDownloadError(
                image_id, "image_request_authorization does not decode to a header value")
        return value
    if image_info.get("image_server_auth_strategy") == "http_basic":
        return _basic(image_info.get("image_server_user"),
                      image_info.get("image_server_password"), image_id, "image_info")
    if config.image_server_auth_strategy == "http_basic":
        return _basic(config.image_server_user, config.image_server_password, image_id,
                      "the agent's configuration")
    return None


def proxy_for(url: str, proxies: Mapping[str, Any] | None, no_proxy: str | None) -> str | None:
    """The proxy URL to reach ``url`` through (``proxies`` is keyed by scheme), or None.

    ``no_proxy`` is a comma-separated list of host names, domain suffixes (``.example.com``
    or ``example.com`` both match sub-domains), ``host:port`` or ``*``.
    """
    if not proxies:
        return None
    parts = urlsplit(url)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    host = (parts.hostname or "").lower()
    for entry in (no_proxy or "").replace(" ", "").lower().split(","):
        if not entry:
            continue
        if entry == "*":
            return None
        name, _, port = entry.partition(":") if not entry.startswith("[") else (entry, "", "")
        if port and str(parts.port or "") != port:
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return None
    return str(proxy)
