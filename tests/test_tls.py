"""TLS: generated certificates, server contexts, automatic TLS for the API, and the agent's
client; every handshake is real, over TCP on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import stat
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import (AcceptableCiphers, Certificate, PrivateCertificate,
                                  TLSVersion,
                                  optionsForClientTLS, trustRootFromCertificates)
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from ipa_twisted.agent import Agent as IronicAgent
from ipa_twisted.certificates import generate_in_child
from ipa_twisted.config import AgentConfig, ConfigError
from ipa_twisted.http import make_http_client, make_pool
from ipa_twisted.ironic.client import IronicClient, callback_url
from ipa_twisted.net.autotls import SwitchableTLSFactory, auto_tls_possible, prepare_api_tls
from ipa_twisted.process import ProcessExecutionError, ProcessRunner
from ipa_twisted.testing.fake_ironic import FakeIronic
from ipa_twisted.tap import check_startup_config, server_tls_options
from ipa_twisted.tls import (CLOCK_SKEW, ServerTLS, TlsCertificate, generate_tls_certificate,
                             server_context_from, tls_version)

NOW = 1_750_000_000.0
IRONIC_CONFIG = AgentConfig(api_url="http://ironic:6385")


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello" + (b" over TLS" if request.isSecure() else b"")


def directory(test: SynchronousTestCase) -> str:
    path = test.mktemp()
    os.makedirs(path)
    return path


def load(certificate: TlsCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(certificate.text.encode())


class Authority:
    """A throw-away CA issuing certificates for 127.0.0.1 (servers) or for clients."""

    def __init__(self, test: SynchronousTestCase, name: str = "Test CA") -> None:
        self.directory = directory(test)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.path = self._write("ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def issue(self, name: str, ip: str | None = None) -> tuple[str, str]:
        """(certificate file, key file); a server certificate when ``ip`` is given."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        if ip is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), False)
        cert = builder.sign(self.key, hashes.SHA256())
        return (self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{name}.key", key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption())))


class GenerateTests(SynchronousTestCase):
    def test_certificate_properties(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        made = generate_tls_certificate("192.0.2.5", clock=clock, directory=directory(self))
        cert = load(made)
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.assertEqual(key.curve.name, "secp256r1")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.IPAddress),
                         [ipaddress.ip_address("192.0.2.5")])
        self.assertEqual(cert.subject, cert.issuer)
        common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(common_name, os.uname().nodename)
        now = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
        self.assertEqual(cert.not_valid_before_utc, now - CLOCK_SKEW)
        self.assertEqual(cert.not_valid_after_utc, now + datetime.timedelta(days=90))
        self.assertGreaterEqual(CLOCK_SKEW, datetime.timedelta(hours=1))
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.SERVER_AUTH])
        key.verify(cert.signature, cert.tbs_certificate_bytes,
                   ec.ECDSA(cert.signature_hash_algorithm))          # self-signed

    def test_curve_and_clock_skew_given(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        now = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
        for curve, name in [("p256", "secp256r1"), ("p384", "secp384r1"),
                            ("p521", "secp521r1")]:
            cert = load(generate_tls_certificate("192.0.2.5", clock=clock, curve=curve,
                                                 clock_skew=600, directory=directory(self)))
            key = cert.public_key()
            assert isinstance(key, ec.EllipticCurvePublicKey)
            self.assertEqual(key.curve.name, name)
            self.assertEqual(cert.not_valid_before_utc, now - datetime.timedelta(seconds=600))
            key.verify(cert.signature, cert.tbs_certificate_bytes,
                       ec.ECDSA(cert.signature_hash_algorithm))
        self.assertRaises(ValueError, generate_tls_certificate, "192.0.2.5", curve="p192",
                          directory=directory(self))

    def test_files(self) -> None:
        made = generate_tls_certificate("192.0.2.5", directory=directory(self))
        with open(made.path) as f:
            self.assertEqual(f.read(), made.text)
        with open(made.private_key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        self.assertEqual(key.public_key(), load(made).public_key())
        for path in (made.path, made.private_key_path):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_default_directory_is_private(self) -> None:
        made = generate_tls_certificate("192.0.2.5")
        where = os.path.dirname(made.path)
        self.addCleanup(shutil.rmtree, where)
        self.assertEqual(stat.S_IMODE(os.stat(where).st_mode), 0o700)
        self.assertEqual(os.path.dirname(made.private_key_path), where)

    def test_names_and_validity(self) -> None:
        made = generate_tls_certificate("[2001:db8::5]", "node-1", 7,
                                        directory=directory(self))
        cert = load(made)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.IPAddress),
                         [ipaddress.ip_address("2001:db8::5")])
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
                         "node-1")
        self.assertEqual(cert.not_valid_after_utc - cert.not_valid_before_utc,
                         datetime.timedelta(days=7) + CLOCK_SKEW)
        named = load(generate_tls_certificate("agent.example.com", directory=directory(self)))
        san = named.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["agent.example.com"])

    def test_tls_versions(self) -> None:
        self.assertEqual(tls_version("TLSv1.3"), TLSVersion.TLSv1_3)
        self.assertRaises(ValueError, tls_version, "SSLv3")

    def test_server_context_errors(self) -> None:
        made = generate_tls_certificate("192.0.2.5", directory=directory(self))
        self.assertRaises(OSError, server_context_from, made.path + ".missing",
                          made.private_key_path)
        self.assertRaises(ValueError, server_context_from, made.private_key_path,
                          made.private_key_path)
        self.assertRaises(ValueError, server_context_from, made.path, made.private_key_path,
                          minimum_version="TLSv1.0")
        both = os.path.join(os.path.dirname(made.path), "both.pem")
        with open(both, "w") as f:
            f.write(made.text + open(made.private_key_path).read())
        server_context_from(both, both).getContext()             # one file holding both


