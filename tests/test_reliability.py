"""Reliability of the API: body limits, slow and idle clients, many idle connections, and
a hypothesis fuzz of 20 000 hostile requests against a running agent.

Faults: an image server cutting the connection 20 times during one image write. The other
faults (Ironic unreachable for a minute during lookup and heartbeats, a hanging program,
SIGTERM during a command) and the secrets are in tests/test_reliability_faults.py.

Bounded in time: about 90 s in all, most of it the fuzz (``IPA_FUZZ_REQUESTS``, default
20 000, lowers or raises its request count).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import select
import socket
import time
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest, TestCase

from ipa_twisted.agent import Agent
from ipa_twisted.api.app import AgentAPI
from ipa_twisted.api.site import AgentSite
from ipa_twisted.commands import sync_command
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions.base import Extension
from tests.image_server import ImageResource
from tests.processes import SAFE_POWER, TWISTD, Child, child_env, free_port, poll, sleep
from tests.test_images import MiB, ImageServerMixin, image_bytes

TOKEN = "r" * 40
LIMIT = 1000


class EchoExtension(Extension):
    """One harmless command."""

    name = "probe"

    @sync_command("echo")
    def echo(self, text: str) -> str:
        return text


# -- raw HTTP, blocking (run in a thread: the server runs on the reactor) ---------------------

def exchange(port: int, raw: bytes, timeout: float = 30) -> bytes:
    """Send ``raw``, read until the server closes; what it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered (413) and closed before taking everything: read the answer
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    if not response.startswith(b"HTTP/1."):
        raise AssertionError(f"not an HTTP answer: {response[:200]!r}")
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> Any:
    head, _, body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        decoded = b""
        while True:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, body = decoded + rest[:size], rest[size + 2:]
        body = decoded
    return json.loads(body)


def get(port: int, path: str, timeout: float = 10) -> bytes:
    return exchange(port, f"GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
                    .encode(), timeout)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def server_connections() -> list[Any]:
    return [r for r in reactor.getReaders() if isinstance(r, tcp.Server)]


# -- the site in this process: body limit, timeouts, idle connections ------------------------

