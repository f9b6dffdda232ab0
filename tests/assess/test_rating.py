"""Facts to level: table-driven, no network."""

from __future__ import annotations

import pytest

from tlsmilter.assess.model import AddressProbe, Code, DaneStatus, MxFacts
from tlsmilter.assess.rating import DomainFacts, rate, rate_probe
from tlsmilter.core.levels import SCORE_BANDS, UNKNOWN, Level


def probe(**kw: object) -> AddressProbe:
    base: dict[str, object] = {"address": "192.0.2.1", "connected": True, "starttls": True,
                               "tls_version": "TLSv1.3", "pkix_valid": True}
    base.update(kw)
    return AddressProbe(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("p", "authenticated", "dane_applies", "level", "code"),
    [
        (probe(starttls=None, connected=False, temporary=True), True, True, UNKNOWN,
         Code.UNREACHABLE),
        (probe(starttls=False, tls_version=None), True, False, "none", Code.NO_STARTTLS),
        (probe(tls_version=None), True, False, "none", Code.TLS_FAILED),
        (probe(tls_version="TLSv1"), True, False, "none", Code.TLS_VERSION_LOW),
        (probe(tls_version="TLSv1.1"), True, False, "none", Code.TLS_VERSION_LOW),
        (probe(dane=DaneStatus.MISMATCH), True, True, "none", Code.DANE_MISMATCH),
        # a mismatch in TLSA that does not apply (insecure MX) is ignored
        (probe(dane=DaneStatus.MISMATCH, pkix_valid=False,
               pkix_error="cert_untrusted: x"), False, False, "encrypted", Code.CERT_UNTRUSTED),
        (probe(dane=DaneStatus.MATCH, pkix_valid=False, pkix_error="cert_untrusted: x"),
         True, True, "dane", Code.DANE_MATCH),
        (probe(), True, False, "verified", Code.CERT_VALID),
        (probe(), False, False, "encrypted", Code.CERT_VALID),
        (probe(pkix_valid=False, pkix_error="cert_expired: 2020"), True, False, "encrypted",
         Code.CERT_EXPIRED),
        (probe(pkix_valid=False, pkix_error="cert_name_mismatch: x"), True, False, "encrypted",
         Code.CERT_NAME_MISMATCH),
        (probe(tls_version="TLSv1.2"), True, False, "verified", Code.CERT_VALID),
    ],
)
def test_rate_probe(p: AddressProbe, authenticated: bool, dane_applies: bool, level: str,
                    code: Code) -> None:
    got, codes = rate_probe(p, authenticated=authenticated, dane_applies=dane_applies,
                            min_version="1.2")
    assert (got, codes[0]) == (level, code)


def test_min_tls_version_13_demotes_12() -> None:
    got, codes = rate_probe(probe(tls_version="TLSv1.2"), authenticated=True,
                            dane_applies=False, min_version="1.3")
    assert got == "none" and codes == [Code.TLS_VERSION_LOW]


def mx(host: str, *probes: AddressProbe, **kw: object) -> MxFacts:
    facts = MxFacts(host=host, preference=10, addresses=[p.address for p in probes],
                    probes=list(probes))
    for key, value in kw.items():
        setattr(facts, key, value)
    return facts


def facts(*mxs: MxFacts, dnssec: bool = False, sts: str | None = None,
          tlsrpt: bool = False) -> DomainFacts:
    return DomainFacts(mx=list(mxs), dnssec=dnssec, sts_mode=sts, tlsrpt=tlsrpt)


