"""Tests for ipa_twisted.config: parsing, merging, validation and the generated docs."""

from __future__ import annotations

import configparser
import dataclasses
import io
import os
import random
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ipa_twisted.config import (
    OPTIONS,
    AgentConfig,
    ConfigError,
    _parse_ini,
    default_config_files,
    ini_name,
    ini_names,
    kernel_name,
    kernel_names,
    load_config,
    main,
    parse_bool,
    parse_kernel_cmdline,
    render_docs,
    split_urls,
)

_FIELD = {f.name: f for f in OPTIONS}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


class ConfigTestCase(SynchronousTestCase):
    """Writes temp files; never reads /etc or /proc/cmdline."""

    def write(self, text: str) -> str:
        path = str(self.mktemp())
        Path(path).write_text(text, encoding="utf-8")
        return path

    def load(self, *files: str, cmdline: str = "", cli: dict[str, Any] | None = None,
             vmedia: dict[str, str] | None = None) -> tuple[AgentConfig, list[str]]:
        return load_config(cli=cli or {}, config_files=files, default_files=False,
                           cmdline_path=self.write(cmdline), vmedia_params=vmedia)

    def error(self, *files: str, cmdline: str = "", cli: dict[str, Any] | None = None,
              vmedia: dict[str, str] | None = None) -> str:
        with self.assertRaises(ConfigError) as raised:
            self.load(*files, cmdline=cmdline, cli=cli, vmedia=vmedia)
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        return message


class ParseBoolTests(SynchronousTestCase):
    def test_true_spellings(self) -> None:
        for text in ["1", "t", "true", "on", "y", "yes", "TRUE", "Yes", " On "]:
            self.assertIs(parse_bool(text), True, text)

    def test_false_spellings(self) -> None:
        for text in ["0", "f", "false", "off", "n", "no", "FALSE", "No", "oFF"]:
            self.assertIs(parse_bool(text), False, text)

    def test_anything_else_is_a_value_error(self) -> None:
        for text in ["", "2", "maybe", "enable", "truee", "-1"]:
            self.assertRaises(ValueError, parse_bool, text)


class ParseKernelCmdlineTests(SynchronousTestCase):
    def test_plain_parameters(self) -> None:
        self.assertEqual(
            parse_kernel_cmdline("BOOTIF=01-52-54-00-12-34-56 ipa-debug=1 quiet "
                                 "console=ttyS0,115200n8 boot_method=vmedia\n"),
            {"BOOTIF": "01-52-54-00-12-34-56", "ipa-debug": "1", "quiet": "",
             "console": "ttyS0,115200n8", "boot_method": "vmedia"})

    def test_quoted_values_keep_spaces(self) -> None:
        self.assertEqual(
            parse_kernel_cmdline('a="x y"  "b=p q"\tc=d=e e= "f"'),
            {"a": "x y", "b": "p q", "c": "d=e", "e": "", "f": ""})

    def test_inner_quotes_are_kept(self) -> None:
        self.assertEqual(parse_kernel_cmdline('a=x"y z"w b'), {"a": 'x"y z"w', "b": ""})

    def test_unterminated_quote_runs_to_the_end(self) -> None:
        self.assertEqual(parse_kernel_cmdline('a="x y'), {"a": "x y"})

    def test_last_repeat_wins_and_separator_is_skipped(self) -> None:
        self.assertEqual(parse_kernel_cmdline("a=1 -- a=2 b"), {"a": "2", "b": ""})

    def test_empty(self) -> None:
        self.assertEqual(parse_kernel_cmdline("  \n"), {})


