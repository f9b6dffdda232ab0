"""Facts to level, score and reasons. Pure: no I/O, table-tested.

The level is the weakest over every MX host (a sender may deliver to any of them) and every
address of each host. The score sits inside its level's band and only rewards extras; decisions
never use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlsmilter.assess.model import (
    AddressProbe,
    Code,
    DaneStatus,
    MxFacts,
    Reason,
    Severity,
)
from tlsmilter.core.levels import SCORE_BANDS, UNKNOWN, Level

_VERSIONS = {"SSLv3": 0, "TLSv1": 1, "TLSv1.1": 2, "TLSv1.2": 3, "TLSv1.3": 4}
MIN_VERSIONS = {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}

_TEXT: dict[Code, tuple[Severity, str]] = {
    Code.MX_DNSSEC: (Severity.GOOD, "MX records are DNSSEC-signed and validated"),
    Code.MX_INSECURE: (Severity.INFO, "MX records are not DNSSEC-signed"),
    Code.NULL_MX: (Severity.PROBLEM, "the domain publishes a null MX: it accepts no mail"),
    Code.IMPLICIT_MX: (Severity.INFO, "no MX records: the domain's own address is its mail host"),
    Code.NO_MAIL_HOST: (Severity.PROBLEM, "the domain has no MX and no address: it cannot "
                                          "receive mail"),
    Code.DNS_TEMPFAIL: (Severity.PROBLEM, "DNS lookup failed temporarily (SERVFAIL, bogus "
                                          "DNSSEC or timeout)"),
    Code.TIMEOUT: (Severity.PROBLEM, "the assessment ran out of time"),
    Code.MX_TRUNCATED: (Severity.INFO, "more MX hosts than the configured maximum; the rest "
                                       "were not probed"),
    Code.MTA_STS_ENFORCE: (Severity.GOOD, "MTA-STS policy in enforce mode"),
    Code.MTA_STS_TESTING: (Severity.INFO, "MTA-STS policy in testing mode: authenticates "
                                          "nothing yet"),
    Code.MTA_STS_NONE: (Severity.INFO, "MTA-STS policy in mode none"),
    Code.MTA_STS_FAILED: (Severity.PROBLEM, "MTA-STS record published but the policy could "
                                            "not be used"),
    Code.MTA_STS_NOT_COVERED: (Severity.PROBLEM, "MX host is not covered by the MTA-STS "
                                                 "policy's mx patterns"),
    Code.NO_MTA_STS: (Severity.INFO, "no MTA-STS policy"),
    Code.TLSRPT: (Severity.GOOD, "TLS reporting (TLSRPT) is published"),
    Code.NO_TLSRPT: (Severity.INFO, "no TLS reporting (TLSRPT) record"),
    Code.TLS13_EVERYWHERE: (Severity.GOOD, "every MX negotiates TLS 1.3"),
    Code.TLSA_ROLLOVER_SAFE: (Severity.GOOD, "TLSA records allow a safe key rollover"),
    Code.MX_CNAME: (Severity.INFO, "MX target is a CNAME (RFC 5321 forbids it; it works)"),
    Code.NO_ADDRESS: (Severity.PROBLEM, "MX host has no address"),
    Code.UNREACHABLE: (Severity.PROBLEM, "MX address could not be probed"),
    Code.NO_STARTTLS: (Severity.PROBLEM, "MX does not offer STARTTLS: mail would travel in "
                                         "clear text"),
    Code.TLS_FAILED: (Severity.PROBLEM, "STARTTLS offered but the TLS handshake fails"),
    Code.TLS_VERSION_LOW: (Severity.PROBLEM, "MX negotiates a TLS version below the minimum"),
    Code.CERT_VALID: (Severity.GOOD, "certificate is valid for the MX host name"),
    Code.CERT_UNTRUSTED: (Severity.PROBLEM, "certificate is not issued by a trusted CA"),
    Code.CERT_EXPIRED: (Severity.PROBLEM, "certificate has expired"),
    Code.CERT_NAME_MISMATCH: (Severity.PROBLEM, "certificate does not name the MX host"),
    Code.DANE_MATCH: (Severity.GOOD, "DANE: a DNSSEC-validated TLSA record matches"),
    Code.DANE_MISMATCH: (Severity.PROBLEM, "DANE: DNSSEC-validated TLSA records exist but "
                                           "none matches: delivery would fail"),
    Code.TLSA_INSECURE: (Severity.INFO, "TLSA records are not DNSSEC-validated: ignored"),
    Code.NO_TLSA: (Severity.INFO, "no TLSA records: DANE not deployed"),
}


def reason_texts() -> dict[Code, tuple[Severity, str]]:
    """Every reason code with its severity and text (before any detail is appended)."""
    return dict(_TEXT)


def reason(code: Code, host: str | None = None, detail: str = "") -> Reason:
    severity, text = _TEXT[code]
    return Reason(code, severity, f"{text} ({detail})" if detail else text, host)


@dataclass
class DomainFacts:
    """Everything ``rate`` needs about a domain whose mail hosts were found and probed."""

    mx: list[MxFacts]
    dnssec: bool
    sts_mode: str | None  # a usable policy's mode
    tlsrpt: bool
    min_tls_version: str = "1.2"
    extra_reasons: list[Reason] = field(default_factory=list)


@dataclass(frozen=True)
class Rating:
    level: str  # Level value or UNKNOWN
    score: int | None
    reasons: list[Reason]


def rate_probe(probe: AddressProbe, *, authenticated: bool, dane_applies: bool,
               min_version: str) -> tuple[str, list[Code]]:
    """Level of one MX address, and the codes that explain it."""
    if probe.starttls is None:  # never got past EHLO: says nothing about the server's TLS
        return UNKNOWN, [Code.UNREACHABLE]
    if not probe.starttls:
        return Level.NONE.value, [Code.NO_STARTTLS]
    if probe.tls_version is None:
        return Level.NONE.value, [Code.TLS_FAILED]
    if _VERSIONS.get(probe.tls_version, -1) < _VERSIONS[MIN_VERSIONS[min_version]]:
        return Level.NONE.value, [Code.TLS_VERSION_LOW]
    if dane_applies and probe.dane is DaneStatus.MISMATCH:
        return Level.NONE.value, [Code.DANE_MISMATCH]
    if dane_applies and probe.dane is DaneStatus.MATCH:
        return Level.DANE.value, [Code.DANE_MATCH]
    cert_code = Code.CERT_VALID if probe.pkix_valid else _cert_problem(probe)
    if authenticated and probe.pkix_valid:
        return Level.VERIFIED.value, [cert_code]
    return Level.ENCRYPTED.value, [cert_code]


def _cert_problem(probe: AddressProbe) -> Code:
    error = probe.pkix_error or ""
    for code in (Code.CERT_EXPIRED, Code.CERT_NAME_MISMATCH, Code.CERT_UNTRUSTED):
        if error.startswith(code.value):
            return code
    return Code.CERT_UNTRUSTED


def _probe_detail(code: Code, probe: AddressProbe) -> str:
    """The fact behind ``code``, for the reason text."""
    if code is Code.TLS_VERSION_LOW:
        return probe.tls_version or ""
    if code in (Code.DANE_MATCH, Code.DANE_MISMATCH):
        return probe.dane_detail or ""
    if code in (Code.CERT_EXPIRED, Code.CERT_NAME_MISMATCH, Code.CERT_UNTRUSTED):
        return (probe.pkix_error or "").partition(": ")[2]
    return probe.error or ""


def _weakest(levels: list[str]) -> str:
    known = [Level(v) for v in levels if v != UNKNOWN]
    return min(known).value if known else UNKNOWN


def rate(facts: DomainFacts) -> Rating:
    """Level, score and reasons for a domain whose MX hosts were probed."""
    reasons = list(facts.extra_reasons)
    mx_levels = []
    for mx in facts.mx:
        if mx.address_error and not mx.addresses:
            mx.level = UNKNOWN
            reasons.append(reason(Code.UNREACHABLE, mx.host, mx.address_error))
            mx_levels.append(UNKNOWN)
            continue
        if not mx.addresses:
            reasons.append(reason(Code.NO_ADDRESS, mx.host))
            continue  # senders skip a host without address; it cannot weaken the domain
        dane_applies = facts.dnssec and mx.tlsa_secure
        authenticated = bool(mx.authenticated_by)
        levels = []
        for probe in mx.probes:
            level, codes = rate_probe(probe, authenticated=authenticated,
                                      dane_applies=dane_applies,
                                      min_version=facts.min_tls_version)
            levels.append(level)
            for code in codes:
                detail = _probe_detail(code, probe)
                reasons.append(reason(code, mx.host, f"{probe.address}: {detail}"
                                      if detail else probe.address))
        mx.level = _weakest(levels)
        mx_levels.append(mx.level)
        if mx.tlsa and not mx.tlsa_secure:
            reasons.append(reason(Code.TLSA_INSECURE, mx.host))
        elif facts.dnssec and not mx.tlsa and not mx.tlsa_error:
            reasons.append(reason(Code.NO_TLSA, mx.host))
    level = _weakest(mx_levels)
    reasons = _dedupe(reasons)
    if level == UNKNOWN:
        return Rating(UNKNOWN, None, reasons)
    return Rating(level, score(Level(level), facts), reasons)


def score(level: Level, facts: DomainFacts) -> int:
    """A number inside the level's band, rewarding extras beyond what the level needs."""
    low, high = SCORE_BANDS[level]
    probes = [p for mx in facts.mx for p in mx.probes]
    tls13 = _tls13_everywhere(facts)
    starttls_somewhere = any(p.starttls for p in probes)
    pkix_everywhere = bool(probes) and all(p.pkix_valid for p in probes)
    enforce = facts.sts_mode == "enforce"
    rollover = _tlsa_rollover_safe(facts)
    extras = {
        Level.NONE: [(starttls_somewhere, 10), (facts.dnssec, 6), (facts.tlsrpt, 4)],
        Level.ENCRYPTED: [(tls13, 8), (pkix_everywhere, 6), (facts.tlsrpt, 6),
                          (facts.dnssec or facts.sts_mode is not None, 4)],
        Level.VERIFIED: [(tls13, 8), (facts.tlsrpt, 6), (facts.dnssec and enforce, 6),
                         (pkix_everywhere, 4)],
        Level.DANE: [(tls13, 8), (facts.tlsrpt, 6), (enforce, 6), (rollover, 5)],
    }[level]
    return min(high, low + sum(points for present, points in extras if present))


def _tls13_everywhere(facts: DomainFacts) -> bool:
    probes = [p for mx in facts.mx for p in mx.probes]
    return bool(probes) and all(p.tls_version == "TLSv1.3" for p in probes)


def _tlsa_rollover_safe(facts: DomainFacts) -> bool:
    """Every MX has validated TLSA records that survive a key change without an outage:
    two or more records, or a DANE-TA one."""
    return bool(facts.mx) and all(
        mx.tlsa_secure and (len(mx.tlsa) >= 2 or any(t.startswith("2 ") for t in mx.tlsa))
        for mx in facts.mx)


def domain_reasons(facts: DomainFacts) -> list[Reason]:
    """Domain-wide extras, for the report; the same facts ``score`` rewards."""
    out = []
    if _tls13_everywhere(facts):
        out.append(reason(Code.TLS13_EVERYWHERE))
    if _tlsa_rollover_safe(facts):
        out.append(reason(Code.TLSA_ROLLOVER_SAFE))
    return out


def _dedupe(reasons: list[Reason]) -> list[Reason]:
    seen: set[tuple[Code, str | None, str]] = set()
    out = []
    for r in reasons:
        key = (r.code, r.host, r.text)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out