class SiteRobustnessTests(TestCase):
    """An AgentSite on 127.0.0.1 in this reactor; clients are blocking sockets in threads."""

    timeout = 120

    def setUp(self) -> None:
        config = AgentConfig(agent_token=TOKEN, standalone=True, max_request_body=LIMIT)
        self.agent = Agent(config, reactor, runner=None,  # type: ignore[arg-type]
                           extensions=[EchoExtension])
        self.site = AgentSite(AgentAPI(self.agent).app.resource(), idle_timeout=1.0,
                              max_request_body=LIMIT)
        self.listening = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)
        self.port = self.listening.getHost().port
        self.addCleanup(self.connections_closed)

    async def connections_closed(self) -> None:
        """Trial wants no open connection left: wait for the server to see every close."""
        await poll(lambda: not server_connections(), timeout=10, interval=0.05)

    def post(self, body: bytes, headers: str = "") -> Any:
        return deferToThread(exchange, self.port, (
            f"POST /v1/commands/?agent_token={TOKEN} HTTP/1.1\r\nHost: agent\r\n"
            f"Content-Type: application/json\r\n{headers}\r\n").encode() + body)

    async def test_small_body_is_served(self) -> None:
        body = json.dumps({"name": "probe.echo", "params": {"text": "hi"}}).encode()
        response = await self.post(body, f"Content-Length: {len(body)}\r\n"
                                         "Connection: close\r\n")
        self.assertEqual(status_of(response), 200)
        self.assertEqual(body_of(response)["command_status"], "SUCCEEDED")

    async def test_content_length_above_limit_is_413_before_the_body(self) -> None:
        # 10 GiB announced, 100 bytes sent: the answer comes without waiting for the rest.
        started = time.monotonic()
        response = await self.post(b"x" * 100, "Content-Length: 10737418240\r\n")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(status_of(response), 413)
        self.assertEqual(body_of(response), {
            "faultcode": "Client", "faultstring": f"Request body larger than {LIMIT} bytes"})
        self.assertEqual(self.agent.list_command_results(), [])

    async def test_body_at_the_limit_is_read(self) -> None:
        body = b" " * (LIMIT - 2) + b"{}"
        response = await self.post(body, f"Content-Length: {len(body)}\r\n"
                                         "Connection: close\r\n")
        self.assertEqual(status_of(response), 400)  # read, parsed: no name nor params

    async def test_expect_100_continue_gets_only_413(self) -> None:
        response = await self.post(b"", "Content-Length: 5000\r\nExpect: 100-continue\r\n")
        self.assertEqual(status_of(response), 413)
        self.assertNotIn(b"100 Continue", response)

    async def test_chunked_body_counted_as_it_arrives(self) -> None:
        chunk = b"400\r\n" + b"a" * 0x400 + b"\r\n"
        started = time.monotonic()
        # Never ends (no 0-length chunk): the 413 must come from counting, not from the end.
        response = await self.post(chunk * 3, "Transfer-Encoding: chunked\r\n")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(status_of(response), 413)
        self.assertEqual(self.agent.list_command_results(), [])

    async def test_chunked_body_under_limit_is_served(self) -> None:
        body = json.dumps({"name": "probe.echo", "params": {"text": "chunked"}}).encode()
        raw = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        response = await self.post(raw, "Transfer-Encoding: chunked\r\nConnection: close\r\n")
        self.assertEqual(status_of(response), 200)
        self.assertEqual(body_of(response)["command_result"], {"result": "echo: chunked"})

    async def test_idle_client_times_out(self) -> None:
        def idle() -> float:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                started = time.monotonic()
                self.assertEqual(s.recv(1), b"")  # closed by the server
                return time.monotonic() - started
        waited = await deferToThread(idle)
        self.assertLess(waited, 5)

    async def test_slow_client_times_out_without_blocking_others(self) -> None:
        def slow() -> tuple[float, bytes]:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                started = time.monotonic()
                s.sendall(b"POST /v1/commands/ HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
                return time.monotonic() - started, s.recv(1000)
        slow_client = deferToThread(slow)
        await sleep(0.2)
        for _ in range(5):  # others are answered while the slow one waits
            started = time.monotonic()
            self.assertEqual(status_of(await deferToThread(get, self.port, "/v1/status")),
                             200)
            self.assertLess(time.monotonic() - started, 0.5)
        waited, answer = await slow_client
        self.assertEqual(answer, b"")  # timed out: closed without an answer
        self.assertLess(waited, 5)

    async def test_trickling_client_is_cut_at_the_request_timeout(self) -> None:
        # A byte every 0.25 s keeps resetting the 1 s idle timeout; sending this request
        # whole would take a minute. The request timeout (1 s here) ends it.
        request = b"GET /v1/status HTTP/1.1\r\nHost: agent\r\nX-Slow: " + b"a" * 240

        def trickle() -> tuple[float, int]:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                started = time.monotonic()
                sent = 0
                try:
                    for byte in request:
                        s.sendall(bytes([byte]))
                        sent += 1
                        readable, _, _ = select.select([s], [], [], 0.25)
                        if readable and s.recv(1) == b"":
                            break  # closed by the server
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return time.monotonic() - started, sent
        waited, sent = await deferToThread(trickle)
        self.assertLess(sent, len(request))
        self.assertTrue(0.9 < waited < 3, waited)

    async def test_keep_alive_requests_each_get_the_full_request_timeout(self) -> None:
        # Three requests on one connection over more than the 1 s limit: each arrives at
        # once, so none is cut.
        def three() -> list[int]:
            codes = []
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                for _ in range(3):
                    s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n")
                    answer = s.recv(65536)
                    codes.append(status_of(answer))
                    time.sleep(0.6)
            return codes
        self.assertEqual(await deferToThread(three), [200, 200, 200])

    async def test_1000_idle_connections_do_not_stop_the_api(self) -> None:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 2200:  # 1000 client and 1000 server sockets in this process
            if hard != resource.RLIM_INFINITY and hard < 2200:
                raise SkipTest(f"needs 2200 open files; the hard limit is {hard}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (2200, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        self.site.timeOut = 60  # they must stay open while we ask
        sockets: list[socket.socket] = []

        def open_idle() -> None:
            for _ in range(1000):
                sockets.append(socket.create_connection(("127.0.0.1", self.port),
                                                        timeout=10))
        try:
            await deferToThread(open_idle)
            await poll(lambda: len(server_connections()) >= 1000,
                       timeout=30, interval=0.05)
            started = time.monotonic()
            response = await deferToThread(get, self.port, "/v1/status")
            self.assertEqual(status_of(response), 200)
            self.assertLess(time.monotonic() - started, 2)
        finally:
            for s in sockets:
                s.close()


# -- the fuzz, against a running agent in the disk sandbox ------------------------------------

# Every command with the names of its parameters. Not fuzzed at all: commands that act on
# this machine whatever their parameters (system.lockdown closes the API, run_image and
# power_off reboot or power off, log.collect_system_logs runs dozens of tools per call,
# iscsi.start_iscsi_target starts a target).
COMMANDS = {
    "clean.get_clean_steps": ["node", "ports"],
    "clean.execute_clean_step": ["step", "node", "ports", "clean_version"],
    "deploy.get_deploy_steps": ["node", "ports"],
    "deploy.execute_deploy_step": ["step", "node", "ports", "deploy_version"],
    "flow.start_flow": ["flow"],
    "image.install_bootloader": ["root_uuid", "efi_system_part_uuid", "prep_boot_part_uuid",
                                 "target_boot_mode", "ignore_bootloader_failure"],
    "poll.get_hardware_info": [],
    "poll.set_node_info": ["node_info"],
    "rescue.finalize_rescue": ["rescue_password", "hashed"],
    "service.get_service_steps": ["node", "ports"],
    "service.execute_service_step": ["step", "node", "ports", "service_version"],
    "standby.prepare_image": ["image_info", "configdrive"],
    "standby.cache_image": ["image_info", "force"],
    "standby.get_partition_uuids": [],
    "standby.sync": [],
}
PATHS = ["/", "/v1", "/v1/", "/v1/status", "/status", "/v1/commands", "/v1/commands/",
         "/commands/", "/v1/commands/0", "/v1/commands/../status", "//v1//status",
         "/v1/commands/%00", "/v1/status/extra"]
FRAMING = {b"content-length", b"transfer-encoding", b"expect", b"connection", b"host",
           b"upgrade"}


def fuzz_strategies() -> Any:
    from hypothesis import strategies as st

    # Mostly printable ASCII (what gets past Twisted's parser to the API), percent-escapes
    # of anything (invalid UTF-8 included), now and then raw bytes (Twisted's 400).
    printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                        max_size=60).map(str.encode)
    escaped = st.binary(max_size=20).map(lambda b: b"".join(b"%%%02x" % c for c in b))
    raw_bytes = st.binary(max_size=60).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b" ", b"%20"))
    line_safe = st.one_of(printable, printable, printable, escaped, escaped, raw_bytes)
    clean = st.one_of(printable, printable, escaped)
    method = st.one_of(
        st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD",
                         b"OPTIONS", b"TRACE", b"get", b"CONNECT"]),
        st.sampled_from([b"GET", b"POST"]), st.sampled_from([b"GET", b"POST"]),
        st.sampled_from([b"GET", b"POST"]), st.sampled_from([b"GET", b"POST"]),
        st.sampled_from([b"GET", b"POST"]), st.binary(min_size=1, max_size=10).filter(lambda b: not set(b) & set(b" \r\n")))
    path = st.one_of(st.sampled_from(PATHS).map(str.encode),
                     st.sampled_from(PATHS).map(str.encode),
                     st.tuples(st.sampled_from(PATHS).map(str.encode), line_safe).map(
                         lambda t: t[0] + t[1]),
                     line_safe.map(lambda b: b"/" + b))
    query_value = st.one_of(st.just(TOKEN.encode()), st.just(TOKEN.encode()),
                            st.sampled_from([b"true", b"false"]), clean)
    query = st.lists(st.tuples(st.sampled_from([b"agent_token", b"wait", b"x", b""]) |
                               clean, query_value), max_size=3).map(
        lambda pairs: b"&".join(k.replace(b"&", b"") + b"=" + v.replace(b"&", b"")
                                for k, v in pairs))
    header_name = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                          min_size=1, max_size=20).map(str.encode).filter(
        lambda n: n.lower() not in FRAMING)
    header_value = st.one_of(
        *[st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=100).map(
            str.encode)] * 8,
        st.binary(max_size=100).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
    headers = st.lists(st.tuples(header_name, header_value), max_size=2)
    content_type = st.sampled_from([b"application/json", b"application/json", b"application/json",
                                    b"application/json", b"text/plain",
                                    b"", b"\xff\xfe",
                                    b"application/json; charset=latin-1"])
    wrong = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) |
        st.just(10 ** 300) | st.just(-(2 ** 64)) | st.just(1e308),
        lambda children: st.lists(children, max_size=3), max_leaves=8)
    params = st.sampled_from(sorted(COMMANDS)).flatmap(lambda name: st.tuples(
        st.just(name), st.dictionaries(
            st.sampled_from(COMMANDS[name] or ["unexpected"]) | st.text(max_size=8),
            wrong, max_size=len(COMMANDS[name]) + 1)))
    command_body = st.one_of(
        params.map(lambda p: json.dumps({"name": p[0], "params": p[1]}).encode()),
        st.text(max_size=30).map(lambda n: json.dumps({"name": n, "params": {}}).encode()),
        wrong.map(lambda v: json.dumps({"name": "standby.sync", "params": v}).encode()),
        wrong.map(lambda v: json.dumps(v).encode()))
    body = st.one_of(
        st.just(b""), command_body, command_body, command_body, st.binary(max_size=300),
        st.sampled_from([b"\xff\xfe\xfd", b"{\"name\": \"\xc3\x28\"}", b"{" * 1000,
                         b"[" * 50000 + b"]" * 50000, b"1" * 5000,
                         b'{"name": "standby.sync", "params": {"a": ' + b"9" * 20000 +
                         b"}}", b"null", b"[]", b'"str"', b"1e999999",
                         b'{"name": 5, "params": []}', b'{"name": null, "params": null}']))
    return st.tuples(method, path, query, headers, content_type, body)