class PrecedenceTests(ConfigTestCase):
    def test_defaults(self) -> None:
        config, warnings = self.load()
        self.assertEqual(warnings, [])
        self.assertEqual(config.override(cmdline_path="/proc/cmdline"), AgentConfig())

    def test_each_source_overrides_the_previous(self) -> None:
        first = self.write("[DEFAULT]\napi_url = http://one:6385\nlisten_port = 1\n"
                           "lookup_timeout = 1\ndebug = true\ninsecure = true\n"
                           "ntp_server = ntp1\n")
        second = self.write("[DEFAULT]\napi_url = http://two:6385\nlisten_port = 2\n"
                            "lookup_timeout = 2\ndebug = false\n")
        cmdline = "ipa-api-url=http://three:6385 ipa-listen-port=3 ipa-debug=1"
        vmedia = {"ipa-api-url": "http://four:6385", "ipa-listen-port": "4"}
        cli = {"api_url": "http://five:6385", "listen_port": None}
        config, warnings = self.load(first, second, cmdline=cmdline, vmedia=vmedia, cli=cli)
        self.assertEqual(warnings, [])
        self.assertEqual(config.api_url, "http://five:6385")     # cli
        self.assertEqual(config.listen_port, 4)                  # vmedia (cli None ignored)
        self.assertIs(config.debug, True)                        # kernel
        self.assertEqual(config.lookup_timeout, 2.0)             # later file
        self.assertIs(config.insecure, True)                     # first file
        self.assertEqual(config.ntp_server, "ntp1")
        self.assertEqual(config.heartbeat_timeout, 300.0)        # default

    def test_typed_cli_values(self) -> None:
        config, _ = self.load(cli={"listen_port": 8080, "lookup_timeout": 5,
                                   "standalone": True, "listen_host": "::1"})
        self.assertEqual((config.listen_port, config.lookup_timeout), (8080, 5.0))
        self.assertIsInstance(config.lookup_timeout, float)
        self.assertEqual((config.standalone, config.listen_host), (True, "::1"))

    def test_string_cli_values_are_converted(self) -> None:
        config, _ = self.load(cli={"listen_port": "8080", "insecure": "yes"})
        self.assertEqual((config.listen_port, config.insecure), (8080, True))

    def test_empty_string_unsets_optional(self) -> None:
        conf = self.write("[DEFAULT]\nntp_server = ntp1\nadvertise_host = 10.0.0.1\n")
        config, _ = self.load(conf, cmdline="ipa-ntp-server=", cli={"advertise_host": ""})
        self.assertIsNone(config.ntp_server)
        self.assertIsNone(config.advertise_host)

    def test_other_sections(self) -> None:
        conf = self.write("[ssl]\ncert_file = /c.pem\nkey_file = /k.pem\n"
                          "[metrics]\nbackend = statsd\nprepend_host_reverse = no\n"
                          "[metrics_statsd]\nstatsd_port = 9125\n")
        config, warnings = self.load(conf)
        self.assertEqual(warnings, [])
        self.assertEqual((config.ssl_cert_file, config.ssl_key_file), ("/c.pem", "/k.pem"))
        self.assertEqual((config.metrics_backend, config.metrics_statsd_port),
                         ("statsd", 9125))
        self.assertIs(config.metrics_prepend_host_reverse, False)

    def test_names_ignore_case_and_dashes(self) -> None:
        conf = self.write("[default]\nLISTEN-PORT = 1234\nAdvertise_Protocol = https\n"
                          "[SSL]\nCert-File = /c.pem\n")
        config, warnings = self.load(conf)
        self.assertEqual(warnings, [])
        self.assertEqual((config.listen_port, config.advertise_protocol,
                          config.ssl_cert_file), (1234, "https", "/c.pem"))

    def test_default_section_is_not_copied_into_others(self) -> None:
        conf = self.write("[DEFAULT]\ninsecure = true\n[ssl]\ncert_file = /c.pem\n")
        config, warnings = self.load(conf)
        self.assertEqual(warnings, [])
        self.assertIs(config.insecure, True)

    def test_repeated_option_last_wins(self) -> None:
        conf = self.write("[DEFAULT]\nlisten_port = 1\n[DEFAULT]\nlisten_port = 2\n")
        self.assertEqual(self.load(conf)[0].listen_port, 2)

    def test_ip_lookup_sleep_uses_the_reference_kernel_name(self) -> None:
        config, warnings = self.load(cmdline="ipa-ip-lookup-timeout=4")
        self.assertEqual((config.ip_lookup_sleep, warnings), (4.0, []))

    def test_documented_kernel_parameters(self) -> None:
        cmdline = ("ipa-api-url=mdns ipa-debug=1 ipa-insecure=1 ipa-standalone=true "
                   "ipa-agent-token=tok ipa-global-request-id=req-1 "
                   "ipa-inspection-callback-url=http://[fd00::1]:5050/v1/continue "
                   'ipa-inspection-collectors="default,logs" ipa-collect-lldp=1 '
                   "ipa-lldp-timeout=2.5 ipa-enable-vlan-interfaces=eth0.100 "
                   "ipa-ntp-server=pool.ntp.org ipa-disk-wait-attempts=3 "
                   "ipa-disk-wait-delay=0.5 ipa-advertise-host=10.0.0.2 "
                   "ipa-listen-host=0.0.0.0 BOOTIF=01-aa boot_method=pxe")
        config, warnings = self.load(cmdline=cmdline)
        self.assertEqual(warnings, [])
        self.assertEqual(config.api_url, "mdns")
        self.assertTrue(config.debug and config.insecure and config.standalone
                        and config.collect_lldp)
        self.assertEqual(config.agent_token, "tok")
        self.assertEqual(config.global_request_id, "req-1")
        self.assertEqual(config.inspection_callback_url, "http://[fd00::1]:5050/v1/continue")
        self.assertEqual(config.inspection_collectors, "default,logs")
        self.assertEqual(config.lldp_timeout, 2.5)
        self.assertEqual(config.enable_vlan_interfaces, "eth0.100")
        self.assertEqual(config.ntp_server, "pool.ntp.org")
        self.assertEqual((config.disk_wait_attempts, config.disk_wait_delay), (3, 0.5))
        self.assertEqual((config.advertise_host, config.listen_host),
                         ("10.0.0.2", "0.0.0.0"))