@implementer(IPolicyForHTTPS)
class ClientPolicy:
    """A test client: trusts ``trust`` (PEM), sends ``certificate`` (files), caps the
    TLS version at ``maximum``."""

    def __init__(self, trust: str | bytes, certificate: tuple[str, str] | None = None,
                 maximum: Any = None, ciphers: str | None = None) -> None:
        pem = trust if isinstance(trust, bytes) else trust.encode()
        self.trust = trustRootFromCertificates([Certificate.loadPEM(pem)])
        self.client = None
        if certificate is not None:
            with open(certificate[0], "rb") as c, open(certificate[1], "rb") as k:
                self.client = PrivateCertificate.loadPEM(c.read() + k.read())
        self.maximum, self.ciphers = maximum, ciphers

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        extra: dict[str, Any] = {"lowerMaximumSecurityTo": self.maximum} if self.maximum else {}
        if self.ciphers:
            extra["acceptableCiphers"] = AcceptableCiphers.fromOpenSSLCipherString(
                self.ciphers)
        creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
            hostname.decode(), trustRoot=self.trust, clientCertificate=self.client,
            extraCertificateOptions=extra)
        return creator


class HandshakeTestCase(TestCase):
    def client(self, policy: IPolicyForHTTPS | None = None,
               config: AgentConfig | None = None) -> HTTPClient:
        pool = make_pool(reactor) if config is not None else HTTPConnectionPool(
            reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        if config is not None:
            return make_http_client(reactor, config, pool=pool, connect_timeout=10)
        options: dict[str, Any] = {} if policy is None else {"contextFactory": policy}
        return HTTPClient(Agent(reactor, pool=pool, connectTimeout=10, **options))

    def serve_tls(self, context: Any) -> int:
        port = reactor.listenSSL(0, Site(Hello()), context, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port
        return number

    async def get(self, client: HTTPClient, url: str) -> bytes:
        response = await client.get(url, timeout=10)
        self.assertEqual(response.code, 200)
        body: bytes = await response.content()
        return body

    async def refused(self, client: HTTPClient, url: str, reason: str) -> None:
        """The request fails, and ``reason`` is part of why."""
        try:
            await client.get(url, timeout=10)
        except Exception as e:
            self.assertIn(reason, repr(e))
            return
        raise self.failureException(f"{url} answered")


class LoadedOnFirstConnectionTests(HandshakeTestCase):
    """``ServerTLS(load_now=False)`` (automatic TLS) reads its files and makes its OpenSSL
    context when the first connection arrives, not before; the default checks at once."""

    async def test_automatic_tls_loads_on_the_first_connection(self) -> None:
        fake = FakeIronic(version="1.68")
        ironic = IronicClient("http://ironic:6385", StubTreq(fake.app.resource()), reactor,
                              "test")
        tls = await prepare_api_tls(IRONIC_CONFIG, ironic, "127.0.0.1",
                                    directory=directory(self))
        assert tls.certificate is not None and tls.agent_verify_ca is not None
        saved = {path: open(path, "rb").read() for path in
                 (tls.certificate.path, tls.certificate.private_key_path)}
        for path in saved:                  # not read yet: missing files go unnoticed
            os.remove(path)
        port = self.serve_tls(tls.context)
        url = f"https://127.0.0.1:{port}/"
        with capturedLogs() as events:
            await self.refused(self.client(ClientPolicy(tls.agent_verify_ca)), url, "")
        self.assertIn(f"Cannot serve TLS with certificate {tls.certificate.path}: ",
                      " ".join(formatEvent(e) for e in events))
        self.flushLoggedErrors()
        for path, data in saved.items():
            with open(path, "wb") as f:
                f.write(data)
        self.assertEqual(await self.get(self.client(ClientPolicy(tls.agent_verify_ca)), url),
                         b"hello over TLS")
        for path in saved:                  # read once: later connections need no files
            os.remove(path)
        self.assertEqual(await self.get(self.client(ClientPolicy(tls.agent_verify_ca)), url),
                         b"hello over TLS")

    def test_operator_files_are_checked_at_once(self) -> None:
        missing = os.path.join(directory(self), "missing.pem")
        with self.assertRaises(OSError):
            ServerTLS(missing, missing, lambda: IRONIC_CONFIG)
        ServerTLS(missing, missing, lambda: IRONIC_CONFIG, load_now=False)


class ChildCertificateTests(TestCase):
    """Automatic TLS's certificate made in a child process, as the agent makes it."""

    async def test_made_in_a_child_as_in_the_agent(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        with capturedLogs() as events:
            made = await generate_in_child(ProcessRunner(reactor, reactor), "192.0.2.5",
                                           clock=clock, directory=directory(self),
                                           curve="p384", clock_skew=600)
        [ran] = [e["argv"] for e in events if e.get("log_format") == "Running {argv}"]
        self.assertEqual(ran[1:4], ("-S", "-m", "ipa_twisted.certificates"))
        cert = load(made)
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.assertEqual(key.curve.name, "secp384r1")
        now = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
        self.assertEqual(cert.not_valid_before_utc, now - datetime.timedelta(seconds=600))
        self.assertEqual(cert.not_valid_after_utc, now + datetime.timedelta(days=90))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.IPAddress),
                         [ipaddress.ip_address("192.0.2.5")])
        with open(made.path) as f:
            self.assertEqual(f.read(), made.text)
        with open(made.private_key_path, "rb") as f:
            self.assertEqual(serialization.load_pem_private_key(f.read(), None).public_key(),
                             key)
        for path in (made.path, made.private_key_path):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    async def test_a_failed_child_leaves_nothing_and_the_agent_makes_it(self) -> None:
        class Failing:
            """A runner whose child writes half a certificate and dies."""

            def __init__(self) -> None:
                self.argv: tuple[str, ...] = ()

            def execute(self, *argv: str, **kwargs: Any) -> Deferred[tuple[bytes, bytes]]:
                self.argv = argv
                with open(os.path.join(argv[5], "agent.crt"), "w") as f:
                    f.write("-----BEGIN CERT")
                return fail(ProcessExecutionError(argv, 1, b"", b"MemoryError"))

        fake = FakeIronic(version="1.68")
        ironic = IronicClient("http://ironic:6385", StubTreq(fake.app.resource()), reactor,
                              "test")
        where, runner = directory(self), Failing()
        with capturedLogs() as events:
            tls = await prepare_api_tls(IRONIC_CONFIG, ironic, "127.0.0.1", directory=where,
                                        runner=runner)  # type: ignore[arg-type]
        self.assertEqual(runner.argv[4:6], ("127.0.0.1", where))
        self.assertIn("making it in the agent", " ".join(formatEvent(e) for e in events))
        self.assertEqual(tls.protocol, "https")
        assert tls.certificate is not None
        self.assertEqual(load(tls.certificate).public_key().curve.name,  # type: ignore
                         "secp384r1")
        self.assertEqual(sorted(os.listdir(where)), ["agent.crt", "agent.key"])


class AutoTLSTests(HandshakeTestCase):
    async def test_api_over_auto_tls_verified_with_the_heartbeat_certificate(self) -> None:
        fake = FakeIronic(version="1.68")
        node = fake.add_node(macs=["52:54:00:12:34:56"])
        ironic = IronicClient("http://ironic:6385", StubTreq(fake.app.resource()), reactor,
                              "test")
        api = SwitchableTLSFactory(Site(Hello()))
        listening = reactor.listenTCP(0, api, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        plain = self.client()
        self.assertEqual(await self.get(plain, f"http://127.0.0.1:{port}/"), b"hello")
        lingering = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                          Closing())

        tls = await prepare_api_tls(IRONIC_CONFIG, ironic, "127.0.0.1",
                                    directory=directory(self))
        self.assertEqual(tls.protocol, "https")
        api.start_tls(tls.context)
        await lingering.closed                      # plain connections end at the switch
        node.token_issued = True                    # as lookup would have
        await ironic.heartbeat(node.uuid, callback_url("127.0.0.1", port, tls.protocol),
                               node.token, agent_verify_ca=tls.agent_verify_ca)
        body = fake.heartbeats[-1].body
        self.assertEqual(body["callback_url"], f"https://127.0.0.1:{port}")
        sent = body["agent_verify_ca"]
        self.assertEqual(sent, tls.agent_verify_ca)
        # tls_certificate_curve and auto_tls_allowed_clock_skew: the reference's defaults
        cert = x509.load_pem_x509_certificate(sent.encode())
        self.assertEqual(cert.public_key().curve.name, "secp384r1")  # type: ignore[union-attr]
        self.assertEqual(cert.not_valid_after_utc - cert.not_valid_before_utc,
                         datetime.timedelta(days=90, seconds=3600))

        verified = self.client(ClientPolicy(sent))
        self.assertEqual(await self.get(verified, f"https://127.0.0.1:{port}/"),
                         b"hello over TLS")
        await self.refused(plain, f"http://127.0.0.1:{port}/", "ConnectionDone")
        other = generate_tls_certificate("127.0.0.1", directory=directory(self))
        await self.refused(self.client(ClientPolicy(other.text)), f"https://127.0.0.1:{port}/",
                           "certificate verify failed")

    async def test_a_certificate_for_another_address_is_refused(self) -> None:
        made = generate_tls_certificate("127.0.0.2", directory=directory(self))
        port = self.serve_tls(server_context_from(made.path, made.private_key_path))
        await self.refused(self.client(ClientPolicy(made.text)), f"https://127.0.0.1:{port}/",
                           "IPAddressMismatch")

    async def test_old_ironic_keeps_plain_http(self) -> None:
        fake = FakeIronic(version="1.67")
        ironic = IronicClient("http://ironic:6385", StubTreq(fake.app.resource()), reactor,
                              "test")
        where = directory(self)
        tls = await prepare_api_tls(IRONIC_CONFIG, ironic, "127.0.0.1", directory=where)
        self.assertEqual(tuple(tls), (None, None, "http", None))
        self.assertEqual(os.listdir(where), [])

    async def test_manual_tls_disabled_or_standalone_do_not_ask(self) -> None:
        class Unasked:
            async def supports_auto_tls(self) -> bool:
                raise AssertionError("asked")

        for config in (IRONIC_CONFIG.override(listen_tls=True),
                       IRONIC_CONFIG.override(enable_auto_tls=False),
                       IRONIC_CONFIG.override(advertise_protocol="https"),
                       IRONIC_CONFIG.override(standalone=True)):
            self.assertFalse(auto_tls_possible(config))
            tls = await prepare_api_tls(config, Unasked(), "127.0.0.1")
            self.assertEqual((tls.context, tls.agent_verify_ca), (None, None))
            self.assertEqual(tls.protocol, config.advertise_protocol)
        self.assertTrue(auto_tls_possible(IRONIC_CONFIG))
        self.assertEqual((await prepare_api_tls(IRONIC_CONFIG, None, "x")).context, None)

    async def test_minimum_version_is_honoured(self) -> None:
        config = IRONIC_CONFIG.override(tls_min_version="1.3")
        fake = FakeIronic(version="1.68")
        ironic = IronicClient("http://ironic:6385", StubTreq(fake.app.resource()), reactor,
                              "test")
        tls = await prepare_api_tls(config, ironic, "127.0.0.1", directory=directory(self))
        port = self.serve_tls(tls.context)
        assert tls.agent_verify_ca is not None
        url = f"https://127.0.0.1:{port}/"
        await self.refused(self.client(ClientPolicy(tls.agent_verify_ca,
                                                    maximum=TLSVersion.TLSv1_2)), url,
                           "protocol version")
        self.assertEqual(await self.get(self.client(ClientPolicy(tls.agent_verify_ca)), url),
                         b"hello over TLS")


class Closing(Protocol):
    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.closed.callback(None)


class ManualTLSTests(HandshakeTestCase):
    """[ssl] files on the server; cafile/certfile/keyfile/insecure on the agent's client."""

    async def test_client_certificates_required_by_ca_file(self) -> None:
        ca, strangers = Authority(self), Authority(self, "Other CA")
        server = ca.issue("agent", ip="127.0.0.1")
        port = self.serve_tls(server_context_from(*server, ca_file=ca.path))
        url = f"https://127.0.0.1:{port}/"
        with open(ca.path) as f:
            trusted = f.read()
        self.assertEqual(await self.get(self.client(ClientPolicy(trusted, ca.issue("ironic"))),
                                        url), b"hello over TLS")
        await self.refused(self.client(ClientPolicy(trusted)), url, "certificate required")
        await self.refused(self.client(ClientPolicy(trusted, strangers.issue("ironic"))), url,
                           "unknown ca")

    async def test_agent_client_verifies_ironic_with_cafile(self) -> None:
        ca, strangers = Authority(self), Authority(self, "Other CA")
        port = self.serve_tls(server_context_from(*ca.issue("ironic", ip="127.0.0.1")))
        url = f"https://127.0.0.1:{port}/"
        self.assertEqual(await self.get(self.client(config=AgentConfig(cafile=ca.path)), url),
                         b"hello over TLS")
        await self.refused(self.client(config=AgentConfig()), url,    # the system's CAs
                           "certificate verify failed")
        await self.refused(self.client(config=AgentConfig(cafile=strangers.path)), url,
                           "certificate verify failed")
        self.assertEqual(await self.get(self.client(config=AgentConfig(insecure=True)), url),
                         b"hello over TLS")

    async def test_agent_client_sends_its_certificate(self) -> None:
        ca = Authority(self)
        port = self.serve_tls(server_context_from(*ca.issue("ironic", ip="127.0.0.1"),
                                                  ca_file=ca.path))
        url = f"https://127.0.0.1:{port}/"
        certfile, keyfile = ca.issue("agent-client")
        with_certificate = AgentConfig(cafile=ca.path, certfile=certfile, keyfile=keyfile)
        self.assertEqual(await self.get(self.client(config=with_certificate), url),
                         b"hello over TLS")
        await self.refused(self.client(config=AgentConfig(cafile=ca.path)), url,
                           "certificate required")
        insecure = AgentConfig(insecure=True, certfile=certfile, keyfile=keyfile)
        self.assertEqual(await self.get(self.client(config=insecure), url), b"hello over TLS")


class KeptAlive(Protocol):
    """One HTTP/1.1 request on a connection that then stays open (keep-alive)."""

    def __init__(self) -> None:
        self.answered: Deferred[bytes] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if not self.answered.called:
            self.answered.callback(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.closed.callback(None)


class PolicyTLSTests(HandshakeTestCase):
    """tls_min_version and tls_cipher_suites on the API, from the moment lookup sets them."""

    def manual(self, **options: Any) -> tuple[IronicAgent, SwitchableTLSFactory, int, str]:
        """An agent whose API serves manual TLS ([ssl] files) on 127.0.0.1: (agent, API
        factory, port, the CA's PEM)."""
        ca = Authority(self)
        cert, key = ca.issue("agent", ip="127.0.0.1")
        config = IRONIC_CONFIG.override(listen_tls=True, ssl_cert_file=cert,
                                        ssl_key_file=key, **options)
        check_startup_config(config)
        agent = IronicAgent(config, reactor, None)  # type: ignore[arg-type]
        api = SwitchableTLSFactory(Site(Hello()))
        api.start_tls(server_tls_options(config, lambda: agent.config))
        listening = reactor.listenTCP(0, api, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        with open(ca.path) as f:
            return agent, api, listening.getHost().port, f.read()

    async def test_manual_tls_refuses_tls12_once_lookup_says_13(self) -> None:
        agent, api, port, ca = self.manual()
        url = f"https://127.0.0.1:{port}/"
        tls12 = ClientPolicy(ca, maximum=TLSVersion.TLSv1_2)
        self.assertEqual(await self.get(self.client(tls12), url), b"hello over TLS")
        lingering = KeptAlive()
        await connectProtocol(wrapClientTLS(tls12.creatorForNetloc(b"127.0.0.1", port),
                                            TCP4ClientEndpoint(reactor, "127.0.0.1", port)),
                              lingering)
        self.assertIn(b"200 OK", await lingering.answered)

        with capturedLogs() as events:
            agent.process_lookup_data({"node": {"uuid": "n-1"}, "config": {
                "heartbeat_timeout": 300, "tls_min_version": "1.3",
                "tls_cipher_suites": None}})
            await self.refused(self.client(tls12), url, "protocol version")
            api.close_outdated()                     # as the service does after lookup
            await lingering.closed                   # the 1.2 keep-alive connection ends
        self.assertEqual(await self.get(self.client(ClientPolicy(ca)), url), b"hello over TLS")
        said = " ".join(formatEvent(e) for e in events)
        self.assertIn("TLS 1.3 or later", said)
        self.assertIn("Closed 1 API connection", said)

    async def test_cipher_suites_on_the_api(self) -> None:
        agent, _, port, ca = self.manual(tls_cipher_suites="ECDHE-ECDSA-AES128-GCM-SHA256")
        url = f"https://127.0.0.1:{port}/"

        def tls12(ciphers: str) -> HTTPClient:
            return self.client(ClientPolicy(ca, maximum=TLSVersion.TLSv1_2, ciphers=ciphers))
        self.assertEqual(await self.get(tls12("ECDHE-ECDSA-AES128-GCM-SHA256"), url),
                         b"hello over TLS")
        await self.refused(tls12("ECDHE-ECDSA-AES256-GCM-SHA384"), url, "handshake failure")
        # Ironic's lookup sets none: the agent's own list stays (as the reference).
        agent.apply_lookup_policy({"tls_cipher_suites": None})
        await self.refused(tls12("ECDHE-ECDSA-AES256-GCM-SHA384"), url, "handshake failure")
        agent.apply_lookup_policy({"tls_cipher_suites": "ECDHE-ECDSA-AES256-GCM-SHA384"})
        self.assertEqual(await self.get(tls12("ECDHE-ECDSA-AES256-GCM-SHA384"), url),
                         b"hello over TLS")
        await self.refused(tls12("ECDHE-ECDSA-AES128-GCM-SHA256"), url, "handshake failure")

    async def test_default_tls12_ciphers_are_the_references(self) -> None:
        _, _, port, ca = self.manual()
        url = f"https://127.0.0.1:{port}/"
        chacha = ClientPolicy(ca, maximum=TLSVersion.TLSv1_2,
                              ciphers="ECDHE-ECDSA-CHACHA20-POLY1305")
        await self.refused(self.client(chacha), url, "handshake failure")
        self.assertEqual(await self.get(self.client(ClientPolicy(
            ca, maximum=TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")), url),
            b"hello over TLS")

    async def test_unusable_cipher_list_from_lookup_keeps_the_api_up(self) -> None:
        agent, _, port, ca = self.manual()
        with capturedLogs() as events:
            agent.apply_lookup_policy({"tls_cipher_suites": "NOT-A-CIPHER-FROM-IRONIC"})
            self.assertEqual(await self.get(self.client(ClientPolicy(
                ca, maximum=TLSVersion.TLSv1_2)), f"https://127.0.0.1:{port}/"),
                b"hello over TLS")
        errors = [formatEvent(e) for e in events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("NOT-A-CIPHER-FROM-IRONIC", errors[0])

    def test_bad_settings_stop_start_up(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            check_startup_config(IRONIC_CONFIG.override(tls_cipher_suites="NOT-A-CIPHER"))
        self.assertIn("tls_cipher_suites", str(raised.exception))
        made = generate_tls_certificate("127.0.0.1", directory=directory(self))
        with self.assertRaises(ConfigError) as raised:
            check_startup_config(IRONIC_CONFIG.override(
                listen_tls=True, ssl_cert_file=made.private_key_path,
                ssl_key_file=made.private_key_path))
        self.assertIn("[ssl]", str(raised.exception))
        check_startup_config(IRONIC_CONFIG.override(
            tls_cipher_suites="ECDHE+AESGCM", listen_tls=True, ssl_cert_file=made.path,
            ssl_key_file=made.private_key_path))

    async def test_auto_tls_follows_the_config_in_force(self) -> None:
        fake = FakeIronic(version="1.68")
        ironic = IronicClient("http://ironic:6385", StubTreq(fake.app.resource()), reactor,
                              "test")
        current = [IRONIC_CONFIG]
        tls = await prepare_api_tls(IRONIC_CONFIG, ironic, "127.0.0.1",
                                    directory=directory(self), current=lambda: current[0])
        assert tls.agent_verify_ca is not None
        port = self.serve_tls(tls.context)
        url = f"https://127.0.0.1:{port}/"
        tls12 = ClientPolicy(tls.agent_verify_ca, maximum=TLSVersion.TLSv1_2)
        self.assertEqual(await self.get(self.client(tls12), url), b"hello over TLS")
        current[0] = IRONIC_CONFIG.override(tls_min_version="1.3")
        await self.refused(self.client(tls12), url, "protocol version")