def build_request(method: bytes, path: bytes, query: bytes, headers: list[tuple[bytes, bytes]],
                  content_type: bytes, body: bytes) -> bytes:
    target = path + (b"?" + query if query else b"")
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: agent", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if content_type:
        lines.append(b"Content-Type: " + content_type)
    if body or method not in (b"GET", b"HEAD"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class APIFuzzTests(TestCase):
    """Hostile requests against ``twistd ipa --standalone`` in the disk sandbox."""

    timeout = 900

    async def start_agent(self) -> tuple[Child, int]:
        if os.geteuid() != 0 or not shutil.which("unshare"):
            raise SkipTest("the sandbox needs root and unshare")
        from ipa_twisted.testing.sandbox import sandbox_argv
        port = free_port()
        scratch = os.path.abspath(self.mktemp())
        for sub in ("etc", "run"):
            os.makedirs(os.path.join(scratch, sub))
        cmdline, conf = os.path.join(scratch, "cmdline"), os.path.join(scratch, "agent.conf")
        with open(cmdline, "w") as f:
            f.write("\n")
        with open(conf, "w") as f:
            f.write(f"[DEFAULT]\nagent_token = {TOKEN}\n{SAFE_POWER}"
                    f"etc_path = {scratch}/etc\nrun_path = {scratch}/run\n"
                    "command_timeout = 20\n")
        shadow = ["reboot", "poweroff", "shutdown", "halt", "efibootmgr", "mdadm",
                  "tgtd", "tgtadm", "targetcli", "grub-install", "grub2-install"]
        argv = sandbox_argv([], TWISTD + [
            "-n", "--pidfile=", "ipa", "--standalone", "--no-default-config-files",
            "--config-file", conf, "--cmdline-path", cmdline, "--listen", f"127.0.0.1:{port}"],
            shadow=[p for p in shadow if shutil.which(p)])
        env = child_env()
        env["PATH"] = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        agent = Child(argv, env)
        self.addCleanup(agent.stop, "KILL")

        async def answers() -> bool:
            try:
                return status_of(await deferToThread(get, port, "/v1/status", 2)) == 200
            except (OSError, AssertionError):
                return False
        await poll(answers, timeout=60, interval=0.1)
        return agent, port

    async def test_fuzz(self) -> None:
        from hypothesis import HealthCheck, given, settings

        agent, port = await self.start_agent()
        total = int(os.environ.get("IPA_FUZZ_REQUESTS", "20000"))
        warm_up = min(500, total // 10)
        seen: dict[int, int] = {}
        rss: list[int] = []
        slowest = [0.0]

        @settings(max_examples=total, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(fuzz_strategies())
        def one(request: tuple[Any, ...]) -> None:
            raw = build_request(*request)
            started = time.monotonic()
            response = exchange(port, raw, timeout=30)
            slowest[0] = max(slowest[0], time.monotonic() - started)
            code = status_of(response)
            seen[code] = seen.get(code, 0) + 1
            assert code < 500, (raw[:300], response[:500])
            if sum(seen.values()) == warm_up:
                rss.append(rss_kib(agent.process.pid))

        started = time.monotonic()
        await deferToThread(one)
        self.assertEqual(status_of(await deferToThread(get, port, "/v1/status")), 200)
        growth = (rss_kib(agent.process.pid) - rss[0]) / 1024
        print(f"\n  fuzz: {sum(seen.values())} requests in {time.monotonic() - started:.0f}s,"
              f" codes {dict(sorted(seen.items()))}, slowest {slowest[0]:.2f}s,"
              f" RSS growth {growth:.1f} MiB")
        self.assertGreaterEqual(sum(seen.values()), total)
        self.assertLess(growth, 10)
        self.assertNotIn(b"Unhandled", agent.output)


# -- faults: an image server cutting the connection ------------------------------------------

class ImageServerCutsTests(ImageServerMixin, TestCase):
    """One image write survives 20 cut connections by resuming (Range) where it stopped."""

    # The agent's default retry count (9): a cut after progress is not a failed attempt.
    config = AgentConfig(image_download_connection_retry_interval=0.01,
                         image_download_connection_timeout=5.0)

    def setUp(self) -> None:
        self.set_up_server()

    async def test_20_cuts_during_one_write(self) -> None:
        data = image_bytes(21 * MiB + 7)
        cuts = [MiB * i + 1000 * i for i in range(1, 21)]
        resource = ImageResource(data, cuts=cuts)
        url = self.serve("flaky.raw", resource)
        with capturedLogs():
            written = await self.write({"urls": [url], "disk_format": "raw",
                                        "os_hash_algo": "sha256",
                                        "os_hash_value": hashlib.sha256(data).hexdigest()})
        self.assertEqual(written.checksum, hashlib.sha256(data).hexdigest())
        self.assertEqual(self.device_bytes()[:len(data)], data)
        self.assertEqual(len(resource.requests), 21)  # the first, then one per cut
        self.assertTrue(all(r["range"] for r in resource.requests[1:]))
