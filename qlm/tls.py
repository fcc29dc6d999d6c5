"""TLS material for local use: a private CA and the certificates it signs (``cryptography``).

``make up`` (:func:`ensure_local_pki`) writes under ``<dir>/tls/``: ``ca.pem`` (the CA a
client trusts: ``QLM_TLS_CA``), ``server.pem`` / ``server-key.pem`` (every gRPC listener
of the stack; names ``localhost``, ``127.0.0.1`` and ``::1``) and ``client.pem`` /
``client-key.pem`` (a client certificate for mTLS). Keys are ECDSA P-256; files holding
a private key are mode 0600. Production brings its own certificates (the same settings
take their paths).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qlm.core.errors import InvalidInput

VALID_DAYS = 825
LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class LocalPki:
    """Paths of the files :func:`ensure_local_pki` writes."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client-key.pem"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qlm local"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _issue(subject: str, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
           key: ec.EllipticCurvePrivateKey, usage: x509.ObjectIdentifier | None,
           ca: bool = False, names: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(issuer)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                       critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in (*LOCAL_NAMES, *names)]
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOCAL_IPS]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def ensure_local_pki(directory: Path, names: tuple[str, ...] = ()) -> LocalPki:
    """The local CA and certificates under ``directory``, made if missing (kept if there).

    ``names``: DNS names the server certificate holds besides ``localhost`` and the
    loopback addresses (the services' names on a compose network or in a cluster)."""
    pki = LocalPki(directory)
    if all(p.exists() for p in (pki.ca, pki.server_cert, pki.server_key, pki.client_cert,
                                pki.client_key)):
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("qlm local CA", _name("qlm local CA"), ca_key, ca_key, None, ca=True)
    _write_key(pki.ca_key, ca_key)
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for cert_path, key_path, subject, usage in (
        (pki.server_cert, pki.server_key, "qlm server", ExtendedKeyUsageOID.SERVER_AUTH),
        (pki.client_cert, pki.client_key, "qlm client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(subject, ca_cert.subject, ca_key, key, usage, names=names)
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki


def read_pem(path: Path, setting: str) -> bytes:
    """The bytes of a PEM file, or InvalidInput naming ``setting``."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidInput(setting, f"cannot read {path}: {error.strerror}") from None
    if b"-----BEGIN" not in data:
        raise InvalidInput(setting, f"{path} is not a PEM file")
    return data
