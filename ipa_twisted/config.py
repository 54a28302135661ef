# Over 500 lines: the one table of every option (the reference's 84 and ours) and its one loader.
"""The agent's configuration: one immutable AgentConfig, merged from every source.

Sources, later wins: built-in defaults < config files (``[DEFAULT]`` and the reference agent's
other sections) < kernel command line ``ipa-*`` parameters < virtual media parameters < the
command-line flags. Lookup data and mDNS may override a few options later through
``AgentConfig.override``.

Each field's metadata says where it comes from: ``section`` (INI section, default
``DEFAULT``), ``name`` (its name in that section, default the field name), ``kernel`` (the
kernel parameter, default ``ipa-`` + name with dashes; ``False`` for none), ``secret``,
``choices``, ``minimum``/``maximum`` (numbers), ``url`` (``mdns`` or an http(s) URL), ``urls``
(comma-separated URLs), ``aliases``/``kernel_aliases`` (other accepted spellings),
``ignored`` (why a reference option is accepted without effect) and ``help``.
``load_config`` merges the sources; ``render_docs`` documents them.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit


def _opt(default: Any, help: str, *, section: str = "DEFAULT", name: str | None = None,
         kernel: str | None | bool = None, secret: bool = False,
         choices: tuple[str, ...] | None = None, minimum: float | None = None,
         maximum: float | None = None, url: bool = False, urls: bool = False,
         list: bool = False, aliases: tuple[tuple[str, str], ...] = (),
         kernel_aliases: tuple[str, ...] = (), ignored: str | None = None) -> Any:
    """Declare one option; ``kernel=False`` means no kernel parameter sets it.

    Numeric options are non-negative unless ``minimum`` says otherwise. ``urls``: a
    comma-separated list of URLs (or ``mdns`` alone). ``aliases`` are other ``(section,
    name)`` spellings accepted in config files, ``kernel_aliases`` other kernel
    parameters. ``ignored`` (the reason) marks an option of the reference agent that is
    accepted and has no effect here.
    """
    numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
    if numeric and minimum is None:
        minimum = 0
    given = {"help": help, "section": section, "name": name, "kernel": kernel,
             "secret": secret, "choices": choices, "minimum": minimum, "maximum": maximum,
             "url": url or urls, "urls": urls, "list": list, "aliases": aliases,
             "kernel_aliases": kernel_aliases, "ignored": ignored}
    return field(default=default, metadata=_Metadata(
        (key, value) for key, value in given.items() if value != _METADATA_DEFAULTS.get(key)))


_METADATA_DEFAULTS: dict[str, Any] = {
    "section": "DEFAULT", "name": None, "kernel": None, "secret": False, "choices": None,
    "minimum": None, "maximum": None, "url": False, "urls": False, "list": False,
    "aliases": (), "kernel_aliases": (), "ignored": None}


class _Metadata(dict[str, Any]):
    """An option's metadata, holding only what differs from ``_METADATA_DEFAULTS`` (104
    options of 14 keys each, kept for the agent's whole run)."""

    def __missing__(self, key: str) -> Any:
        return _METADATA_DEFAULTS[key]


