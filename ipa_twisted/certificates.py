"""The agent's self-signed certificates (automatic TLS), made here or in a child process.

``generate_tls_certificate`` makes what automatic TLS serves and sends to Ironic as
``agent_verify_ca``: an elliptic-curve key and a self-signed certificate whose subject
alternative name is the advertised IP address, valid from a clock skew before now (a
ramdisk's clock may be behind Ironic's until NTP runs) for ``valid_for_days`` days from
now. The certificate and key are written, mode 0600, into a private (0700) directory.

``generate_in_child`` runs the same function in a short-lived Python child
(``python -m ipa_twisted.certificates``) through the agent's process runner. Making a key
and a certificate touches about 1.3 MiB of cryptography's library that the agent never
needs again; in a child, that memory ends with it, and the agent only reads the two PEM
files (0.5 MiB) to serve them.

This module imports nothing of Twisted or cryptography when loaded, so the child starts
with the standard library only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from cryptography import x509

    from ipa_twisted.process import ProcessRunner

CLOCK_SKEW = datetime.timedelta(days=1)
"""How far before now a generated certificate becomes valid, unless told (automatic TLS
passes ``auto_tls_allowed_clock_skew``)."""

CURVES = ("p256", "p384", "p521")
"""Elliptic curves a generated certificate's key may use (``tls_certificate_curve``)."""

DEFAULT_VALIDITY_DAYS = 90

CERTIFICATE_FILE, KEY_FILE = "agent.crt", "agent.key"

CHILD_TIMEOUT = 120.0
"""Seconds the child may take (an emulated ramdisk starts Python slowly)."""


class Clock(Protocol):
    """What is needed of a clock (``IReactorTime``): now, in seconds since the epoch."""

    def seconds(self) -> float: ...


class TlsCertificate(NamedTuple):
    """A generated certificate: its PEM ``text`` and the files of it and its key."""

    text: str
    path: str
    private_key_path: str


def _subject_alternative_name(host: str) -> x509.GeneralName:
    from cryptography import x509
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: str, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)


def _check_curve(curve: str) -> None:
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r}: not one of {', '.join(CURVES)}")


def generate_tls_certificate(ip_address: str, common_name: str | None = None,
                             valid_for_days: int = DEFAULT_VALIDITY_DAYS, *,
                             clock: Clock | None = None,
                             directory: str | None = None, curve: str = "p256",
                             clock_skew: float | None = None) -> TlsCertificate:
    """A new self-signed certificate for ``ip_address`` and its key, written to files.

    ``common_name`` defaults to this host's name. ``ip_address`` is normally an IP
    address (the SAN is then an IP address entry); a host name gives a DNS name entry.
    ``clock`` gives "now" (default: the system clock). The files go into ``directory``
    (default: a new private temporary directory). ``curve`` (one of CURVES) is the key's
    elliptic curve; the certificate is valid from ``clock_skew`` seconds before now
    (default CLOCK_SKEW).
    """
    _check_curve(curve)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    now = datetime.datetime.fromtimestamp(
        clock.seconds() if clock is not None else time.time(), datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         common_name or socket.gethostname() or "ipa")])
    curves: dict[str, ec.EllipticCurve] = {
        "p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}
    skew = CLOCK_SKEW if clock_skew is None else datetime.timedelta(seconds=clock_skew)
    key = ec.generate_private_key(curves[curve])
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - skew)
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
    path = os.path.join(directory, CERTIFICATE_FILE)
    key_path = os.path.join(directory, KEY_FILE)
    _write_private(path, text)
    _write_private(key_path, key_pem)
    return TlsCertificate(text.decode("ascii"), path, key_path)


def child_argv(ip_address: str, directory: str, now: float, *, curve: str,
               valid_for_days: int, clock_skew: float | None) -> list[str]:
    """The command that makes the certificate in a child: this interpreter, without
    ``site`` (the parent's ``sys.path`` is given as PYTHONPATH), running this module."""
    argv = [sys.executable, "-S", "-m", __name__, ip_address, directory,
            "--now", repr(now), "--curve", curve, "--days", str(valid_for_days)]
    if clock_skew is not None:
        argv += ["--clock-skew", repr(float(clock_skew))]
    return argv


async def generate_in_child(runner: ProcessRunner, ip_address: str, *,
                            clock: Clock | None = None, directory: str | None = None,
                            curve: str = "p256", clock_skew: float | None = None,
                            valid_for_days: int = DEFAULT_VALIDITY_DAYS) -> TlsCertificate:
    """``generate_tls_certificate`` with the same arguments, run by ``runner`` in a Python
    child; fails with the runner's ProcessExecutionError when the child does."""
    _check_curve(curve)
    if directory is None:
        directory = tempfile.mkdtemp(prefix="ipa-tls-")   # mode 0700
    now = clock.seconds() if clock is not None else time.time()
    search_path = os.pathsep.join(entry for entry in sys.path if entry)
    path = os.path.join(directory, CERTIFICATE_FILE)
    try:
        await runner.execute(*child_argv(ip_address, directory, now, curve=curve,
                                         valid_for_days=valid_for_days, clock_skew=clock_skew),
                             env={"PYTHONPATH": search_path, "PYTHONDONTWRITEBYTECODE": "1"},
                             timeout=CHILD_TIMEOUT)
    except BaseException:
        for name in (CERTIFICATE_FILE, KEY_FILE):   # what a failed child may have left
            if os.path.exists(os.path.join(directory, name)):
                os.remove(os.path.join(directory, name))
        raise
    with open(path) as f:
        text = f.read()
    return TlsCertificate(text, path, os.path.join(directory, KEY_FILE))


class _FixedClock:
    def __init__(self, now: float) -> None:
        self._now = now

    def seconds(self) -> float:
        return self._now


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ipa_twisted.certificates ADDRESS DIRECTORY [--now S] [--curve C]
    [--days N] [--clock-skew S]``: write a certificate and key into DIRECTORY."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m ipa_twisted.certificates",
                                     description=main.__doc__)
    parser.add_argument("address")
    parser.add_argument("directory")
    parser.add_argument("--now", type=float, default=None)
    parser.add_argument("--curve", default="p256", choices=CURVES)
    parser.add_argument("--days", type=int, default=DEFAULT_VALIDITY_DAYS)
    parser.add_argument("--clock-skew", type=float, default=None)
    args = parser.parse_args(argv)
    generate_tls_certificate(args.address, valid_for_days=args.days,
                             clock=None if args.now is None else _FixedClock(args.now),
                             directory=args.directory, curve=args.curve,
                             clock_skew=args.clock_skew)
    return 0


if __name__ == "__main__":
    sys.exit(main())