class CmdlinePathTests(ConfigTestCase):
    def test_path_from_a_config_file(self) -> None:
        cmdline = self.write("ipa-listen-port=7000")
        conf = self.write(f"[DEFAULT]\ncmdline_path = {cmdline}\n")
        config, _ = load_config(cli={}, config_files=[conf], default_files=False)
        self.assertEqual((config.listen_port, config.cmdline_path), (7000, cmdline))

    def test_path_from_cli_beats_the_file(self) -> None:
        ignored, used = self.write("ipa-listen-port=7000"), self.write("ipa-listen-port=7001")
        conf = self.write(f"[DEFAULT]\ncmdline_path = {ignored}\n")
        config, _ = load_config(cli={"cmdline_path": used}, config_files=[conf],
                                default_files=False)
        self.assertEqual((config.listen_port, config.cmdline_path), (7001, used))

    def test_argument_beats_everything(self) -> None:
        ignored, used = self.write("ipa-listen-port=7000"), self.write("ipa-listen-port=7001")
        config, _ = load_config(cli={"cmdline_path": ignored}, default_files=False,
                                cmdline_path=used)
        self.assertEqual((config.listen_port, config.cmdline_path), (7001, used))

    def test_missing_file_means_no_parameters(self) -> None:
        missing = self.mktemp()
        config, warnings = load_config(cli={}, default_files=False, cmdline_path=missing)
        self.assertEqual((config.listen_port, warnings), (9999, []))


class WarningTests(ConfigTestCase):
    def test_unknown_options_and_sections(self) -> None:
        conf = self.write("[DEFAULT]\nlisten_port = 1\nbogus = 1\n[ssl]\ninsecure = 1\n"
                          "[nope]\nx = 1\n")
        config, warnings = self.load(conf)
        self.assertEqual(config.listen_port, 1)
        self.assertEqual(warnings, [
            f"Unknown option 'bogus' in {conf} [DEFAULT] (ignored)",
            f"Unknown option 'insecure' in {conf} [ssl] (ignored)",
            f"Unknown section [nope] in {conf} (ignored)"])

    def test_unknown_ipa_parameters(self) -> None:
        _, warnings = self.load(cmdline="ipa-bogus=1 ipa-cafile=/x BOOTIF=1 console=tty0",
                                vmedia={"ipa-nope": "2", "other": "3"})
        self.assertEqual(warnings, [
            "Unknown parameter ipa-bogus from kernel command line (ignored)",
            "Unknown parameter ipa-cafile from kernel command line (ignored)",
            "Unknown parameter ipa-nope from virtual media parameters (ignored)"])

    def test_values_of_unknown_options_are_not_shown(self) -> None:
        conf = self.write("[DEFAULT]\nagent_tokn = s3cr3t\n")
        _, warnings = self.load(conf, cmdline="ipa-agent-tokn=s3cr3t")
        self.assertEqual(len(warnings), 2)
        self.assertNotIn("s3cr3t", " ".join(warnings))


