"""What an ``image_info`` from Ironic must hold, and what it says about the image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ipa_twisted import errors


def validate_image_info(image_info: Any) -> None:
    """InvalidCommandParamsError (400) unless ``image_info`` can be deployed.

    Like the reference agent: ``id`` and a non-empty ``urls`` list are required, and a
    checksum (``checksum``, or ``os_hash_algo`` with ``os_hash_value``) so the image can be
    verified.
    """
    if not isinstance(image_info, dict):
        raise errors.InvalidCommandParamsError("image_info must be an object")
    for field in ("id", "urls"):
        if field not in image_info:
            raise errors.InvalidCommandParamsError(f"Image is missing '{field}' field.")
    urls = image_info["urls"]
    if (not isinstance(urls, list) or not urls
            or not all(isinstance(u, str) and u for u in urls)):
        raise errors.InvalidCommandParamsError(
            "Image 'urls' must be a list with at least one element.")
    checksum = image_info.get("checksum")
    algo, value = image_info.get("os_hash_algo"), image_info.get("os_hash_value")
    has_checksum = isinstance(checksum, str) and bool(checksum)
    has_hash = isinstance(algo, str) and bool(algo) and isinstance(value, str) and bool(value)
    if checksum is not None and not isinstance(checksum, str):
        raise errors.InvalidCommandParamsError("Image 'checksum' must be a string")
    if (algo is None) != (value is None) or (algo is not None and not has_hash):
        raise errors.InvalidCommandParamsError(
            "Image 'os_hash_algo' and 'os_hash_value' must be given together, as strings")
    if not (has_checksum or has_hash):
        raise errors.InvalidCommandParamsError(
            "Image checksum is not available, either the 'checksum' field or the "
            "'os_hash_algo' and 'os_hash_value' fields pair must be set for image "
            "verification.")
    for field in ("root_mb", "swap_mb", "ephemeral_mb"):
        size = image_info.get(field)
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                                 or size < 0):
            raise errors.InvalidCommandParamsError(f"Image '{field}' must be a whole number")


def is_partition_image(image_info: Mapping[str, Any]) -> bool:
    """Whether Ironic sent a partition image (else a whole-disk image)."""
    return image_info.get("image_type") == "partition"
