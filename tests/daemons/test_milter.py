"""Milter callbacks driven through pymilter's test context (no MTA).

The embedded backend is real (cache, event loop, in-flight bookkeeping); only the prober
behind it is the suite's stand-in (tests/fakes.py), since these tests are about the glue, not
the network.
"""

from __future__ import annotations

import email.message
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import Milter
import pytest
from Milter import testctx

from tests.fakes import TableProber, assessment
from tlsmilter import config, metrics
from tlsmilter.daemons import instrument
from tlsmilter.daemons.milter import (
    ASSESSMENT_HEADER,
    ROUTE_HEADER,
    TAG_HEADER,
    TlsMilter,
    policies_from,
)
from tlsmilter.errors import CacheUnavailable
from tlsmilter.store.embedded import EmbeddedAssessments as Engine
from tlsmilter.store.scheduling import WarmupBudget


class Ctx(testctx.TestCtx):  # type: ignore[misc]
    """TestCtx records quarantine (its own raises NotImplemented)."""

    def __init__(self) -> None:
        super().__init__()
        self.quarantined: str | None = None

    def quarantine(self, reason: str) -> None:
        self.quarantined = reason


LEVELS = {"dane.test": "dane", "verified.test": "verified", "enc.test": "encrypted",
          "plain.test": "none"}


@pytest.fixture
def make_engine() -> Iterator[Any]:
    engines: list[Engine] = []

    def make(settings: config.Config, delay: float = 0.0, warm: bool = True
             ) -> tuple[Engine, TableProber]:
        prober = TableProber(LEVELS, delay)
        engine = Engine(settings, prober=prober)  # type: ignore[arg-type]
        engine.start()
        if warm:
            for domain, level in LEVELS.items():
                engine.memory.put(assessment(domain, level))
        engines.append(engine)
        return engine, prober

    yield make
    for engine in engines:
        engine.stop()


# What Postfix resolves a few recipients to ({rcpt_addr}, {rcpt_mailer}), as the lab's real
# Postfix did (see test_e2e for the delivery side); the rest go to "smtp" with no {rcpt_addr}.
RESOLVED = {
    "<postmaster>": ("postmaster@ours.test", "local"),
    "<user>": ("user@ours.test", "local"),
    "<@plain.test>": ('""@plain.test', "smtp"),
    "<u%plain.test@ours.test>": ("u@plain.test", "smtp"),
    "<plain.test!u@ours.test>": ("u@plain.test", "smtp"),
    "<@ours.test:u@plain.test>": ("u@plain.test", "smtp"),
}


def send(engine: Engine, settings: config.Config, rcpts: list[str],
         headers: list[tuple[str, str]], mailer: str | None = "smtp",
         resolved: dict[str, tuple[str, str]] = RESOLVED) -> tuple[int, Ctx]:
    """Drive one message through the callbacks; ``mailer`` for recipients not in ``resolved``
    (None: no macros, as non_smtpd_milters see it)."""
    Milter.factory = lambda: TlsMilter(engine, settings, policies_from(settings))
    ctx = Ctx()
    ctx._setsymval("i", "4QID1")
    assert ctx._connect() == Milter.CONTINUE
    # An MTA that can skip replies (TestCtx offers it, as Postfix does) gets none to MAIL,
    # RCPT and headers; one that cannot gets CONTINUE.
    silent = Milter.NOREPLY if ctx._protocol & Milter.P_NR_RCPT else Milter.CONTINUE
    assert ctx._envfrom("<sender@example.org>") == silent
    for rcpt in rcpts:
        address, transport = resolved.get(rcpt, (None, mailer))
        ctx._setsymval("{rcpt_addr}", address)
        ctx._setsymval("{rcpt_mailer}", transport)
        assert ctx._envrcpt(rcpt) == silent
    ctx._data()
    msg = email.message.Message()
    for name, value in headers:
        msg[name] = value
    ctx._msg = msg
    for name, value in headers:
        assert ctx._header(name, value) == silent
    ctx._eoh()
    return ctx._eom(), ctx


DEFAULT = config.Config()
SENSITIVE = [("Subject", "Patient file"), ("X-Sensitivity", "private")]


