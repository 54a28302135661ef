"""TLS for the agent's API: self-signed certificates (automatic TLS) and server contexts.

``generate_tls_certificate`` makes what automatic TLS serves and sends to Ironic as
``agent_verify_ca``: an EC P-256 key and a self-signed certificate whose subject alternative
name is the advertised IP address, valid from a day before now (a ramdisk's clock may be
behind Ironic's until NTP runs) for ``valid_for_days`` days from now. The certificate and
key are written, mode 0600, into a new private (0700) directory.

``server_context_from`` builds the API's server TLS settings from PEM files: the
certificate (and any chain after it), its key, optionally a CA bundle that client
certificates must chain to, and the lowest TLS version accepted.

Client TLS (outgoing requests) is ``ipa_twisted.http``'s.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import tempfile
import time
from typing import Any, NamedTuple

from constantly import NamedConstant
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.internet.ssl import TLSVersion

CLOCK_SKEW = datetime.timedelta(days=1)
"""How far before now a generated certificate becomes valid."""

DEFAULT_VALIDITY_DAYS = 90
TLS_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
"""The ``tls_min_version`` values (Ironic's spelling), as Twisted's TLSVersion."""

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class TlsCertificate(NamedTuple):
    """A generated certificate: its PEM ``text`` and the files of it and its key."""

    text: str
    path: str
    private_key_path: str


def tls_version(name: str) -> NamedConstant:
    """The TLSVersion of ``1.2`` or ``1.3`` (also ``TLSv1.2``, ``TLSv1.3``), else ValueError."""
    try:
        version: NamedConstant = TLS_VERSIONS[name.removeprefix("TLSv")]
    except KeyError:
        raise ValueError(f"Unknown TLS version {name!r}: use one of "
                         f"{', '.join(TLS_VERSIONS)}") from None
    return version


def _subject_alternative_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: str, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)


def generate_tls_certificate(ip_address: str, common_name: str | None = None,
                             valid_for_days: int = DEFAULT_VALIDITY_DAYS, *,
                             clock: IReactorTime | None = None,
                             directory: str | None = None) -> TlsCertificate:
    """A new self-signed certificate for ``ip_address`` and its key, written to files.

    ``common_name`` defaults to this host's name. ``ip_address`` is normally an IP
    address (the SAN is then an IP address entry); a host name gives a DNS name entry.
    ``clock`` gives "now" (default: the system clock). The files go into ``directory``
    (default: a new private temporary directory).
    """
    now = datetime.datetime.fromtimestamp(
        clock.seconds() if clock is not None else time.time(), datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         common_name or socket.gethostname() or "ipa")])
    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=valid_for_days))
        .add_extension(x509.SubjectAlternativeName(
            [_subject_alternative_name(ip_address)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                       critical=False)
        .sign(key, hashes.SHA256()))
    text = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    if directory is None:
        directory = tempfile.mkdtemp(prefix="ipa-tls-")   # mode 0700
    path = os.path.join(directory, "agent.crt")
    key_path = os.path.join(directory, "agent.key")
    _write_private(path, text)
    _write_private(key_path, key_pem)
    return TlsCertificate(text.decode("ascii"), path, key_path)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_context_from(cert_file: str, key_file: str, *, ca_file: str | None = None,
                        minimum_version: str = "1.2") -> CertificateOptions:
    """Server TLS settings from PEM files.

    ``cert_file`` holds the certificate, optionally followed by its chain; ``key_file``
    its unencrypted key (may be the same file). With ``ca_file``, clients must present a
    certificate that chains to one of its certificates. Raises OSError or ValueError (and
    OpenSSL errors) for unreadable or invalid files.
    """
    chain = _PEM_CERTIFICATE.findall(_read(cert_file))
    if not chain:
        raise ValueError(f"No PEM certificate in {cert_file}")
    loaded = PrivateCertificate.loadPEM(chain[0] + b"\n" + _read(key_file))
    extra = [Certificate.loadPEM(block).original for block in chain[1:]]
    options: dict[str, Any] = {}
    if ca_file:
        from ipa_twisted.http import load_trust_root
        options["trustRoot"] = load_trust_root(ca_file)   # implies: a certificate required
    return CertificateOptions(
        privateKey=loaded.privateKey.original, certificate=loaded.original,
        extraCertChain=extra or None, raiseMinimumTo=tls_version(minimum_version),
        **options)
