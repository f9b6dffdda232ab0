"""The assessment of one domain: typed, JSON-serialisable, documented in docs/check-json.md."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from tlsmilter.core.levels import UNKNOWN

SCHEMA_VERSION = 1


class Code(enum.Enum):
    """Machine reason codes; the value is the stable code, the text is for people."""

    # domain-wide
    MX_DNSSEC = "mx_dnssec"
    MX_INSECURE = "mx_insecure"
    NULL_MX = "null_mx"
    IMPLICIT_MX = "implicit_mx"
    NO_MAIL_HOST = "no_mail_host"
    DNS_TEMPFAIL = "dns_tempfail"
    TIMEOUT = "timeout"
    MX_TRUNCATED = "mx_truncated"
    MTA_STS_ENFORCE = "mta_sts_enforce"
    MTA_STS_TESTING = "mta_sts_testing"
    MTA_STS_NONE = "mta_sts_none"
    MTA_STS_FAILED = "mta_sts_failed"
    MTA_STS_NOT_COVERED = "mta_sts_not_covered"
    NO_MTA_STS = "no_mta_sts"
    TLSRPT = "tlsrpt"
    NO_TLSRPT = "no_tlsrpt"
    TLS13_EVERYWHERE = "tls13_everywhere"
    TLSA_ROLLOVER_SAFE = "tlsa_rollover_safe"
    # per MX host
    MX_CNAME = "mx_cname"
    NO_ADDRESS = "no_address"
    UNREACHABLE = "unreachable"
    NO_STARTTLS = "no_starttls"
    TLS_FAILED = "tls_failed"
    TLS_VERSION_LOW = "tls_version_low"
    CERT_VALID = "cert_valid"
    CERT_UNTRUSTED = "cert_untrusted"
    CERT_EXPIRED = "cert_expired"
    CERT_NAME_MISMATCH = "cert_name_mismatch"
    DANE_MATCH = "dane_match"
    DANE_MISMATCH = "dane_mismatch"
    TLSA_INSECURE = "tlsa_insecure"
    NO_TLSA = "no_tlsa"


class Severity(enum.Enum):
    GOOD = "good"
    INFO = "info"
    PROBLEM = "problem"


@dataclass(frozen=True)
class Reason:
    code: Code
    severity: Severity
    text: str
    host: str | None = None  # the MX host it is about, if any

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.value, "severity": self.severity.value,
                               "text": self.text}
        if self.host:
            out["host"] = self.host
        return out


class DaneStatus(enum.Enum):
    NONE = "none"  # no TLSA records (or no usable ones)
    INSECURE = "insecure"  # TLSA records exist but are not DNSSEC-validated: ignored
    MATCH = "match"
    MISMATCH = "mismatch"
    UNKNOWN = "unknown"  # the TLSA lookup failed temporarily


@dataclass
class AddressProbe:
    """What one MX address did when we spoke SMTP to it."""

    address: str
    connected: bool = False
    starttls: bool | None = None  # None: we never got as far as EHLO
    tls_version: str | None = None  # "TLSv1.3" style, as ssl reports it
    cipher: str | None = None
    chain: list[str] = field(default_factory=list)  # subjects, leaf first (DER kept out of JSON)
    pkix_valid: bool | None = None
    pkix_error: str | None = None
    dane: DaneStatus = DaneStatus.NONE
    dane_detail: str | None = None
    error: str | None = None  # why the probe stopped early
    temporary: bool = False  # the failure may go away (timeout, refused): not evidence of "none"
    duration: float = 0.0


@dataclass
class MxFacts:
    host: str
    preference: int
    canonical: str = ""  # CNAME target when the MX host is an alias
    addresses: list[str] = field(default_factory=list)
    addresses_secure: bool = False
    address_error: str | None = None
    tlsa: list[str] = field(default_factory=list)
    tlsa_secure: bool = False
    tlsa_error: str | None = None
    authenticated_by: list[str] = field(default_factory=list)  # "dnssec", "mta-sts"
    probes: list[AddressProbe] = field(default_factory=list)
    level: str = UNKNOWN


@dataclass
class MtaStsFacts:
    mode: str | None = None  # enforce | testing | none, None when no valid policy
    record_id: str | None = None
    outcome: str = ""
    detail: str = ""
    mx: list[str] = field(default_factory=list)


@dataclass
class Assessment:
    domain: str
    level: str  # a Level value or "unknown"
    score: int | None
    reasons: list[Reason]
    dnssec: bool
    mta_sts: MtaStsFacts | None
    tlsrpt: bool
    mx: list[MxFacts]
    implicit_mx: bool
    null_mx: bool
    assessed_at: str  # ISO 8601 UTC
    duration: float

    def to_json(self) -> dict[str, Any]:
        """The documented ``check --json`` object (docs/check-json.md)."""
        mx = []
        for m in self.mx:
            probes = [_probe_json(p) for p in m.probes]
            mx.append({
                "host": m.host,
                "preference": m.preference,
                "canonical": m.canonical or m.host,
                "addresses": m.addresses,
                "level": m.level,
                "starttls": _all_or_none([p["starttls"] for p in probes]),
                "tls_version": _weakest_version([p["tls_version"] for p in probes]),
                "pkix_valid": _all_or_none([p["pkix_valid"] for p in probes]),
                "dane": _worst_dane([p["dane"] for p in probes]) if probes else "none",
                "authenticated_by": m.authenticated_by,
                "tlsa": m.tlsa,
                "tlsa_secure": m.tlsa_secure,
                "probes": probes,
            })
        return {
            "schema": SCHEMA_VERSION,
            "domain": self.domain,
            "level": self.level,
            "score": self.score,
            "reasons": [r.to_json() for r in self.reasons],
            "dnssec": self.dnssec,
            "mta_sts": self.mta_sts.mode if self.mta_sts else None,
            "mta_sts_detail": asdict(self.mta_sts) if self.mta_sts else None,
            "tlsrpt": self.tlsrpt,
            "implicit_mx": self.implicit_mx,
            "null_mx": self.null_mx,
            "mx": mx,
            "assessed_at": self.assessed_at,
            "duration": round(self.duration, 3),
        }


def _probe_json(p: AddressProbe) -> dict[str, Any]:
    out = asdict(p)
    out["dane"] = p.dane.value
    out["duration"] = round(p.duration, 3)
    return out


def _all_or_none(values: list[Any]) -> bool | None:
    """True only if every probe says True; None if no probe got that far."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    return all(known)


_VERSION_ORDER = ["SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]


def _weakest_version(values: list[str | None]) -> str | None:
    known = [v for v in values if v in _VERSION_ORDER]
    return min(known, key=_VERSION_ORDER.index) if known else None


_DANE_ORDER = ["mismatch", "unknown", "insecure", "none", "match"]


def _worst_dane(values: list[str]) -> str:
    return min(values, key=_DANE_ORDER.index)
