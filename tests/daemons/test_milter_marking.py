"""Each way of marking mail, through the milter's callbacks (pymilter's test context).

The matching itself is tested in tests/core; here: the glue gathers what it needs (labels,
Subject, envelope sender, From:), applies the result (refused or routed, the Subject's keyword
stripped) and names the trigger in the decision line and the assessment header. Through real
Postfix: tests/daemons/test_e2e_marking.py.
"""

from __future__ import annotations

from typing import Any

import Milter
import pytest
from Milter import testctx

from tests.daemons.test_milter import make_engine, send
from tlsmilter import config
from tlsmilter.core.decisionlog import parse
from tlsmilter.daemons.milter import ASSESSMENT_HEADER, ROUTE_HEADER, LiveConfig, TlsMilter

__all__ = ["make_engine"]  # the fixture, imported to be used here

LABEL = "f42aa342-8706-4288-bd11-ebb85995028c"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
MSIP = (f"MSIP_Label_{LABEL}_Enabled=true;\r\n MSIP_Label_{LABEL}_SetDate=2024-03-01T09:12:44Z;"
        f"\r\n MSIP_Label_{LABEL}_Method=Privileged;\r\n MSIP_Label_{LABEL}_Name=Confidential;"
        f"\r\n MSIP_Label_{LABEL}_SiteId={TENANT};\r\n MSIP_Label_{LABEL}_ContentBits=0")

SETTINGS = config.from_mapping({"sensitivity": {
    "labels": {LABEL: "private"},
    "subject_keywords": {"[secure]": "private"},
    "strip_subject_keyword": True,
    "senders": {"hr.example.org": "personal"},
    "sender_from_header": True,
}})
BY_ENVELOPE = config.from_mapping({"sensitivity": {"senders": {"example.org": "personal"}}})


@pytest.mark.parametrize(
    ("settings", "headers", "trigger", "value"),
    [
        (SETTINGS, [("Subject", "hi"), ("msip_labels", MSIP)], "label", LABEL),
        (SETTINGS, [("Subject", "=?UTF-8?Q?=5BSecure=5D_loonstrook?=")], "subject", "[secure]"),
        (SETTINGS, [("From", "HR <payroll@hr.example.org>"), ("Subject", "x")], "sender",
         "hr.example.org"),
        (BY_ENVELOPE, [("Subject", "unmarked")], "sender", "example.org"),
        (SETTINGS, [("X-Sensitivity", "private")], "header", "private"),
    ],
)
def test_each_trigger_refuses_a_weak_domain_and_routes_a_strong_one(
        make_engine: Any, caplog: pytest.LogCaptureFixture, settings: config.Config,
        headers: list[tuple[str, str]], trigger: str, value: str) -> None:
    engine, _ = make_engine(settings)
    with caplog.at_level("INFO", logger="tlsmilter.milter"):
        refused, _ctx = send(engine, settings, ["<a@plain.test>"], headers)
        accepted, ctx = send(engine, settings, ["<a@dane.test>"], headers)
    assert refused == Milter.REJECT
    assert accepted == Milter.ACCEPT
    assert ctx._msg[ROUTE_HEADER] in ("verified", "encrypted")
    assert ctx._msg[ASSESSMENT_HEADER].endswith(f"; trigger={trigger}")
    lines = [parse(r.getMessage()) for r in caplog.records]
    decided = [d for d in lines if d is not None]
    assert [(d.verdict, d.trigger, d.sensitivity) for d in decided] == [
        ("reject", trigger, value), ("accept", trigger, value)]


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([("Subject", "hi")], "nothing marks it"),
        ([("msip_labels", MSIP.replace("Enabled=true", "Enabled=false"))], "label removed"),
        ([("msip_labels", MSIP.replace(LABEL, "11111111-2222-4333-8444-555555555555"))],
         "another label"),
        ([("Subject", "payslips [secure]")], "keyword not at the start"),
        ([("From", "someone@example.org")], "From: not a sender rule"),
        ([("msip_labels", "\x00" * 50_000), ("Subject", "=?bogus?Q?" + "=FF" * 10_000)],
         "garbage"),
    ],
)
def test_unmarked_mail_passes_untouched(make_engine: Any, headers: list[tuple[str, str]],
                                        why: str) -> None:
    engine, _ = make_engine(SETTINGS)
    rc, ctx = send(engine, SETTINGS, ["<a@plain.test>"], headers)
    assert rc == Milter.ACCEPT, why
    assert not ctx._headerschanged, why


