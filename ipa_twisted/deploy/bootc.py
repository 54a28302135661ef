"""Deploying a bootable container: the body of the ``execute_bootc_install`` step.

Ironic's ``bootc`` deploy interface names the image in the node's
``instance_info['image_source']`` (``oci://registry/name:tag``) and sends it with the config
drive and the pull secret (Ironic's ``image_pull_secret``, base64-encoded once more) as the
step's arguments ``image_source``, ``configdrive`` and ``oci_pull_secret``. As the reference
agent does:

1. podman is told not to ``pivot_root`` (it cannot on a ramdisk):
   ``/etc/containers/containers.conf.d/01-ipa.conf`` holds ``[engine] no_pivot_root = true``;
2. the image (``registry/name:tag``: the URL without its scheme) is pulled first,
   ``podman pull [--authfile=<file>] --retry-delay=5s <image>``; with a pull secret the auth
   file (``{"auths": {registry: {"auth": <secret>}}}``) exists only during the pull, so the
   tenant's image never sees it;
3. ``podman --log-level=debug run --rm --privileged --pid=host --pull=never
   -v /var/lib/containers:/var/lib/containers -v /dev:/dev [-v /tmp:/tmp]
   [--security-opt label=type:unconfined_t] <image> bootc install to-disk --wipe
   --skip-fetch-check --root-size=<disk MiB - 768>M [--block-setup=tpm2-luks]
   [--root-ssh-authorized-keys=<file>] [--disable-selinux] <device>``: the bootc of the
   image writes the disk. ``instance_info``'s ``bootc_authorized_keys`` (a file under /tmp,
   shared with the container) and ``bootc_tpm2_luks`` add their options; SELinux is
   considered enabled when ``getenforce`` says Enforcing or Permissive;
4. the disk must then hold a partition table with a partition, and the config drive, if
   any, gets its partition at the end of the disk (as for whole-disk images).

podman runs with the proxy variables of the agent's environment (``http_proxy``,
``https_proxy``, ``no_proxy`` and their upper-case forms), as the reference's podman
inherits them. ``disable_bootc_deploy`` refuses the step before anything runs (the bootc
that runs comes from the tenant's image). Differences from the reference: the config drive
is decoded before anything is pulled (a bad one changes nothing), the auth file lives in a
private directory removed with it, the authorized keys file is removed after the run, a
disk too small for the 768 MiB reserve is refused, an image without bootc is named as
such whether podman exits 0 or not, and a podman without ``--retry-delay`` (older ones,
like Debian 12's 4.3) is asked again without it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from twisted.logger import Logger

from ipa_twisted.context import HardwareContext
from ipa_twisted.deploy import configdrive as configdrives
from ipa_twisted.deploy.write import validate_partitioning
from ipa_twisted.errors import (ImageDownloadError, ImageWriteError, InstanceDeployFailure,
                                InvalidCommandParamsError)
from ipa_twisted.process import ProcessExecutionError, failures_as, proxy_environment

log = Logger()

CONTAINERS_CONF_DIR = "/etc/containers/containers.conf.d"
NO_PIVOT_ROOT_CONF = "[engine]\nno_pivot_root = true\n"
RESERVED_MiB = 768
"""Left out of the root size: the EFI system partition (bootc makes ~512 MiB) and the config
drive."""
MiB = 1024 * 1024
BOOTC_NOT_FOUND = "executable file `bootc` not found"
RETRY_DELAY = "--retry-delay=5s"
"""The reference's pull option; older podman (Debian 12's 4.3) does not know it."""


def container_reference(image_source: str) -> tuple[str, str]:
    """``(registry, image)`` of an ``oci://registry/name:tag`` URL: the image is the URL
    without its scheme, as podman names it."""
    url = urlparse(image_source)
    if not url.netloc or not url.path.strip("/"):
        raise InvalidCommandParamsError(
            f"image_source {image_source!r} does not name a container image "
            "(oci://registry/name:tag)")
    return url.netloc, url.netloc + url.path


class BootcInstaller:
    """Installs a bootable container image on a disk with the image's own bootc."""

    def __init__(self, context: HardwareContext, *,
                 containers_conf_dir: str = CONTAINERS_CONF_DIR,
                 temp_dir: str | None = None) -> None:
        """``containers_conf_dir`` and ``temp_dir`` (the authorized keys file; podman
        shares /tmp with the container) are for tests."""
        self._context = context
        self._conf_dir = containers_conf_dir
        self._temp_dir = temp_dir

    async def install(self, device: str, image_source: Any, *, pull_secret: Any = None,
                      instance_info: Mapping[str, Any] | None = None,
                      configdrive: Any = None) -> str:
        """Pull ``image_source`` and run its ``bootc install to-disk`` onto ``device``;
        then the config drive. Returns the reference's message."""
        if not isinstance(image_source, str) or not image_source:
            raise InvalidCommandParamsError("execute_bootc_install needs image_source, the "
                                            "container image (oci://registry/name:tag)")
        instance_info = instance_info or {}
        registry, image = container_reference(image_source)
        drive = None
        if configdrive:
            drive = await configdrives.get_configdrive(self._context, configdrive)
        log.info("Preparing container {image} for bootc on {device}", image=image,
                 device=device)
        self._write_no_pivot_root()
        env = proxy_environment()
        await self._pull(image, registry, pull_secret, env)
        size = await self._root_size(device)
        selinux = await self._selinux()
        keys = instance_info.get("bootc_authorized_keys")
        key_file = self._write_authorized_keys(str(keys)) if keys else None
        try:
            argv = bootc_install_argv(image, device, size, selinux=selinux,
                                      tpm2_luks=bool(instance_info.get("bootc_tpm2_luks")),
                                      authorized_keys_file=key_file)
            await self._run(argv, device, image_source, env)
        finally:
            if key_file is not None:
                _remove(key_file)
        await validate_partitioning(self._context, device)
        if drive is not None:
            await configdrives.create_config_drive_partition(self._context, device, drive)
        message = f"Container image ({image_source}) written to device {device}"
        log.info("{message}", message=message)
        return message

    def _write_no_pivot_root(self) -> None:
        os.makedirs(self._conf_dir, exist_ok=True)
        with open(os.path.join(self._conf_dir, "01-ipa.conf"), "w") as f:
            f.write(NO_PIVOT_ROOT_CONF)

    async def _pull(self, image: str, registry: str, pull_secret: Any,
                    env: dict[str, str]) -> None:
        runner: Any = self._context.runner
        auth_dir = None
        argv = ["podman", "pull"]
        if pull_secret:
            auth_dir, auth_path = _write_auth(pull_secret, registry, image)
            argv.append(f"--authfile={auth_path}")
        argv += [RETRY_DELAY, image]
        try:
            with failures_as(make=lambda e: ImageDownloadError(
                    image, f"Failed to pull container image: {e}")):
                try:
                    await runner.execute(*argv, timeout=None, env=env)
                except ProcessExecutionError as e:
                    if "unknown flag: --retry-delay" not in e.stderr_text:
                        raise
                    log.info("This podman has no --retry-delay: pulling without it")
                    argv.remove(RETRY_DELAY)
                    await runner.execute(*argv, timeout=None, env=env)
        finally:
            if auth_dir is not None:
                shutil.rmtree(auth_dir, ignore_errors=True)
        log.info("Pulled container image {image}", image=image)

    async def _root_size(self, device: str) -> int:
        with failures_as(InstanceDeployFailure, f"Cannot read the size of {device}"):
            out, _ = await self._context.runner.execute(
                "blockdev", "--getsize64", device, timeout=self._context.config.command_timeout)
        try:
            size = int(out.strip()) // MiB - RESERVED_MiB
        except ValueError:
            raise InstanceDeployFailure(f"blockdev gave no size for {device}: {out!r}") from None
        if size <= 0:
            raise InstanceDeployFailure(
                f"{device} is too small for bootc install: {RESERVED_MiB} MiB are reserved "
                "for the EFI system partition and the config drive")
        return size

    async def _selinux(self) -> bool:
        try:
            out, _ = await self._context.runner.execute("getenforce", timeout=30.0)
        except ProcessExecutionError:
            return False
        return out.startswith(b"Enforcing") or out.startswith(b"Permissive")

    def _write_authorized_keys(self, keys: str) -> str:
        fd, path = tempfile.mkstemp(text=True, dir=self._temp_dir)
        with os.fdopen(fd, "w") as f:
            f.write(keys)
        return path

    async def _run(self, argv: list[str], device: str, image_source: str,
                   env: dict[str, str]) -> None:
        runner: Any = self._context.runner
        log.info("Running bootc install from {image} onto {device}", image=image_source,
                 device=device)
        try:
            out, err = await runner.execute(*argv, timeout=None, env=env)
        except ProcessExecutionError as e:
            if BOOTC_NOT_FOUND in e.stdout_text + e.stderr_text:
                raise _no_bootc(image_source) from e
            raise ImageWriteError(device, e.exit_code, e.stdout_text, e.stderr_text) from e
        if BOOTC_NOT_FOUND in (out + err).decode("utf-8", "replace"):
            raise _no_bootc(image_source)


