"""``tlsmilter report``: decision lines in, per-domain refusals and level mix out."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tlsmilter import config
from tlsmilter.cli import main
from tlsmilter.commands.report import render, summarize
from tlsmilter.core.decisionlog import UNRECORDED, format_decision, parse
from tlsmilter.core.levels import Level
from tlsmilter.core.verdict import DomainStatus, decide
from tlsmilter.daemons.milter import policies_from

OLD = ("Nov 22 08:00:01 mx tlsmilter[12]: INFO tlsmilter.milter: decision queue_id=4Q1 "
       "sensitivity=private policy=private require=verified verdict=reject "
       "domains=a.example:dane,b.example:none failing=b.example")
NEW = ("INFO tlsmilter.milter: decision queue_id=4Q2 sensitivity=personal policy=personal "
       "require=encrypted verdict=tag would_be=reject domains=b.example:none,[192.0.2.1]:none,"
       "[ipv6:2001:db8::1]:none failing=b.example,[192.0.2.1],[ipv6:2001:db8::1] "
       "reasons=b.example:no_starttls,[192.0.2.1]:invalid_domain,"
       "[ipv6:2001:db8::1]:invalid_domain")
ACCEPT = ("decision queue_id=4Q3 sensitivity=private policy=private require=verified "
          "verdict=accept domains=a.example:dane,c.example:verified failing=- reasons=-")
FAILED = "WARNING tlsmilter.milter: decision queue_id=4Q4 verdict=tempfail reason=internal_error"


@pytest.mark.parametrize(("line", "verdict", "failing", "reasons"), [
    (OLD, "reject", ("b.example",), {"b.example": UNRECORDED}),
    (NEW, "tag", ("b.example", "[192.0.2.1]", "[ipv6:2001:db8::1]"),
     {"b.example": "no_starttls", "[192.0.2.1]": "invalid_domain",
      "[ipv6:2001:db8::1]": "invalid_domain"}),
    (ACCEPT, "accept", (), {}),
    (FAILED, "tempfail", (), {}),
])
def test_decision_lines_old_and_new_parse(line: str, verdict: str, failing: tuple[str, ...],
                                          reasons: dict[str, str]) -> None:
    decision = parse(line)
    assert decision is not None
    assert (decision.verdict, decision.failing, decision.reasons) == (verdict, failing, reasons)


@pytest.mark.parametrize("line", ["", "decision made", "INFO x: queue_id=1 verdict=reject",
                                  "decision queue_id=1"])
def test_other_lines_are_skipped(line: str) -> None:
    assert parse(line) is None


def test_report_ranks_refused_domains_with_reasons_and_counts_levels() -> None:
    summary = summarize([OLD, "noise\n", NEW, ACCEPT, FAILED])
    text = render(summary, top=1)
    assert summary.messages == 4 and summary.internal_errors == 1
    assert "Top 1 of 3 domains refused for sensitive mail:" in text
    assert "        2  b.example  none       unrecorded 1, no_starttls 1" in text
    assert "[192.0.2.1]" not in text  # below --top
    assert "Levels of the 5 recipient domains seen (latest decision):" in text
    assert "  dane            1   20.0%" in text
    assert "  none            3   60.0%" in text


def test_a_formatted_decision_line_parses_back() -> None:
    # The format and its parser must stay in step: they live in one module, core.decisionlog.
    settings = config.Config()
    policy = policies_from(settings)["private"]
    statuses = [DomainStatus("a.example", Level.DANE),
                DomainStatus("b.example", Level.ENCRYPTED, "")]
    verdict = decide(policy, statuses)
    decision = parse(format_decision("4QX", "private", statuses, verdict,
                                     {"b.example": "level_too_low"}))
    assert decision is not None
    assert decision.verdict == "reject" and decision.failing == ("b.example",)
    assert decision.reasons == {"b.example": "level_too_low"}
    assert decision.levels == {"a.example": "dane", "b.example": "encrypted"}


def test_report_command_reads_files(capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "mail.log"
        log.write_text(f"{OLD}\n{ACCEPT}\n")
        assert main(["report", "--top", "3", str(log)]) == 0
        assert main(["report", str(Path(tmp) / "missing.log")]) == 1
    out, err = capsys.readouterr()
    assert "tlsmilter report: 2 sensitive message decisions" in out
    assert "b.example" in out
    assert "missing.log: cannot read" in err


@pytest.mark.lab
@pytest.mark.skipif(os.geteuid() != 0, reason="the lab runs as root")
def test_report_adds_the_shared_cache_levels_on_redis(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.lab.redis_server import LabRedis
    from tlsmilter.store.redis.cache import RedisCache

    with tempfile.TemporaryDirectory() as tmp, LabRedis(Path(tmp)) as redis:
        settings = config.from_mapping({"cache": {"backend": "redis"},
                                        "redis": {"url": redis.url}})
        cache = RedisCache(settings)
        for domain, level in (("a.example", "dane"), ("b.example", "none"),
                              ("c.example", "none")):
            cache.put({"domain": domain, "level": level, "reasons": []})
        toml = Path(tmp) / "tlsmilter.toml"
        toml.write_text(f'[cache]\nbackend = "redis"\n[redis]\nurl = "{redis.url}"\n')
        log = Path(tmp) / "empty.log"
        log.write_text("")
        assert main(["--config", str(toml), "report", str(log)]) == 0
    out = capsys.readouterr().out
    assert "Levels of the 3 domains in the shared cache:" in out
    assert "  none            2   66.7%" in out


def test_report_counts_triggers_and_overrides_and_reads_older_lines() -> None:
    new = ["decision queue_id=1 sensitivity=x trigger=label policy=private require=verified "
           "verdict=reject domains=m.example:verified failing=m.example "
           "reasons=m.example:override_require overrides=m.example:require-dane\n",
           "decision queue_id=2 sensitivity=hr.example trigger=sender policy=personal "
           "require=encrypted verdict=accept domains=d.example:dane failing=- reasons=- "
           "overrides=d.example:deny\n",  # a line as tlsmilter never writes it: still read
           "decision queue_id=3 sensitivity=[secure] trigger=label policy=private "
           "require=verified verdict=accept domains=m.example:dane failing=- reasons=- "
           "overrides=m.example:require-dane\n"]
    text = render(summarize([OLD, *new]), top=5)
    assert "  marked by: label 2, sender 1" in text
    assert "Per-domain overrides applied (2):" in text
    assert "        2  m.example  require-dane" in text
    assert "        1  m.example  dane       override_require 1" in text  # latest level
    assert "marked by" not in render(summarize([OLD]), top=5)  # older lines: no trigger