@pytest.mark.parametrize(
    ("domain", "level"),
    [
        # the weakest MX decides
        (facts(mx("a", probe(), authenticated_by=["dnssec"]),
               mx("b", probe(starttls=False, tls_version=None), authenticated_by=["dnssec"]),
               dnssec=True), "none"),
        # the weakest address of one MX decides
        (facts(mx("a", probe(), probe(address="192.0.2.2", pkix_valid=False,
                                      pkix_error="cert_untrusted: self"),
                  authenticated_by=["mta-sts"]), sts="enforce"), "encrypted"),
        # one MX unreachable, the other assessed: the assessed one decides
        (facts(mx("a", probe(starttls=None, temporary=True)), mx("b", probe())), "encrypted"),
        # nothing assessable: unknown, never a level
        (facts(mx("a", probe(starttls=None, temporary=True))), UNKNOWN),
        (facts(mx("a", address_error="SERVFAIL")), UNKNOWN),
        # a host without any address is skipped, it cannot receive mail
        (facts(mx("a"), mx("b", probe(dane=DaneStatus.MATCH), tlsa_secure=True,
                           tlsa=["3 1 1 ab"]), dnssec=True), "dane"),
        # TLSA only counts when DNSSEC covers the MX
        (facts(mx("a", probe(dane=DaneStatus.MATCH), tlsa_secure=True)), "encrypted"),
    ],
)
def test_domain_level_is_the_weakest(domain: DomainFacts, level: str) -> None:
    assert rate(domain).level == level


@pytest.mark.parametrize("level", list(Level))
def test_score_stays_in_band(level: Level) -> None:
    variants = {
        Level.NONE: probe(starttls=False, tls_version=None),
        Level.ENCRYPTED: probe(pkix_valid=False, pkix_error="cert_untrusted: x"),
        Level.VERIFIED: probe(),
        Level.DANE: probe(dane=DaneStatus.MATCH),
    }
    low, high = SCORE_BANDS[level]
    for extras in (False, True):
        m = mx("a", variants[level], authenticated_by=["dnssec"], tlsa_secure=True,
               tlsa=["3 1 1 aa", "3 1 1 bb"])
        result = rate(facts(m, dnssec=True, sts="enforce" if extras else None, tlsrpt=extras))
        assert result.level == level.value
        assert result.score is not None and low <= result.score <= high


def test_extras_raise_the_score_within_a_level() -> None:
    plain = rate(facts(mx("a", probe(tls_version="TLSv1.2"), authenticated_by=["dnssec"]),
                       dnssec=True))
    rich = rate(facts(mx("a", probe(), authenticated_by=["dnssec", "mta-sts"]), dnssec=True,
                      sts="enforce", tlsrpt=True))
    assert plain.level == rich.level == "verified"
    assert plain.score is not None and rich.score is not None and rich.score > plain.score


def test_unknown_has_no_score() -> None:
    assert rate(facts(mx("a", address_error="timeout"))).score is None


def test_every_reason_code_is_documented() -> None:
    from pathlib import Path

    from tlsmilter.assess.model import Code

    doc = (Path(__file__).resolve().parents[2] / "docs" / "check-json.md").read_text()
    missing = [c.value for c in Code if f"`{c.value}`" not in doc]
    assert not missing


@pytest.mark.parametrize(
    ("tlsa_b", "safe"),
    [(["3 1 1 aa", "3 1 1 bb"], True), (["2 0 1 aa"], True), (["3 1 1 aa"], False), ([], False)],
)
def test_rollover_reason_and_score_agree(tlsa_b: list[str], safe: bool) -> None:
    from tlsmilter.assess.rating import domain_reasons

    a = mx("a", probe(dane=DaneStatus.MATCH), tlsa_secure=True, tlsa=["3 1 1 aa", "3 1 1 bb"])
    b = mx("b", probe(address="192.0.2.2", dane=DaneStatus.MATCH), tlsa_secure=bool(tlsa_b),
           tlsa=tlsa_b)
    domain = facts(a, b, dnssec=True)
    codes = {r.code for r in domain_reasons(domain)}
    assert (Code.TLSA_ROLLOVER_SAFE in codes) is safe
    if tlsa_b:  # without TLSA on b the domain is not dane; the score band differs
        assert rate(domain).score == (75 + 8 + (5 if safe else 0))