# The dataclass gives fields, ``replace`` and frozenness; ``__init__``, ``__repr__``,
# ``__eq__`` and ``__hash__`` are written below over OPTIONS instead of generated: compiling
# the generated ones for 104 fields peaked at 1.3 MB of heap at import (0.1 MiB of it was
# still in the agent's idle RSS).
@dataclass(frozen=True, init=False, repr=False, eq=False)
class AgentConfig:
    """Every option the agent reads, with the reference agent's names and defaults."""

    # -- Ironic and the API ---------------------------------------------------------------
    api_url: str | None = _opt(None, "URL of the Ironic API, several comma-separated (each "
                                "is tried in turn until one answers), or 'mdns' to "
                                "discover it.", urls=True)
    global_request_id: str | None = _opt(None, "Request ID sent with every Ironic request.")
    ironic_api_version: str | None = _opt(None, "Ironic API version (\"1.68\") to use "
                                          "instead of asking Ironic for its default "
                                          "(advanced; blocks auto-detection).")
    http_request_timeout: float = _opt(30.0, "Seconds a request to Ironic (lookup, "
                                       "heartbeat, version) may take to be answered, per "
                                       "API URL tried.", minimum=1)
    listen_host: str = _opt("::", "Host (address) the API listens on.")
    listen_port: int = _opt(9999, "Port the API listens on.", minimum=1, maximum=65535)
    listen_tls: bool = _opt(False, "Serve the API over TLS with [ssl] cert_file/key_file.")
    auto_tls_allowed_clock_skew: int = _opt(3600, "Seconds before now that the "
                                            "automatic TLS certificate is valid from (the "
                                            "conductor's clock may be behind ours).",
                                            kernel=False)
    tls_certificate_curve: str = _opt("p384", "Elliptic curve of the automatic TLS "
                                      "certificate's key.", choices=("p256", "p384", "p521"))
    enable_auto_tls: bool = _opt(True, "Generate a self-signed certificate when Ironic "
                                 "supports API 1.68 and no manual TLS is set.")
    advertise_host: str | None = _opt(None, "Address sent to Ironic in heartbeats; found "
                                      "from the route to Ironic when unset.")
    advertise_port: int = _opt(9999, "Port sent to Ironic in heartbeats.", minimum=1,
                                maximum=65535)
    advertise_protocol: str = _opt("http", "Protocol sent to Ironic in heartbeats.",
                                   choices=("http", "https"))
    ip_lookup_attempts: int = _opt(6, "Attempts to find an advertise address.", minimum=1)
    ip_lookup_sleep: float = _opt(10.0, "Seconds between advertise address attempts.",
                                   kernel="ipa-ip-lookup-timeout")
    network_interface: str | None = _opt(None, "Interface whose address is advertised.")
    lookup_timeout: float = _opt(600.0, "Seconds to keep trying to look up the node.")
    lookup_interval: float = _opt(1.0, "Initial seconds between lookup attempts.")
    heartbeat_timeout: float = _opt(300.0, "Ironic's heartbeat timeout until lookup says "
                                    "otherwise; beats come every 0.3-0.6 of it.")
    standalone: bool = _opt(False, "No lookup and no heartbeats (debugging, passive mode).")
    agent_token: str | None = _opt(None, "Pre-shared agent token (else from lookup).",
                                   secret=True)
    agent_token_required: bool = _opt(False, "Deprecated: tokens are always checked once "
                                      "known.")
    hardware_initialization_delay: float = _opt(0.0, "Seconds to wait for hardware to "
                                                "initialise before start-up.")
    debug: bool = _opt(False, "Debug logging: commands run and their exit codes.")
    # -- TLS client (outgoing requests) -----------------------------------------------------
    insecure: bool = _opt(False, "Do not verify TLS certificates of Ironic and image "
                          "servers.")
    cafile: str | None = _opt(None, "PEM CA bundle to verify servers with.", kernel=False)
    certfile: str | None = _opt(None, "PEM client certificate.", kernel=False)
    keyfile: str | None = _opt(None, "PEM client key.", kernel=False)
    # -- TLS server ([ssl]) -----------------------------------------------------------------
    ssl_cert_file: str | None = _opt(None, "API server certificate (listen_tls); also read "
                                     "as [DEFAULT] tls_cert_file, the reference's name.",
                                     section="ssl", name="cert_file", kernel=False,
                                     aliases=(("DEFAULT", "tls_cert_file"),))
    ssl_key_file: str | None = _opt(None, "API server private key (listen_tls); also read "
                                    "as [DEFAULT] tls_key_file, the reference's name.",
                                    section="ssl", name="key_file", kernel=False,
                                    aliases=(("DEFAULT", "tls_key_file"),))
    ssl_ca_file: str | None = _opt(None, "CA that API clients' certificates must chain to.",
                                   section="ssl", name="ca_file", kernel=False)
    tls_min_version: str = _opt("1.2", "Lowest TLS version of the API (automatic and manual "
                                "TLS) and of outgoing HTTPS; Ironic's lookup may raise it.",
                                choices=("1.2", "1.3"))
    tls_cipher_suites: str | None = _opt(None, "OpenSSL cipher list (colon-separated) for "
                                         "TLS 1.2 on the API and outgoing HTTPS; TLS 1.3 "
                                         "suites are the library's. Ironic's lookup may set "
                                         "it.")
    # -- Inspection -------------------------------------------------------------------------
    inspection_callback_url: str | None = _opt(None, "Inspection receiver URL, several "
                                                "comma-separated (tried in turn), or "
                                                "'mdns'.", urls=True)
    inspection_collectors: str = _opt("default,logs", "Comma-separated inspection "
                                      "collectors (logs last: it sends the logs so far).")
    inspection_dhcp_wait_timeout: float = _opt(
        60.0, "Seconds to wait for DHCP before inspection; 0: no wait. Also read as "
        "inspection_dhcp_timeout (ipa-inspection-dhcp-timeout), this agent's old name.",
        aliases=(("DEFAULT", "inspection_dhcp_timeout"),),
        kernel_aliases=("ipa-inspection-dhcp-timeout",))
    inspection_dhcp_all_interfaces: bool = _opt(False, "Wait for DHCP on every interface, "
                                                "not only the PXE one.")
    inspection_benchmarks: str = _opt("", "Benchmarks for the extra-hardware collector.")
    introspection_daemon: bool = _opt(False, "Keep posting inspection data periodically.",
                                      kernel=False)
    introspection_daemon_post_interval: float = _opt(300.0, "Seconds between posts in "
                                                     "daemon mode.", kernel=False)
    collect_lldp: bool = _opt(False, "Collect LLDP TLVs into the inventory.")
    lldp_timeout: float = _opt(30.0, "Seconds to listen for LLDP frames.")
    enable_vlan_interfaces: str = _opt("", "VLAN interfaces to create: iface.vlan items, "
                                       "interface names, or 'all'.")
    # -- Clock and disks --------------------------------------------------------------------
    ntp_server: str | None = _opt(None, "NTP server to sync the clock with.")
    fail_if_clock_not_set: bool = _opt(False, "Fail start-up if the clock cannot be set.")
    disk_wait_attempts: int = _opt(10, "Attempts to wait for a suitable disk.")
    ignore_bootloader_failure: bool = _opt(False, "Report success when installing the "
                                           "bootloader fails (Ironic may override it).")
    inject_files_priority: int = _opt(0, "Priority of the inject_files deploy step; 0: "
                                      "not run unless Ironic asks for it.", maximum=99)
    enable_discard_erase: bool = _opt(
        False, "Let erase_devices discard a disk that has no secure erase.",
        ignored="erase_devices has no discard path in this agent: a disk without a secure "
        "erase is overwritten (shred), which this option would only have shortened")
    disk_erasure_concurrency: int = _opt(0, "Disks erase_devices erases at once when the "
                                         "node does not say; 0: all.", kernel=False)
    disk_wait_delay: float = _opt(3.0, "Seconds between disk wait attempts.")
    # -- Images -----------------------------------------------------------------------------
    image_download_connection_timeout: float = _opt(60.0, "Seconds to connect to an image "
                                                    "server.")
    image_download_connection_retries: int = _opt(9, "Download retries per URL.")
    image_download_connection_retry_interval: float = _opt(10.0, "Seconds between download "
                                                           "retries.")
    image_download_max_duration: float = _opt(0.0, "Seconds a whole image download may "
                                              "take, retries included; 0: no limit.")
    image_server_user: str | None = _opt(None, "User for HTTP basic auth against image "
                                         "servers (image_info's value wins).")
    image_server_password: str | None = _opt(None, "Password for HTTP basic auth against "
                                             "image servers (image_info's value wins).",
                                             secret=True)
    config_drive_rebuild: bool = _opt(
        False, "Always rebuild the config drive as a FAT for the disk's sector size (it is "
        "rebuilt anyway when the disk's sectors are too large for it, e.g. 4K).")
    disable_bootc_deploy: bool = _opt(
        False, "Refuse the execute_bootc_install deploy step (the bootc that would write "
        "the disk comes from the deployed image).")
    image_server_auth_strategy: str = _opt("noauth", "Authentication against image "
                                           "servers: noauth or http_basic (image_info's "
                                           "value wins).", choices=("noauth", "http_basic"))
    # -- Policy Ironic sends in the lookup answer (docs/policies.md) -------------------------
    md5_enabled: bool = _opt(False, "Accept images whose only checksum is MD5 (Ironic's "
                             "agent_md5_checksum_enable overrides it).")
    permitted_image_formats: tuple[str, ...] = _opt(
        ("raw", "gpt", "qcow2"), "Image formats that may be written (comma-separated); a "
        "detected format outside it is refused before any byte is written.", list=True)
    disable_deep_image_inspection: bool = _opt(False, "Trust the declared image format "
                                               "instead of inspecting the image's bytes.")
    enable_bios_bootloader_install: bool = _opt(False, "Allow grub-install for BIOS "
                                                "(legacy) boot of partition images "
                                                "(CVE-2026-43003 mitigation when off).")
    skip_bmc_detect: bool = _opt(False, "Do not probe for a BMC (ipmitool) in the inventory; "
                                 "Ironic's agent_skip_bmc_detect sets it.", kernel=False)
    guard_special_filesystems: bool = _opt(True, "Refuse to erase a disk that holds a shared "
                                           "cluster filesystem (VMFS, GFS2, OCFS2, ...).",
                                           name="guard-special-filesystems")
    # -- Containers ([container]; Ironic's agent_containers overrides) ----------------------
    # Read by the container steps (hardware/container_manager.py) when a step is listed or
    # runs, so lookup's values apply.
    container_allow_arbitrary_containers: bool = _opt(
        False, "Run any container image, not only allowed_containers.", section="container",
        name="allow_arbitrary_containers")
    container_allowed_containers: tuple[str, ...] = _opt(
        (), "Container images that a step's arguments may name (a docker:// or oci:// "
        "prefix is ignored); steps of container_steps_file need not be listed.",
        section="container",
        name="allowed_containers", list=True)
    container_container_steps_file: str = _opt(
        "/etc/ironic-python-agent.d/mysteps.yaml", "YAML (or JSON) file of container "
        "steps; a missing file means none.",
        section="container", name="container_steps_file")
    container_runner: str = _opt("podman", "Container runtime that pulls and runs the "
                                 "container steps' images.", section="container",
                                 name="runner", choices=("podman", "docker"))
    container_pull_options: tuple[str, ...] = _opt(
        (), "Options (comma-separated) for the runner's pull.", section="container",
        name="pull_options", list=True)
    container_run_options: tuple[str, ...] = _opt(
        ("--rm", "--network=host"), "Options (comma-separated) for the runner's run.",
        section="container", name="run_options", list=True)
    # -- Disks ([disk_utils], [disk_partitioner]) --------------------------------------------
    efi_system_partition_size: int = _opt(550, "MiB of the EFI system partition made for "
                                          "partition images on UEFI.", minimum=1,
                                          section="disk_utils")
    bios_boot_partition_size: int = _opt(1, "MiB of the BIOS Boot partition made for "
                                         "partition images on GPT disks booting in BIOS "
                                         "mode.", minimum=1, section="disk_utils")
    dd_block_size: str = _opt(
        "1M", "Block size of dd when writing images.", section="disk_utils",
        ignored="images are written by the agent's own streaming O_DIRECT writer, not dd")
    partition_detection_attempts: int = _opt(
        3, "Seconds (at least) to wait for a new partition's device to appear (the "
        "reference checks once a second); never less than 10 s.", minimum=1,
        section="disk_utils")
    partprobe_attempts: int = _opt(10, "Times partprobe is tried on a disk before giving "
                                   "up (the failure is logged).", minimum=1,
                                   section="disk_utils")
    image_convert_memory_limit: int = _opt(
        2048, "MiB qemu-img convert may use.", section="disk_utils",
        ignored="no qemu-img: qcow2 images are converted while streaming, in bounded memory")
    image_convert_attempts: int = _opt(
        3, "Attempts of qemu-img convert.", section="disk_utils",
        ignored="no qemu-img: qcow2 images are converted while streaming (a failed "
        "download is retried as image_download_connection_retries says)")
    check_device_interval: int = _opt(
        1, "Seconds between checks that a disk is not in use before partitioning.",
        section="disk_partitioner",
        ignored="the reference's fuser wait, left from iSCSI deploys; the agent partitions "
        "only disks it has just wiped, with nothing mounted")
    check_device_max_retries: int = _opt(
        20, "Checks that a disk is not in use before partitioning.",
        section="disk_partitioner", ignored="see check_device_interval")
    # -- mDNS ([mdns]) ------------------------------------------------------------------------
    use_mdns: bool = _opt(False, "Discover Ironic with mDNS when neither api_url nor "
                          "inspection_callback_url is set (as if api_url were 'mdns'). "
                          "mDNS answers are not authenticated.", section="mdns")
    mdns_allowed_overrides: tuple[str, ...] = _opt(
        ("inspection_callback_url", "ntp_server"), "Options that mDNS TXT properties "
        "(ipa_<option>) may set; only those of the list in docs/network.md (never an "
        "address, identity or secret) can be.", section="mdns", name="allowed_overrides",
        kernel=False, list=True)
    mdns_lookup_attempts: int = _opt(
        3, "Attempts to find a service with mDNS.", section="mdns", name="lookup_attempts",
        kernel=False, minimum=1,
        ignored="discovery repeats its queries (1, 2, 4, 8 s apart) for 30 s rather than a "
        "number of times")
    mdns_params: str | None = _opt(
        None, "Properties to publish with a registered mDNS service.", section="mdns",
        name="params", kernel=False,
        ignored="the agent only looks services up; it publishes none")
    mdns_interfaces: tuple[str, ...] = _opt(
        (), "Addresses of the interfaces to use for mDNS.", section="mdns",
        name="interfaces", kernel=False, list=True,
        ignored="queries go out on every interface that is up and multicast-capable")
    # -- Metrics ----------------------------------------------------------------------------
    metrics_backend: str = _opt("noop", "Metrics backend: statsd sends them; collector (the "
                                "reference keeps them in its own memory, for no reader "
                                "in the agent) sends nothing, as noop.", section="metrics",
                                name="backend", kernel=False,
                                choices=("noop", "statsd", "collector"))
    metrics_prepend_host: bool = _opt(False, "Prefix metric names with the host name.",
                                      section="metrics", name="prepend_host", kernel=False)
    metrics_prepend_uuid: bool = _opt(False, "Prefix metric names with the node UUID.",
                                      section="metrics", name="prepend_uuid", kernel=False)
    metrics_prepend_host_reverse: bool = _opt(True, "Reverse the host name's labels.",
                                              section="metrics", name="prepend_host_reverse",
                                              kernel=False)
    metrics_global_prefix: str | None = _opt(None, "Prefix for every metric name.",
                                             section="metrics", name="global_prefix",
                                             kernel=False)
    metrics_statsd_host: str = _opt("localhost", "statsd host.", section="metrics_statsd",
                                    name="statsd_host", kernel=False)
    metrics_statsd_port: int = _opt(8125, "statsd UDP port.", section="metrics_statsd",
                                    name="statsd_port", kernel=False, minimum=1,
                                    maximum=65535)
    # -- ipa-twisted: system roots and commands that tests replace ---------------------------
    cmdline_path: str = _opt("/proc/cmdline", "Kernel command line to read ipa-* "
                             "parameters from.", kernel=False)
    sys_path: str = _opt("/sys", "Root of sysfs.", kernel=False)
    proc_path: str = _opt("/proc", "Root of procfs.", kernel=False)
    dev_path: str = _opt("/dev", "Root of device nodes.", kernel=False)
    etc_path: str = _opt("/etc", "Root of /etc (rescue config, hostname).", kernel=False)
    run_path: str = _opt("/run", "Root of /run (bind-mounted into images' chroots).",
                         kernel=False)
    reboot_command: str = _opt("reboot -f", "Command (argv, space-separated) that reboots.",
                               kernel=False)
    poweroff_command: str = _opt("poweroff -f", "Command (argv, space-separated) that "
                                 "powers off.", kernel=False)
    include_loop_devices: bool = _opt(False, "List loop devices as disks (inventory, "
                                      "install device, erasure): for tests on loop "
                                      "devices only.", kernel=False)
    command_timeout: float = _opt(600.0, "Default seconds before an external command is "
                                  "killed.", kernel=False)
    max_request_body: int = _opt(1048576, "Largest API request body in bytes.",
                                 kernel=False, minimum=1)

    def override(self, **changes: Any) -> AgentConfig:
        """A copy with ``changes`` applied, values already of the option's type."""
        return dataclasses.replace(self, **changes)

    def __init__(self, **values: Any) -> None:
        """Options by name; the ones not given take their defaults."""
        unknown = values.keys() - _FIELDS.keys()
        if unknown:
            raise TypeError(f"AgentConfig has no option {', '.join(sorted(unknown))}")
        for option in OPTIONS:
            value = values.get(option.name, option.default)
            if value is dataclasses.MISSING:
                raise TypeError(f"AgentConfig needs option {option.name}")
            object.__setattr__(self, option.name, value)

    def __repr__(self) -> str:
        shown = (f"{option.name}=<secret>" if option.metadata["secret"] and
                 getattr(self, option.name) is not None else
                 f"{option.name}={getattr(self, option.name)!r}" for option in OPTIONS)
        return f"AgentConfig({', '.join(shown)})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not AgentConfig:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _FIELDS)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in _FIELDS))

    def merged(self, changes: Mapping[str, Any], source: str) -> AgentConfig:
        """A copy with ``changes`` (option name to raw value) coerced and checked.

        The one coercion path for values arriving while the agent runs (lookup, mDNS):
        text or JSON values, as the config files and kernel parameters are read. Raises
        ConfigError naming the option and ``source`` for an unknown option or bad value.
        """
        values = {}
        for name, raw in changes.items():
            option = _FIELDS.get(name)
            if option is None:
                raise ConfigError(f"Unknown option {name!r} from {source}")
            values[name] = _convert(option, raw, name, f"from {source}")
        return dataclasses.replace(self, **values)

    @property
    def listen(self) -> tuple[str, int]:
        """(host, port) the API listens on."""
        return self.listen_host, self.listen_port


