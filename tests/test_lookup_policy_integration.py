"""Policy from Ironic's lookup answer, end to end: a real ``twistd ipa`` against the fake
Ironic process answering lookup with Ironic 39's default policy (``tls_min_version`` "1.3",
``enable_bios_bootloader_install`` false).

TLS clients here are the standard library's ``ssl`` (run in a thread: it blocks), so the
agent is checked by a TLS implementation other than the one it is written with.
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipa_twisted.testing.fake_ironic import IRONIC_39_POLICY
from ipa_twisted.tls import generate_tls_certificate
from tests.processes import (FakeIronicProcess, free_port, http_client, physical_macs_or_skip, poll,
                             request_json, start_agent)

TOKEN = "policy-token-" + "p" * 32
NODE = "3f0b7a52-6c1e-4a55-9d0e-2b9c8d7e6f10"
HEARTBEAT_TIMEOUT = 5.0


def _context(ca: str, maximum: ssl.TLSVersion | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca)
    if maximum is not None:
        context.maximum_version = maximum
    return context


def handshake(port: int, ca: str, maximum: ssl.TLSVersion | None = None) -> str:
    """The TLS version a client (capped at ``maximum``) gets from 127.0.0.1:``port``;
    raises ssl.SSLError when refused. Blocking: run it in a thread."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with _context(ca, maximum).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /v1/status HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            if not tls.recv(4096).startswith(b"HTTP/1.1 200"):
                raise AssertionError("no answer over TLS")
            return str(tls.version())


def kept_alive(port: int, ca: str, maximum: ssl.TLSVersion) -> ssl.SSLSocket:
    """A TLS connection that got one answer and stays open (HTTP/1.1 keep-alive)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = _context(ca, maximum).wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(b"GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n")
    if not tls.recv(4096).startswith(b"HTTP/1.1 200"):
        raise AssertionError("no answer over TLS")
    return tls


def closed_by_peer(tls: ssl.SSLSocket) -> bool:
    """Whether the agent closes ``tls`` within its timeout (blocking)."""
    try:
        while tls.recv(4096):
            pass
        return True
    except (ssl.SSLError, ConnectionError):
        return True
    except socket.timeout:
        return False
    finally:
        tls.close()


class LookupPolicyTests(TestCase):
    """tls_min_version and enable_bios_bootloader_install as Ironic 39 sends them."""

    timeout = 120

    def setUp(self) -> None:
        self.macs = physical_macs_or_skip()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.ironic = FakeIronicProcess(self, self.dir, macs=self.macs, node_uuid=NODE,
                                        token=TOKEN, heartbeat_timeout=HEARTBEAT_TIMEOUT,
                                        lookup_config=IRONIC_39_POLICY)

    async def refused(self, port: int, ca: str) -> str:
        """The error a TLS 1.2-only client gets."""
        try:
            version = await deferToThread(handshake, port, ca, ssl.TLSVersion.TLSv1_2)
        except ssl.SSLError as e:
            return str(e)
        raise self.failureException(f"a TLS 1.2-only client was served ({version})")

    async def test_auto_tls_api_refuses_tls12_and_bios_grub_install(self) -> None:
        ironic_port = await self.ironic.start()
        agent = start_agent(self, self.dir, api_url=f"http://127.0.0.1:{ironic_port}")
        beats = await poll(lambda: self.ironic.records("heartbeat"), timeout=60)
        ca = beats[0]["body"]["agent_verify_ca"]
        self.assertEqual(beats[0]["body"]["callback_url"], f"https://127.0.0.1:{agent.port}")
        self.assertIn("version", await self.refused(agent.port, ca))
        self.assertEqual(await deferToThread(handshake, agent.port, ca), "TLSv1.3")

        # A partition image's BIOS boot loader, asked for over the API as Ironic does.
        base, client = f"https://127.0.0.1:{agent.port}", http_client(ca)
        mark = len(agent.output)
        code, answer = await request_json(
            "POST", f"{base}/v1/commands/", {"name": "image.install_bootloader", "params": {
                "root_uuid": "0e3d1c4f-1111-4d2b-9a55-000000000001",
                "target_boot_mode": "bios"}}, client=client, agent_token=TOKEN)
        self.assertEqual(code, 200, answer)

        async def finished() -> Any:
            _, result = await request_json("GET", f"{base}/v1/commands/{answer['id']}",
                                           client=client, agent_token=TOKEN)
            return result if result["command_status"] != "RUNNING" else None
        result = await poll(finished, timeout=30)
        self.assertEqual(result["command_status"], "FAILED", result)
        error = result["command_error"]
        self.assertEqual(error["type"], "InvalidImage")
        self.assertIn("enable_bios_bootloader_install", error["details"])
        self.assertIn("CVE-2026-43003", error["details"])
        # Refused before anything was run (the agent logs every program it runs).
        self.assertNotIn(b"Running ", agent.output[mark:])
        self.assertIsNone(agent.exit_code)

    async def test_manual_tls_listener_built_before_lookup_follows_it(self) -> None:
        made = generate_tls_certificate("127.0.0.1", directory=tempfile.mkdtemp(dir=self.dir))
        with open(made.path) as f:
            ca = f.read()
        ssl_config = os.path.join(self.dir, "ssl.conf")
        with open(ssl_config, "w") as f:
            f.write(f"[DEFAULT]\nlisten_tls = true\n[ssl]\ncert_file = {made.path}\n"
                    f"key_file = {made.private_key_path}\n")
        ironic_port = free_port()       # Ironic is not up yet: lookup keeps trying
        agent = start_agent(self, self.dir, api_url=f"http://127.0.0.1:{ironic_port}",
                            wrap=lambda argv: argv + ["--config-file", ssl_config])

        # Before lookup: the agent's own tls_min_version (1.2) holds.
        version = await poll(lambda: deferToThread(handshake, agent.port, ca,
                                                   ssl.TLSVersion.TLSv1_2), timeout=60)
        self.assertEqual(version, "TLSv1.2")
        lingering = await deferToThread(kept_alive, agent.port, ca, ssl.TLSVersion.TLSv1_2)

        await self.ironic.start(ironic_port)
        await poll(lambda: self.ironic.records("heartbeat"), timeout=60)
        self.assertIn("version", await self.refused(agent.port, ca))
        self.assertEqual(await deferToThread(handshake, agent.port, ca), "TLSv1.3")
        self.assertTrue(await deferToThread(closed_by_peer, lingering),
                        "a TLS 1.2 connection from before lookup stayed open")
        self.assertIn(b"TLS 1.3 or later", agent.output)