def test_non_sensitive_mail_is_untouched(make_engine: Any) -> None:
    engine, _ = make_engine(DEFAULT)
    rc, ctx = send(engine, DEFAULT, ["<a@plain.test>"], [("Subject", "hello")])
    assert rc == Milter.ACCEPT
    assert not ctx._headerschanged and ctx._reply is None


def test_sensitive_mail_to_secure_domains_is_routed(make_engine: Any) -> None:
    engine, _ = make_engine(DEFAULT)
    rc, ctx = send(engine, DEFAULT, ["<a@dane.test>", "<b@Verified.TEST.>"], SENSITIVE)
    assert rc == Milter.ACCEPT
    assert ctx._msg[ROUTE_HEADER] == "verified"
    assert "dane.test=dane; verified.test=verified" in ctx._msg[ASSESSMENT_HEADER]


def test_no_reply_to_mail_rcpt_and_headers_is_negotiated(make_engine: Any) -> None:
    engine, _ = make_engine(DEFAULT)
    _rc, ctx = send(engine, DEFAULT, ["<a@dane.test>"], SENSITIVE)
    skipped = Milter.P_NR_MAIL | Milter.P_NR_RCPT | Milter.P_NR_HDR
    assert ctx._protocol & skipped == skipped


def test_an_mta_that_cannot_skip_replies_gets_continue(make_engine: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    no_skipping = Milter.P_NR_MAIL | Milter.P_NR_RCPT | Milter.P_NR_HDR
    monkeypatch.setattr(testctx.TestCtx, "default_opts",
                        [Milter.CURR_ACTS, 0x1fffff & ~no_skipping, 0, 0])
    engine, _ = make_engine(DEFAULT)
    rc, ctx = send(engine, DEFAULT, ["<a@dane.test>", "<b@plain.test>"], SENSITIVE)
    assert ctx._protocol & no_skipping == 0
    assert rc == Milter.REJECT  # the recipients and headers were all seen
    assert any("plain.test" in line for line in ctx._reply[2:])


def test_sensitive_mail_to_a_weak_domain_is_rejected_naming_it(make_engine: Any) -> None:
    engine, _ = make_engine(DEFAULT)
    rc, ctx = send(engine, DEFAULT, ["<a@dane.test>", "<b@plain.test>"], SENSITIVE)
    assert rc == Milter.REJECT
    code, xcode, *lines = ctx._reply
    assert (code, xcode) == ("550", "5.7.10")
    assert any(line.startswith("plain.test: cannot receive mail securely enough: MX does not "
                               "offer STARTTLS") for line in lines)
    assert not any("dane.test" in line for line in lines)


def test_unknown_domain_waits_then_tempfails_and_probe_fills_cache(make_engine: Any) -> None:
    settings = config.from_mapping({"milter": {"eom_wait": 0.2}})
    engine, prober = make_engine(settings, delay=1.0, warm=False)
    rc, ctx = send(engine, settings, ["<a@dane.test>"], SENSITIVE)
    assert rc == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("451", "4.4.3")
    assert prober.calls == ["dane.test"]  # probed once, started at RCPT
    engine.wait(["dane.test"], 5)
    rc, _ctx = send(engine, settings, ["<a@dane.test>"], SENSITIVE)
    assert rc == Milter.ACCEPT


def test_eom_wait_returns_as_soon_as_the_probe_finishes(make_engine: Any) -> None:
    settings = config.from_mapping({"milter": {"eom_wait": 5}})
    engine, _ = make_engine(settings, delay=0.1, warm=False)
    rc, _ctx = send(engine, settings, ["<a@verified.test>"], SENSITIVE)
    assert rc == Milter.ACCEPT


def test_local_and_skipped_recipients_are_not_checked(make_engine: Any) -> None:
    settings = config.from_mapping({"milter": {"skip_domains": ["Plain.test."]}})
    engine, prober = make_engine(settings, warm=False)
    rc, _ = send(engine, settings, ["<x@unassessed.test>"], SENSITIVE, mailer="local")
    assert rc == Milter.ACCEPT
    rc, ctx = send(engine, settings, ["<x@plain.test>", "<postmaster>"], SENSITIVE)
    assert rc == Milter.ACCEPT
    assert prober.calls == []
    # nothing leaves this server: no route header, or FILTER would send local mail out
    assert ctx._msg[ROUTE_HEADER] is None


@pytest.mark.parametrize(("rcpt", "expected", "named"), [
    ("<user@[192.0.2.1]>", Milter.REJECT, "[192.0.2.1]: cannot receive mail securely enough: "
                                          "an address literal has no MX to assess"),
    ("<user@bad..domain>", Milter.REJECT, "bad..domain: cannot receive"),
    ("<user@" + "x" * 300 + ">", Milter.REJECT, "too long"),
    ("<@>", Milter.REJECT, "@: cannot receive mail securely enough: empty"),
    ("garbage", Milter.REJECT, "garbage: cannot receive mail securely enough: the address "
                               "names no domain (Postfix transport smtp)"),
    ("<a@b@c.test>", Milter.TEMPFAIL, "c.test: transport security not known yet"),
    ("<u@bücher.test>", Milter.TEMPFAIL, "xn--bcher-kva.test: transport security not known"),
    ("<u@\udcff.test>", Milter.REJECT, "not valid UTF-8"),
])
def test_strange_recipients_get_a_defined_outcome(make_engine: Any, rcpt: str, expected: int,
                                                   named: str) -> None:
    engine, _ = make_engine(DEFAULT)
    grown = deltas({"fail-safe": ("tlsmilter_fail_safe_total", {"reason": "callback_error"})})
    rc, ctx = send(engine, DEFAULT, [rcpt], SENSITIVE)
    assert rc == expected
    assert any(named in line for line in ctx._reply[2:]), ctx._reply
    assert grown() == {"fail-safe": 0}  # decided, not caught as an internal error


@pytest.mark.parametrize("rcpt", ["<@plain.test>", "<u%plain.test@ours.test>",
                                  "<plain.test!u@ours.test>", "<@ours.test:u@plain.test>"])
def test_the_domain_postfix_resolved_is_checked_not_the_one_written(make_engine: Any,
                                                                    rcpt: str) -> None:
    # Each is addressed to our own (skipped) domain or to none, and goes to plain.test.
    settings = config.from_mapping({"milter": {"skip_domains": ["ours.test"]}})
    engine, _ = make_engine(settings)
    rc, ctx = send(engine, settings, [rcpt], SENSITIVE)
    assert rc == Milter.REJECT
    assert any(line.startswith("plain.test: ") for line in ctx._reply[2:]), ctx._reply


@pytest.mark.parametrize("rcpt", ["<u%plain.test@ours.test>", "<plain.test!u@ours.test>"])
def test_without_postfix_macros_a_rerouting_address_is_not_trusted(make_engine: Any,
                                                                   rcpt: str) -> None:
    # sendmail(1) mail: Postfix passes the address as written and no transport; our own
    # domain is skipped, yet Postfix would deliver these to plain.test.
    settings = config.from_mapping({"milter": {"skip_domains": ["ours.test"]}})
    engine, _ = make_engine(settings)
    rc, ctx = send(engine, settings, [rcpt], SENSITIVE, mailer=None, resolved={})
    assert rc == Milter.REJECT
    assert any("may route elsewhere" in line for line in ctx._reply[2:]), ctx._reply
    rc, _ctx = send(engine, settings, [rcpt], [("Subject", "normal mail")], mailer=None,
                    resolved={})
    assert rc == Milter.ACCEPT


def test_without_postfix_macros_bare_names_are_local(make_engine: Any) -> None:
    engine, prober = make_engine(DEFAULT, warm=False)
    rc, ctx = send(engine, DEFAULT, ["<postmaster>", "<root>"], SENSITIVE, mailer=None,
                   resolved={})
    assert rc == Milter.ACCEPT
    assert prober.calls == []
    assert ctx._msg[ROUTE_HEADER] is None


def test_forged_internal_headers_are_removed_from_any_message(make_engine: Any) -> None:
    engine, _ = make_engine(DEFAULT)
    headers = [("Subject", "hi"), (ROUTE_HEADER, "dane"), (ASSESSMENT_HEADER, "forged")]
    rc, ctx = send(engine, DEFAULT, ["<a@plain.test>"], headers)
    assert rc == Milter.ACCEPT
    assert ctx._msg[ROUTE_HEADER] is None and ctx._msg[ASSESSMENT_HEADER] is None


@pytest.mark.parametrize(("settings", "rcpt"), [
    ({}, "<a@dane.test>"),  # accepted
    ({"milter": {"monitor": True}}, "<a@plain.test>"),  # tagged
    ({"policies": {"private": {"on_insecure": "quarantine"}}}, "<a@plain.test>"),  # held
])
def test_tls_required_no_is_removed_from_sensitive_mail(make_engine: Any,
                                                        settings: dict[str, Any],
                                                        rcpt: str) -> None:
    configured = config.from_mapping(settings)
    engine, _ = make_engine(configured)
    rc, ctx = send(engine, configured, [rcpt], [*SENSITIVE, ("TLS-Required", "No")])
    assert rc == Milter.ACCEPT
    assert ctx._msg["TLS-Required"] is None


def test_monitor_mode_tags_instead_of_rejecting(make_engine: Any) -> None:
    settings = config.from_mapping({"milter": {"monitor": True, "subject_tag": "[insecure]"}})
    engine, _ = make_engine(settings)
    rc, ctx = send(engine, settings, ["<a@plain.test>"], SENSITIVE)
    assert rc == Milter.ACCEPT
    assert ctx._msg[TAG_HEADER] == "insecure: plain.test (would reject)"
    # TestCtx's chgheader appends instead of replacing; Postfix replaces.
    assert "[insecure] Patient file" in ctx._msg.get_all("Subject")
    assert ctx._msg[ROUTE_HEADER] is None


def test_quarantine_holds_with_reason(make_engine: Any) -> None:
    settings = config.from_mapping({"policies": {"private": {"on_insecure": "quarantine"}}})
    engine, _ = make_engine(settings)
    rc, ctx = send(engine, settings, ["<a@plain.test>"], SENSITIVE)
    assert rc == Milter.ACCEPT
    assert ctx.quarantined and "plain.test" in ctx.quarantined


def test_internal_error_fails_safe(make_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = make_engine(DEFAULT)

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr("tlsmilter.daemons.milter.decide", broken)
    rc, ctx = send(engine, DEFAULT, ["<a@dane.test>"], SENSITIVE)
    assert rc == Milter.TEMPFAIL and ctx._reply[:2] == ("451", "4.3.0")
    rc, ctx = send(engine, DEFAULT, ["<a@dane.test>"], [("Subject", "ordinary")])
    assert rc == Milter.ACCEPT and ctx._reply is None


class Later:
    """``prefetch`` as the shared backend does it: the lookup ends on another thread, after
    ``delay``, with what the engine's own lookup finds (or ``error``); None: never."""

    def __init__(self, engine: Engine, delay: float | None,
                 error: Exception | None = None) -> None:
        self.engine = engine
        self.delay = delay
        self.error = error
        self.started: list[Future[Any]] = []

    def __call__(self, domain: str) -> Future[Any]:
        future: Future[Any] = Future()

        def finish() -> None:
            if self.error is not None:
                future.set_exception(self.error)
            else:
                future.set_result(self.engine.lookup(domain))

        if self.delay is not None:
            threading.Timer(self.delay, finish).start()
        self.started.append(future)
        return future


def test_rcpt_starts_lookups_and_only_sensitive_mail_waits_for_them(
        make_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = make_engine(DEFAULT)
    later = Later(engine, 0.3)
    monkeypatch.setattr(engine, "prefetch", later)
    grown = deltas({"pending": ("tlsmilter_recipients_total", {"level": "pending"}),
                    "waits": ("tlsmilter_eom_wait_seconds_count", {})})
    rc, _ctx = send(engine, DEFAULT, ["<a@dane.test>", "<b@verified.test>"],
                    [("Subject", "ordinary")])
    assert rc == Milter.ACCEPT
    assert not any(f.done() for f in later.started)  # normal mail did not wait for them
    rc, ctx = send(engine, DEFAULT, ["<a@dane.test>", "<b@verified.test>"], SENSITIVE)
    assert rc == Milter.ACCEPT and ctx._msg[ROUTE_HEADER] == "verified"  # waited, then knew
    # Still running at RCPT: counted pending, as the metric is what RCPT knew.
    assert grown() == {"pending": 4, "waits": 1}


def test_a_cache_that_cannot_answer_tempfails_sensitive_mail_without_a_traceback(
        make_engine: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    engine, _ = make_engine(DEFAULT)
    monkeypatch.setattr(engine, "prefetch", Later(engine, 0.1, CacheUnavailable("redis hung")))
    grown = deltas({"cache": ("tlsmilter_fail_safe_total", {"reason": "cache_unavailable"})})
    with caplog.at_level("DEBUG", logger="tlsmilter"):
        rc, _ctx = send(engine, DEFAULT, ["<a@dane.test>"], [("Subject", "ordinary")])
        assert rc == Milter.ACCEPT
        rc, ctx = send(engine, DEFAULT, ["<a@dane.test>"], SENSITIVE)
    assert rc == Milter.TEMPFAIL and ctx._reply[:2] == ("451", "4.3.0")
    assert grown() == {"cache": 1}
    assert not any(r.exc_info for r in caplog.records)


def test_a_lookup_unfinished_by_eom_wait_counts_as_not_assessed(
        make_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = config.from_mapping({"milter": {"eom_wait": 0.2}})
    # A slow prober: EOM starts the probe RCPT could not (issue 12), and it is not done either.
    engine, _ = make_engine(settings, delay=5.0, warm=False)
    monkeypatch.setattr(engine, "prefetch", Later(engine, None))
    rc, ctx = send(engine, settings, ["<a@dane.test>"], SENSITIVE)
    # Not assessed in time: unknown, the private policy's answer to which is a tempfail.
    assert rc == Milter.TEMPFAIL and ctx._reply[:2] == ("451", "4.4.3")


def test_prober_failure_means_unknown_not_accept(make_engine: Any) -> None:
    settings = config.from_mapping({"milter": {"eom_wait": 1}})
    engine, _ = make_engine(settings, warm=False)
    rc, _ctx = send(engine, settings, ["<a@boom.test>"], SENSITIVE)
    assert rc == Milter.TEMPFAIL


def test_undecodable_header_value_gets_fail_safe_policy(make_engine: Any) -> None:
    engine, _ = make_engine(DEFAULT)
    rc, _ctx = send(engine, DEFAULT, ["<a@enc.test>"], [("X-Sensitivity", "geheim\udcff")])
    # fail-safe policy "confidential" requires verified: an encrypted-only domain is refused
    assert rc == Milter.REJECT


# -- metrics and the decision line -----------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def deltas(samples: dict[str, tuple[str, dict[str, str]]]) -> Callable[[], dict[str, float]]:
    """Read ``samples`` now; the returned function gives how much each grew since."""
    before = {key: sample(name, **labels) for key, (name, labels) in samples.items()}
    return lambda: {key: sample(name, **labels) - before[key]
                    for key, (name, labels) in samples.items()}


def test_a_refusal_is_counted_and_logged_with_each_failing_domains_reason(
        make_engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings = config.from_mapping({"milter": {"eom_wait": 0.1}})
    engine, _ = make_engine(settings, delay=1.0)  # new.test stays unassessed at EOM
    grown = deltas({
        "rejected": ("tlsmilter_messages_total", {"sensitivity": "private", "verdict": "reject"}),
        "no_starttls": ("tlsmilter_refused_domains_total", {"reason": "no_starttls"}),
        "invalid": ("tlsmilter_refused_domains_total", {"reason": "invalid_domain"}),
        "not_assessed": ("tlsmilter_refused_domains_total", {"reason": "not_assessed"}),
        "rcpt_none": ("tlsmilter_recipients_total", {"level": "none"}),
        "rcpt_dane": ("tlsmilter_recipients_total", {"level": "dane"}),
        "rcpt_pending": ("tlsmilter_recipients_total", {"level": "pending"}),
        "rcpt_invalid": ("tlsmilter_recipients_total", {"level": "invalid"}),
        "eom": ("tlsmilter_milter_callback_seconds_count", {"stage": "eom"}),
        "rcpt": ("tlsmilter_milter_callback_seconds_count", {"stage": "rcpt"}),
        "waits": ("tlsmilter_eom_wait_seconds_count", {}),
    })
    with caplog.at_level("INFO", logger="tlsmilter.milter"):
        rc, _ctx = send(engine, settings, ["<a@dane.test>", "<b@plain.test>", "<c@plain.test>",
                                           "<d@[192.0.2.1]>", "<e@new.test>"], SENSITIVE)
    assert rc == Milter.REJECT
    assert grown() == {"rejected": 1, "no_starttls": 1, "invalid": 1, "not_assessed": 1,
                       "rcpt_none": 2, "rcpt_dane": 1, "rcpt_pending": 1, "rcpt_invalid": 1,
                       "eom": 1, "rcpt": 5, "waits": 1}
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decision ")]
    assert line.endswith(" failing=plain.test,[192.0.2.1],new.test reasons=plain.test:"
                         "no_starttls,[192.0.2.1]:invalid_domain,new.test:not_assessed")


def test_normal_mail_and_fail_safe_activations_are_counted(
        make_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = make_engine(DEFAULT)
    grown = deltas({
        "normal": ("tlsmilter_messages_total", {"sensitivity": "normal", "verdict": "accept"}),
        "tempfail": ("tlsmilter_messages_total", {"sensitivity": "private",
                                                  "verdict": "tempfail"}),
        "callback": ("tlsmilter_fail_safe_total", {"reason": "callback_error"}),
        "decide": ("tlsmilter_fail_safe_total", {"reason": "decide_error"}),
        "local": ("tlsmilter_recipients_total", {"level": "local"}),
    })
    send(engine, DEFAULT, ["<postmaster>"], [("Subject", "ordinary")])

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(engine, "prefetch", broken)
    rc, _ctx = send(engine, DEFAULT, ["<a@dane.test>"], SENSITIVE)  # RCPT fails
    assert rc == Milter.TEMPFAIL
    monkeypatch.undo()
    # The lookup RCPT started fails: found out at end-of-message, gathering assessments.
    monkeypatch.setattr(engine, "lookup", broken)
    rc, _ctx = send(engine, DEFAULT, ["<a@dane.test>"], SENSITIVE)
    assert rc == Milter.TEMPFAIL
    monkeypatch.undo()
    monkeypatch.setattr("tlsmilter.daemons.milter.decide", broken)
    rc, _ctx = send(engine, DEFAULT, ["<a@dane.test>"], SENSITIVE)
    assert rc == Milter.TEMPFAIL
    assert grown() == {"normal": 1, "tempfail": 3, "callback": 1, "decide": 2, "local": 1}


def test_policy_names_from_the_config_are_pre_initialised() -> None:
    settings = config.from_mapping({"policies": {"medical": {"require": "dane"}}})
    assert metrics.REGISTRY.get_sample_value(
        "tlsmilter_messages_total", {"sensitivity": "medical", "verdict": "reject"}) is None
    instrument.init_labels(settings)
    for action in ("accept", "tag", "quarantine", "tempfail", "reject"):
        assert sample("tlsmilter_messages_total", sensitivity="medical", verdict=action) == 0


# -- hostile input (issue 12); tests/daemons/test_fuzz.py drives the real libmilter ----------


class RefusingCtx(Ctx):
    """Refuses a multi-line reply as libmilter does one it cannot build; decodes macros
    strictly, as pymilter's C getsymval does."""

    def setreply(self, rcode: str, xcode: str, *msg: str) -> None:
        if len(msg) > 1:
            raise Milter.milter.error("cannot set reply")
        super().setreply(rcode, xcode, *msg)

    def getsymval(self, name: str) -> str | None:
        value = super().getsymval(name)
        if isinstance(value, bytes):
            return value.decode("utf-8")  # raises UnicodeDecodeError, like pymilter
        return value


def run_refusing(engine: Engine, settings: config.Config, rcpt_addr: bytes | str,
                 headers: list[tuple[str, str]]) -> tuple[int, RefusingCtx]:
    Milter.factory = lambda: TlsMilter(engine, settings, policies_from(settings))
    ctx = RefusingCtx()
    ctx._setsymval("{rcpt_addr}", rcpt_addr)
    rc = deliver(ctx, ["<x@y.test>"], headers)
    return rc, ctx


def deliver(ctx: Ctx, rcpts: list[str], headers: list[tuple[str, str]]) -> int:
    """One message through ``ctx`` (its macros set by the caller); the EOM answer."""
    ctx._setsymval("i", "4QID1")
    ctx._setsymval("{rcpt_mailer}", "smtp")
    ctx._connect()
    ctx._envfrom("<sender@example.org>")
    for rcpt in rcpts:
        ctx._envrcpt(rcpt)
    ctx._data()
    msg = email.message.Message()
    for name, value in headers:
        msg[name] = value
        ctx._header(name, value)
    ctx._msg = msg
    ctx._eoh()
    return int(ctx._eom())


def test_a_refused_reply_is_replaced_by_a_short_one_with_the_same_code(
        make_engine: Any) -> None:
    engine, _ = make_engine(DEFAULT)
    rc, ctx = run_refusing(engine, DEFAULT, "a@plain.test", SENSITIVE)
    assert rc == Milter.REJECT
    assert ctx._reply[:2] == ("550", "5.7.10")
    assert "not secure enough" in ctx._reply[2]


def test_an_undecodable_recipient_macro_is_not_assessable(make_engine: Any) -> None:
    engine, _ = make_engine(DEFAULT)
    grown = deltas({"fail-safe": ("tlsmilter_fail_safe_total", {"reason": "callback_error"})})
    rc, ctx = run_refusing(engine, DEFAULT, b"a@\xff\xfe.test", SENSITIVE)
    assert rc == Milter.REJECT and ctx._reply[:2] == ("550", "5.7.10")
    assert grown() == {"fail-safe": 0}  # decided, not caught as an internal error
    rc, ctx = run_refusing(engine, DEFAULT, b"a@\xff\xfe.test", [("Subject", "ordinary")])
    assert rc == Milter.ACCEPT


def test_the_monitor_tag_says_unknown_for_an_unassessed_domain(make_engine: Any) -> None:
    settings = config.from_mapping({"milter": {"monitor": True, "eom_wait": 0.2}})
    engine, _ = make_engine(settings, delay=5.0)
    rc, ctx = send(engine, settings, ["<a@slow.test>"], SENSITIVE)
    assert rc == Milter.ACCEPT
    assert ctx._msg[TAG_HEADER] == "unknown: slow.test (would tempfail)"


def test_rcpt_starts_warm_up_probes_within_the_budget_only(make_engine: Any) -> None:
    settings = config.from_mapping({"prober": {"warmup_per_message": 100},
                                    "milter": {"eom_wait": 5.0}})
    engine, prober = make_engine(settings, warm=False)
    budget = WarmupBudget(100, 10_000, 60.0)
    Milter.factory = lambda: TlsMilter(engine, settings, policies_from(settings), budget=budget)
    grown = deltas({"message": ("tlsmilter_warmup_dropped_total", {"reason": "message"})})

    def message(rcpts: list[str], headers: list[tuple[str, str]]) -> tuple[int, Ctx]:
        ctx = Ctx()
        ctx._setsymval("{client_addr}", "192.0.2.7")
        return deliver(ctx, rcpts, headers), ctx

    rc, _ctx = message([f"<u@new{i}.test>" for i in range(150)], [("Subject", "ordinary")])
    assert rc == Milter.ACCEPT and grown() == {"message": 50}
    engine.wait([f"new{i}.test" for i in range(100)], 5.0)  # the ones RCPT started
    assert len(prober.calls) == 100  # the other 50 were not probed for an ordinary message
    # A sensitive message past the budget: its unprobed domain is probed at end-of-message.
    calls = len(prober.calls)
    rc, ctx = message([*(f"<u@new{i}.test>" for i in range(200, 300)), "<u@dane.test>"],
                      SENSITIVE)
    assert grown() == {"message": 51}  # dane.test was the 101st new domain
    assert prober.calls[calls + 100:] == ["dane.test"]  # probed at end-of-message
    assert rc == Milter.TEMPFAIL  # the new*.test domains are unknown ...
    reply = "\n".join(ctx._reply[2:])
    assert "new200.test: " in reply and "dane.test" not in reply  # ... dane.test passed