OPTIONS: tuple[dataclasses.Field[Any], ...] = tuple(dataclasses.fields(AgentConfig))
"""Every option, in declaration order (for loaders, docs and --help)."""


# -- Loading -------------------------------------------------------------------------------

DEFAULT_CONFIG_FILES: tuple[str, ...] = (
    "ironic-python-agent/ironic-python-agent.conf",
    "ironic-python-agent.conf",
)
"""Config files read, when present, relative to ``/etc``; then ``DEFAULT_CONFIG_DIR``."""

DEFAULT_CONFIG_DIR = "ironic-python-agent.d"
"""Directory under ``/etc`` whose ``*.conf`` files are read, sorted by name."""

KERNEL_PREFIX = "ipa-"
"""Kernel (and virtual media) parameters with this prefix are agent options."""

_TRUE = frozenset({"1", "t", "true", "on", "y", "yes"})
_FALSE = frozenset({"0", "f", "false", "off", "n", "no"})
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_HINTS = typing.get_type_hints(AgentConfig)
_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in OPTIONS}


class ConfigError(Exception):
    """A configuration source or value the agent cannot use; its str is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", message).strip())


def parse_bool(text: str) -> bool:
    """The boolean ``text`` spells (as oslo.config reads it), else ValueError."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("not a boolean (use true/false, yes/no, on/off or 1/0)")


