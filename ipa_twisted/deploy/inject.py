"""The ``inject_files`` deploy step: write files into the partitions of the install device.

Each file is an object with ``path`` (absolute, in the partition), ``content`` (base64, or a
URL, formatted with ``{node}`` and ``{ports}``, whose body is the content), or
``deleted: true`` to remove the file; ``partition``; and optionally ``mode``, ``dirmode``
(for the leaf directory if it is created), ``owner`` and ``group`` (numbers). The node's
``properties.inject_files`` come first, then the step's ``files``.

``partition`` may be a partition number of the install device; a device path; ``UUID=``,
``PARTUUID=`` or ``LABEL=`` a value, or a bare UUID or label, matched against the install
device's partitions; or absent, in which case the partition is the first (LVM partitions
skipped) that has the path's first directory (``etc`` for ``/etc/hostname``): a file
directly in ``/`` needs an explicit ``partition``.

Every partition is mounted on a private temporary directory and unmounted right after.
``inject_files`` does the work for a manager's step of that name (the generic manager's),
given the install device; ``INJECT_FILES_STEP`` is the step.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from twisted.logger import Logger

from ipa_twisted.blockdev import disks
from ipa_twisted.blockdev.mounts import UnmountError, mounted
from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import (CommandExecutionError, DeviceNotFound,
                                InvalidCommandParamsError)
from ipa_twisted.images.download import fetch_small
from ipa_twisted.process import ProcessExecutionError

log = Logger()

MAX_DOWNLOAD_SIZE = 64 << 20
"""Largest file content fetched from a URL (it is held in memory)."""
_FIELDS = frozenset({"path", "partition", "content", "deleted", "mode", "dirmode", "owner",
                     "group"})
_TAGS = ("UUID", "PARTUUID", "LABEL")

ARGSINFO: dict[str, dict[str, Any]] = {
    "files": {
        "description": (
            "Files to inject, a list of file structures with keys: 'path' (path to the "
            "file), 'partition' (partition specifier), 'content' (base64 encoded string), "
            "'mode' (new file mode) and 'dirmode' (mode for the leaf directory, if "
            "created). Merged with the values from node.properties[inject_files]."),
        "required": False,
    },
    "verify_ca": {
        "description": ("Whether to verify TLS certificates. Global agent options are used "
                        "by default."),
        "required": False,
    },
}

INJECT_FILES_STEP: dict[str, Any] = {
    "step": "inject_files", "priority": 0, "interface": "deploy",
    "reboot_requested": False, "abortable": True, "argsinfo": ARGSINFO}
"""The deploy step, for ``get_deploy_steps``; its priority there is the
``inject_files_priority`` option's (0, the default: run only when Ironic asks for it)."""


def validate_files(from_properties: Any, from_args: Any) -> list[dict[str, Any]]:
    """The files to inject; InvalidCommandParamsError listing every problem."""
    if not isinstance(from_properties, list):
        raise InvalidCommandParamsError("The `inject_files` node property must be a list, "
                                        f"got {type(from_properties).__name__}")
    if not isinstance(from_args, list):
        raise InvalidCommandParamsError("The `files` argument must be a list, got "
                                        f"{type(from_args).__name__}")
    files = from_properties + from_args
    failures: list[str] = []
    for item in files:
        if not isinstance(item, dict):
            failures.append(f"expected an object, got {item!r}")
            continue
        unknown = sorted(set(item) - _FIELDS)
        if unknown:
            failures.append(f"unexpected fields in {item}: {', '.join(unknown)}")
        path = item.get("path")
        if not path or not isinstance(path, str):
            failures.append(f"expected a path in {item}")
        elif not path.startswith("/"):
            failures.append(f"path must be absolute in {item}")
        elif path.endswith("/"):
            failures.append(f"directories not supported for {item}")
        elif os.path.dirname(path) == "/" and not item.get("partition"):
            failures.append(f'{item} in root directory requires "partition"')
        elif ".." in path.split("/"):
            failures.append(f"path must not contain '..' in {item}")
        if item.get("content") and item.get("deleted"):
            failures.append(f"content cannot be used with deleted in {item}")
        if not item.get("deleted") and not isinstance(item.get("content"), str):
            failures.append(f"expected content (a string) in {item}")
        for field in ("owner", "group", "mode", "dirmode"):
            if field in item and type(item[field]) is not int:
                failures.append(f"{field} must be a number in {item}")
        partition = item.get("partition")
        if partition is not None and not isinstance(partition, (int, str)):
            failures.append(f"partition must be a number or a string in {item}")
    if failures:
        raise InvalidCommandParamsError("Validation of files failed: " + "; ".join(failures))
    return files


def _inside(root: str, path: str) -> str:
    """``path`` (absolute in the partition) under mount point ``root``, never outside it."""
    full = os.path.join(root, os.path.normpath(path.strip("/")))
    resolved = os.path.realpath(os.path.dirname(full))
    real_root = os.path.realpath(root)
    if resolved != real_root and not resolved.startswith(real_root + os.sep):
        raise CommandExecutionError(f"{path} leads outside its partition")
    return full


