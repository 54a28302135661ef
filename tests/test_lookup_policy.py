"""Policy in Ironic's lookup answer becomes the agent's configuration, as Ironic 39 sends it."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.agent import Agent
from ipa_twisted.config import AgentConfig, ConfigError


def ironic39_lookup_config(**changes: Any) -> dict[str, Any]:
    """The lookup answer's ``config`` exactly as Ironic 39 builds it, with its defaults.

    From ``ironic/api/controllers/v1/ramdisk.py`` (``config()``) and the default values
    of the options it reads.
    """
    config: dict[str, Any] = {
        "metrics": {"backend": "noop", "prepend_host": False, "prepend_uuid": False,
                    "prepend_host_reverse": True, "global_prefix": None},
        "metrics_statsd": {"statsd_host": "localhost", "statsd_port": 8125},
        "heartbeat_timeout": 300,
        "agent_containers": {"allow_arbitrary_containers": False, "allowed_containers": [],
                             "container_steps_file": "/etc/ironic-python-agent.d/mysteps.yaml",
                             "runner": "podman", "pull_options": None, "run_options": None},
        "agent_token": "a" * 43,
        "agent_token_required": True,
        "agent_md5_checksum_enable": False,
        "disable_deep_image_inspection": False,
        "permitted_image_formats": ["raw", "gpt", "qcow2", "iso"],
        "agent_skip_bmc_detect": False,
        "enable_bios_bootloader_install": False,
        "tls_min_version": "1.3",
        "tls_cipher_suites": None,
    }
    config.update(changes)
    return config


class LookupPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.agent = Agent(AgentConfig(), Clock(), runner=None,  # type: ignore[arg-type]
                           extensions=[])

    def adopt(self, **changes: Any) -> AgentConfig:
        self.agent.process_lookup_data({"node": {"uuid": "n1"},
                                        "config": ironic39_lookup_config(**changes)})
        return self.agent.config

    def test_ironic39_defaults(self) -> None:
        config = self.adopt()
        self.assertFalse(config.md5_enabled)
        self.assertEqual(config.permitted_image_formats, ("raw", "gpt", "qcow2", "iso"))
        self.assertFalse(config.disable_deep_image_inspection)
        self.assertFalse(config.enable_bios_bootloader_install)
        self.assertFalse(config.skip_bmc_detect)
        self.assertEqual(config.tls_min_version, "1.3")
        self.assertIsNone(config.tls_cipher_suites)
        self.assertEqual(config.container_runner, "podman")
        self.assertEqual(config.container_allowed_containers, ())
        # null means "not set by Ironic": the agent's defaults stay
        self.assertEqual(config.container_run_options, ("--rm", "--network=host"))
        self.assertEqual(self.agent.agent_token, "a" * 43)

    def test_policies_set(self) -> None:
        config = self.adopt(agent_md5_checksum_enable=True, permitted_image_formats=["raw"],
                            disable_deep_image_inspection=True, agent_skip_bmc_detect=True,
                            enable_bios_bootloader_install=True,
                            tls_cipher_suites="ECDHE-RSA-AES256-GCM-SHA384",
                            agent_containers={"allowed_containers": ["quay.io/a/b:1"],
                                              "runner": "docker",
                                              "run_options": ["--rm"]})
        self.assertTrue(config.md5_enabled)
        self.assertEqual(config.permitted_image_formats, ("raw",))
        self.assertTrue(config.disable_deep_image_inspection)
        self.assertTrue(config.skip_bmc_detect)
        self.assertTrue(config.enable_bios_bootloader_install)
        self.assertEqual(config.tls_cipher_suites, "ECDHE-RSA-AES256-GCM-SHA384")
        self.assertEqual(config.container_allowed_containers, ("quay.io/a/b:1",))
        self.assertEqual(config.container_runner, "docker")
        self.assertEqual(config.container_run_options, ("--rm",))

    def test_false_does_not_take_back_what_the_operator_enabled(self) -> None:
        # As the reference: Ironic's false for these keeps the agent's own setting.
        self.agent.config = AgentConfig(enable_bios_bootloader_install=True,
                                        tls_cipher_suites="HIGH")
        config = self.adopt(enable_bios_bootloader_install=False, tls_cipher_suites="")
        self.assertTrue(config.enable_bios_bootloader_install)
        self.assertEqual(config.tls_cipher_suites, "HIGH")

    def test_ironic_may_forbid_what_the_config_allowed(self) -> None:
        self.agent.config = AgentConfig(md5_enabled=True, permitted_image_formats=("vmdk",))
        config = self.adopt()
        self.assertFalse(config.md5_enabled)
        self.assertEqual(config.permitted_image_formats, ("raw", "gpt", "qcow2", "iso"))

    def test_bad_values_are_ignored_with_a_warning(self) -> None:
        with capturedLogs() as events:
            config = self.adopt(tls_min_version="1.1", permitted_image_formats=7,
                                agent_containers={"runner": "lxc", "newer_option": 1},
                                agent_md5_checksum_enable=True)
        self.assertEqual(config.tls_min_version, "1.2")
        self.assertEqual(config.permitted_image_formats, ("raw", "gpt", "qcow2"))
        self.assertEqual(config.container_runner, "podman")
        self.assertTrue(config.md5_enabled)    # the good ones still apply
        warnings = [e for e in events if "Ignoring a lookup setting" in e["log_format"]]
        self.assertEqual(len(warnings), 4, [e["error"] for e in warnings])
        self.assertTrue(any("newer_option" in e["error"] for e in warnings))
        self.assertEqual(self.agent.node, {"uuid": "n1"})

    def test_managers_see_the_policy(self) -> None:
        context = self.agent.hardware_context()
        self.adopt(permitted_image_formats=["raw"])
        self.assertEqual(context.config.permitted_image_formats, ("raw",))

    def test_applied_policy_is_logged_once(self) -> None:
        with capturedLogs() as events:
            self.adopt(permitted_image_formats=["raw"])
        lines = [e for e in events if "Policy from Ironic" in e["log_format"]]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["changes"]["permitted_image_formats"], ("raw",))
        self.assertNotIn("agent_token", repr(lines[0]["changes"]))


class MergedTests(SynchronousTestCase):
    """``AgentConfig.merged``: the one coercion for values arriving at run time."""

    def test_text_and_json_values(self) -> None:
        config = AgentConfig().merged({"md5_enabled": "yes", "listen_port": "8080",
                                       "permitted_image_formats": "raw, qcow2,,"}, "test")
        self.assertEqual((config.md5_enabled, config.listen_port,
                          config.permitted_image_formats), (True, 8080, ("raw", "qcow2")))

    def test_errors_name_option_and_source(self) -> None:
        e = self.assertRaises(ConfigError, AgentConfig().merged, {"listen_port": 0}, "mDNS")
        self.assertIn("listen_port from mDNS", str(e))
        e = self.assertRaises(ConfigError, AgentConfig().merged, {"nope": 1}, "mDNS")
        self.assertIn("Unknown option 'nope' from mDNS", str(e))

    def test_list_options_from_files(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[DEFAULT]\npermitted_image_formats = raw,vmdk\n"
                    "[container]\nallowed_containers = a:1, b:2\n")
        from ipa_twisted.config import load_config
        config, _ = load_config(cli={}, config_files=[path], default_files=False,
                                cmdline_path="/nonexistent")
        self.assertEqual(config.permitted_image_formats, ("raw", "vmdk"))
        self.assertEqual(config.container_allowed_containers, ("a:1", "b:2"))


class MaskedTokenTests(SynchronousTestCase):
    """Ironic's ``******``: the token went to an agent before this one."""

    def make_agent(self, token: str | None) -> tuple[Agent, Clock, list[None]]:
        clock = Clock()
        agent = Agent(AgentConfig(agent_token=token), clock,
                      runner=None, extensions=[])  # type: ignore[arg-type]
        fired: list[None] = []
        agent.lockdown_wanted.wait().addCallback(fired.append)
        return agent, clock, fired

    def test_without_a_token_the_agent_locks_itself_down(self) -> None:
        agent, clock, fired = self.make_agent(None)
        with capturedLogs() as events:
            agent.process_lookup_data({"node": {"uuid": "n1"},
                                       "config": ironic39_lookup_config(agent_token="******")})
        self.assertTrue(agent.locked_down)          # commands refused at once
        clock.advance(1)
        self.assertEqual(fired, [None])             # then the API is closed for good
        self.assertTrue(any("locking down" in e["log_format"] for e in events))

    def test_a_configured_token_is_kept(self) -> None:
        agent, clock, fired = self.make_agent("p" * 40)
        agent.process_lookup_data({"node": {"uuid": "n1"},
                                   "config": ironic39_lookup_config(agent_token="******")})
        clock.advance(1)
        self.assertEqual((agent.locked_down, fired, agent.agent_token),
                         (False, [], "p" * 40))
