"""The decision line stays short and parsable whatever the sender sends (issue 12)."""

from __future__ import annotations

from tlsmilter.core.decisionlog import format_decision, format_fail_safe, parse
from tlsmilter.core.levels import Level
from tlsmilter.core.verdict import Action, DomainStatus, Policy, decide

STRICT = Policy("private", Level.VERIFIED, Action.REJECT, Action.TEMPFAIL)


def test_a_huge_sensitivity_value_is_capped() -> None:
    value = "x\r\n " * 20_000
    verdict = decide(STRICT, [DomainStatus("a.test", Level.NONE)], sensitivity=value)
    line = format_decision("4Q1", value, [DomainStatus("a.test", Level.NONE)], verdict, {})
    decision = parse(line)
    assert decision is not None and decision.verdict == "reject"
    assert len(decision.sensitivity) == 256 and decision.sensitivity.endswith("...")
    assert len(format_fail_safe("4Q1", value)) < 400


def test_thousands_of_recipients_make_one_short_line() -> None:
    statuses = [DomainStatus(f"ok{i}.test", Level.DANE) for i in range(4990)]
    statuses += [DomainStatus(f"weak{i}.test", Level.NONE) for i in range(10)]
    verdict = decide(STRICT, statuses)
    line = format_decision("4Q1", "private", statuses, verdict,
                           {d.domain: "no_starttls" for d in verdict.failing})
    decision = parse(line)
    assert decision is not None and len(line) < 2000
    assert decision.omitted == 4980
    # every failing domain is named while there are at most 20 of them
    assert decision.failing == tuple(f"weak{i}.test" for i in range(10))
    assert set(decision.reasons.values()) == {"no_starttls"} and len(decision.levels) == 20


def test_a_short_list_is_whole_and_in_order() -> None:
    statuses = [DomainStatus("b.test", Level.DANE), DomainStatus("a.test", Level.NONE)]
    line = format_decision("4Q1", "private", statuses, decide(STRICT, statuses), {})
    assert "domains=b.test:dane,a.test:none failing=a.test" in line and "omitted" not in line


def test_the_trigger_is_written_and_read_back() -> None:
    statuses = [DomainStatus("a.test", Level.NONE)]
    for trigger in ("header", "label", "subject", "sender"):
        line = format_decision("4Q1", "k", statuses, decide(STRICT, statuses), {}, trigger)
        decision = parse(line)
        assert decision is not None and decision.trigger == trigger, line
        assert decision.sensitivity == "k" and decision.policy == "private"
        fail_safe = parse(format_fail_safe("4Q2", "private", trigger))
        assert fail_safe is not None and fail_safe.trigger == trigger
        assert fail_safe.internal_error


def test_a_line_from_before_triggers_still_parses() -> None:
    old = ("Dec  1 10:00:00 mx tlsmilter[1]: decision queue_id=4Q1 sensitivity=private "
           "policy=private require=verified verdict=reject domains=a.test:none "
           "failing=a.test reasons=a.test:no_starttls")
    decision = parse(old)
    assert decision is not None
    assert (decision.trigger, decision.verdict, decision.failing) == ("", "reject", ("a.test",))
    assert decision.reasons == {"a.test": "no_starttls"}


def test_overrides_are_written_and_read_back_bounded() -> None:
    statuses = [DomainStatus(f"d{i}.test", Level.DANE) for i in range(30)]
    line = format_decision("4Q1", "private", statuses, decide(STRICT, statuses), {}, "header",
                           {f"d{i}.test": "require-dane" for i in range(30)})
    decision = parse(line)
    assert decision is not None and decision.verdict == "accept"
    assert len(decision.overrides) == 20
    assert set(decision.overrides.values()) == {"require-dane"}
    assert parse(format_decision("4Q1", "p", statuses, decide(STRICT, statuses), {})
                 ).overrides == {}  # type: ignore[union-attr]
