"""Per-domain overrides: what ``decide`` sees of a domain under one, and dates. Pure."""

from __future__ import annotations

import datetime

import pytest

from tlsmilter.core.levels import Level
from tlsmilter.core.overrides import Kind, Override, apply, describe, parse_date
from tlsmilter.core.verdict import Action, DomainStatus, Policy, decide

E, V, D, N = Level.ENCRYPTED, Level.VERIFIED, Level.DANE, Level.NONE
PRIVATE = Policy("private", V, Action.REJECT, Action.TEMPFAIL)
PERSONAL = Policy("personal", E, Action.REJECT, Action.TEMPFAIL)
REQUIRE_DANE = Override("m.test", Kind.REQUIRE, D, "ministry wants DANE")
REQUIRE_ENC = Override("m.test", Kind.REQUIRE, E, "weaker than the policy")
DENY = Override("m.test", Kind.DENY, D, "contract ended")


@pytest.mark.parametrize(
    ("policy", "level", "override", "action", "why"),
    [
        (PRIVATE, D, None, Action.ACCEPT, ""),
        (PRIVATE, D, REQUIRE_DANE, Action.ACCEPT, ""),
        (PRIVATE, V, REQUIRE_DANE, Action.REJECT,
         "assessed verified; this domain requires dane (ministry wants DANE)"),
        (PERSONAL, E, REQUIRE_DANE, Action.REJECT, "requires dane"),
        # a policy stricter than the override still wins
        (PRIVATE, E, REQUIRE_ENC, Action.REJECT, ""),
        (PERSONAL, E, REQUIRE_ENC, Action.ACCEPT, ""),
        (PRIVATE, None, REQUIRE_DANE, Action.TEMPFAIL, ""),  # unknown stays unknown
        (PRIVATE, D, DENY, Action.REJECT, "sensitive mail may not go there (contract ended)"),
        (PRIVATE, None, DENY, Action.REJECT, "contract ended"),  # refused, not retried
        (PRIVATE, N, DENY, Action.REJECT, "contract ended"),
    ],
)
def test_decide_under_an_override(policy: Policy, level: Level | None,
                                  override: Override | None, action: Action, why: str) -> None:
    status = DomainStatus("m.test", level)
    if override is not None:
        status = apply(status, override)
    verdict = decide(policy, [status, DomainStatus("ok.test", D)])
    assert verdict.action is action
    if action is not Action.ACCEPT:
        assert [d.domain for d in verdict.failing] == ["m.test"]
        assert why in verdict.failing[0].why
        assert why in "\n".join(verdict.reply)


def test_require_floors_combine_upwards() -> None:
    once = apply(DomainStatus("m.test", V), REQUIRE_DANE)
    assert apply(once, REQUIRE_ENC).floor is D


@pytest.mark.parametrize(
    ("expires", "today", "expired", "expiring"),
    [
        (None, "2026-12-02", False, False),
        ("2026-12-02", "2026-12-02", False, True),  # applies through its last day
        ("2026-12-01", "2026-12-02", True, False),
        ("2026-12-16", "2026-12-02", False, True),  # 14 days ahead
        ("2026-12-17", "2026-12-02", False, False),
    ],
)
def test_expiry(expires: str | None, today: str, expired: bool, expiring: bool) -> None:
    override = Override("m.test", Kind.DENY, D, "r", parse_date(expires or ""))
    day = datetime.date.fromisoformat(today)
    assert override.expired(day) is expired
    assert override.expiring(day, 14) is expiring


@pytest.mark.parametrize("text", ["2026-13-01", "2026-1-1", "20261201", "tomorrow",
                                  "2026-12-01T00:00", " 2026-12-01"])
def test_bad_dates(text: str) -> None:
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_date(text)


def test_labels() -> None:
    assert (REQUIRE_DANE.label, DENY.label) == ("require-dane", "deny")


@pytest.mark.parametrize(
    ("override", "text"),
    [
        (REQUIRE_DANE, "require dane (ministry wants DANE)"),
        (Override("m.test", Kind.DENY, D, "gone", datetime.date(2026, 12, 31)),
         "deny sensitive mail (gone; until 2026-12-31)"),
        (Override("m.test", Kind.DENY, D, "gone", datetime.date(2026, 12, 1)),
         "deny sensitive mail (gone; expired on 2026-12-01, no longer applied)"),
    ],
)
def test_describe(override: Override, text: str) -> None:
    assert describe(override, datetime.date(2026, 12, 2)) == text
