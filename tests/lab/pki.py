"""A throwaway certificate authority for the lab.

``LabCA`` makes a root CA and issues server certificates of the kinds in ``model.Cert``. All
keys are ECDSA P-256: quick to generate and accepted by every TLS version the lab serves.

Files under the CA's work directory:

* ``ca.pem`` / ``ca-key.pem``: the root certificate (the trust anchor) and its key;
* ``<host>.<kind>.pem`` / ``<host>.<kind>.key``: an issued certificate and its key.

For lab-CA-issued kinds the certificate file holds the leaf followed by the root. The root is
the trust anchor, so PKIX clients do not need it, but a DANE-TA(2) record with a digest can
only match a certificate the server actually sends (RFC 7671 section 5.2.2), so the server
must present it. A self-signed certificate file holds just the leaf.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.lab.model import Cert, Tlsa, TlsaTarget

CA_NAME = "tlsmilter lab root CA"
WRONG_NAME = "wrong-name.invalid"
UNRELATED_NAME = "unrelated.invalid"


def tlsa_data_for(cert: x509.Certificate, selector: int, mtype: int) -> str:
    """Return the hex certificate association data of a TLSA record for ``cert``.

    ``selector`` 0 covers the whole certificate, 1 its SubjectPublicKeyInfo; ``mtype`` 0 is
    the exact DER, 1 its SHA-256 digest, 2 its SHA-512 digest.
    """
    if selector == 0:
        der = cert.public_bytes(serialization.Encoding.DER)
    elif selector == 1:
        der = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        raise ValueError(f"unknown TLSA selector {selector}")
    if mtype == 0:
        return der.hex()
    if mtype == 1:
        return hashlib.sha256(der).hexdigest()
    if mtype == 2:
        return hashlib.sha512(der).hexdigest()
    raise ValueError(f"unknown TLSA matching type {mtype}")


@dataclass(frozen=True)
class Issued:
    """A certificate issued for a lab server, with its files.

    ``issuer`` is the certificate that signed ``cert``: the lab root, or ``cert`` itself for a
    self-signed one.
    """

    host: str
    kind: Cert
    cert_file: Path
    key_file: Path
    cert: x509.Certificate
    issuer: x509.Certificate

    def tlsa_data(self, usage: int, selector: int, mtype: int) -> str:
        """Return TLSA association data: trust-anchor usages (0, 2) cover the issuer,
        end-entity usages (1, 3) the leaf."""
        if usage in (0, 2):
            return tlsa_data_for(self.issuer, selector, mtype)
        if usage in (1, 3):
            return tlsa_data_for(self.cert, selector, mtype)
        raise ValueError(f"unknown TLSA usage {usage}")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class LabCA:
    """A root CA in ``workdir`` that issues server certificates on demand.

    ``issue`` is thread-safe and caches per (host, kind), so servers and zone writers that ask
    for the same certificate get the same one.
    """

    def __init__(self, workdir: Path) -> None:
        """Create the root CA and write ``ca.pem`` and ``ca-key.pem`` into ``workdir``."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        public = self._key.public_key()
        self.ca_cert: x509.Certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(CA_NAME))
            .issuer_name(_name(CA_NAME))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = workdir / "ca.pem"
        self.ca_file.write_bytes(_pem(self.ca_cert))
        _write_key(workdir / "ca-key.pem", self._key)
        self._issued: dict[tuple[str, Cert], Issued] = {}
        self._unrelated: Issued | None = None
        self._lock = threading.Lock()

    def issue(self, host: str, kind: Cert) -> Issued:
        """Return the certificate of ``kind`` for ``host``, creating it on first use."""
        with self._lock:
            issued = self._issued.get((host, kind))
            if issued is None:
                issued = self._make(host, kind)
                self._issued[(host, kind)] = issued
            return issued

    @property
    def unrelated(self) -> Issued:
        """A valid lab-CA certificate no lab server presents (the ``TlsaTarget.WRONG`` data)."""
        with self._lock:
            if self._unrelated is None:
                self._unrelated = self._make(UNRELATED_NAME, Cert.CA)
            return self._unrelated

    def tlsa_for(self, issued: Issued, tlsa: Tlsa) -> str:
        """Return the association data of the model's ``tlsa`` record for a server presenting
        ``issued``; the record's target, not its usage, picks the certificate."""
        if tlsa.target is TlsaTarget.EE:
            cert = issued.cert
        elif tlsa.target is TlsaTarget.TA:
            cert = issued.issuer
        else:
            cert = self.unrelated.cert
        return tlsa_data_for(cert, tlsa.selector, tlsa.mtype)

    def _make(self, host: str, kind: Cert) -> Issued:
        now = datetime.datetime.now(datetime.UTC)
        if kind is Cert.EXPIRED:
            not_before = now - datetime.timedelta(days=10)
            not_after = now - datetime.timedelta(days=1)
        else:
            not_before = now - datetime.timedelta(days=1)
            not_after = now + datetime.timedelta(days=30)
        name = WRONG_NAME if kind is Cert.WRONG_NAME else host
        key = _new_key()
        public = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        if kind is Cert.SELF_SIGNED:
            cert = builder.issuer_name(_name(name)).sign(key, hashes.SHA256())
            issuer, chain = cert, _pem(cert)
        else:
            ski = self.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            cert = (
                builder.issuer_name(self.ca_cert.subject)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value),
                    critical=False,
                )
                .sign(self._key, hashes.SHA256())
            )
            issuer, chain = self.ca_cert, _pem(cert, self.ca_cert)
        cert_file = self.workdir / f"{host}.{kind.value}.pem"
        key_file = self.workdir / f"{host}.{kind.value}.key"
        cert_file.write_bytes(chain)
        _write_key(key_file, key)
        return Issued(host, kind, cert_file, key_file, cert, issuer)
