"""The prober against the real lab: Knot, Unbound, SMTP and HTTPS servers on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab.lab import Lab
from tlsmilter import config
from tlsmilter.assess import prober as prober_module
from tlsmilter.assess.model import Assessment
from tlsmilter.assess.mtasts import CachedPolicy, Mode, Policy
from tlsmilter.assess.prober import Prober
from tlsmilter.store.stsfile import FILE_NAME as STS_FILE
from tlsmilter.store.stsfile import load_policies, save_policies

pytestmark = pytest.mark.lab

FAST = {"connect": 2, "smtp": 2, "tls": 2, "https": 2, "domain": 10}


def settings(lab: Lab, **timeouts: float) -> config.ProberSettings:
    return config.from_mapping({"prober": {
        "resolver": lab.resolver, "ca_file": str(lab.ca.ca_file),
        "ehlo_name": "prober.lab.invalid", "timeouts": {**FAST, **timeouts},
    }}).prober


@pytest.fixture(scope="module")
def assessed(lab: Lab) -> dict[str, dict[str, Any]]:
    """Every scenario assessed once, concurrently, as ``check --json`` would print it."""
    async def run() -> list[Assessment]:
        return await Prober(settings(lab)).assess_many(lab.domain(n) for n in lab.scenarios)
    return {a.domain.split(".")[0]: a.to_json() for a in asyncio.run(run())}


def reason_codes(result: dict[str, Any]) -> set[str]:
    return {r["code"] for r in result["reasons"]}


# scenario, level, reason codes that must be present, facts (top-level or of the first MX)
CASES = [
    ("plain", "none", {"no_starttls"}, {"starttls": False, "dnssec": False}),
    ("tls10", "none", {"tls_version_low"}, {"tls_version": "TLSv1"}),
    ("broken-tls", "none", {"tls_failed"}, {"starttls": True, "tls_version": None}),
    ("self-signed", "encrypted", {"cert_untrusted"}, {"pkix_valid": False}),
    ("expired", "encrypted", {"cert_expired", "mx_dnssec"}, {"pkix_valid": False,
                                                             "dnssec": True}),
    ("wrong-name", "encrypted", {"cert_name_mismatch"}, {"pkix_valid": False}),
    ("ca-unauth", "encrypted", {"cert_valid", "mx_insecure"}, {"pkix_valid": True,
                                                               "dnssec": False}),
    ("sts-enforce", "verified", {"mta_sts_enforce", "tlsrpt"}, {"mta_sts": "enforce",
                                                                "tlsrpt": True}),
    ("sts-wildcard", "verified", {"mta_sts_enforce"}, {"authenticated_by": ["mta-sts"]}),
    ("sts-uncovered", "encrypted", {"mta_sts_not_covered"}, {"mta_sts": "enforce"}),
    ("sts-testing", "encrypted", {"mta_sts_testing"}, {"mta_sts": "testing",
                                                       "authenticated_by": []}),
    ("dnssec-ca", "verified", {"mx_dnssec", "cert_valid", "no_tlsa"},
     {"dnssec": True, "tls_version": "TLSv1.3", "authenticated_by": ["dnssec"]}),
    ("dnssec-tls12", "verified", {"cert_valid"}, {"tls_version": "TLSv1.2"}),
    ("dane-ee", "dane", {"dane_match"}, {"dane": "match", "pkix_valid": False,
                                         "tlsa_secure": True}),
    ("dane-ee-full", "dane", {"dane_match"}, {"dane": "match", "pkix_valid": False}),
    ("dane-ta", "dane", {"dane_match"}, {"dane": "match", "pkix_valid": True}),
    ("dane-ta-wrong-name", "none", {"dane_mismatch"}, {"dane": "mismatch"}),
    ("dane-mismatch", "none", {"dane_mismatch"}, {"dane": "mismatch"}),
    ("dane-unsigned", "encrypted", {"mx_insecure"}, {"dane": "none", "tlsa_secure": False}),
    ("dane-full", "dane", {"dane_match", "mta_sts_enforce", "tls13_everywhere"},
     {"score": 100}),
    ("two-mx", "none", {"no_starttls", "cert_valid"}, {}),
    ("cname-mx", "verified", {"mx_cname"}, {"canonical": "real-mx1.cname-mx.test"}),
    ("null-mx", "none", {"null_mx"}, {"null_mx": True, "mx": []}),
    ("implicit", "verified", {"implicit_mx", "mx_dnssec"}, {"implicit_mx": True,
                                                            "host": "implicit.test"}),
    ("no-host", "none", {"no_mail_host"}, {}),
    ("bogus", "unknown", {"dns_tempfail"}, {"score": None}),
    ("hang", "unknown", {"unreachable"}, {"starttls": None}),
    ("hang-second", "verified", {"unreachable", "cert_valid"}, {}),
]


def test_every_scenario_has_a_case(lab: Lab) -> None:
    # The delivery tests' own domains, which they change at run time, have no case here.
    delivery_only = {"degrades", "falls", "sts-blocked", "dane-falls"}
    assert {c[0] for c in CASES} | delivery_only == set(lab.scenarios)


@pytest.mark.parametrize(("scenario", "level", "codes", "facts"), CASES, ids=[c[0] for c in CASES])
def test_scenario(assessed: dict[str, dict[str, Any]], scenario: str, level: str,
                  codes: set[str], facts: dict[str, Any]) -> None:
    result = assessed[scenario]
    assert result["level"] == level, result["reasons"]
    assert codes <= reason_codes(result), reason_codes(result)
    for key, expected in facts.items():
        where = result if key in result else result["mx"][0]
        assert where[key] == expected, (key, where)


def test_two_mx_reports_each_host(assessed: dict[str, dict[str, Any]]) -> None:
    mx = {m["host"]: m for m in assessed["two-mx"]["mx"]}
    assert mx["mx1.two-mx.test"]["level"] == "verified"
    assert mx["mx2.two-mx.test"]["level"] == "none"


def test_score_is_inside_the_level_band(assessed: dict[str, dict[str, Any]]) -> None:
    bands = {"none": (0, 24), "encrypted": (25, 49), "verified": (50, 74), "dane": (75, 100)}
    for name, result in assessed.items():
        if result["level"] == "unknown":
            assert result["score"] is None
        else:
            low, high = bands[result["level"]]
            assert low <= result["score"] <= high, name


def test_probe_records_chain_and_cipher(assessed: dict[str, dict[str, Any]]) -> None:
    probe = assessed["dane-ta"]["mx"][0]["probes"][0]
    assert probe["cipher"]
    assert probe["chain"] == ["CN=mx1.dane-ta.test", "CN=tlsmilter lab root CA"]


def test_mta_sts_policy_fetched_through_the_lab(lab: Lab,
                                                assessed: dict[str, dict[str, Any]]) -> None:
    # The MTA-STS host exists only in the lab's DNS: a fetch proves the configured resolver
    # was used, and the lab CA (not the system store) was trusted for HTTPS.
    assert lab.https["sts-enforce.test"].request_count >= 1
    assert assessed["sts-enforce"]["mta_sts_detail"]["mx"] == ["mx1.sts-enforce.test"]


def test_hanging_domain_costs_at_most_its_budget(lab: Lab) -> None:
    prober = Prober(settings(lab, smtp=30, domain=1.5))
    started = time.monotonic()
    result = asyncio.run(prober.assess(lab.domain("hang")))
    elapsed = time.monotonic() - started
    assert result.level == "unknown"
    assert [r.code.value for r in result.reasons] == ["timeout"]
    assert elapsed < 1.5 + 1.0  # the budget, plus scheduling slack on a loaded machine


def test_probes_never_overlap_on_one_address(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    spans: list[tuple[float, float]] = []
    real_probe = prober_module.probe_address

    async def timed_probe(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return await real_probe(*args, **kwargs)
        finally:
            spans.append((started, time.monotonic()))

    monkeypatch.setattr(prober_module, "probe_address", timed_probe)

    async def run() -> list[Assessment]:
        return await Prober(settings(lab)).assess_many([lab.domain("dnssec-ca")] * 4)

    results = asyncio.run(run())
    assert {r.level for r in results} == {"verified"}
    assert len(spans) == 4
    spans.sort()
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans)), spans


def test_check_cli_json(lab: Lab) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tlsmilter.cli", "check", "--json", "--resolver", lab.resolver,
         "--ca-file", str(lab.ca.ca_file), "--timeout", "10",
         lab.domain("dane-ee"), lab.domain("plain")],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr  # some domain rated none
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["domain"] for d in lines] == ["dane-ee.test", "plain.test"]
    for d in lines:
        assert {"domain", "level", "score", "reasons", "dnssec", "mta_sts", "mx",
                "assessed_at"} <= set(d)
        for mx in d["mx"]:
            assert {"host", "addresses", "starttls", "tls_version", "pkix_valid",
                    "dane"} <= set(mx)
    assert [d["level"] for d in lines] == ["dane", "none"]


def test_check_cli_human_report(lab: Lab) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tlsmilter.cli", "check", "--resolver", lab.resolver,
         "--ca-file", str(lab.ca.ca_file), lab.domain("sts-testing")],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    first, *rest = done.stdout.splitlines()
    assert first.startswith("sts-testing.test: ENCRYPTED")
    assert any("testing mode" in line for line in rest)
    assert rest[-1].startswith("  to improve: ")


def test_check_shows_the_policy_serve_cached_and_its_age(lab: Lab, tmp_path: Path) -> None:
    # serve saved sts-enforce.test's policy two minutes ago; its id is still the current one,
    # so check applies the cached policy (RFC 8461 3.3) without fetching, and says so.
    domain = lab.domain("sts-enforce")
    state = tmp_path / "state"
    state.mkdir()
    cached = CachedPolicy("20261122T000000", Policy(Mode.ENFORCE, 86400, (f"mx1.{domain}",)),
                          time.time() - 120)
    save_policies(state / STS_FILE, [(domain, cached)])
    conf = tmp_path / "tlsmilter.toml"
    conf.write_text(f'[cache]\nstate_dir = "{state}"\n')
    https = lab.https[domain]
    fetches = https.request_count
    done = subprocess.run(
        [sys.executable, "-m", "tlsmilter.cli", "--config", str(conf), "check", "--resolver",
         lab.resolver, "--ca-file", str(lab.ca.ca_file), domain],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{domain}: VERIFIED"), done.stdout
    assert re.search(r"MTA-STS: cached policy id 20261122T000000, mode enforce, max_age 86400, "
                     r"fetched 1[12]\d s ago \(id unchanged\)", done.stdout), done.stdout
    assert https.request_count == fetches
    assert load_policies(state / STS_FILE) == [(domain, cached)]  # read, never rewritten
