"""The HTTP client factory: TLS policy per config (in-memory handshakes), pool, timeouts."""

from __future__ import annotations

import datetime
import ipaddress
from types import SimpleNamespace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.endpoints import (SSL4ServerEndpoint, TCP4ServerEndpoint,
                                        TCP6ServerEndpoint)
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.internet.ssl import (AcceptableCiphers, Certificate, CertificateOptions,
                                  PrivateCertificate, TLSVersion)
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from ipa_twisted.config import AgentConfig
from ipa_twisted.http import HTTPClients, make_http_client, make_pool
from ipa_twisted.tls import DEFAULT_TLS12_CIPHERS, AgentTLSPolicy, tls_policy

_NOW = datetime.datetime.now(datetime.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[bytes, bytes]:
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class Authority:
    """A throw-away CA that signs server and client certificates."""

    def __init__(self, cn: str = "Test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(_NOW - datetime.timedelta(days=1))
                     .not_valid_after(_NOW + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = _pem(self.key, self.cert)[0]

    def issue(self, cn: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              self_signed: bool = False) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (x509.CertificateBuilder().subject_name(_name(cn))
                   .issuer_name(_name(cn) if self_signed else self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(_NOW - datetime.timedelta(days=1))
                   .not_valid_after(_NOW + datetime.timedelta(days=1)))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
        return _pem(key, builder.sign(key if self_signed else self.key, hashes.SHA256()))


def server_options(cert_and_key: tuple[bytes, bytes], client_ca: bytes | None = None,
                   **kwargs: Any) -> CertificateOptions:
    loaded = PrivateCertificate.loadPEM(cert_and_key[0] + cert_and_key[1])
    if client_ca is not None:
        kwargs.update(verify=True, requireCertificate=True,
                      caCerts=[Certificate.loadPEM(client_ca).original])
    return CertificateOptions(privateKey=loaded.privateKey.original,
                              certificate=loaded.original, **kwargs)


class _TLSProtocol:
    """What a client connection creator reports hostname failures to."""

    def __init__(self) -> None:
        self.verification_failure: Any = None
        self.factory = SimpleNamespace(wrappedFactory=None)  # no ALPN

    def failVerification(self, reason: Any) -> None:
        self.verification_failure = reason


class Handshake:
    """Runs a TLS handshake between two memory-BIO connections."""

    def __init__(self, config: AgentConfig, host: bytes, server: CertificateOptions,
                 policy: AgentTLSPolicy | None = None) -> None:
        self.app = _TLSProtocol()
        creator = (policy or tls_policy(config)).creatorForNetloc(host, 443)
        self.client = creator.clientConnectionForTLS(self.app)  # type: ignore[arg-type]
        self.client.set_connect_state()
        self.server = SSL.Connection(server.getContext(), None)
        self.server.set_accept_state()
        self.error: Exception | None = None
        for _ in range(10):
            for this, other in ((self.client, self.server), (self.server, self.client)):
                try:
                    this.do_handshake()
                except SSL.WantReadError:
                    pass
                except SSL.Error as e:
                    self.error = e
                    return
                try:
                    other.bio_write(this.bio_read(65536))
                except SSL.WantReadError:
                    pass

    @property
    def ok(self) -> bool:
        return self.error is None and self.app.verification_failure is None


class TLSPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = Authority()
        self.server = server_options(self.ca.issue("ironic", dns=("ironic.test",),
                                                   ips=("127.0.0.1",)))

    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_default_uses_platform_trust(self) -> None:
        policy = tls_policy(AgentConfig())
        self.assertTrue(policy.verify)
        self.assertIsNone(policy.trust_root)
        self.assertIsNone(policy.client_certificate)
        handshake = Handshake(AgentConfig(), b"ironic.test", self.server)
        self.assertIsInstance(handshake.error, SSL.Error)  # our CA is not a platform CA

    def test_cafile_trusts_that_ca_and_checks_the_hostname(self) -> None:
        config = AgentConfig(cafile=self.write(Authority("Other CA").pem + self.ca.pem))
        self.assertTrue(Handshake(config, b"ironic.test", self.server).ok)
        self.assertTrue(Handshake(config, b"127.0.0.1", self.server).ok)
        # Refused in the handshake or right after it, depending on the Twisted version.
        self.assertFalse(Handshake(config, b"other.test", self.server).ok)
        self.assertFalse(Handshake(config, b"10.0.0.1", self.server).ok)

    def test_cafile_rejects_other_cas(self) -> None:
        config = AgentConfig(cafile=self.write(Authority("Other CA").pem))
        self.assertIsInstance(Handshake(config, b"ironic.test", self.server).error, SSL.Error)

    def test_insecure_accepts_anything(self) -> None:
        self_signed = server_options(self.ca.issue("whatever", self_signed=True))
        config = AgentConfig(insecure=True, cafile=self.write(Authority("Other CA").pem))
        self.assertFalse(tls_policy(config).verify)
        self.assertTrue(Handshake(config, b"ironic.test", self_signed).ok)
        self.assertTrue(Handshake(config, b"10.9.9.9", self.server).ok)

    def test_client_certificate_is_presented(self) -> None:
        cert, key = self.ca.issue("agent")
        demanding = server_options(self.ca.issue("ironic", dns=("ironic.test",)),
                                   client_ca=self.ca.pem)
        for insecure in (False, True):
            config = AgentConfig(cafile=self.write(self.ca.pem), certfile=self.write(cert),
                                 keyfile=self.write(key), insecure=insecure)
            handshake = Handshake(config, b"ironic.test", demanding)
            self.assertTrue(handshake.ok, handshake.error)
            peer = handshake.server.get_peer_certificate()
            assert peer is not None
            self.assertEqual(peer.get_subject().CN, "agent")
        anonymous = Handshake(AgentConfig(cafile=self.write(self.ca.pem)), b"ironic.test",
                              demanding)
        self.assertFalse(anonymous.ok)

    def test_minimum_tls_version(self) -> None:
        old = server_options(self.ca.issue("ironic", dns=("ironic.test",)),
                             lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        config = AgentConfig(cafile=self.write(self.ca.pem))
        self.assertTrue(Handshake(config, b"ironic.test", old).ok)
        strict = AgentConfig(cafile=config.cafile, tls_min_version="1.3")
        self.assertIsInstance(Handshake(strict, b"ironic.test", old).error, SSL.Error)

    def only_tls12(self, cipher: str) -> CertificateOptions:
        """Ironic's certificate, served with TLS 1.2 and ``cipher`` only."""
        return server_options(self.ca.issue("ironic", dns=("ironic.test",)),
                              lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
                              acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(
                                  cipher))

    def test_tls12_ciphers_default_to_the_reference_list(self) -> None:
        config = AgentConfig(cafile=self.write(self.ca.pem))
        for cipher in DEFAULT_TLS12_CIPHERS.split(":"):
            if "ECDSA" in cipher:          # our test certificates have EC keys
                self.assertTrue(Handshake(config, b"ironic.test",
                                          self.only_tls12(cipher)).ok, cipher)
        chacha = self.only_tls12("ECDHE-ECDSA-CHACHA20-POLY1305")
        self.assertIsInstance(Handshake(config, b"ironic.test", chacha).error, SSL.Error)
        allowed = config.override(tls_cipher_suites="ECDHE-ECDSA-CHACHA20-POLY1305")
        self.assertTrue(Handshake(allowed, b"ironic.test", chacha).ok)
        aes = self.only_tls12("ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertIsInstance(Handshake(allowed, b"ironic.test", aes).error, SSL.Error)

    def test_cipher_list_does_not_limit_tls13(self) -> None:
        config = AgentConfig(cafile=self.write(self.ca.pem), tls_min_version="1.3",
                             tls_cipher_suites="ECDHE-ECDSA-CHACHA20-POLY1305")
        handshake = Handshake(config, b"ironic.test", self.server)
        self.assertTrue(handshake.ok, handshake.error)
        self.assertEqual(handshake.client.get_protocol_version_name(), "TLSv1.3")

    def test_policy_follows_the_config_in_force(self) -> None:
        """As after lookup: the next connection gets the version Ironic asked for."""
        old = server_options(self.ca.issue("ironic", dns=("ironic.test",)),
                             lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        current = [AgentConfig(cafile=self.write(self.ca.pem))]
        policy = tls_policy(current[0], current=lambda: current[0])
        self.assertTrue(Handshake(current[0], b"ironic.test", old, policy).ok)
        current[0] = current[0].merged({"tls_min_version": "1.3"}, "Ironic's lookup answer")
        self.assertEqual(policy.settings.minimum_version, "1.3")
        self.assertIsInstance(Handshake(current[0], b"ironic.test", old, policy).error,
                              SSL.Error)
        self.assertTrue(Handshake(current[0], b"ironic.test", self.server, policy).ok)

    def test_unusable_cipher_list_from_lookup_falls_back_to_the_default(self) -> None:
        current = [AgentConfig(cafile=self.write(self.ca.pem))]
        policy = tls_policy(current[0], current=lambda: current[0])
        current[0] = current[0].override(tls_cipher_suites="NO-SUCH-CIPHER")
        with capturedLogs() as events:
            handshake = Handshake(current[0], b"ironic.test",
                                  self.only_tls12("ECDHE-ECDSA-AES256-GCM-SHA384"), policy)
            self.assertTrue(handshake.ok, handshake.error)
            Handshake(current[0], b"ironic.test", self.server, policy)
        errors = [formatEvent(e) for e in events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1, errors)      # once, not per connection
        self.assertIn("NO-SUCH-CIPHER", errors[0])
        self.assertRaises(ValueError, tls_policy,                 # configured: refused
                          current[0].override(cafile=None))
        # Following the configuration in force, a client is made all the same.
        self.assertEqual(tls_policy(current[0], current=lambda: current[0]).settings,
                         ("1.2", None))

    def test_missing_or_empty_files_fail_early(self) -> None:
        self.assertRaises(OSError, tls_policy, AgentConfig(cafile="/nonexistent/ca.pem"))
        self.assertRaises(ValueError, tls_policy, AgentConfig(cafile=self.write(b"")))


class ClientFactoryTests(SynchronousTestCase):
    def test_pool_is_small_and_persistent(self) -> None:
        pool = make_pool(MemoryReactorClock())
        self.assertTrue(pool.persistent)
        self.assertEqual(pool.maxPersistentPerHost, 2)

    def test_connect_timeout(self) -> None:
        memory = MemoryReactorClock()
        client = make_http_client(memory, AgentConfig(), connect_timeout=7)
        self.assertIsInstance(client, HTTPClient)
        client.get("http://127.0.0.1:6385/")
        memory.advance(0)
        [(host, port, _, timeout, _)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 6385, 7))


    def test_ip_addresses_are_connected_to_without_resolving(self) -> None:
        memory = MemoryReactorClock()
        asked: list[str] = []
        resolver = memory.nameResolver

        @implementer(IHostnameResolver)
        class Recording:
            def resolveHostName(self, receiver: IResolutionReceiver, hostName: str,
                                *args: Any, **kwargs: Any) -> IHostResolution:
                asked.append(hostName)
                return resolver.resolveHostName(receiver, hostName, *args, **kwargs)

        memory.installNameResolver(Recording())
        client = make_http_client(memory, AgentConfig())
        for url in ("http://192.0.2.1:6385/", "http://[2001:db8::1]:6385/",
                    "https://192.0.2.1/", "http://ironic.example:6385/"):
            client.get(url)
        memory.advance(0)
        self.assertEqual([(host, port, timeout) for host, port, _, timeout, _
                          in memory.tcpClients],
                         [("192.0.2.1", 6385, 30), ("2001:db8::1", 6385, 30),
                          ("192.0.2.1", 443, 30), ("127.0.0.1", 6385, 30)])
        self.assertEqual(asked, ["ironic.example"])   # the memory resolver's 127.0.0.1

    def test_unsupported_scheme(self) -> None:
        client = make_http_client(MemoryReactorClock(), AgentConfig())
        failure = self.failureResultOf(client.get("ftp://192.0.2.1/"))
        self.assertIn("Unsupported scheme", str(failure.value))


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello"


class RealConnectionTests(TestCase):
    """Through the real reactor: persistent connections, and TLS via the Agent."""

    async def get(self, url: str, config: AgentConfig) -> tuple[int, bytes]:
        pool = make_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        client = make_http_client(reactor, config, pool=pool)
        response = await client.get(url)
        return response.code, await response.content()

    async def test_ipv6_address_in_the_url(self) -> None:
        # treq's URL library cannot encode such a URL by itself (hyperlink issue 188)
        port = await TCP6ServerEndpoint(reactor, 0, interface="::1").listen(Site(_Hello()))
        self.addCleanup(port.stopListening)
        self.assertEqual(await self.get(f"http://[::1]:{port.getHost().port}/?a=b c",
                                        AgentConfig()), (200, b"hello"))

    async def test_connections_are_reused(self) -> None:
        site = Site(_Hello())
        connections = []
        build = site.buildProtocol
        site.buildProtocol = lambda addr: connections.append(addr) or build(addr)  # type: ignore
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        pool = make_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        client = make_http_client(reactor, AgentConfig(), pool=pool)
        url = f"http://127.0.0.1:{port.getHost().port}/"
        with capturedLogs() as events:
            for _ in range(3):
                response = await client.get(url)
                self.assertEqual(await response.content(), b"hello")
        self.assertEqual(len(connections), 1)
        # No "Starting factory" / "Stopping factory" lines for the client's connections.
        self.assertEqual([formatEvent(e) for e in events
                          if "factory" in formatEvent(e).lower()], [])

    async def test_kept_alive_connections_follow_tls_changes(self) -> None:
        """A connection made before lookup changed the TLS settings is not reused."""
        ca = Authority()
        site = Site(_Hello())
        connections = []
        build = site.buildProtocol
        site.buildProtocol = lambda addr: connections.append(addr) or build(addr)  # type: ignore
        options = server_options(ca.issue("ironic", ips=("127.0.0.1",)),
                                 lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(
            site)
        self.addCleanup(port.stopListening)
        cafile = self.mktemp()
        with open(cafile, "wb") as f:
            f.write(ca.pem)
        current = [AgentConfig(cafile=cafile)]
        pool = make_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        client = make_http_client(reactor, lambda: current[0], pool=pool)
        url = f"https://127.0.0.1:{port.getHost().port}/"
        for _ in range(2):
            response = await client.get(url)
            self.assertEqual(await response.content(), b"hello")
        self.assertEqual(len(connections), 1)
        current[0] = current[0].override(tls_cipher_suites="ECDHE-ECDSA-AES256-GCM-SHA384")
        response = await client.get(url)
        self.assertEqual(await response.content(), b"hello")
        self.assertEqual(len(connections), 2)
        current[0] = current[0].override(tls_min_version="1.3")
        with self.assertRaises(Exception) as raised:
            await client.get(url)
        self.assertIn("protocol version", repr(raised.exception))

    async def test_https_with_cafile_and_insecure(self) -> None:
        ca = Authority()
        options = server_options(ca.issue("ironic", ips=("127.0.0.1",)))
        port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(
            Site(_Hello()))
        self.addCleanup(port.stopListening)
        url = f"https://127.0.0.1:{port.getHost().port}/"
        cafile = self.mktemp()
        with open(cafile, "wb") as f:
            f.write(ca.pem)
        self.assertEqual(await self.get(url, AgentConfig(cafile=cafile)), (200, b"hello"))
        self.assertEqual(await self.get(url, AgentConfig(insecure=True)), (200, b"hello"))
        with self.assertRaises(Exception):
            await self.get(url, AgentConfig())


class HTTPClientsTests(TestCase):
    """The agent's clients, made once: the verifying one and its unverified twin."""

    def test_made_once_each(self) -> None:
        clients = HTTPClients(MemoryReactorClock(), AgentConfig())
        self.assertIs(clients.client(), clients.client())
        self.assertIs(clients.client(verify=False), clients.client(verify=False))
        self.assertIsNot(clients.client(), clients.client(verify=False))

    async def test_unverified_twin_does_not_share_connections(self) -> None:
        site = Site(_Hello())
        connections = []
        build = site.buildProtocol
        site.buildProtocol = lambda addr: connections.append(addr) or build(addr)  # type: ignore
        self_signed = server_options(Authority().issue("image-server", ips=("127.0.0.1",),
                                                       self_signed=True))
        port = await SSL4ServerEndpoint(reactor, 0, self_signed,
                                        interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        clients = HTTPClients(reactor, lambda: AgentConfig())
        self.addCleanup(clients.close)
        url = f"https://127.0.0.1:{port.getHost().port}/"
        for _ in range(2):
            response = await clients.client(verify=False).get(url)
            self.assertEqual(await response.content(), b"hello")
        self.assertEqual(len(connections), 1)  # kept alive in the twin's pool
        with self.assertRaises(Exception):
            await clients.client().get(url)   # never the twin's verified-less connection
        self.assertEqual(len(connections), 2)
