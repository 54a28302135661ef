"""A real ``twistd ipa`` process against a recording Ironic test service, on 127.0.0.1."""

from __future__ import annotations

import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.processes import (TWISTD, Child, FakeIronicProcess, free_port, http_client,
                             physical_macs_or_skip, poll, request_json, sleep, start_agent)

TOKEN = "integration-token-" + "x" * 32
NODE = "1be26c0b-03f2-4d2e-ae87-c02d7f33c123"
HEARTBEAT_TIMEOUT = 2.0


class IronicDrivenAgentTests(TestCase):
    """Lookup, jittered heartbeats, an Ironic outage, and commands with and without token."""

    timeout = 120

    def setUp(self) -> None:
        self.macs = physical_macs_or_skip()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.ironic = FakeIronicProcess(self, self.dir, macs=self.macs, node_uuid=NODE,
                                        token=TOKEN, heartbeat_timeout=HEARTBEAT_TIMEOUT)
        self.records = self.ironic.records

    client: Any = None

    async def get(self, url: str, **params: str) -> tuple[int, Any]:
        return await request_json("GET", url, client=self.client, timeout=10, **params)

    async def post(self, url: str, body: Any, **params: str) -> tuple[int, Any]:
        return await request_json("POST", url, body, client=self.client, **params)

    def trust(self, pem: str) -> None:
        """Talk to the agent over HTTPS, trusting only ``pem`` (as Ironic does)."""
        self.client = http_client(pem)

    async def test_lookup_heartbeats_outage_and_commands(self) -> None:
        ironic_port = await self.ironic.start()
        agent = start_agent(self, self.dir, api_url=f"http://127.0.0.1:{ironic_port}")
        agent_port = agent.port
        base = f"https://127.0.0.1:{agent_port}"

        # Lookup carries this machine's MACs.
        lookups = await poll(lambda: [r for r in self.records("lookup") if r["status"] == 200])
        self.assertEqual(sorted(lookups[0]["addresses"]), sorted(self.macs))
        headers = {k.lower(): v for k, v in lookups[0]["headers"].items()}
        self.assertEqual(headers.get("x-openstack-ironic-api-version"), "1.68", headers)

        # Heartbeats arrive with the reference agent's fields, at jittered intervals.
        beats = await poll(lambda: len(self.records("heartbeat")) >= 4 and
                           self.records("heartbeat"), timeout=30)
        body = beats[0]["body"]
        # Automatic TLS (on by default, Ironic >= 1.68): HTTPS with the certificate sent.
        self.assertEqual(body["callback_url"], f"https://127.0.0.1:{agent_port}")
        self.assertIn("BEGIN CERTIFICATE", body["agent_verify_ca"])
        self.assertEqual(body["agent_token"], TOKEN)
        self.assertIsInstance(body["agent_version"], str)
        self.assertEqual(beats[0]["node_uuid"], NODE)
        gaps = [b["time"] - a["time"] for a, b in zip(beats, beats[1:4])]
        for gap in gaps:
            self.assertTrue(0.3 * HEARTBEAT_TIMEOUT - 0.2 <= gap <= 0.6 * HEARTBEAT_TIMEOUT + 0.5,
                            gaps)
        self.assertGreater(len({round(g, 2) for g in gaps}), 1, f"no jitter in {gaps}")

        # Plain HTTP is gone; a client with another CA is refused; Ironic's way works.
        with self.assertRaises(Exception):
            await treq.get(f"http://127.0.0.1:{agent_port}/v1/status", timeout=5,
                           persistent=False)
        self.trust(_other_certificate())
        with self.assertRaises(Exception):
            await self.get(f"{base}/v1/status")
        self.trust(body["agent_verify_ca"])

        # Commands over real HTTPS: 401 without the token, served with it.
        code, answer = await self.post(f"{base}/v1/commands/",
                                       {"name": "poll.get_hardware_info", "params": {}})
        self.assertEqual((code, answer), (401, {"faultcode": "Client",
                                                "faultstring": "Token invalid."}))
        self.assertEqual((await self.get(f"{base}/v1/commands/"))[0], 401)
        code, answer = await self.post(f"{base}/v1/commands/",
                                       {"name": "poll.get_hardware_info", "params": {}},
                                       agent_token=TOKEN)
        self.assertEqual(code, 200)
        self.assertEqual(answer["command_status"], "SUCCEEDED", answer)
        macs = {i["mac_address"] for i in answer["command_result"]["interfaces"]}
        self.assertTrue(set(self.macs) <= macs)
        code, listing = await self.get(f"{base}/v1/commands/", agent_token=TOKEN)
        self.assertEqual([c["id"] for c in listing["commands"]], [answer["id"]])

        # Ironic goes away: the agent keeps serving, and heartbeats resume when it is back.
        await self.ironic.child.stop("KILL")
        await sleep(3)
        self.assertEqual((await self.get(f"{base}/v1/status"))[0], 200)
        self.assertIsNone(agent.exit_code)
        before = len(self.records("heartbeat"))
        await self.ironic.start()
        await poll(lambda: len(self.records("heartbeat")) > before, timeout=20)

        # The token never reaches the log, and SIGTERM stops the agent cleanly.
        await agent.stop("TERM")
        self.assertTrue(agent.stopped_cleanly, agent.output[-2000:])
        self.assertNotIn(TOKEN.encode(), agent.output)
        self.assertIn(b"Running ", agent.output, "--debug shows commands run")


    async def test_several_api_urls_the_one_that_answers(self) -> None:
        """``--api-url DEAD,IRONIC`` (ipa-api-url=A,B): lookup moves past the URL where nothing
        listens, heartbeats go to the one that answered, the advertised address is found."""
        ironic_port = await self.ironic.start()
        dead = f"http://127.0.0.1:{free_port()}"
        agent = start_agent(self, self.dir, name="several",
                            api_url=f"{dead},http://127.0.0.1:{ironic_port}",
                            config="http_request_timeout = 5\n")
        beats = await poll(lambda: len(self.records("heartbeat")) >= 2 and
                           self.records("heartbeat"), timeout=30)
        self.assertEqual(beats[0]["body"]["callback_url"], f"https://127.0.0.1:{agent.port}")
        self.assertEqual(beats[0]["node_uuid"], NODE)
        self.assertIn(f"Cannot reach Ironic at {dead}/".encode(), agent.output)
        # Once one answered, it comes first: no further tries of the dead URL after lookup.
        tries = agent.output.count(b"trying the next API URL")
        await poll(lambda: len(self.records("heartbeat")) >= 4, timeout=30)
        self.assertEqual(agent.output.count(b"trying the next API URL"), tries)
        # Automatic TLS with the reference's default curve (tls_certificate_curve = p384).
        from cryptography import x509
        cert = x509.load_pem_x509_certificate(beats[0]["body"]["agent_verify_ca"].encode())
        self.assertEqual(cert.public_key().curve.name, "secp384r1")  # type: ignore[union-attr]
        await agent.stop("TERM")
        self.assertTrue(agent.stopped_cleanly, agent.output[-2000:])