def parse_kernel_cmdline(text: str) -> dict[str, str]:
    """Every parameter of a kernel command line, as the kernel splits it.

    Parameters are separated by whitespace; double quotes protect spaces and are removed
    around a whole parameter or a whole value (``key="a b"``, ``"key=a b"``). A bare
    ``key`` maps to ``""``; a repeated key keeps its last value; the ``--`` separator is
    skipped and the parameters after it (init's) are kept too.
    """
    params: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        start, quoted = i, False
        while i < n and (quoted or not text[i].isspace()):
            if text[i] == '"':
                quoted = not quoted
            i += 1
        token = text[start:i]
        if len(token) > 1 and token[0] == '"' and token[-1] == '"':
            token = token[1:-1]
        elif token.startswith('"'):
            token = token[1:]
        if not token or token == "--":
            continue
        key, equals, value = token.partition("=")
        if equals and value.startswith('"'):
            value = value[1:-1] if len(value) > 1 and value.endswith('"') else value[1:]
        params[key] = value
    return params


def validate_url(text: str) -> None:
    """Accept ``mdns`` or an absolute http(s) URL with a host, else ValueError."""
    if text == "mdns":
        return
    if any(c.isspace() for c in text):
        raise ValueError("not a URL: contains whitespace")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError("not 'mdns' or an http:// or https:// URL")
    try:
        host, _ = parts.hostname, parts.port
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if not host:
        raise ValueError("URL has no host")


