"""decide() and sensitivity classification: pure, table-driven."""

from __future__ import annotations

import pytest

from tlsmilter import config
from tlsmilter.core.levels import Level
from tlsmilter.core.sensitivity import classify_sensitivity as classify
from tlsmilter.core.verdict import (
    MAX_EXTRA_LINES,
    MAX_REPLY_LINES,
    Action,
    DomainStatus,
    Policy,
    decide,
    short_reply,
    tag_text,
)
from tlsmilter.daemons.milter import policies_from

E, V, D, N = Level.ENCRYPTED, Level.VERIFIED, Level.DANE, Level.NONE
STRICT = Policy("strict", V, Action.REJECT, Action.TEMPFAIL, ("See https://portal.example",))
SOFT = Policy("soft", E, Action.TAG, Action.QUARANTINE)


def ds(domain: str, level: Level | None, why: str = "") -> DomainStatus:
    return DomainStatus(domain, level, why)


@pytest.mark.parametrize(
    ("policy", "domains", "action", "codes", "failing"),
    [
        (STRICT, [ds("a.test", V), ds("b.test", D)], Action.ACCEPT, ("", ""), []),
        (STRICT, [], Action.ACCEPT, ("", ""), []),
        (STRICT, [ds("a.test", E)], Action.REJECT, ("550", "5.7.10"), ["a.test"]),
        (STRICT, [ds("a.test", None)], Action.TEMPFAIL, ("451", "4.4.3"), ["a.test"]),
        # one insecure and one unknown: the stricter action, both domains named
        (STRICT, [ds("a.test", N), ds("b.test", None), ds("c.test", D)], Action.REJECT,
         ("550", "5.7.10"), ["a.test", "b.test"]),
        (SOFT, [ds("a.test", N)], Action.TAG, ("", ""), ["a.test"]),
        (SOFT, [ds("a.test", None)], Action.QUARANTINE, ("", ""), ["a.test"]),
        (SOFT, [ds("a.test", E)], Action.ACCEPT, ("", ""), []),
        (Policy("t", D, Action.TEMPFAIL, Action.TEMPFAIL), [ds("a.test", V)], Action.TEMPFAIL,
         ("450", "4.7.10"), ["a.test"]),
    ],
)
def test_decide(policy: Policy, domains: list[DomainStatus], action: Action,
                codes: tuple[str, str], failing: list[str]) -> None:
    verdict = decide(policy, domains)
    assert verdict.action is action
    assert (verdict.smtp_code, verdict.enhanced_code) == codes
    assert [d.domain for d in verdict.failing] == failing


def test_reply_names_every_failing_domain_and_why() -> None:
    verdict = decide(STRICT, [ds("a.test", N, "MX does not offer STARTTLS"),
                              ds("b.test", None, "DNS lookup failed")], sensitivity="private")
    text = "\n".join(verdict.reply)
    assert "marked 'private'" in verdict.reply[0]
    assert "a.test: cannot receive mail securely enough: MX does not offer STARTTLS" in text
    assert "b.test: transport security not known yet: DNS lookup failed" in text
    assert verdict.reply[-1] == "See https://portal.example"


@pytest.mark.parametrize("action", [Action.REJECT, Action.TEMPFAIL])
def test_monitor_mode_only_tags(action: Action) -> None:
    policy = Policy("p", V, action, action)
    verdict = decide(policy, [ds("a.test", N)], monitor=True)
    assert verdict.action is Action.TAG
    assert verdict.would_be is action
    assert verdict.smtp_code == ""


POLICIES = policies_from(config.Config())
VALUES = config.Config().sensitivity.values
WATCHED = ["X-Sensitivity", "Sensitivity"]


