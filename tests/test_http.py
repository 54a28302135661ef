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
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate, TLSVersion
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from ipa_twisted.config import AgentConfig
from ipa_twisted.http import make_http_client, make_pool, tls_policy

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

    def __init__(self, config: AgentConfig, host: bytes, server: CertificateOptions) -> None:
        self.app = _TLSProtocol()
        creator = tls_policy(config).creatorForNetloc(host, 443)
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