class ErrorTests(ConfigTestCase):
    def test_bad_values_in_a_file(self) -> None:
        cases = [
            ("listen_port = abc", "Invalid value 'abc' for listen_port", "not an integer"),
            ("listen_port = 1.5", "for listen_port", "not an integer"),
            ("listen_port = 0", "for listen_port", "must be between 1 and 65535"),
            ("advertise_port = 65536", "for advertise_port", "must be between 1 and 65535"),
            ("lookup_timeout = soon", "for lookup_timeout", "not a number"),
            ("lookup_timeout = -1", "for lookup_timeout", "must not be negative"),
            ("lldp_timeout = nan", "for lldp_timeout", "not a finite number"),
            ("disk_wait_delay = inf", "for disk_wait_delay", "not a finite number"),
            ("ip_lookup_attempts = 0", "for ip_lookup_attempts", "must be at least 1"),
            ("debug = maybe", "Invalid value 'maybe' for debug", "not a boolean"),
            ("insecure =", "Invalid value '' for insecure", "not a boolean"),
            ("advertise_protocol = ftp", "for advertise_protocol", "not one of: http, https"),
            ("api_url = ironic:6385", "for api_url", "not 'mdns' or an http"),
            ("api_url = http://", "for api_url", "URL has no host"),
            ("api_url = http://h:port/", "for api_url", "not a valid URL"),
            ("inspection_callback_url = /v1/continue", "for inspection_callback_url",
             "not 'mdns'"),
            ("tls_min_version = 1.0", "for tls_min_version", "not one of"),
        ]
        for line, head, reason in cases:
            conf = self.write(f"[DEFAULT]\n{line}\n")
            message = self.error(conf)
            self.assertIn(head, message, line)
            self.assertIn(f" in {conf} [DEFAULT]: ", message, line)
            self.assertIn(f": {reason}", message)

    def test_bad_value_in_another_section(self) -> None:
        conf = self.write("[metrics_statsd]\nstatsd_port = 0\n")
        self.assertEqual(self.error(conf), f"Invalid value '0' for statsd_port in {conf} "
                         "[metrics_statsd]: must be between 1 and 65535")
        conf = self.write("[metrics]\nbackend = graphite\n")
        self.assertIn("for backend in", self.error(conf))

    def test_bad_kernel_parameter(self) -> None:
        self.assertEqual(
            self.error(cmdline="ipa-api-url=ftp://x ipa-debug=1"),
            "Invalid value 'ftp://x' for api_url from kernel command line (ipa-api-url): "
            "not 'mdns' or an http:// or https:// URL")
        self.assertIn("for lldp_timeout from kernel command line (ipa-lldp-timeout): "
                      "not a number", self.error(cmdline="ipa-lldp-timeout=x"))

    def test_bare_kernel_flag_is_not_a_boolean(self) -> None:
        self.assertIn("Invalid value '' for debug from kernel command line (ipa-debug)",
                      self.error(cmdline="ipa-debug"))

    def test_bad_vmedia_parameter(self) -> None:
        self.assertEqual(
            self.error(vmedia={"ipa-listen-port": "99999"}),
            "Invalid value '99999' for listen_port from virtual media parameters "
            "(ipa-listen-port): must be between 1 and 65535")

    def test_bad_cli_values(self) -> None:
        self.assertEqual(self.error(cli={"api_url": "nope"}),
                         "Invalid value 'nope' for api_url from --api-url: not 'mdns' or "
                         "an http:// or https:// URL")
        self.assertIn("for listen_port from --listen-port: expected integer, not bool",
                      self.error(cli={"listen_port": True}))
        self.assertIn("for debug from --debug: expected boolean, not int",
                      self.error(cli={"debug": 1}))
        self.assertIn("for lookup_timeout from --lookup-timeout: must not be negative",
                      self.error(cli={"lookup_timeout": -0.5}))

    def test_cli_names_name_the_flag(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            load_config(cli={"listen_port": 0}, default_files=False,
                        cmdline_path=self.write(""), cli_names={"listen_port": "--listen"})
        self.assertEqual(str(raised.exception),
                         "Invalid value 0 for listen_port from --listen: must be between "
                         "1 and 65535")

    def test_unknown_cli_option(self) -> None:
        self.assertEqual(self.error(cli={"bogus": 1}), "Unknown option 'bogus' from --bogus")

    def test_secret_is_masked(self) -> None:
        for message in [
            self.error(cli={"agent_token": 1234}),
            self.error(self.write("[DEFAULT]\nagent_token 1234\n")),
            self.error(self.write("agent_token = 1234\n")),
        ]:
            self.assertNotIn("1234", message)
        message = self.error(cli={"agent_token": 1234})
        self.assertEqual(message, "Invalid value <secret> for agent_token from "
                         "--agent-token: expected string, not int")

    def test_missing_explicit_file(self) -> None:
        missing = self.mktemp()
        self.assertEqual(self.error(missing),
                         f"Cannot read config file {missing}: No such file or directory")

    def test_directory_as_file(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.assertIn(f"Cannot read config file {directory}: ", self.error(directory))

    def test_unparsable_files(self) -> None:
        cases = [("listen_port = 1\n", "line 1: an option before any [section] header"),
                 ("[DEFAULT]\nno delimiter\n\nx\n",
                  "line 2, 4: neither [section], 'name = value' nor a comment"),
                 ("[DEFAULT\nx = 1\n", "line 1: an option before any [section] header")]
        for text, reason in cases:
            conf = self.write(text)
            self.assertEqual(self.error(conf), f"Cannot parse config file {conf}: {reason}")

    def test_not_utf8(self) -> None:
        conf = self.mktemp()
        Path(conf).write_bytes(b"[DEFAULT]\nntp_server = \xff\n")
        self.assertEqual(self.error(conf), f"Cannot read config file {conf}: not UTF-8 text")


class DefaultFilesTests(SynchronousTestCase):
    def test_order_and_presence(self) -> None:
        etc = Path(self.mktemp())
        (etc / "ironic-python-agent.d").mkdir(parents=True)
        (etc / "ironic-python-agent").mkdir()
        names = ["ironic-python-agent.conf", "ironic-python-agent.d/b.conf",
                 "ironic-python-agent.d/a.conf", "ironic-python-agent.d/c.txt",
                 "ironic-python-agent/ironic-python-agent.conf"]
        for name in names:
            (etc / name).write_text("")
        self.assertEqual(default_config_files(str(etc)), [
            str(etc / "ironic-python-agent/ironic-python-agent.conf"),
            str(etc / "ironic-python-agent.conf"),
            str(etc / "ironic-python-agent.d/a.conf"),
            str(etc / "ironic-python-agent.d/b.conf")])

    def test_none_present(self) -> None:
        self.assertEqual(default_config_files(self.mktemp()), [])


class MetadataTests(SynchronousTestCase):
    def test_kernel_names(self) -> None:
        names = {f.name: kernel_name(f) for f in OPTIONS}
        self.assertEqual(names["api_url"], "ipa-api-url")
        self.assertEqual(names["inspection_callback_url"], "ipa-inspection-callback-url")
        self.assertIsNone(names["cafile"])
        self.assertIsNone(names["ssl_cert_file"])

    def test_defaults_pass_their_own_validation(self) -> None:
        cli = {f.name: f.default for f in OPTIONS}
        config, _ = load_config(cli=cli, default_files=False, cmdline_path=self.mktemp())
        self.assertEqual(config.override(cmdline_path="/proc/cmdline"), AgentConfig())


class AgentConfigObjectTests(SynchronousTestCase):
    """AgentConfig's hand-written ``__init__``, ``__repr__``, ``__eq__`` and ``__hash__``
    behave as the generated ones did, and the repr hides secrets."""

    def test_defaults_keywords_and_unknown_options(self) -> None:
        config = AgentConfig(api_url="http://ironic:6385")
        self.assertEqual((config.api_url, config.listen_port), ("http://ironic:6385", 9999))
        with self.assertRaises(TypeError) as raised:
            AgentConfig(no_such_option=1, api_url="x")   # type: ignore[call-arg]
        self.assertIn("no_such_option", str(raised.exception))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.api_url = "changed"  # type: ignore[misc]

    def test_equality_hash_and_replace(self) -> None:
        first, second = AgentConfig(listen_port=1), AgentConfig(listen_port=1)
        self.assertEqual(first, second)
        self.assertEqual(hash(first), hash(second))
        self.assertNotEqual(first, AgentConfig(listen_port=2))
        self.assertNotEqual(first, object())
        self.assertEqual(dataclasses.replace(first, listen_port=2), AgentConfig(listen_port=2))
        self.assertEqual(first.override(listen_port=2).listen_port, 2)

    def test_repr_hides_secrets(self) -> None:
        text = repr(AgentConfig(agent_token="token-value", image_server_password="pw-value",
                                api_url="http://ironic:6385"))
        self.assertIn("agent_token=<secret>", text)
        self.assertIn("image_server_password=<secret>", text)
        self.assertNotIn("token-value", text)
        self.assertNotIn("pw-value", text)
        self.assertIn("api_url='http://ironic:6385'", text)
        self.assertIn("agent_token=None", repr(AgentConfig()))

    def test_metadata_defaults(self) -> None:
        token = _FIELD["agent_token"].metadata
        self.assertEqual((token["secret"], token["section"], token["aliases"]),
                         (True, "DEFAULT", ()))
        self.assertNotIn("secret", dict(_FIELD["api_url"].metadata))   # stored sparsely
        self.assertIs(_FIELD["api_url"].metadata["secret"], False)


class DocsTests(SynchronousTestCase):
    def test_docs_are_up_to_date(self) -> None:
        self.assertEqual(
            DOCS.read_text(encoding="utf-8"), render_docs(),
            "docs/configuration.md is stale: run "
            "python -m ipa_twisted.config --docs > docs/configuration.md")

    def test_every_option_is_documented(self) -> None:
        docs = render_docs()
        for option in OPTIONS:
            self.assertIn(option.metadata["help"], docs)
            kernel = kernel_name(option)
            if kernel:
                self.assertIn(f"`{kernel}`", docs)

    def test_main_prints_the_docs(self) -> None:
        out = io.StringIO()
        self.assertEqual(main(["--docs"], out), 0)
        self.assertEqual(out.getvalue(), render_docs())


# Every option of the reference agent (ironic-python-agent 13.0.0) as (section, name, kernel
# parameter or None): [DEFAULT] cli_opts, [disk_utils], [disk_partitioner] and [container]
# from config.py, [metrics] and [metrics_statsd] from metrics_lib, [mdns] from mdns.py; the
# kernel parameter is the APARAMS name the reference reads. Derived from the reference's
# source by test_list_matches_the_reference_source (when that source is at hand).
REFERENCE_OPTIONS: tuple[tuple[str, str, str | None], ...] = (
    ("DEFAULT", "api_url", "ipa-api-url"),
    ("DEFAULT", "global_request_id", "ipa-global-request-id"),
    ("DEFAULT", "listen_host", "ipa-listen-host"),
    ("DEFAULT", "listen_port", "ipa-listen-port"),
    ("DEFAULT", "listen_tls", None),
    ("DEFAULT", "tls_cert_file", None),
    ("DEFAULT", "tls_key_file", None),
    ("DEFAULT", "enable_auto_tls", None),
    ("DEFAULT", "auto_tls_allowed_clock_skew", None),
    ("DEFAULT", "tls_min_version", "ipa-tls-min-version"),
    ("DEFAULT", "tls_cipher_suites", "ipa-tls-cipher-suites"),
    ("DEFAULT", "tls_certificate_curve", "ipa-tls-certificate-curve"),
    ("DEFAULT", "advertise_host", "ipa-advertise-host"),
    ("DEFAULT", "advertise_port", "ipa-advertise-port"),
    ("DEFAULT", "advertise_protocol", "ipa-advertise-protocol"),
    ("DEFAULT", "ip_lookup_attempts", "ipa-ip-lookup-attempts"),
    ("DEFAULT", "ip_lookup_sleep", "ipa-ip-lookup-timeout"),
    ("DEFAULT", "network_interface", "ipa-network-interface"),
    ("DEFAULT", "lookup_timeout", "ipa-lookup-timeout"),
    ("DEFAULT", "lookup_interval", "ipa-lookup-interval"),
    ("DEFAULT", "lldp_timeout", "ipa-lldp-timeout"),
    ("DEFAULT", "collect_lldp", "ipa-collect-lldp"),
    ("DEFAULT", "inspection_callback_url", "ipa-inspection-callback-url"),
    ("DEFAULT", "inspection_collectors", "ipa-inspection-collectors"),
    ("DEFAULT", "inspection_dhcp_wait_timeout", "ipa-inspection-dhcp-wait-timeout"),
    ("DEFAULT", "inspection_dhcp_all_interfaces", "ipa-inspection-dhcp-all-interfaces"),
    ("DEFAULT", "hardware_initialization_delay", "ipa-hardware-initialization-delay"),
    ("DEFAULT", "disk_wait_attempts", "ipa-disk-wait-attempts"),
    ("DEFAULT", "disk_wait_delay", "ipa-disk-wait-delay"),
    ("DEFAULT", "insecure", "ipa-insecure"),
    ("DEFAULT", "cafile", None),
    ("DEFAULT", "certfile", None),
    ("DEFAULT", "keyfile", None),
    ("DEFAULT", "introspection_daemon", None),
    ("DEFAULT", "introspection_daemon_post_interval", None),
    ("DEFAULT", "ntp_server", "ipa-ntp-server"),
    ("DEFAULT", "fail_if_clock_not_set", None),
    ("DEFAULT", "agent_token", "ipa-agent-token"),
    ("DEFAULT", "image_server_user", None),
    ("DEFAULT", "image_server_password", None),
    ("DEFAULT", "image_server_auth_strategy", None),
    ("DEFAULT", "image_download_connection_timeout", "ipa-image-download-connection-timeout"),
    ("DEFAULT", "image_download_connection_retries", "ipa-image-download-connection-retries"),
    ("DEFAULT", "image_download_connection_retry_interval", "ipa-image-download-connection-retry-interval"),
    ("DEFAULT", "image_download_max_duration", "ipa-image-download-max-duration"),
    ("DEFAULT", "ironic_api_version", "ipa-ironic-api-version"),
    ("DEFAULT", "enable_vlan_interfaces", "ipa-enable-vlan-interfaces"),
    ("DEFAULT", "ignore_bootloader_failure", "ipa-ignore-bootloader-failure"),
    ("DEFAULT", "inject_files_priority", "ipa-inject-files-priority"),
    ("DEFAULT", "guard-special-filesystems", "ipa-guard-special-filesystems"),
    ("DEFAULT", "enable_discard_erase", "ipa-enable-discard-erase"),
    ("DEFAULT", "md5_enabled", None),
    ("DEFAULT", "http_request_timeout", "ipa-http-request-timeout"),
    ("DEFAULT", "config_drive_rebuild", None),
    ("DEFAULT", "disable_deep_image_inspection", None),
    ("DEFAULT", "permitted_image_formats", None),
    ("DEFAULT", "disable_bootc_deploy", None),
    ("DEFAULT", "enable_bios_bootloader_install", None),
    ("disk_utils", "efi_system_partition_size", None),
    ("disk_utils", "bios_boot_partition_size", None),
    ("disk_utils", "dd_block_size", None),
    ("disk_utils", "partition_detection_attempts", None),
    ("disk_utils", "partprobe_attempts", None),
    ("disk_utils", "image_convert_memory_limit", None),
    ("disk_utils", "image_convert_attempts", None),
    ("disk_partitioner", "check_device_interval", None),
    ("disk_partitioner", "check_device_max_retries", None),
    ("container", "allow_arbitrary_containers", None),
    ("container", "allowed_containers", None),
    ("container", "container_steps_file", None),
    ("container", "runner", None),
    ("container", "pull_options", None),
    ("container", "run_options", None),
    ("metrics", "backend", None),
    ("metrics", "prepend_host", None),
    ("metrics", "prepend_host_reverse", None),
    ("metrics", "global_prefix", None),
    ("metrics_statsd", "statsd_host", None),
    ("metrics_statsd", "statsd_port", None),
    ("mdns", "use_mdns", "ipa-use-mdns"),
    ("mdns", "allowed_overrides", None),
    ("mdns", "lookup_attempts", None),
    ("mdns", "params", None),
    ("mdns", "interfaces", None),
)

REFERENCE_SOURCE = os.environ.get("IPA_REFERENCE_SOURCE", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "reference",
    "ironic-python-agent-13.0.0", "ironic_python_agent"))
"""The reference agent's source: ``.ci/setup`` unpacks its 13.0.0 wheel there."""


def _reference_options_from_source(root: str) -> list[tuple[str, str, str | None]]:
    """(section, name, kernel parameter) of every cfg.*Opt in the reference's option lists."""
    import ast
    sources = [("config.py", {"cli_opts": "DEFAULT", "disk_utils_opts": "disk_utils",
                              "disk_part_opts": "disk_partitioner",
                              "container_opts": "container"}),
               ("metrics_lib/metrics_utils.py", {"metrics_opts": "metrics"}),
               ("metrics_lib/metrics_statsd.py", {"statsd_opts": "metrics_statsd"}),
               ("mdns.py", {"opts": "mdns"})]
    found = []
    for path, lists in sources:
        tree = ast.parse(Path(root, path).read_text(encoding="utf-8"))
        for node in tree.body:
            if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id in lists):
                continue
            assert isinstance(node.value, ast.List)
            for call in node.value.elts:
                assert isinstance(call, ast.Call) and isinstance(call.args[0], ast.Constant)
                kernel = next((str(n.args[0].value) for n in ast.walk(call)
                               if isinstance(n, ast.Call) and n.args
                               and isinstance(n.args[0], ast.Constant)
                               and str(n.args[0].value).startswith("ipa-")), None)
                found.append((lists[node.targets[0].id], str(call.args[0].value), kernel))
    return found