def validate_urls(text: str) -> None:
    """Accept ``mdns`` or comma-separated absolute http(s) URLs, each checked, else
    ValueError (naming the bad URL when there are several)."""
    urls = split_urls(text)
    if not urls:
        raise ValueError("no URL")
    if len(urls) > 1 and "mdns" in urls:
        raise ValueError("'mdns' cannot be combined with other URLs")
    for url in urls:
        try:
            validate_url(url)
        except ValueError as e:
            raise ValueError(f"{url!r}: {e}" if len(urls) > 1 else str(e)) from None


def default_config_files(etc: str = "/etc") -> list[str]:
    """The default config files that exist under ``etc``, in the order they are read."""
    files = [os.path.join(etc, name) for name in DEFAULT_CONFIG_FILES]
    found = [path for path in files if os.path.isfile(path)]
    found.extend(sorted(glob.glob(os.path.join(glob.escape(etc), DEFAULT_CONFIG_DIR,
                                               "*.conf"))))
    return found


def load_config(*, cli: Mapping[str, Any], config_files: Sequence[str] = (),
                default_files: bool = True, cmdline_path: str | None = None,
                vmedia_params: Mapping[str, str] | None = None,
                cli_names: Mapping[str, str] | None = None,
                ) -> tuple[AgentConfig, list[str]]:
    """Merge every source into an ``AgentConfig``, with warnings for what was ignored.

    Later wins: defaults < the default config files (when ``default_files``) <
    ``config_files`` in order < kernel ``ipa-*`` parameters (from ``cmdline_path``, else
    the ``cmdline_path`` option, read if readable) < ``vmedia_params`` < ``cli`` (field
    name to typed or string value; ``None`` is ignored). ``cli_names`` names the flag
    each ``cli`` entry came from, for errors (default ``--field-name``). The
    ``cmdline_path`` argument, when given, is also the result's ``cmdline_path``.

    Raises ConfigError for a missing or unparsable explicit file, an unparsable default
    file, and any invalid value.
    """
    warnings: list[str] = []
    values: dict[str, Any] = {}
    for path in default_config_files() if default_files else []:
        values.update(_read_config_file(path, warnings))
    for path in config_files:
        values.update(_read_config_file(path, warnings))
    from_cli = _read_cli(cli, cli_names or {})
    if cmdline_path is None:
        cmdline_path = from_cli.get("cmdline_path", values.get(
            "cmdline_path", _FIELDS["cmdline_path"].default))
    assert cmdline_path is not None
    values.update(_read_params(_read_cmdline(cmdline_path), "kernel command line",
                               warnings))
    if vmedia_params:
        values.update(_read_params(vmedia_params, "virtual media parameters", warnings))
    values.update(from_cli)
    values["cmdline_path"] = cmdline_path
    for name, value in values.items():
        reason = _FIELDS[name].metadata["ignored"]
        if reason and value != _FIELDS[name].default:
            warnings.append(f"Option {name} is accepted and ignored: {reason}")
    if (values.get("use_mdns") and not values.get("standalone")
            and not values.get("api_url") and not values.get("inspection_callback_url")):
        values["api_url"] = "mdns"   # [mdns] use_mdns: discover Ironic, as the reference
    return AgentConfig(**values), warnings