def _other_certificate() -> str:
    """A certificate for 127.0.0.1 that the agent does not have."""
    import tempfile

    from ipa_twisted.tls import generate_tls_certificate
    with tempfile.TemporaryDirectory() as directory:
        return generate_tls_certificate("127.0.0.1", directory=directory).text


class StandaloneAgentTests(TestCase):
    """The README's standalone agent on loopback."""

    timeout = 60

    async def test_standalone_answers_and_stops(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        started = reactor.seconds()
        agent = start_agent(self, directory)   # standalone; this machine's disks guarded
        port = agent.port

        async def root() -> Any:
            response = await treq.get(f"http://127.0.0.1:{port}/", timeout=2,
                                       persistent=False)
            return response.code == 200 and await response.json()

        body = await poll(root, timeout=30, interval=0.05)
        self.assertEqual(body["name"], "OpenStack Ironic Python Agent API")
        print(f"\n  standalone start-up to first 200: {reactor.seconds() - started:.2f}s")
        response = await treq.post(f"http://127.0.0.1:{port}/v1/commands/?wait=true",
                                   json={"name": "standby.sync", "params": {}}, timeout=30,
                                   persistent=False)
        self.assertEqual((await response.json())["command_status"], "SUCCEEDED")
        # The full sync reached blockdev --flushbufs, which the test guard kept off this
        # machine's disks.
        with open(os.path.join(directory, "host-shims", "refused.log")) as f:
            self.assertIn("blockdev --flushbufs", f.read())
        # Lockdown, outside a network namespace of the test's own, takes no interface of
        # this machine down: the guard refuses it, and the agent still locks itself.
        response = await treq.post(f"http://127.0.0.1:{port}/v1/commands/?wait=true",
                                   json={"name": "system.lockdown", "params": {}},
                                   timeout=30, persistent=False)
        self.assertEqual((await response.json())["command_status"], "SUCCEEDED")
        refused = os.path.join(directory, "host-shims", "refused.log")
        await poll(lambda: " down" in open(refused).read(), timeout=30)
        with self.assertRaises(Exception):
            await treq.get(f"http://127.0.0.1:{port}/", timeout=2, persistent=False)
        await agent.stop("TERM")
        self.assertTrue(agent.stopped_cleanly, agent.output[-2000:])


class StartupErrorTests(TestCase):
    """Bad configuration stops start-up with one clear line and a non-zero exit."""

    timeout = 60

    async def run_twistd(self, *args: str) -> Child:
        child = Child(TWISTD + ["-n", "--pidfile=", "ipa", "--no-default-config-files",
                                *args])
        self.addCleanup(child.stop, "KILL")
        await child.ended
        return child

    async def test_bad_port_in_config_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("[DEFAULT]\nlisten_port = abc\n")
        child = await self.run_twistd("--standalone", "--config-file", path)
        self.assertNotEqual(child.exit_code, 0)
        lines = child.output.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("listen_port", lines[0])
        self.assertIn(path, lines[0])

    async def test_malformed_api_url_on_kernel_cmdline(self) -> None:
        cmdline = os.path.abspath(self.mktemp())
        with open(cmdline, "w") as f:
            f.write("ipa-api-url=not-a-url console=ttyS0\n")
        child = await self.run_twistd("--cmdline-path", cmdline)
        self.assertNotEqual(child.exit_code, 0)
        self.assertIn(b"api_url", child.output)
        self.assertIn(b"kernel command line", child.output)

    async def test_missing_api_url(self) -> None:
        cmdline = os.path.abspath(self.mktemp())
        with open(cmdline, "w") as f:
            f.write("\n")
        child = await self.run_twistd("--cmdline-path", cmdline)
        self.assertNotEqual(child.exit_code, 0)
        self.assertIn(b"api_url is required", child.output)

    async def test_help_lists_and_documents(self) -> None:
        child = Child(TWISTD + ["--help"])
        await child.ended
        self.assertIn(b"ipa", child.output)
        child = Child(TWISTD + ["ipa", "--help"])
        await child.ended
        for flag in (b"--standalone", b"--debug", b"--api-url", b"--listen", b"--config-file",
                     b"--advertise", b"--cmdline-path", b"--no-default-config-files"):
            self.assertIn(flag, child.output)