def _as_text(value: Any) -> str:
    """An option value as a config file or kernel parameter spells it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


class ReferenceCompatibilityTests(ConfigTestCase):
    """Every option name of the reference agent is accepted, acts or says why not."""

    def option(self, section: str, name: str) -> Any:
        by_ini = {(s.lower(), n.lower().replace("-", "_")): f
                  for f in OPTIONS for s, n in ini_names(f)}
        return by_ini.get((section.lower(), name.lower().replace("-", "_")))

    def test_list_matches_the_reference_source(self) -> None:
        if not os.path.isdir(REFERENCE_SOURCE):
            raise SkipTest(f"reference agent source not at {REFERENCE_SOURCE} (bash .ci/setup "
                           "puts it there; or set IPA_REFERENCE_SOURCE)")
        self.assertEqual(_reference_options_from_source(REFERENCE_SOURCE),
                         list(REFERENCE_OPTIONS))

    def test_every_reference_option_has_a_field(self) -> None:
        self.assertEqual(len(REFERENCE_OPTIONS), 84)
        missing = [(s, n) for s, n, _ in REFERENCE_OPTIONS if self.option(s, n) is None]
        self.assertEqual(missing, [])

    def test_every_reference_kernel_parameter_sets_its_option(self) -> None:
        for section, name, kernel in REFERENCE_OPTIONS:
            if kernel is not None:
                self.assertIn(kernel, kernel_names(self.option(section, name)),
                              f"[{section}] {name}")

    def test_all_accepted_in_a_file_and_on_the_kernel_command_line(self) -> None:
        lines: dict[str, list[str]] = {}
        params = []
        for section, name, kernel in REFERENCE_OPTIONS:
            option = self.option(section, name)
            value = _as_text(option.default)
            lines.setdefault(section, []).append(f"{name} = {value}")
            if kernel:
                params.append(f'{kernel}="{value}"')
        text = "".join(f"[{section}]\n" + "\n".join(body) + "\n"
                       for section, body in lines.items())
        config, warnings = self.load(self.write(text), cmdline=" ".join(params))
        self.assertEqual(warnings, [])
        self.assertEqual(config.override(cmdline_path="/proc/cmdline"), AgentConfig())

    def test_ignored_options_say_why_in_the_docs(self) -> None:
        docs = render_docs()
        ignored = [f for f in OPTIONS if f.metadata["ignored"]]
        self.assertIn("dd_block_size", [f.name for f in ignored])
        for option in ignored:
            row = next(line for line in docs.splitlines()
                       if line.startswith(f"| `[{option.metadata['section']}]` | "
                                          f"`{ini_name(option)}` |"))
            self.assertIn(f"**Accepted and ignored**: {option.metadata['ignored']}.", row)

    def test_setting_an_ignored_option_warns(self) -> None:
        conf = self.write("[disk_utils]\ndd_block_size = 4M\nimage_convert_attempts = 3\n")
        config, warnings = self.load(conf, cmdline="ipa-enable-discard-erase=1")
        self.assertEqual(config.dd_block_size, "4M")
        self.assertEqual(warnings, [
            "Option dd_block_size is accepted and ignored: "
            + _FIELD["dd_block_size"].metadata["ignored"],
            "Option enable_discard_erase is accepted and ignored: "
            + _FIELD["enable_discard_erase"].metadata["ignored"]])

    def test_inspection_dhcp_wait_timeout_under_both_names(self) -> None:
        self.assertEqual(self.load(cmdline="ipa-inspection-dhcp-wait-timeout=5")[0]
                         .inspection_dhcp_wait_timeout, 5.0)
        self.assertEqual(self.load(cmdline="ipa-inspection-dhcp-timeout=7")[0]
                         .inspection_dhcp_wait_timeout, 7.0)
        conf = self.write("[DEFAULT]\ninspection_dhcp_timeout = 9\n")
        self.assertEqual(self.load(conf)[0].inspection_dhcp_wait_timeout, 9.0)
        self.assertIn("| `[DEFAULT]` | `inspection_dhcp_wait_timeout` | "
                      "`ipa-inspection-dhcp-wait-timeout`, `ipa-inspection-dhcp-timeout` |",
                      render_docs())

    def test_tls_file_names_of_the_reference(self) -> None:
        conf = self.write("[DEFAULT]\ntls_cert_file = /c.pem\ntls_key_file = /k.pem\n")
        config, warnings = self.load(conf)
        self.assertEqual((config.ssl_cert_file, config.ssl_key_file, warnings),
                         ("/c.pem", "/k.pem", []))

    def test_new_options_take_the_reference_kernel_parameters(self) -> None:
        config, warnings = self.load(cmdline=(
            "ipa-inject-files-priority=45 ipa-http-request-timeout=12 "
            "ipa-ironic-api-version=1.68 ipa-tls-certificate-curve=p256 "
            "ipa-ignore-bootloader-failure=true ipa-use-mdns=0"))
        self.assertEqual(warnings, [])
        self.assertEqual((config.inject_files_priority, config.http_request_timeout,
                          config.ironic_api_version, config.tls_certificate_curve,
                          config.ignore_bootloader_failure),
                         (45, 12.0, "1.68", "p256", True))
        conf = self.write("[disk_utils]\nefi_system_partition_size = 1024\n"
                          "bios_boot_partition_size = 2\npartprobe_attempts = 4\n")
        config, warnings = self.load(conf)
        self.assertEqual((config.efi_system_partition_size, config.bios_boot_partition_size,
                          config.partprobe_attempts, warnings), (1024, 2, 4, []))

    def test_limits(self) -> None:
        self.assertIn("must be between 0 and 99",
                      self.error(cmdline="ipa-inject-files-priority=100"))
        self.assertIn("not one of: p256, p384, p521",
                      self.error(cmdline="ipa-tls-certificate-curve=p192"))
        self.assertIn("must be at least 1",
                      self.error(self.write("[disk_utils]\nefi_system_partition_size=0\n")))

    def test_every_metrics_backend_of_the_reference(self) -> None:
        for backend in ("noop", "statsd", "collector"):
            config, warnings = self.load(self.write(f"[metrics]\nbackend = {backend}\n"))
            self.assertEqual((config.metrics_backend, warnings), (backend, []))

    def test_use_mdns_means_api_url_mdns(self) -> None:
        self.assertEqual(self.load(cmdline="ipa-use-mdns=1")[0].api_url, "mdns")
        self.assertEqual(self.load(cmdline="ipa-use-mdns=1 ipa-api-url=http://i:6385")[0]
                         .api_url, "http://i:6385")
        self.assertIsNone(self.load(cmdline="ipa-use-mdns=1 ipa-standalone=1")[0].api_url)
        self.assertIsNone(self.load(cmdline=(
            "ipa-use-mdns=1 ipa-inspection-callback-url=http://i:5050/v1/continue"))[0]
            .api_url)
        self.assertIsNone(self.load()[0].api_url)


class APIURLListTests(ConfigTestCase):
    def test_a_list_is_accepted_as_given(self) -> None:
        config, warnings = self.load(
            cmdline="ipa-api-url=https://a:6385,http://[fd00::2]:6385/,https://c")
        self.assertEqual(warnings, [])
        self.assertEqual(split_urls(config.api_url or ""),
                         ["https://a:6385", "http://[fd00::2]:6385/", "https://c"])
        self.assertEqual(split_urls(" https://a , ,https://b,"), ["https://a", "https://b"])

    def test_each_url_is_checked(self) -> None:
        self.assertIn("Invalid value 'https://a,ftp://b' for api_url from kernel command "
                      "line (ipa-api-url): 'ftp://b': not 'mdns' or an http:// or https:// "
                      "URL", self.error(cmdline="ipa-api-url=https://a,ftp://b"))
        self.assertIn("'mdns' cannot be combined with other URLs",
                      self.error(cmdline="ipa-api-url=mdns,https://a"))
        self.assertIn("no URL", self.error(cli={"api_url": ","}))
        self.assertIn("not 'mdns' or an http:// or https:// URL",
                      self.error(cli={"api_url": "ironic:6385"}))


class IniParserTests(SynchronousTestCase):
    """``_parse_ini`` reads what ``configparser`` read before it (``interpolation=None,
    strict=False``, no default section): the same sections, names and values, and it
    refuses the same files."""

    ATOMS = ("[DEFAULT]", "[a]", "[A]", "x = 1", "X=2", "y: 3", " cont", "\tcont2", "  ",
             "", "# c", "; c", " # ic", "k = v # not", "k2 =", "= v", "noval", "[b] tail",
             "a=b=c", "a:b=c", "  z = 4", "k = %(x)s", "[DEFAULT]x", "k = v ;c", "K-2 = w")

    @staticmethod
    def configparser_reads(text: str) -> Any:
        parser = configparser.ConfigParser(default_section="\0", interpolation=None,
                                           strict=False, empty_lines_in_values=False)
        try:
            parser.read_string(text)
        except configparser.Error:
            return "refused"
        return {section: dict(parser.items(section, raw=True))
                for section in parser.sections()}

    @staticmethod
    def ours(text: str) -> Any:
        try:
            return _parse_ini(io.StringIO(text))
        except ConfigError:
            return "refused"

    def test_same_as_configparser(self) -> None:
        chooser = random.Random(16)
        for _ in range(5000):
            text = "\n".join(chooser.choice(self.ATOMS)
                             for _ in range(chooser.randint(1, 8)))
            text += chooser.choice(("", "\n"))
            self.assertEqual(self.ours(text), self.configparser_reads(text), repr(text))

    def test_continuation_and_repeats(self) -> None:
        text = ("[DEFAULT]\nA = 1\n  two\n\tthree\n\n  z = 4\nb = first\nb = last\n"
                "[x]\n[x]\nc: d\n")
        self.assertEqual(self.ours(text), {"DEFAULT": {"a": "1\ntwo\nthree", "z": "4",
                                                       "b": "last"}, "x": {"c": "d"}})