def test_the_keyword_is_stripped_from_delivered_mail_only_where_configured(
        make_engine: Any) -> None:
    engine, _ = make_engine(SETTINGS)
    _rc, ctx = send(engine, SETTINGS, ["<a@dane.test>"], [("Subject", "RE: [SECURE] payslip")])
    assert ctx._msg.get_all("Subject")[-1] == "RE: payslip"
    _rc, ctx = send(engine, SETTINGS, ["<a@dane.test>"],
                    [("Subject", "=?UTF-8?Q?=5Bsecure=5D_caf=C3=A9?=")])
    assert ctx._msg.get_all("Subject")[-1] == "=?utf-8?b?Y2Fmw6k=?="  # café
    kept = config.from_mapping({"sensitivity": {"subject_keywords": {"[secure]": "private"}}})
    engine, _ = make_engine(kept)
    _rc, ctx = send(engine, kept, ["<a@dane.test>"], [("Subject", "[secure] payslip")])
    assert ctx._msg.get_all("Subject") == ["[secure] payslip"]


def test_the_strictest_trigger_wins_and_is_named(make_engine: Any) -> None:
    stricter = config.from_mapping({"sensitivity": {"labels": {LABEL: "strictest"}},
                                    "policies": {"strictest": {"require": "dane"}}})
    engine, _ = make_engine(stricter)
    rc, ctx = send(engine, stricter, ["<a@verified.test>"],
                   [("X-Sensitivity", "private"), ("msip_labels", MSIP)])
    assert rc == Milter.REJECT  # the label's dane, not the header's verified
    rc, ctx = send(engine, stricter, ["<a@dane.test>"],
                   [("X-Sensitivity", "private"), ("msip_labels", MSIP)])
    assert rc == Milter.ACCEPT
    assert ctx._msg[ROUTE_HEADER] == "dane"
    assert ctx._msg[ASSESSMENT_HEADER].endswith("trigger=label")


def test_a_reload_brings_new_rules_from_the_next_message(make_engine: Any) -> None:
    engine, _ = make_engine(config.Config())
    live = LiveConfig(config.Config())
    Milter.factory = lambda: TlsMilter(engine, *live.current, live=live)
    ctx = testctx.TestCtx()
    ctx._setsymval("i", "4QID1")
    ctx._connect()

    def message() -> int:
        ctx._envfrom("<sender@example.org>")
        ctx._setsymval("{rcpt_mailer}", "smtp")
        ctx._envrcpt("<a@plain.test>")
        ctx._data()
        ctx._header("msip_labels", MSIP)
        ctx._eoh()
        rc: int = ctx._eom()
        return rc

    assert message() == Milter.ACCEPT  # no label rules yet
    live.replace(SETTINGS)  # what serve does on SIGHUP
    assert message() == Milter.REJECT  # same connection, next message: the new rules


@pytest.mark.parametrize(
    ("headers", "expected"),
    [([("Subject", "[secure] x"), ("msip_labels", MSIP)], Milter.TEMPFAIL),
     ([("Subject", "[secure] x"), ("X-Sensitivity", "private")], Milter.TEMPFAIL),
     ([("Subject", "[secure] x"), ("From", "a@hr.example.org")], Milter.ACCEPT)],
)
def test_a_classification_fault_tempfails_marked_mail_and_passes_the_rest(
        make_engine: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        headers: list[tuple[str, str]], expected: int) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("classifier bug")

    monkeypatch.setattr("tlsmilter.daemons.milter.classify", broken)
    engine, _ = make_engine(SETTINGS)
    with caplog.at_level("ERROR", logger="tlsmilter.milter"):
        rc, _ctx = send(engine, SETTINGS, ["<a@dane.test>"], headers)
    assert rc == expected
    assert any("internal error classifying" in r.getMessage() for r in caplog.records)


def test_a_tagged_message_gets_the_tag_on_the_stripped_subject(make_engine: Any) -> None:
    # Monitor mode tags instead of refusing: the keyword goes, the tag comes, once each.
    cfg = config.from_mapping({"milter": {"monitor": True, "subject_tag": "[insecure]"},
                               "sensitivity": {"subject_keywords": {"[secure]": "private"},
                                               "strip_subject_keyword": True}})
    engine, _ = make_engine(cfg)
    rc, ctx = send(engine, cfg, ["<a@plain.test>"], [("Subject", "[secure] payslip")])
    assert rc == Milter.ACCEPT
    assert ctx._msg.get_all("Subject")[-1] == "[insecure] payslip"
    assert ROUTE_HEADER not in ctx._msg
