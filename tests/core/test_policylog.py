"""The policy-answer line: formatted by the policy server, parsed back by proof."""

from __future__ import annotations

import pytest

from tlsmilter.core.delivery import PolicyAnswer
from tlsmilter.core.policylog import MAX_REASON, PolicyLine, format_answer, parse


@pytest.mark.parametrize(("answer", "reason"), [
    (PolicyAnswer.DANE_ONLY, ""), (PolicyAnswer.SECURE, ""),
    (PolicyAnswer.TEMP, "tlsmilter cannot vouch for b.example: not assessed (again) yet"),
])
def test_round_trip_behind_any_prefix(answer: PolicyAnswer, reason: str) -> None:
    line = format_answer("tlspolicy-dane", "b.example", answer, reason)
    assert parse(f"2026-12-02T06:10:24+0000 mail tlsmilter[7]: INFO x: {line}\n") == PolicyLine(
        "tlspolicy-dane", "b.example", answer.value, reason)


def test_the_line_stays_bounded_and_on_one_line() -> None:
    line = format_answer("m" * 500, "d" * 500, PolicyAnswer.TEMP, "why\nforged " * 1000)
    assert "\n" not in line and len(line) < 64 + 256 + MAX_REASON + 60
    parsed = parse(line)
    assert parsed is not None and parsed.answer == "temp"


def test_other_lines_carry_no_answer() -> None:
    assert parse("INFO tlsmilter.milter: decision queue_id=A verdict=accept") is None
    assert parse("policy answer map=tlspolicy domain=b.example") is None