def ini_name(option: dataclasses.Field[Any]) -> str:
    """The option's name in its config file section."""
    return option.metadata["name"] or option.name


def kernel_name(option: dataclasses.Field[Any]) -> str | None:
    """The kernel parameter that sets the option, or None."""
    kernel = option.metadata["kernel"]
    if kernel is False:
        return None
    if isinstance(kernel, str):
        return kernel
    return KERNEL_PREFIX + option.name.replace("_", "-")


def ini_names(option: dataclasses.Field[Any]) -> list[tuple[str, str]]:
    """Every ``(section, name)`` that sets the option in a config file, its own first."""
    return [(option.metadata["section"], ini_name(option)), *option.metadata["aliases"]]


def kernel_names(option: dataclasses.Field[Any]) -> list[str]:
    """Every kernel parameter that sets the option, its own first."""
    own = kernel_name(option)
    return ([own] if own else []) + list(option.metadata["kernel_aliases"])


def split_urls(value: str) -> list[str]:
    """The URLs of a comma-separated URL option (``api_url``), blanks dropped."""
    return [url.strip() for url in value.split(",") if url.strip()]


_BY_INI: dict[tuple[str, str], dataclasses.Field[Any]] = {
    (section.lower(), name.lower().replace("-", "_")): f
    for f in OPTIONS for section, name in ini_names(f)}
_BY_KERNEL: dict[str, dataclasses.Field[Any]] = {
    name: f for f in OPTIONS for name in kernel_names(f)}
_SECTIONS = {section for section, _ in _BY_INI}
_INI_SECTION = re.compile(r"\[(?P<name>.+)\]")
_INI_OPTION = re.compile(r"(?P<name>.*?)\s*[=:]\s*(?P<value>.*)$")


