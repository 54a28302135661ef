"""The ``twistd ipa`` command line, and the configuration it selects.

Flags are the last and strongest configuration source; secrets such as the agent token
have no flag, since argv is visible to every process on the machine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from twisted.python import usage

from ipa_twisted.config import AgentConfig, load_config, validate_urls


def parse_host_port(text: str) -> tuple[str, int]:
    """(host, port) from ``HOST:PORT`` or ``[IPv6]:PORT``, else ValueError."""
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise ValueError("expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError("an IPv6 address needs brackets, as in [::1]:9999")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    return host, int(port)


class Options(usage.Options):
    """Flags of ``twistd ipa``; each overrides the option of the same name."""

    synopsis = "[options]"
    longdesc = ("Run the Ironic bare-metal agent. Options come from built-in defaults, "
                "then config files, then kernel ipa-* parameters, then virtual media "
                "parameters, then these flags; later sources win. See "
                "docs/configuration.md.")

    optFlags = [
        ["standalone", None, "No lookup and no heartbeats (debugging without Ironic)."],
        ["debug", None, "Debug logging (twistd's own --debug, before 'ipa', is pdb)."],
        ["no-default-config-files", None,
         "Do not read /etc/ironic-python-agent.conf, "
         "/etc/ironic-python-agent/ironic-python-agent.conf or "
         "/etc/ironic-python-agent.d/*.conf."],
    ]
    optParameters = [
        ["api-url", None, None, "Ironic API URL, several comma-separated (tried in turn), "
         "or 'mdns' to discover it (api_url)."],
        ["listen", None, None,
         "HOST:PORT the API listens on, IPv6 as [::1]:9999 (listen_host, listen_port)."],
        ["advertise", None, None,
         "HOST:PORT sent to Ironic in heartbeats (advertise_host, advertise_port)."],
        ["cmdline-path", None, None,
         "File to read kernel ipa-* parameters from (cmdline_path; default /proc/cmdline)."],
    ]
    compData = usage.Completions(optActions={
        "config-file": usage.CompleteFiles("*.conf"),
        "cmdline-path": usage.CompleteFiles(),
    })

    def __init__(self) -> None:
        super().__init__()
        self["config-files"] = []

    def getSynopsis(self) -> str:
        """Under twistd, twistd's synopsis followed by ours (``Usage: twistd [options] ipa
        [options]``, once); alone, the same line spelled out."""
        if self.parent is None:
            return "Usage: twistd [twistd options] ipa [options]"
        return super().getSynopsis()

    def opt_config_file(self, path: str) -> None:
        """INI config file read after the default ones; repeatable, later files win."""
        self["config-files"].append(path)

    def postOptions(self) -> None:
        """Reject flags that are wrong on their own; the merged config checks the rest."""
        for flag in ("listen", "advertise"):
            if self[flag] is not None:
                try:
                    parse_host_port(self[flag])
                except ValueError as e:
                    raise usage.UsageError(
                        f"--{flag} takes HOST:PORT, not {self[flag]!r}: {e}") from None
        if self["api-url"] is not None:
            try:
                validate_urls(self["api-url"])
            except ValueError as e:
                raise usage.UsageError(f"--api-url {self['api-url']!r}: {e}") from None
        if self["cmdline-path"] == "":
            raise usage.UsageError("--cmdline-path needs a file name")


def config_from_options(options: Options, vmedia_params: Mapping[str, str] | None = None
                        ) -> tuple[AgentConfig, list[str]]:
    """The merged configuration the parsed ``options`` select, with its warnings.

    ``vmedia_params`` (read from a virtual media device at start-up) rank above the kernel
    command line and below the flags.

    Raises ``ipa_twisted.config.ConfigError`` for a bad value in any source.
    """
    cli: dict[str, Any] = {"api_url": options["api-url"],
                           "cmdline_path": options["cmdline-path"]}
    names = {"api_url": "--api-url", "cmdline_path": "--cmdline-path"}
    for flag in ("listen", "advertise"):
        if options[flag] is not None:
            host, port = parse_host_port(options[flag])
            cli[f"{flag}_host"], cli[f"{flag}_port"] = host, port
            names[f"{flag}_host"] = names[f"{flag}_port"] = f"--{flag}"
    for flag in ("standalone", "debug"):
        if options[flag]:
            cli[flag] = True
            names[flag] = f"--{flag}"
    return load_config(cli=cli, config_files=list(options["config-files"]),
                       default_files=not options["no-default-config-files"],
                       cli_names=names, vmedia_params=vmedia_params)
