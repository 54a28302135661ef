"""Agent parameters from virtual media, for nodes booted with ``boot_method=vmedia``.

Ironic's virtual media boot attaches a small floppy or USB image whose file system is
labelled ``ir-vfd-dev``, holding ``parameters.txt``: ``key=value`` words separated by
spaces or new lines, like the kernel command line. The reference agent reads it at start-up
and lets its values win over the kernel command line's; ``load_config(vmedia_params=...)``
merges them the same way.

The device is found, in order, as ``{dev_path}/disk/by-label/ir-vfd-dev`` (or
``IR-VFD-DEV``, as FAT keeps labels in capitals), with ``blkid -L``, and finally as the
block device whose ``{sys_path}/class/block/*/device/model`` says "virtual media". It is
mounted read-only on a temporary directory and unmounted once the file is read.
"""

from __future__ import annotations

import glob
import os
import tempfile

from twisted.logger import Logger

from ipa_twisted.config import AgentConfig, parse_kernel_cmdline
from ipa_twisted.errors import VirtualMediaBootError
from ipa_twisted.context import CommandRunner
from ipa_twisted.process import ProcessExecutionError

log = Logger()

VMEDIA_LABELS = ("ir-vfd-dev", "IR-VFD-DEV")
PARAMETERS_FILE = "parameters.txt"
VMEDIA_MODEL = "virtual media"
MAX_PARAMETERS_SIZE = 1 << 20
VMEDIA_TIMEOUT = 60.0


def parse_parameters(text: str) -> dict[str, str]:
    """``key=value`` words of ``text`` (words without ``=`` are skipped; later wins)."""
    params: dict[str, str] = {}
    for word in text.split():
        key, equals, value = word.partition("=")
        if equals and key:
            params[key] = value
    return params


def booted_from_vmedia(config: AgentConfig) -> bool:
    """Whether the kernel command line (``cmdline_path``) says ``boot_method=vmedia``."""
    try:
        with open(config.cmdline_path, "rb") as f:
            cmdline = f.read().decode("utf-8", "replace")
    except OSError:
        return False
    return parse_kernel_cmdline(cmdline).get("boot_method") == "vmedia"


def _by_model(config: AgentConfig) -> str | None:
    pattern = os.path.join(glob.escape(config.sys_path), "class", "block", "*", "device",
                           "model")
    for model in sorted(glob.glob(pattern)):
        try:
            with open(model, encoding="utf-8", errors="replace") as f:
                if VMEDIA_MODEL in f.read().lower():
                    name = os.path.basename(os.path.dirname(os.path.dirname(model)))
                    return os.path.join(config.dev_path, name)
        except OSError:
            continue
    return None


async def find_vmedia_device(runner: CommandRunner, config: AgentConfig) -> str | None:
    """The virtual media device's path, or None (see the module docstring)."""
    for label in VMEDIA_LABELS:
        link = os.path.join(config.dev_path, "disk", "by-label", label)
        if os.path.exists(link):
            return link
    if runner.which("blkid") is not None:
        for label in VMEDIA_LABELS:
            try:
                out, _ = await runner.execute("blkid", "-L", label, timeout=VMEDIA_TIMEOUT,
                                              check_exit_code=[0, 2])
            except ProcessExecutionError as e:
                log.warn("blkid -L {label} failed: {error}", label=label, error=str(e))
                continue
            found = out.decode("utf-8", "replace").split()
            if found:
                return found[0]
    return _by_model(config)


def _read_parameters(directory: str) -> dict[str, str]:
    path = os.path.join(directory, PARAMETERS_FILE)
    with open(path, "rb") as f:
        data = f.read(MAX_PARAMETERS_SIZE + 1)
    if len(data) > MAX_PARAMETERS_SIZE:
        raise VirtualMediaBootError(f"{PARAMETERS_FILE} is larger than "
                                    f"{MAX_PARAMETERS_SIZE} bytes")
    return parse_parameters(data.decode("utf-8", "replace"))


async def read_vmedia_params(runner: CommandRunner, config: AgentConfig) -> dict[str, str]:
    """Every ``key=value`` of the virtual media's ``parameters.txt``; ``{}`` when there is
    no such device (as the reference: Ironic's Redfish virtual media passes everything on
    the boot ISO's kernel command line, with ``boot_method=vmedia`` and no floppy).

    VirtualMediaBootError when the device cannot be mounted or the file read.
    """
    device = await find_vmedia_device(runner, config)
    if device is None:
        log.info("No virtual media parameters device ({labels}): the kernel command line "
                 "holds the parameters", labels=", ".join(VMEDIA_LABELS))
        return {}
    directory = tempfile.mkdtemp(prefix="ipa-vmedia-")
    try:
        await runner.execute("mount", "-o", "ro", device, directory, timeout=VMEDIA_TIMEOUT)
    except ProcessExecutionError as e:
        os.rmdir(directory)
        raise VirtualMediaBootError(f"Unable to mount virtual media device {device}: "
                                    f"{e}") from e
    try:
        params = _read_parameters(directory)
    except OSError as e:
        raise VirtualMediaBootError(f"Unable to read {PARAMETERS_FILE} from virtual media "
                                    f"device {device}: {e}") from e
    finally:
        try:
            await runner.execute("umount", directory, timeout=VMEDIA_TIMEOUT)
        except ProcessExecutionError as e:
            log.warn("Unable to unmount the virtual media device from {directory}: "
                     "{error}", directory=directory, error=str(e))
        else:
            os.rmdir(directory)
    log.info("Read {count} parameters from virtual media device {device}",
             count=len(params), device=device)
    return params


async def get_vmedia_params(runner: CommandRunner, config: AgentConfig) -> dict[str, str]:
    """The virtual media parameters if the node booted from virtual media, else ``{}``."""
    if not booted_from_vmedia(config):
        return {}
    return await read_vmedia_params(runner, config)
