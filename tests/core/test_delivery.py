"""core.delivery: the Postfix TLS policy that enforces each assessed level, and lookup keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from tests.fakes import FALLBACK, VERIFY, mx, sts_only
from tlsmilter.assess.model import Assessment, MtaStsFacts, MxFacts
from tlsmilter.core.delivery import (
    DomainPolicy,
    PolicyAnswer,
    PolicyMap,
    answer,
    answer_overridden,
    normalize_key,
    policy_for,
    policy_maps,
)
from tlsmilter.core.levels import Level
from tlsmilter.core.overrides import Kind as OverrideKind
from tlsmilter.core.overrides import Override


@pytest.mark.parametrize(("assessment", "policy"), [
    pytest.param({"level": "dane", "dnssec": True}, "dane-only", id="dane"),
    pytest.param({"level": "encrypted", "dnssec": False}, "encrypt", id="encrypted"),
    pytest.param({"level": "encrypted", "dnssec": True, "mta_sts": "enforce"}, "encrypt",
                 id="encrypted-despite-auth"),
    pytest.param({"level": "verified", "dnssec": True, "mta_sts": None,
                  "mx": [mx("mx.example.com", "dnssec")]}, VERIFY, id="verified-dnssec"),
    pytest.param({"level": "verified", "dnssec": True, "mta_sts": "enforce",
                  "mx": [mx("mx.example.com", "dnssec", "mta-sts")]}, VERIFY,
                 id="verified-dnssec-and-sts"),
    pytest.param(sts_only(mx("mx1.example.com", "mta-sts"), mx("mx2.example.com", "mta-sts")),
                 "secure match=mx1.example.com:mx2.example.com servername=hostname",
                 id="verified-sts-pins-mx-hosts"),
    pytest.param(sts_only(mx("MX1.Example.COM.", "mta-sts"), mx("mx1.example.com", "mta-sts")),
                 "secure match=mx1.example.com servername=hostname",
                 id="verified-sts-normalised-deduplicated"),
    pytest.param(sts_only(mx("mx1.example.com", "mta-sts"), mx("backup.example.net")),
                 "secure match=mx1.example.com servername=hostname",
                 id="verified-sts-only-authenticated-hosts"),
    pytest.param(sts_only(mx("a b.example.com", "mta-sts"), mx("x:y.example.com", "mta-sts"),
                          {"host": 7, "authenticated_by": ["mta-sts"]},
                          mx("ok.example.com", "mta-sts")),
                 "secure match=ok.example.com servername=hostname",
                 id="verified-sts-unsafe-names-dropped"),
    pytest.param(sts_only(), FALLBACK, id="verified-sts-no-hosts"),
    pytest.param(sts_only(mx("mx1.example.com", "mta-sts"), mode="testing"), FALLBACK,
                 id="verified-testing-inconsistent"),
    pytest.param({"level": "verified", "dnssec": "true", "mx": []}, FALLBACK,
                 id="verified-dnssec-not-a-bool"),
    pytest.param({"level": "verified", "dnssec": False, "mta_sts": "enforce", "mx": "junk"},
                 FALLBACK, id="verified-mx-not-a-list"),
    pytest.param({"level": "none", "dnssec": True}, None, id="none"),
    pytest.param({"level": "unknown", "dnssec": False}, None, id="unknown"),
    pytest.param({"dnssec": True}, None, id="level-missing"),
    pytest.param({"level": "DANE"}, None, id="level-unrecognised"),
    pytest.param({}, None, id="empty"),
    pytest.param(None, None, id="no-assessment"),
])
def test_policy_for(assessment: Mapping[str, Any] | None, policy: str | None) -> None:
    assert policy_for(assessment) == policy


def test_policy_for_real_assessment_json() -> None:
    """The shape ``Assessment.to_json`` really produces, MTA-STS only."""
    mxs = [MxFacts(host="mx2.example.org", preference=20, authenticated_by=["mta-sts"]),
           MxFacts(host="mx1.example.org", preference=10, authenticated_by=["mta-sts"])]
    sts = MtaStsFacts(mode="enforce", mx=["*.example.org"])
    assessment = Assessment(
        domain="example.org", level="verified", score=60, reasons=[], dnssec=False,
        mta_sts=sts, tlsrpt=False, mx=mxs, implicit_mx=False, null_mx=False,
        assessed_at="2025-01-01T00:00:00Z", duration=1.0)
    assert policy_for(assessment.to_json()) == (
        "secure match=mx2.example.org:mx1.example.org servername=hostname")


@pytest.mark.parametrize(("key", "domain"), [
    ("example.com", "example.com"),
    ("Example.COM.", "example.com"),
    ("example.com:25", "example.com"),
    ("example.com:smtp", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("example.com:587", None),
    ("[mx.example.com]", None),
    ("[mx.example.com]:25", None),
    ("[192.0.2.1]", None),
    ("192.0.2.1", None),
    (".example.com", None),
    ("", None),
    ("two words", None),
    ("a..b", None),
])
def test_normalize_key(key: str, domain: str | None) -> None:
    assert normalize_key(key) == domain


# --- the maps and the whole answer -------------------------------------------------------------

MAPS = policy_maps("tlspolicy")
PLAIN, STRICT = MAPS["tlspolicy"], MAPS["tlspolicy-strict"]
ENCRYPTED, VERIFIED, DANE = (MAPS[f"tlspolicy-{level}"] for level in
                             ("encrypted", "verified", "dane"))


def test_the_maps_are_named_after_the_configured_one() -> None:
    assert set(policy_maps("tp")) == {"tp", "tp-strict", "tp-encrypted", "tp-verified",
                                      "tp-dane"}
    assert not PLAIN.strict and STRICT.strict and STRICT.required is None
    assert [m.required for m in (ENCRYPTED, VERIFIED, DANE)] == [
        Level.ENCRYPTED, Level.VERIFIED, Level.DANE]


DNSSEC_VERIFIED = {"level": "verified", "dnssec": True}
BELOW = "TEMP tlsmilter: x.test is assessed {} now, below the {} this message requires"
VOUCH = "TEMP tlsmilter cannot vouch for x.test: {}"


@pytest.mark.parametrize(("assessment", "policy_map", "expected"), [
    # the plain map: the assessed level, NOTFOUND where tlsmilter cannot vouch
    ({"level": "dane"}, PLAIN, (PolicyAnswer.DANE_ONLY, "OK dane-only")),
    ({"level": "none"}, PLAIN, (PolicyAnswer.NOTFOUND, "NOTFOUND ")),
    (None, PLAIN, (PolicyAnswer.NOTFOUND, "NOTFOUND ")),
    # strict: TEMP instead, naming why
    ({"level": "encrypted"}, STRICT, (PolicyAnswer.ENCRYPT, "OK encrypt")),
    ({"level": "unknown"}, STRICT, (PolicyAnswer.TEMP, VOUCH.format("assessed unknown"))),
    (None, STRICT, (PolicyAnswer.TEMP, VOUCH.format("not assessed (again) yet"))),
    # by required level: what is at least that level is enforced as assessed ...
    ({"level": "encrypted"}, ENCRYPTED, (PolicyAnswer.ENCRYPT, "OK encrypt")),
    (DNSSEC_VERIFIED, ENCRYPTED, (PolicyAnswer.VERIFY, f"OK {VERIFY}")),
    (DNSSEC_VERIFIED, VERIFIED, (PolicyAnswer.VERIFY, f"OK {VERIFY}")),
    ({"level": "dane"}, VERIFIED, (PolicyAnswer.DANE_ONLY, "OK dane-only")),
    ({"level": "dane"}, DANE, (PolicyAnswer.DANE_ONLY, "OK dane-only")),
    # ... and what fell below it defers, naming the domain and both levels
    ({"level": "encrypted"}, VERIFIED, (PolicyAnswer.TEMP, BELOW.format("encrypted",
                                                                         "verified"))),
    (DNSSEC_VERIFIED, DANE, (PolicyAnswer.TEMP, BELOW.format("verified", "dane"))),
    ({"level": "encrypted"}, DANE, (PolicyAnswer.TEMP, BELOW.format("encrypted", "dane"))),
    ({"level": "none"}, VERIFIED, (PolicyAnswer.TEMP, VOUCH.format("assessed none"))),
    (None, DANE, (PolicyAnswer.TEMP, VOUCH.format("not assessed (again) yet"))),
])
def test_answer(assessment: Mapping[str, Any] | None, policy_map: PolicyMap,
                expected: tuple[PolicyAnswer, str]) -> None:
    assert answer("x.test", assessment, policy_map) == expected


@pytest.mark.parametrize("level", ["none", "encrypted", "verified", "dane", "unknown", None])
@pytest.mark.parametrize("name", sorted(MAPS))
def test_no_map_answers_weaker_than_it_requires(level: str | None, name: str) -> None:
    assessment = None if level is None else {"level": level, "dnssec": True}
    counted, reply = answer("x.test", assessment, MAPS[name])
    required = MAPS[name].required
    if required is not None and counted is not PolicyAnswer.TEMP:
        assert level is not None and Level(level) >= required, (name, level, reply)
    if MAPS[name].strict:
        assert counted is not PolicyAnswer.NOTFOUND


_DANE = Override("m.test", OverrideKind.REQUIRE, Level.DANE, "ministry\r\nwants DANE")
_DENY = Override("m.test", OverrideKind.DENY, Level.DANE, "gone")
_MAPS = policy_maps("tlspolicy")


@pytest.mark.parametrize(
    ("level", "policy", "override", "map_name", "expected"),
    [
        ("verified", "secure", _DANE, "tlspolicy-strict", "TEMP tlsmilter: m.test is assessed "
         "verified now, below the dane its override requires (ministry??wants DANE)"),
        ("verified", "secure", _DANE, "tlspolicy-encrypted", "TEMP tlsmilter: m.test is "
         "assessed verified now, below the dane its override requires"),
        ("dane", "dane-only", _DANE, "tlspolicy-verified", "OK dane-only"),
        ("verified", "secure", _DANE, "tlspolicy", "OK secure"),  # all mail: unchanged
        (None, None, _DANE, "tlspolicy-strict", "TEMP tlsmilter cannot vouch for m.test: "
         "not assessed (again) yet"),
        ("dane", "dane-only", _DENY, "tlspolicy-dane", "TEMP tlsmilter: sensitive mail to "
         "m.test is denied by override (gone)"),
        ("dane", "dane-only", _DENY, "tlspolicy", "OK dane-only"),
        ("encrypted", "encrypt", None, "tlspolicy-strict", "OK encrypt"),
    ],
)
def test_answers_under_an_override(level: str | None, policy: str | None,
                                   override: Override | None, map_name: str,
                                   expected: str) -> None:
    known = None if level is None else DomainPolicy(
        level, policy, None if policy is None else PolicyAnswer(policy.split()[0]))
    _counted, reply = answer_overridden("m.test", known, _MAPS[map_name], override)
    assert reply.startswith(expected)