def bootc_install_argv(image: str, device: str, root_size_mib: int, *, selinux: bool,
                       tpm2_luks: bool = False,
                       authorized_keys_file: str | None = None) -> list[str]:
    """The ``podman run ... bootc install to-disk ...`` command, as the reference builds it."""
    argv = ["podman", "--log-level=debug", "run", "--rm", "--privileged", "--pid=host",
            "--pull=never", "-v", "/var/lib/containers:/var/lib/containers",
            "-v", "/dev:/dev"]
    if authorized_keys_file:
        argv += ["-v", "/tmp:/tmp"]
    if selinux:
        argv += ["--security-opt", "label=type:unconfined_t"]
    argv += [image, "bootc", "install", "to-disk", "--wipe", "--skip-fetch-check",
             f"--root-size={root_size_mib}M"]
    if tpm2_luks:
        argv.append("--block-setup=tpm2-luks")
    if authorized_keys_file:
        argv.append(f"--root-ssh-authorized-keys={authorized_keys_file}")
    if not selinux:
        argv.append("--disable-selinux")
    argv.append(device)
    return argv


def _write_auth(pull_secret: Any, registry: str, image: str) -> tuple[str, str]:
    """A private directory and the podman auth file in it for ``registry``."""
    try:
        secret = base64.standard_b64decode(str(pull_secret)).decode()
    except (binascii.Error, ValueError) as e:
        raise ImageDownloadError(image, f"the pull secret (oci_pull_secret) is not base64: "
                                 f"{e}") from None
    directory = tempfile.mkdtemp(prefix="ipa-container-auth-")
    path = os.path.join(directory, "auth.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {registry: {"auth": secret}}}, f)
    return directory, path


def _no_bootc(image_source: str) -> ImageDownloadError:
    return ImageDownloadError(image_source, "Container does not contain the required bootc "
                              "binary and thus cannot be deployed.")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError as e:
        log.warn("Cannot remove {path}: {error}", path=path, error=str(e))
