"""Tests for ipa_twisted.options: the ``twistd ipa`` flags and the config they select."""

from __future__ import annotations

from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.config import ConfigError, render_docs
from ipa_twisted.options import Options, config_from_options, parse_host_port


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class ParseHostPortTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertEqual(parse_host_port("127.0.0.1:9999"), ("127.0.0.1", 9999))
        self.assertEqual(parse_host_port("agent.example:1"), ("agent.example", 1))
        self.assertEqual(parse_host_port("[::1]:65535"), ("::1", 65535))
        self.assertEqual(parse_host_port("[::]:80"), ("::", 80))

    def test_invalid(self) -> None:
        for text in ["9999", ":9999", "host:", "host:0", "host:65536", "host:http",
                     "host:-1", "host: 99", "::1:9999", "[::1]9999", "[nope]:9999",
                     "host:٩٩"]:
            self.assertRaises(ValueError, parse_host_port, text)


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual((options["standalone"], options["debug"],
                          options["no-default-config-files"]), (False, False, False))
        self.assertEqual(options["config-files"], [])
        for name in ("api-url", "listen", "advertise", "cmdline-path"):
            self.assertIsNone(options[name])

    def test_flags_and_parameters(self) -> None:
        options = parse("--standalone", "--debug", "--no-default-config-files",
                        "--api-url=https://ironic:6385", "--listen", "[::1]:9999",
                        "--advertise=10.0.0.1:8888", "--cmdline-path=/tmp/cmdline")
        self.assertEqual((options["standalone"], options["debug"]), (True, True))
        self.assertEqual(options["api-url"], "https://ironic:6385")
        self.assertEqual(options["listen"], "[::1]:9999")
        self.assertEqual(options["advertise"], "10.0.0.1:8888")
        self.assertEqual(options["cmdline-path"], "/tmp/cmdline")

    def test_several_api_urls(self) -> None:
        options = parse("--api-url=https://a:6385,https://b:6385")
        self.assertEqual(options["api-url"], "https://a:6385,https://b:6385")

    def test_config_file_repeats_in_order(self) -> None:
        options = parse("--config-file=/b.conf", "--config-file", "/a.conf",
                        "--config-file=/c.conf")
        self.assertEqual(options["config-files"], ["/b.conf", "/a.conf", "/c.conf"])

    def test_no_short_debug_and_no_token_flag(self) -> None:
        self.assertRaises(usage.UsageError, parse, "-d")
        self.assertRaises(usage.UsageError, parse, "--agent-token=secret")

    def test_usage_errors(self) -> None:
        cases = [
            (["--listen=9999"], "--listen takes HOST:PORT, not '9999': expected HOST:PORT"),
            (["--listen=host:0"], "--listen takes HOST:PORT, not 'host:0': port '0' is "
                                  "not a number from 1 to 65535"),
            (["--advertise=::1:99"], "--advertise takes HOST:PORT, not '::1:99': an IPv6 "
                                     "address needs brackets, as in [::1]:9999"),
            (["--api-url=ironic"], "--api-url 'ironic': not 'mdns' or an http:// or "
                                   "https:// URL"),
            (["--api-url=http://a:6385,ironic"], "--api-url 'http://a:6385,ironic': "
                                                 "'ironic': not 'mdns' or an http:// or "
                                                 "https:// URL"),
            (["--cmdline-path="], "--cmdline-path needs a file name"),
        ]
        for argv, message in cases:
            with self.assertRaises(usage.UsageError) as raised:
                parse(*argv)
            self.assertEqual(str(raised.exception), message)

    def test_help_documents_every_flag(self) -> None:
        text = str(Options())
        for flag in ("--standalone", "--debug", "--no-default-config-files", "--api-url=",
                     "--listen=", "--advertise=", "--cmdline-path=", "--config-file="):
            self.assertIn(flag, text)
            line = text[text.index(flag):].splitlines()[0]
            self.assertGreater(len(line.split(None, 1)), 1, f"{flag} has no help")

    def test_help_under_twistd_states_the_synopsis_once(self) -> None:
        from twisted.scripts._twistd_unix import ServerOptions
        twistd = ServerOptions()
        twistd.subCommand = "ipa"
        options = Options()
        options.parent = twistd
        first = str(options).splitlines()[0]
        self.assertEqual(first, "Usage: twistd [options] ipa [options]")
        self.assertEqual(str(Options()).splitlines()[0],
                         "Usage: twistd [twistd options] ipa [options]")

    def test_docs_mention_every_flag(self) -> None:
        docs = render_docs()
        for name in ["standalone", "debug", "no-default-config-files", "api-url", "listen",
                     "advertise", "cmdline-path", "config-file"]:
            self.assertIn(f"`--{name}", docs)


class ConfigFromOptionsTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = str(self.mktemp())
        Path(path).write_text(text)
        return path

    def test_flags_win(self) -> None:
        conf = self.write("[DEFAULT]\napi_url = http://file:6385\nlisten_port = 1\n"
                          "advertise_host = 10.9.9.9\nstandalone = false\n")
        cmdline = self.write("ipa-listen-host=1.1.1.1 ipa-debug=0 ipa-lookup-timeout=7")
        config, warnings = config_from_options(parse(
            "--no-default-config-files", f"--config-file={conf}",
            f"--cmdline-path={cmdline}", "--api-url=mdns", "--listen=[::1]:8000",
            "--advertise=agent.example:8001", "--standalone", "--debug"))
        self.assertEqual(warnings, [])
        self.assertEqual(config.api_url, "mdns")
        self.assertEqual(config.listen, ("::1", 8000))
        self.assertEqual((config.advertise_host, config.advertise_port),
                         ("agent.example", 8001))
        self.assertEqual((config.standalone, config.debug), (True, True))
        self.assertEqual(config.lookup_timeout, 7.0)
        self.assertEqual(config.cmdline_path, cmdline)

    def test_absent_flags_leave_other_sources(self) -> None:
        conf = self.write("[DEFAULT]\nstandalone = true\nlisten_port = 1234\n")
        cmdline = self.write("ipa-debug=1 ipa-api-url=http://kernel:6385")
        config, _ = config_from_options(parse(
            "--no-default-config-files", f"--config-file={conf}",
            f"--cmdline-path={cmdline}"))
        self.assertEqual((config.standalone, config.debug), (True, True))
        self.assertEqual((config.listen_port, config.api_url),
                         (1234, "http://kernel:6385"))

    def test_later_config_file_wins(self) -> None:
        first = self.write("[DEFAULT]\nntp_server = one\nlisten_port = 1\n")
        second = self.write("[DEFAULT]\nntp_server = two\n")
        config, _ = config_from_options(parse(
            "--no-default-config-files", f"--config-file={first}",
            f"--config-file={second}", f"--cmdline-path={self.write('')}"))
        self.assertEqual((config.ntp_server, config.listen_port), ("two", 1))

    def test_missing_config_file(self) -> None:
        missing = self.mktemp()
        with self.assertRaises(ConfigError) as raised:
            config_from_options(parse("--no-default-config-files",
                                      f"--config-file={missing}",
                                      f"--cmdline-path={self.write('')}"))
        self.assertIn(missing, str(raised.exception))
