"""Per-domain overrides through the milter's callbacks (pymilter's test context): the verdict,
the route, the decision line, the header, metrics, and expiry. Through Postfix:
tests/daemons/test_e2e_marking.py."""

from __future__ import annotations

import datetime
from typing import Any

import Milter
import pytest

from tests.daemons.test_milter import make_engine, send
from tlsmilter import config, metrics
from tlsmilter.core.decisionlog import Decision, parse
from tlsmilter.daemons.milter import ASSESSMENT_HEADER, ROUTE_HEADER

__all__ = ["make_engine"]  # the fixture, imported to be used here

TODAY = datetime.datetime.now(datetime.UTC).date()
PRIVATE = [("Subject", "x"), ("X-Sensitivity", "private")]
PERSONAL = [("Subject", "x"), ("X-Sensitivity", "personal")]


def settings(**domains: dict[str, str]) -> config.Config:
    return config.from_mapping({"overrides": {"domains": {
        name.replace("_", "."): value for name, value in domains.items()}}})


def decision(caplog: pytest.LogCaptureFixture) -> Decision:
    found = [d for d in (parse(r.getMessage()) for r in caplog.records) if d is not None]
    assert found
    return found[-1]


def applied(kind: str) -> float:
    return metrics.OVERRIDES_APPLIED.labels(kind=kind)._value.get()  # type: ignore[no-any-return]


def test_require_refuses_a_domain_below_its_level(
        make_engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg = settings(verified_test={"level": "dane", "reason": "ministry wants DANE"})
    engine, _ = make_engine(cfg)
    before = applied("require")
    with caplog.at_level("INFO", logger="tlsmilter.milter"):
        rc, ctx = send(engine, cfg, ["<a@verified.test>", "<b@dane.test>"], PRIVATE)
    assert rc == Milter.REJECT
    assert "verified.test: cannot receive mail securely enough: assessed verified; this " \
           "domain requires dane (ministry wants DANE)" in "\n".join(ctx._reply)
    line = decision(caplog)
    assert line.failing == ("verified.test",)
    assert line.reasons == {"verified.test": "override_require"}
    assert line.overrides == {"verified.test": "require-dane"}
    assert line.levels == {"verified.test": "verified", "dane.test": "dane"}  # as assessed
    assert applied("require") == before + 1


def test_require_routes_to_its_level_when_accepted(
        make_engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg = settings(dane_test={"level": "dane", "reason": "ministry"})
    engine, _ = make_engine(cfg)
    with caplog.at_level("INFO", logger="tlsmilter.milter"):
        rc, ctx = send(engine, cfg, ["<a@dane.test>", "<b@Dane.Test.>"], PERSONAL)
    assert rc == Milter.ACCEPT
    assert ctx._msg[ROUTE_HEADER] == "dane"  # not the policy's encrypted: delivery enforces it
    assert ctx._msg[ASSESSMENT_HEADER].endswith(
        "dane.test=dane; trigger=header; overrides=dane.test:require-dane")
    assert decision(caplog).overrides == {"dane.test": "require-dane"}


def test_deny_refuses_even_a_dane_domain_and_normal_mail_passes(
        make_engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg = settings(dane_test={"action": "deny", "reason": "contract ended"})
    engine, _ = make_engine(cfg)
    before = applied("deny")
    with caplog.at_level("INFO", logger="tlsmilter.milter"):
        rc, ctx = send(engine, cfg, ["<a@dane.test>"], PRIVATE)
    assert rc == Milter.REJECT
    assert "sensitive mail may not go there (contract ended)" in "\n".join(ctx._reply)
    assert decision(caplog).reasons == {"dane.test": "override_deny"}
    assert applied("deny") == before + 1
    rc, ctx = send(engine, cfg, ["<a@dane.test>"], [("Subject", "hello")])
    assert rc == Milter.ACCEPT and not ctx._headerschanged


def test_an_expired_override_no_longer_applies_logged_and_counted_once(
        make_engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    yesterday = (TODAY - datetime.timedelta(days=1)).isoformat()
    cfg = settings(dane_test={"action": "deny", "reason": "r", "expires": yesterday})
    engine, _ = make_engine(cfg)
    expired = metrics.OVERRIDES_EXPIRED._value.get()
    with caplog.at_level("INFO", logger="tlsmilter.milter"):
        for _ in range(3):
            rc, ctx = send(engine, cfg, ["<a@dane.test>"], PRIVATE)
            assert rc == Milter.ACCEPT
            assert "overrides=" not in ctx._msg[ASSESSMENT_HEADER]
    notes = [r for r in caplog.records if "expired on" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelname == "WARNING"
    assert f"override for dane.test (deny) expired on {yesterday}" in notes[0].getMessage()
    assert metrics.OVERRIDES_EXPIRED._value.get() == expired + 1
    assert decision(caplog).overrides == {}


def test_an_override_on_its_last_day_applies_with_one_warning(
        make_engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg = settings(dane_test={"action": "deny", "reason": "r", "expires": TODAY.isoformat()})
    engine, _ = make_engine(cfg)
    with caplog.at_level("INFO", logger="tlsmilter.milter"):
        for _ in range(2):
            assert send(engine, cfg, ["<a@dane.test>"], PRIVATE)[0] == Milter.REJECT
    notes = [r.getMessage() for r in caplog.records if "expires on" in r.getMessage()]
    assert notes == [f"override for dane.test (deny) expires on {TODAY.isoformat()}"]


def test_a_mixed_message_goes_by_the_policys_transport(make_engine: Any) -> None:
    # dane.test needs DANE and has it; enc.test is enough for "personal" but not for the
    # DANE transport, which would defer it for good: the policy's transport instead.
    cfg = settings(dane_test={"level": "dane", "reason": "ministry"})
    engine, _ = make_engine(cfg)
    rc, ctx = send(engine, cfg, ["<a@dane.test>", "<b@enc.test>"], PERSONAL)
    assert rc == Milter.ACCEPT
    assert ctx._msg[ROUTE_HEADER] == "encrypted"
