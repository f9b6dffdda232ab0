"""The human report of ``tlsmilter check``: readable in ten seconds."""

from __future__ import annotations

from tlsmilter.assess.model import Assessment, Reason, Severity

_MARK = {Severity.GOOD: "+", Severity.INFO: " ", Severity.PROBLEM: "!"}

_ADVICE = {
    "no_starttls": "enable STARTTLS on every MX",
    "tls_failed": "fix the MX's TLS configuration (certificate/key, protocol versions)",
    "tls_version_low": "allow TLS 1.2 or newer on the MX",
    "cert_untrusted": "use a certificate from a public CA (or publish DANE TLSA records)",
    "cert_expired": "renew the MX certificate",
    "cert_name_mismatch": "use a certificate that names the MX host",
    "dane_mismatch": "update the TLSA records to match the certificate, or the certificate "
                     "to match them",
    "mx_insecure": "sign the zone with DNSSEC, or publish an MTA-STS policy in enforce mode",
    "no_tlsa": "publish TLSA records (DANE) for each MX",
    "mx_insecure_sts": "sign the zone with DNSSEC and publish TLSA records to reach DANE",
    "mta_sts_testing": "move the MTA-STS policy to mode enforce once reports look clean",
    "mta_sts_not_covered": "add the MX host to the MTA-STS policy's mx patterns",
    "mta_sts_failed": "fix the MTA-STS policy host (HTTPS certificate, policy syntax)",
    "no_tlsrpt": "publish a TLSRPT record to receive TLS failure reports",
    "dns_tempfail": "check the domain's DNS servers and DNSSEC signatures",
}


def render(assessment: Assessment) -> str:
    a = assessment
    score = "-" if a.score is None else f"{a.score}/100"
    lines = [f"{a.domain}: {a.level.upper()}  (score {score}, {a.duration:.1f}s)"]
    if a.mx:
        for mx in a.mx:
            versions = sorted({p.tls_version or "no TLS" for p in mx.probes}) or ["not probed"]
            via = f" via {', '.join(mx.authenticated_by)}" if mx.authenticated_by else ""
            lines.append(f"  MX {mx.preference:>3} {mx.host}  [{mx.level}] "
                         f"{', '.join(mx.addresses) or 'no address'}  {'/'.join(versions)}{via}")
    for reason in _ordered(a.reasons):
        where = f" [{reason.host}]" if reason.host else ""
        lines.append(f"  {_MARK[reason.severity]} {reason.text}{where}")
    if a.mta_sts and a.mta_sts.outcome == "cached":
        # RFC 8461 3.3: the policy fetched before still applies; say which, how old, and why.
        lines.append(f"    MTA-STS: {a.mta_sts.detail}")
    codes = dict.fromkeys(r.code.value for r in a.reasons if r.severity is not Severity.GOOD)
    if a.mta_sts and a.mta_sts.mode == "enforce" and "mx_insecure" in codes:
        # Already authenticated by MTA-STS: DNSSEC is the step towards DANE, not an alternative.
        del codes["mx_insecure"]
        codes["mx_insecure_sts"] = None
    fixes = [_ADVICE[code] for code in codes if code in _ADVICE]
    if fixes:
        lines.append("  to improve: " + "; ".join(fixes))
    return "\n".join(lines)


def _ordered(reasons: list[Reason]) -> list[Reason]:
    order = {Severity.PROBLEM: 0, Severity.GOOD: 1, Severity.INFO: 2}
    return sorted(reasons, key=lambda r: order[r.severity])