def _write(target: str, item: Mapping[str, Any], content: bytes | None) -> None:
    """Write (or delete) one file as ``item`` says (blocking; small files)."""
    if item.get("deleted"):
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        return
    assert content is not None
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        os.makedirs(directory)
        if item.get("dirmode") is not None:
            os.chmod(directory, item["dirmode"])
    if os.path.islink(target):
        os.unlink(target)     # never write through a link the image put there
    with open(target, "wb") as f:
        f.write(content)
    if item.get("mode") is not None:
        os.chmod(target, item["mode"])
    if item.get("owner") is not None or item.get("group") is not None:
        owner, group = item.get("owner"), item.get("group")
        os.chown(target, -1 if owner is None else owner, -1 if group is None else group)


async def inject_files(context: HardwareContext, node: Any, ports: Any, files: Any,
                       verify_ca: bool, install_device: Callable[[], Awaitable[str]]) -> None:
    """The ``inject_files`` deploy step (see the module docstring).

    ``install_device`` gives the install device; it is asked only when there are files.
    """
    properties = (node or {}).get("properties") or {}
    items = validate_files(properties.get("inject_files") or [], files or [])
    if not items:
        log.info("No files to inject")
        return
    device = str(await install_device())
    for item in items:
        content = await _content(context, item, node, ports, verify_ca)
        partition = await _partition_for(context, device, item)
        path = item["path"]
        try:
            async with mounted(context, partition, prefix="ipa-inject-") as root:
                target = _inside(root, path)
                _write(target, item, content)
        except (ProcessExecutionError, OSError, UnmountError) as e:
            raise CommandExecutionError(
                f"Failed to process file {path} on {partition}. "
                f"{type(e).__name__}: {e}") from e
        log.info("{action} {path} on {partition}",
                 action="Deleted" if item.get("deleted") else "Injected", path=path,
                 partition=partition)


async def _content(context: HardwareContext, item: Mapping[str, Any], node: Any, ports: Any,
                   verify_ca: bool) -> bytes | None:
    if item.get("deleted"):
        return None
    content = str(item["content"])
    if "://" not in content:
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidCommandParamsError(
                f"Content of {item['path']} is not base64: {e}") from e
    url = content.format(node=node, ports=ports)
    http = context.http(verify=verify_ca)
    try:
        body: bytes = await fetch_small(
            url, http, MAX_DOWNLOAD_SIZE, clock=context.reactor,
            timeout=context.config.image_download_connection_timeout)
    except Exception as e:
        raise CommandExecutionError(f"Failed to download {url} for {item['path']}: "
                                    f"{e}") from e
    return body


async def _partitions(context: HardwareContext, device: str) -> list[disks.Partition]:
    partitions = await disks.list_partitions(context, device)
    for partition in partitions:
        if not os.path.exists(partition.path):
            await disks.wait_for_partition(context, device, partition.path)
    return partitions


async def _partition_for(context: HardwareContext, device: str,
                         item: Mapping[str, Any]) -> str:
    """The partition (device path) ``item`` goes to."""
    spec = item.get("partition")
    path = item["path"]
    if spec is None or spec == "":
        return await _partition_with(context, device, path.strip("/").split("/", 1)[0])
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        number = int(spec)
        for partition in await _partitions(context, device):
            if partition.number == number:
                return partition.path
        raise DeviceNotFound(f"No partition {number} on {device}")
    assert isinstance(spec, str)
    if spec.startswith("/"):
        return spec
    tag, equals, value = spec.partition("=")
    tags: Sequence[str] = (tag.upper(),) if equals and tag.upper() in _TAGS else _TAGS
    value = value if equals and tag.upper() in _TAGS else spec
    for partition in await _partitions(context, device):
        probed = await disks.probe(context, partition.path)
        names = {"UUID": probed.get("UUID", "").lower(),
                 "PARTUUID": probed.get("PART_ENTRY_UUID", "").lower(),
                 "LABEL": probed.get("LABEL", "")}
        for name in tags:
            wanted = value if name == "LABEL" else value.lower()
            if names[name] and names[name] == wanted:
                return partition.path
    raise DeviceNotFound(f"No partition {spec} on {device}")


async def _partition_with(context: HardwareContext, device: str, directory: str) -> str:
    """The first partition of ``device`` holding ``/directory``."""
    partitions = await _partitions(context, device)
    for partition in partitions:
        if "lvm" in partition.flags:
            log.debug("Skipping LVM partition {path}", path=partition.path)
            continue
        try:
            async with mounted(context, partition.path, prefix="ipa-inject-") as root:
                if os.path.isdir(os.path.join(root, directory)):
                    log.info("Path /{directory} has been found on partition {path}",
                             directory=directory, path=partition.path)
                    return partition.path
        except ProcessExecutionError as e:
            log.warn("Failure when inspecting partition {path}: {error}",
                     path=partition.path, error=str(e))
    raise DeviceNotFound(f"No partition found with path /{directory}, scanned: "
                         + ", ".join(p.path for p in partitions))