@pytest.mark.parametrize(
    ("headers", "policy"),
    [
        ([], None),
        ([("Subject", "private")], None),
        ([("X-Sensitivity", "Personal")], "personal"),
        ([("Sensitivity", "Company-Confidential")], "confidential"),
        ([("sensitivity", "  PRIVATE ")], "private"),
        ([("X-Sensitivity", "private (set by Outlook)")], "private"),
        ([("X-Sensitivity", "normal")], None),
        ([("X-Sensitivity", "")], None),
        # unrecognised non-empty value: the fail-safe policy, never "not sensitive"
        ([("X-Sensitivity", "secret-ish")], "confidential"),
        ([("X-Sensitivity", "\u00fcberwichtig")], "confidential"),
        ([("X-Sensitivity", "(confidential)")], "confidential"),  # a comment alone
        ([("X-Sensitivity", '""')], "confidential"),
        ([("X-Sensitivity", " \t ")], None),  # nothing at all: not a value
        # several headers: the strictest wins
        ([("X-Sensitivity", "personal"), ("Sensitivity", "private")], "private"),
        ([("Sensitivity", "private"), ("X-Sensitivity", "personal")], "private"),
        ([("X-Sensitivity", "normal"), ("Sensitivity", "personal")], "personal"),
    ],
)
def test_classify(headers: list[tuple[str, str]], policy: str | None) -> None:
    chosen, _value = classify(headers, watched=WATCHED, values=VALUES,
                              fail_safe="confidential", policies=POLICIES)
    assert (chosen.name if chosen else None) == policy


def test_a_reply_fits_the_milter_protocol_however_many_domains_fail() -> None:
    extra = tuple(f"extra line {i}" for i in range(MAX_EXTRA_LINES))
    policy = Policy("private", Level.VERIFIED, Action.REJECT, Action.TEMPFAIL, extra)
    domains = [DomainStatus(f"d{i}.test", Level.NONE, "MX does not offer STARTTLS")
               for i in range(40)]
    verdict = decide(policy, domains)
    assert len(verdict.reply) == MAX_REPLY_LINES
    assert verdict.reply[-MAX_EXTRA_LINES:] == extra  # the configured lines always survive
    named = [line for line in verdict.reply if line.startswith("d")]
    assert named == [f"d{i}.test: cannot receive mail securely enough: MX does not offer "
                     f"STARTTLS" for i in range(len(named))]
    hidden = 40 - len(named)
    assert verdict.reply[-MAX_EXTRA_LINES - 1] == (
        f"... and {hidden} more recipient domains fall short too")
    assert len(verdict.failing) == 40  # the log and metrics still get every one
    assert len(decide(policy, domains[:23]).reply) == MAX_REPLY_LINES  # exactly fits


# -- replies built from hostile input (issue 12) ---------------------------------------------


def test_a_huge_sensitivity_value_still_makes_a_short_safe_reply() -> None:
    verdict = decide(STRICT, [ds("a.test", N)], sensitivity="private\r\n" + "x" * 70_000)
    assert verdict.smtp_code == "550"
    assert "marked 'private\\x0d\\x0axxx" in verdict.reply[0]
    for line in verdict.reply:
        assert line.isascii() and line.isprintable() and len(line) <= 490


def test_names_with_control_bytes_and_idns_are_shown_safely() -> None:
    verdict = decide(STRICT, [ds("evil\r\n550 ok.test", N, "bad name\x00"),
                              ds("bücher.test", N)])
    text = "\n".join(verdict.reply)
    assert "evil\\x0d\\x0a550 ok.test: cannot receive mail securely enough: bad name\\x00" in text
    assert "xn--bcher-kva.test" in text
    assert all(line.isprintable() for line in verdict.reply)


def test_the_short_reply_keeps_the_meaning() -> None:
    rejected = decide(STRICT, [ds("a.test", N)])
    unknown = decide(STRICT, [ds("a.test", None)])
    assert "not secure enough" in short_reply(rejected)
    assert "not known yet" in short_reply(unknown)


@pytest.mark.parametrize(("domains", "text"), [
    ([ds("a.test", N)], "insecure: a.test (would reject)"),
    ([ds("a.test", None)], "unknown: a.test (would tempfail)"),
    ([ds("a.test", N), ds("b.test", None)], "insecure: a.test; unknown: b.test (would reject)"),
])
def test_monitor_mode_tags_unknown_domains_as_unknown(domains: list[DomainStatus],
                                                      text: str) -> None:
    assert tag_text(decide(STRICT, domains, monitor=True)) == text


def test_the_tag_names_a_bounded_number_of_domains() -> None:
    many = [ds(f"d{i}.test", N) for i in range(500)]
    text = tag_text(decide(STRICT, many, monitor=True))
    assert text.endswith("and 480 more (would reject)") and len(text) < 400
