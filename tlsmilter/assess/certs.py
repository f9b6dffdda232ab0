"""PKIX validation and DANE TLSA matching of a presented certificate chain.

Python 3.11's ``ssl`` cannot verify a chain after the handshake, so the prober handshakes
without verification, keeps the chain, and judges it here with
``cryptography.x509.verification``: once against the web PKI (or the configured CA file) for
the MX host name, once against the domain's TLSA records (RFC 7672).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from tlsmilter.assess.model import Code, DaneStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 section 3.1: SMTP uses only DANE-TA(2) and DANE-EE(3)."""
        return self.usage in (2, 3) and self.selector in (0, 1) and self.mtype in (0, 1, 2)

    @classmethod
    def from_text(cls, text: str) -> Tlsa:
        usage, selector, mtype, *hexdata = text.split()
        return cls(int(usage), int(selector), int(mtype), bytes.fromhex("".join(hexdata)))


@dataclass(frozen=True)
class PkixResult:
    valid: bool
    code: Code
    detail: str = ""


@functools.lru_cache(maxsize=8)
def load_store(ca_file: str | None) -> Store:
    """Trust anchors: the configured CA file, else the system bundle."""
    path = Path(ca_file) if ca_file else _system_bundle()
    certs = []
    end = b"-----END CERTIFICATE-----"
    for block in path.read_bytes().split(end)[:-1]:
        # One at a time: system bundles carry the odd certificate cryptography warns about
        # (e.g. a non-positive serial) or will refuse; it must not take the others with it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            try:
                certs.append(x509.load_pem_x509_certificate(block + end))
            except ValueError as exc:
                log.warning("%s: skipping a certificate that does not parse: %s", path, exc)
    if not certs:
        raise ValueError(f"{path}: no certificates")
    return Store(certs)


def _system_bundle() -> Path:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("no system CA bundle found; set prober.ca_file")


def verify_pkix(chain: list[x509.Certificate], names: list[str], store: Store,
                now: dt.datetime) -> PkixResult:
    """Is the leaf valid for one of ``names`` under ``store``? Classifies the failure."""
    if not chain:
        return PkixResult(False, Code.CERT_UNTRUSTED, "no certificate presented")
    leaf, intermediates = chain[0], chain[1:]
    errors = []
    for name in names:
        verifier = PolicyBuilder().store(store).time(now).build_server_verifier(DNSName(name))
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            errors.append(str(exc))
            continue
        return PkixResult(True, Code.CERT_VALID, f"valid for {name}")
    detail = errors[0] if errors else "no name to check"
    if leaf.not_valid_after_utc < now:
        return PkixResult(False, Code.CERT_EXPIRED, f"expired {leaf.not_valid_after_utc:%Y-%m-%d}")
    if not any(name_matches(leaf, n) for n in names):
        return PkixResult(False, Code.CERT_NAME_MISMATCH,
                          f"certificate is for {', '.join(cert_names(leaf)) or 'no DNS name'}")
    if leaf.issuer == leaf.subject:
        detail = "self-signed certificate"
    elif not any(c.subject == leaf.issuer for c in chain[1:]):
        detail = f"issuer {leaf.issuer.rfc4514_string()} is not trusted"
    return PkixResult(False, Code.CERT_UNTRUSTED, detail)


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.value.get_values_for_type(x509.DNSName)]


def name_matches(cert: x509.Certificate, host: str) -> bool:
    """RFC 6125 DNS-ID match with a single leftmost wildcard label."""
    host = host.rstrip(".").lower()
    for pattern in (n.rstrip(".").lower() for n in cert_names(cert)):
        if pattern == host:
            return True
        if pattern.startswith("*.") and "." in host and host.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def association(cert: x509.Certificate, selector: int, mtype: int) -> bytes:
    """TLSA certificate association data of ``cert`` for a selector and matching type."""
    if selector == 0:
        material = cert.public_bytes(serialization.Encoding.DER)
    else:
        material = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if mtype == 1:
        return hashlib.sha256(material).digest()
    if mtype == 2:
        return hashlib.sha512(material).digest()
    return material


def match_tlsa(records: list[Tlsa], chain: list[x509.Certificate], names: list[str],
               now: dt.datetime) -> tuple[DaneStatus, str]:
    """RFC 7672 matching: DANE-EE ignores names and dates; DANE-TA needs a valid chain and name."""
    usable = [r for r in records if r.usable]
    if not usable:
        return DaneStatus.NONE, "no usable TLSA records"
    if not chain:
        return DaneStatus.MISMATCH, "no certificate presented"
    leaf = chain[0]
    for record in usable:
        if record.usage == 3 and association(leaf, record.selector, record.mtype) == record.data:
            return DaneStatus.MATCH, f"DANE-EE {record.selector} {record.mtype} matches the leaf"
    for record in usable:
        if record.usage != 2:
            continue
        for anchor in chain[1:]:
            if association(anchor, record.selector, record.mtype) != record.data:
                continue
            problem = _chain_to_anchor(leaf, chain[1:], anchor, names, now)
            if problem is None:
                return DaneStatus.MATCH, f"DANE-TA {record.selector} {record.mtype} matches " \
                                         f"{anchor.subject.rfc4514_string()}"
            return DaneStatus.MISMATCH, f"DANE-TA anchor found but {problem}"
    return DaneStatus.MISMATCH, f"none of {len(usable)} TLSA record(s) matches the chain"


def _chain_to_anchor(leaf: x509.Certificate, intermediates: list[x509.Certificate],
                     anchor: x509.Certificate, names: list[str], now: dt.datetime) -> str | None:
    store = Store([anchor])
    last = "no reference name"
    for name in names:
        verifier = PolicyBuilder().store(store).time(now).build_server_verifier(DNSName(name))
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            last = f"the chain does not validate for {name}: {exc}"
            continue
        return None
    return last
