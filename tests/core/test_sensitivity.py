"""The combined classifier: every trigger, the strictest policy winning, the trigger named."""

from __future__ import annotations

import pytest

from tlsmilter.core.labels import LabelRules
from tlsmilter.core.levels import Level
from tlsmilter.core.senders import SenderRules
from tlsmilter.core.sensitivity import Facts, Rules, Trigger, classify
from tlsmilter.core.subject import KeywordRules, Match
from tlsmilter.core.verdict import Action, Policy

POLICIES = {
    "personal": Policy("personal", Level.ENCRYPTED, Action.REJECT, Action.TEMPFAIL),
    "private": Policy("private", Level.VERIFIED, Action.REJECT, Action.TEMPFAIL),
    "confidential": Policy("confidential", Level.VERIFIED, Action.REJECT, Action.TEMPFAIL),
    "medical": Policy("medical", Level.DANE, Action.REJECT, Action.TEMPFAIL),
}
LABEL = "f42aa342-8706-4288-bd11-ebb85995028c"
RULES = Rules(
    watched=frozenset({"x-sensitivity"}), values={"private": "private", "normal": ""},
    fail_safe="confidential",
    labels=LabelRules.build({LABEL: "medical"}, {}),
    keywords=KeywordRules.build({"[secure]": "personal", "[dane]": "medical"}, Match.START),
    senders=SenderRules.build({"hr.example.org": "personal"}),
)
LABELLED = f"MSIP_Label_{LABEL}_Enabled=true;\r\n MSIP_Label_{LABEL}_Name=Medisch"


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (Facts(), None),
        (Facts(headers=[("X-Sensitivity", "normal")], subject="hi"), None),
        (Facts(headers=[("X-Sensitivity", "private")]), ("private", "private", Trigger.HEADER)),
        (Facts(label_headers=[LABELLED]), ("medical", LABEL, Trigger.LABEL)),
        (Facts(subject="[secure] x"), ("personal", "[secure]", Trigger.SUBJECT)),
        (Facts(senders=["anna@hr.example.org"]),
         ("personal", "hr.example.org", Trigger.SENDER)),
        # The strictest wins: the label's dane over the header's verified ...
        (Facts(headers=[("X-Sensitivity", "private")], label_headers=[LABELLED]),
         ("medical", LABEL, Trigger.LABEL)),
        # ... a sender rule is a floor, the header's stricter policy stays ...
        (Facts(headers=[("X-Sensitivity", "private")], senders=["a@hr.example.org"]),
         ("private", "private", Trigger.HEADER)),
        # ... and a header saying "normal" does not undo the sender rule.
        (Facts(headers=[("X-Sensitivity", "normal")], senders=["a@hr.example.org"]),
         ("personal", "hr.example.org", Trigger.SENDER)),
        # On a tie the earlier trigger is named.
        (Facts(subject="[secure] x", senders=["a@hr.example.org"]),
         ("personal", "[secure]", Trigger.SUBJECT)),
        (Facts(subject="[dane] x", label_headers=[LABELLED]), ("medical", LABEL, Trigger.LABEL)),
        # Hostile: garbage everywhere still marks nothing, and does not raise.
        (Facts(headers=[("Subject", "private")], label_headers=["\x00" * 100_000],
               subject="=?bogus?=" * 10_000, senders=["", "<>", "@", "\udcff"]), None),
    ],
)
def test_classify(facts: Facts, expected: tuple[str, str, Trigger] | None) -> None:
    marking = classify(facts, RULES, POLICIES)
    if expected is None:
        assert marking is None
    else:
        assert marking is not None
        assert (marking.policy.name, marking.value, marking.trigger) == expected


def test_keywords_found_are_kept_for_stripping_whatever_won() -> None:
    marking = classify(Facts(label_headers=[LABELLED], subject="[secure] x"), RULES, POLICIES)
    assert marking is not None and marking.trigger is Trigger.LABEL
    assert marking.keywords == ("[secure]",)