def _parse_ini(lines: Iterable[str]) -> dict[str, dict[str, str]]:
    """Sections of INI text: option names lowercased, the last of a repeated option wins,
    indented lines continue the value above (joined by newlines) until an empty or comment
    line; ``#`` and ``;`` start comments only at a line's start; no interpolation. This is
    what the reference's oslo.config accepts, and what ``configparser`` (which the agent no
    longer imports: 0.2 MiB of idle RSS) read with ``interpolation=None, strict=False``.
    Raises ConfigError with the bad line numbers, never the lines: they may hold secrets."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    name: str | None = None
    indent_of_name = 0
    bad: list[int] = []
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text[0] in "#;":
            name = None
            continue
        indent = len(line) - len(line.lstrip())
        if current is not None and name is not None and indent > indent_of_name:
            current[name].append(text)
            continue
        section = _INI_SECTION.match(text)
        if section:
            current = sections.setdefault(section["name"], {})
            name = None
            continue
        if current is None:
            raise ConfigError(f"line {lineno}: an option before any [section] header")
        option = _INI_OPTION.match(text)
        if option is None or not option["name"]:
            bad.append(lineno)
            continue
        name = option["name"].lower()
        current[name] = [option["value"]]
        indent_of_name = indent
    if bad:
        raise ConfigError(f"line {', '.join(map(str, bad))}: neither [section], "
                          "'name = value' nor a comment")
    return {section: {key: "\n".join(value).rstrip() for key, value in options.items()}
            for section, options in sections.items()}


def _read_config_file(path: str, warnings: list[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            sections = _parse_ini(f)
    except OSError as e:
        raise ConfigError(f"Cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Cannot read config file {path}: not UTF-8 text") from None
    except ConfigError as e:
        raise ConfigError(f"Cannot parse config file {path}: {e}") from None
    values: dict[str, Any] = {}
    for section, options in sections.items():
        if section.lower() not in _SECTIONS:
            warnings.append(f"Unknown section [{section}] in {path} (ignored)")
            continue
        for key, raw in options.items():
            option = _BY_INI.get((section.lower(), key.replace("-", "_")))
            if option is None:
                warnings.append(f"Unknown option {key!r} in {path} [{section}] (ignored)")
                continue
            values[option.name] = _convert(option, raw, ini_name(option),
                                           f"in {path} [{section}]")
    return values


def _read_cmdline(path: str) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            return parse_kernel_cmdline(f.read().decode("utf-8", "replace"))
    except OSError:
        return {}


def _read_params(params: Mapping[str, str], where: str,
                 warnings: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in params.items():
        if not key.startswith(KERNEL_PREFIX):
            continue
        option = _BY_KERNEL.get(key)
        if option is None:
            warnings.append(f"Unknown parameter {key} from {where} (ignored)")
            continue
        values[option.name] = _convert(option, raw, option.name, f"from {where} ({key})")
    return values


def _read_cli(cli: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, raw in cli.items():
        if raw is None:
            continue
        flag = names.get(name, "--" + name.replace("_", "-"))
        option = _FIELDS.get(name)
        if option is None:
            raise ConfigError(f"Unknown option {name!r} from {flag}")
        values[name] = _convert(option, raw, name, f"from {flag}")
    return values


def _type_of(option: dataclasses.Field[Any]) -> tuple[type, bool]:
    """(base type, whether None is allowed) of an option."""
    hint = _HINTS[option.name]
    if typing.get_origin(hint) is tuple:
        return tuple, False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def _convert(option: dataclasses.Field[Any], raw: Any, label: str, source: str) -> Any:
    """``raw`` as the option's type, checked; ConfigError naming ``label`` and ``source``."""
    try:
        value = _coerce(option, raw)
        if value is not None:
            _check(option, value)
    except ValueError as e:
        shown = "<secret>" if option.metadata["secret"] else repr(raw)
        raise ConfigError(f"Invalid value {shown} for {label} {source}: {e}") from None
    return value


def _coerce(option: dataclasses.Field[Any], raw: Any) -> Any:
    base, optional = _type_of(option)
    if option.metadata["list"]:
        return _coerce_list(raw)
    if isinstance(raw, str):
        if optional and not raw.strip():
            return None
        if base is bool:
            return parse_bool(raw)
        if base is int:
            if not _INTEGER.match(raw.strip()):
                raise ValueError("not an integer")
            return int(raw)
        if base is float:
            try:
                return float(raw)
            except ValueError:
                raise ValueError("not a number") from None
        return raw
    if base is bool and isinstance(raw, bool):
        return raw
    if base is int and isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if base is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    raise ValueError(f"expected {_TYPE_NAMES[base]}, not {type(raw).__name__}")


def _coerce_list(raw: Any) -> tuple[str, ...]:
    """A list option: comma-separated text (as oslo.config's ListOpt) or a JSON list."""
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, (list, tuple)) and all(isinstance(i, str) for i in raw):
        items = list(raw)
    else:
        raise ValueError(f"expected a list of strings, not {type(raw).__name__}")
    return tuple(item.strip() for item in items if item.strip())


def _check(option: dataclasses.Field[Any], value: Any) -> None:
    meta = option.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a finite number")
    low, high = meta["minimum"], meta["maximum"]
    if low is not None and high is not None and not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}")
    if low is not None and value < low:
        raise ValueError("must not be negative" if low == 0 else f"must be at least {low}")
    if meta["list"]:
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ValueError(f"not one of: {', '.join(meta['choices'])}")
    if meta["urls"]:
        validate_urls(value)
    elif meta["url"]:
        validate_url(value)


# -- Documentation --------------------------------------------------------------------------

_TYPE_NAMES: dict[type, str] = {str: "string", int: "integer", float: "number",
                                bool: "boolean", tuple: "list"}

_DOCS_INTRO = """\
# Configuration

<!-- Generated by `python -m ipa_twisted.config --docs > docs/configuration.md`.
     Do not edit: tests/test_config.py checks it matches the code. -->

The agent reads one set of options, with the reference agent's (ironic-python-agent)
names, sections, kernel parameters and defaults, from several sources.

## Sources and precedence

Later sources win:

1. Built-in defaults (the table below).
2. Config files, INI syntax: `[DEFAULT]`, `[ssl]`, `[disk_utils]`, `[disk_partitioner]`,
   `[container]`, `[mdns]`, `[metrics]` and `[metrics_statsd]`.
   Unless `--no-default-config-files` is given, these are read when present:
   `/etc/ironic-python-agent/ironic-python-agent.conf`, `/etc/ironic-python-agent.conf`,
   then `/etc/ironic-python-agent.d/*.conf` sorted by name. Then each `--config-file`,
   in the order given. Option names are case-insensitive and may use `-` for `_`.
3. Kernel command line `ipa-*` parameters, read from `--cmdline-path` (or the
   `cmdline_path` option; default `/proc/cmdline`). Values may be double-quoted:
   `ipa-ntp-server="pool.ntp.org"`. A missing or unreadable file means no parameters.
4. Virtual media parameters, with the same `ipa-*` names.
5. Command-line flags of `twistd ipa` (see `twistd ipa --help`): `--api-url`,
   `--listen HOST:PORT` (`listen_host`, `listen_port`; IPv6 as `[::1]:9999`),
   `--advertise HOST:PORT` (`advertise_host`, `advertise_port`), `--standalone`,
   `--debug`, `--cmdline-path`, `--config-file` (repeatable) and
   `--no-default-config-files`. Secrets such as `agent_token` have no flag.

Lookup data and mDNS may override a few options once the agent runs.

## Compatibility with the reference agent

Every option of the reference agent (ironic-python-agent 13: `[DEFAULT]`, `[disk_utils]`,
`[disk_partitioner]`, `[container]`, `[mdns]`, `[metrics]`, `[metrics_statsd]`) is
accepted under its name, and under its kernel parameter where the reference has one
(`tests/test_config.py` checks the list). Most act as they do there. The ones marked
**Accepted and ignored** below do nothing here, for the reason given; setting one to
anything but its default logs a warning that says so. Other spellings also accepted:
`[DEFAULT] inspection_dhcp_timeout` / `ipa-inspection-dhcp-timeout` (this agent's old
name for `inspection_dhcp_wait_timeout`), `[DEFAULT] tls_cert_file` and `tls_key_file`
(the reference's names for `[ssl] cert_file` and `key_file`). `[mdns] use_mdns` with
neither `api_url` nor `inspection_callback_url` set means `api_url = mdns`.

## Values

- Booleans, case-insensitive: `1`, `t`, `true`, `on`, `y`, `yes` or `0`, `f`, `false`,
  `off`, `n`, `no`.
- Integers are decimal; numbers may have a fraction. Ports are 1-65535; other numbers must
  not be negative.
- URLs (`api_url`, `inspection_callback_url`) are `mdns` or an absolute `http://` or
  `https://` URL with a host. `api_url` may list several, comma-separated
  (`ipa-api-url=https://a:6385,https://b:6385`): each is checked, and lookup, heartbeats
  and version requests try them in turn until one answers (a connection error or timeout
  moves on to the next; an HTTP answer, even an error, is Ironic's). The one that answered
  is tried first next time. `inspection_callback_url` may list several too: each posting
  attempt tries them in turn.
- Lists are comma-separated.
- An empty value unsets an option whose default is unset.

## Errors and warnings

An invalid value in any source, or an explicit `--config-file` that is missing or not valid
INI, stops the agent with one line naming the option, the source and the value (secrets are
shown as `<secret>`), for example
`Invalid value 'abc' for listen_port in /etc/ironic-python-agent.conf [DEFAULT]: not an integer`.
Unknown sections and options in config files, and unknown `ipa-*` parameters, are logged
as warnings and ignored; other kernel parameters (`BOOTIF`, `console`, ...) are ignored
silently.

## Options

| Section | Option | Kernel parameter | Type | Default | Description |
|---|---|---|---|---|---|
"""


def _doc_type(option: dataclasses.Field[Any]) -> str:
    base, optional = _type_of(option)
    meta = option.metadata
    text = _TYPE_NAMES[base]
    if meta["choices"] is not None:
        text += ": " + ", ".join(f"`{c}`" for c in meta["choices"])
    elif meta["url"]:
        text = "URL or `mdns`"
    elif meta["maximum"] is not None:
        text += f" {meta['minimum']}-{meta['maximum']}"
    elif meta["minimum"] is not None:
        text += f" >= {meta['minimum']}"
    return text


def _doc_default(option: dataclasses.Field[Any]) -> str:
    default = option.default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if default == "" or default == ():
        return "empty"
    if isinstance(default, tuple):
        return f"`{','.join(default)}`"
    return f"`{default}`"


def render_docs() -> str:
    """Markdown documentation of the sources, their precedence and every option."""
    rows = []
    for option in OPTIONS:
        kernel = ", ".join(f"`{name}`" for name in kernel_names(option))
        meta = option.metadata
        text = meta["help"] + (" Secret." if meta["secret"] else "")
        if meta["ignored"]:
            text += f" **Accepted and ignored**: {meta['ignored']}."
        cells = [f"`[{meta['section']}]`", f"`{ini_name(option)}`", kernel or "-",
                 _doc_type(option), _doc_default(option), text]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n")
    return _DOCS_INTRO + "".join(rows)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """``python -m ipa_twisted.config --docs``: print ``docs/configuration.md``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--docs"]:
        print("usage: python -m ipa_twisted.config --docs > docs/configuration.md",
              file=sys.stderr)
        return 2
    (out or sys.stdout).write(render_docs())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
