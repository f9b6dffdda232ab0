"""The pymilter glue: gather recipients and headers, apply the verdict of ``core.verdict.decide``.

Fail-safe rules (docs/design.md): a fault never delays or refuses a normal message, and never
lets a sensitive one through unchecked; sensitive mail is tempfailed with a clear text instead.
Headers tlsmilter adds are stripped from every message if a sender forged them.
"""

from __future__ import annotations

import datetime
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import Milter

from tlsmilter import config, labels, metrics
from tlsmilter.core import senders, subject
from tlsmilter.core.decisionlog import MAX_QUEUE_ID, format_decision, format_fail_safe, printable
from tlsmilter.core.domains import InvalidDomain, normalize_domain
from tlsmilter.core.labels import HEADER as LABELS_HEADER
from tlsmilter.core.labels import LabelRules
from tlsmilter.core.levels import UNKNOWN, Level
from tlsmilter.core.overrides import Kind, Override
from tlsmilter.core.overrides import apply as apply_override
from tlsmilter.core.reasons import (
    INVALID_DOMAIN,
    LEVEL_TOO_LOW,
    NOT_ASSESSED,
    OVERRIDE_DENY,
    OVERRIDE_REQUIRE,
    first_problem,
)
from tlsmilter.core.safetext import cap
from tlsmilter.core.sensitivity import Facts, Marking, Rules, classify
from tlsmilter.core.verdict import (
    Action,
    DomainStatus,
    Policy,
    Verdict,
    decide,
    domain_list,
    short_reply,
    tag_text,
)
from tlsmilter.daemons import instrument
from tlsmilter.errors import CacheUnavailable
from tlsmilter.labels import FailSafe, RecipientLevel, Stage
from tlsmilter.store.base import Assessments, Entry, State
from tlsmilter.store.scheduling import WarmupBudget

# The decision log's logger keeps the name it always had: operators filter on it.
log = logging.getLogger("tlsmilter.milter")

ROUTE_HEADER = "X-TLSMilter-Route"
ASSESSMENT_HEADER = "X-TLSMilter-Assessment"
TAG_HEADER = "X-TLSMilter-Tag"
INTERNAL_HEADERS = (ROUTE_HEADER, ASSESSMENT_HEADER, TAG_HEADER)
TLS_REQUIRED = "TLS-Required"

FAIL_SAFE_REPLY = ("451", "4.3.0",
                   "tlsmilter could not check this sensitive message's recipients; "
                   "it was not sent and will be retried")

F = TypeVar("F", bound=Callable[..., Any])


@runtime_checkable
class ReadsInBackground(Protocol):
    """A backend whose cache is a server (Redis): it reads without probing in the background."""

    def peek(self, domain: str) -> Future[tuple[State, Entry | None]]: ...

# pymilter is untyped: give its reply codes a type once.
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL


def policies_from(settings: config.Config) -> dict[str, Policy]:
    """The configured policies as ``core.verdict.Policy`` objects, by name."""
    return {
        name: Policy(name, Level(p.require.value), Action(p.on_insecure.value),
                     Action(p.on_unknown.value), tuple(p.reply))
        for name, p in settings.policies.items()
    }


def rules_from(settings: config.Config) -> Rules:
    """Every configured way of marking mail sensitive, compiled for ``classify``."""
    sens = settings.sensitivity
    return Rules(
        watched=frozenset(h.lower() for h in sens.headers), values=sens.values,
        fail_safe=sens.fail_safe_policy,
        labels=LabelRules.build(sens.labels, sens.label_names),
        keywords=subject.KeywordRules.build(sens.subject_keywords, sens.subject_match),
        senders=senders.SenderRules.build(sens.senders),
        strip_keyword=sens.strip_subject_keyword, from_header=sens.sender_from_header)


class Compiled:
    """What one configuration compiles to, shared by every connection that uses it: the
    marking rules, the overrides, and which expiries were already logged (once per domain)."""

    def __init__(self, settings: config.Config) -> None:
        self.settings = settings
        self.rules = rules_from(settings)
        self.label_rules = bool(self.rules.labels.by_guid or self.rules.labels.by_name)
        self.overrides = config.domain_overrides(settings)
        self.warn_days = settings.overrides.warn_days
        self.noticed: set[tuple[str, str]] = set()  # (domain, "expired" | "expiring")
        self._lock = threading.Lock()

    def first_notice(self, domain: str, what: str) -> bool:
        """True the first time ``what`` is noticed of ``domain``'s override."""
        with self._lock:
            if (domain, what) in self.noticed:
                return False
            self.noticed.add((domain, what))
            return True


_COMPILED: list[Compiled] = []  # the latest few configurations (a reload makes a new one)
_COMPILED_LOCK = threading.Lock()


def compiled(settings: config.Config) -> Compiled:
    """``settings`` compiled, once per configuration object."""
    with _COMPILED_LOCK:
        for known in _COMPILED:
            if known.settings is settings:
                return known
        made = Compiled(settings)
        _COMPILED[:] = [made, *_COMPILED[:3]]
        return made


class LiveConfig:
    """The settings and policies new messages use; ``serve`` replaces them on SIGHUP.

    Milter instances live per connection, so they read this at each MAIL FROM. One attribute
    holds both, so a reader sees the old pair or the new one, never a mix.
    """

    def __init__(self, settings: config.Config) -> None:
        self.current = (settings, policies_from(settings))

    def replace(self, settings: config.Config) -> None:
        self.current = (settings, policies_from(settings))


@dataclass
class Recipient:
    domain: str
    invalid: str = ""  # why the domain cannot be assessed at all (address literal, bad name)
    seen: RecipientLevel = RecipientLevel.PENDING  # what RCPT knew of its level (metrics)
    lookup: Future[tuple[State, Entry | None]] | None = None  # started at RCPT


@dataclass
class MessageState:
    recipients: dict[str, Recipient] = field(default_factory=dict)  # by domain
    headers: list[tuple[str, str]] = field(default_factory=list)  # watched sensitivity headers
    label_headers: list[str] = field(default_factory=list)  # msip_labels values
    from_headers: list[str] = field(default_factory=list)  # only if sender rules read From:
    sender: str = ""  # the envelope sender, bare
    forged: dict[str, int] = field(default_factory=dict)  # internal header -> occurrences
    tls_required_no: list[int] = field(default_factory=list)  # occurrence indexes
    tls_required_count: int = 0
    subject: str | None = None
    reason_codes: dict[str, str] = field(default_factory=dict)  # domain -> first problem code
    warmups: int = 0  # probes RCPT started for new domains (prober.warmup_per_message)


_SEEN = {value: RecipientLevel(value) for value in (*(lv.value for lv in Level), UNKNOWN)}


def _seen(lookup: Future[tuple[State, Entry | None]]) -> RecipientLevel:
    """What a lookup knew of a domain's level right after it was started."""
    if not lookup.done() or lookup.cancelled() or lookup.exception() is not None:
        return RecipientLevel.PENDING  # still running, or the cache could not answer
    _state, entry = lookup.result()
    return _SEEN.get(entry.level, RecipientLevel.UNKNOWN) if entry else RecipientLevel.PENDING
_RECIPIENTS = {seen: metrics.RECIPIENTS.labels(level=seen.value) for seen in RecipientLevel}


def _fail_safe_reason(exc: Exception, otherwise: FailSafe) -> FailSafe:
    """The fail-safe reason to count for ``exc``."""
    return FailSafe.CACHE_UNAVAILABLE if isinstance(exc, CacheUnavailable) else otherwise


def _fail_safe(stage: str, timed: Stage) -> Callable[[F], F]:
    """Catch every exception of a callback: log it, then CONTINUE (EOM has its own rule).

    Also times the callback, as ``timed``."""
    def wrap(func: F) -> F:
        seconds = metrics.CALLBACK_SECONDS.labels(stage=timed.value)

        @functools.wraps(func)
        def guarded(self: TlsMilter, *args: Any) -> Any:
            started = time.perf_counter()
            try:
                return func(self, *args)
            except CacheUnavailable as exc:  # expected while Redis is down: no traceback
                log.debug("%s: %s; message passes to end-of-message", stage, exc)
                instrument.fail_safe(FailSafe.CACHE_UNAVAILABLE)
                self.failed = True
                return CONTINUE
            except Exception as exc:
                log.exception("internal error in %s; message passes to end-of-message", stage)
                instrument.fail_safe(_fail_safe_reason(exc, FailSafe.CALLBACK_ERROR))
                self.failed = True
                return CONTINUE
            finally:
                seconds.observe(time.perf_counter() - started)
        return guarded  # type: ignore[return-value]
    return wrap


def _noreply(func: F) -> F:
    """Postfix need not wait for this callback's answer: it is always CONTINUE.

    Saves a round trip (and a wake-up of Postfix's cleanup or smtpd) per MAIL, RCPT and
    header. pymilter turns the CONTINUE into NOREPLY once the MTA agreed to it at option
    negotiation, and leaves it CONTINUE with an MTA that did not.
    """
    wrapped: F = Milter.noreply(func)
    return wrapped


class TlsMilter(Milter.Base):  # type: ignore[misc]  # pymilter is untyped
    """One instance per SMTP connection (libmilter calls it from one thread at a time)."""

    def __init__(self, assessments: Assessments, settings: config.Config,
                 policies: dict[str, Policy], *, live: LiveConfig | None = None,
                 budget: WarmupBudget | None = None) -> None:
        self.assessments = assessments
        self.live = live
        # RCPT starts warm-up probes only within budget (issue 12); past it a sensitive
        # message has its domains probed, urgently, at end-of-message. None: every RCPT may.
        self.budget = budget
        self.internal = {h.lower(): h for h in INTERNAL_HEADERS}
        self._configure(settings, policies)
        self.msg = MessageState()
        self.failed = False
        metrics.MILTER_SESSIONS.inc()
        metrics.MILTER_SESSIONS_ACTIVE.inc()

    def getsymval(self, sym: str) -> str | None:
        """A macro's value; bytes that are not UTF-8 kept as lone surrogates (U+DC80-U+DCFF).

        pymilter's own raises UnicodeDecodeError for them (its envelope and header callbacks
        decode with ``surrogateescape`` instead). So decoded, a recipient domain with such a
        byte is no valid domain: it cannot be assessed, and counts as ``none``.
        """
        try:
            value: str | None = super().getsymval(sym)
        except UnicodeDecodeError as exc:
            raw = exc.object if isinstance(exc.object, bytes) else bytes(exc.object)
            return raw.decode("utf-8", "surrogateescape")
        return value

    @_noreply
    @_fail_safe("MAIL FROM", Stage.MAIL)
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self.msg = MessageState(sender=senders.envelope_address(mailfrom))
        self.failed = False
        if self.live is not None:  # a reload (SIGHUP) applies from the next message on
            self._configure(*self.live.current)
        return CONTINUE

    def _configure(self, settings: config.Config, policies: dict[str, Policy]) -> None:
        if getattr(self, "settings", None) is not settings:  # compiled once per (re)load
            self.compiled = compiled(settings)
            self.rules = self.compiled.rules
            self.label_rules = self.compiled.label_rules
        self.settings = settings
        self.policies = policies
        self.watched = {h.lower() for h in settings.sensitivity.headers}
        self.local_transports = set(settings.milter.local_transports)
        self.skip_domains = {d.lower().rstrip(".") for d in settings.milter.skip_domains}

    @_noreply
    @_fail_safe("RCPT TO", Stage.RCPT)
    def envrcpt(self, to: str, *params: str) -> int:
        seen = self._recipient(to)
        _RECIPIENTS[seen].inc()
        return CONTINUE

    def _recipient(self, to: str) -> RecipientLevel:
        """Note the recipient's domain and start its assessment; what was known of it.

        The domain comes from ``{rcpt_addr}``, the address as Postfix resolved it, when
        Postfix sends it (smtpd does): the RCPT argument can hide where mail really goes
        (``u%remote@ours``, ``remote!u@ours``, source routes), and ``<@remote>`` goes to
        ``""@remote``. Without the macro (non_smtpd_milters) the argument is all there is.
        """
        mailer = self.getsymval("{rcpt_mailer}")
        if mailer in self.local_transports:
            return RecipientLevel.LOCAL
        address = (self.getsymval("{rcpt_addr}") or to).strip().strip("<>")
        local, at, raw_domain = address.rpartition("@")
        if not at:
            if mailer is None:
                return RecipientLevel.LOCAL  # "postmaster" and friends: Postfix adds $myorigin
            # Postfix sends it to a non-local transport, yet it names no domain to assess.
            return self._invalid(address, "the address names no domain "
                                          f"(Postfix transport {mailer})")
        if mailer is None and ("%" in local or "!" in local):
            # Unresolved (non_smtpd_milters): Postfix's percent hack and bang paths may send
            # u%remote@ours or remote!u@ours to remote, which only Postfix's resolver knows.
            return self._invalid(address, "the address may route elsewhere than its domain "
                                          "(% or ! in the local part)")
        try:
            domain = normalize_domain(raw_domain)
        except InvalidDomain as exc:
            return self._invalid(raw_domain or address, exc.why)  # "<@>": name the address
        if domain in self.skip_domains:
            return RecipientLevel.SKIPPED
        if domain in self.msg.recipients:
            return self.msg.recipients[domain].seen
        # Starts the lookup, and a probe if needed, so they are likely done by EOM; RCPT
        # never waits for either (a shared cache is read in the background).
        lookup = (self._warm_up(domain) if self.budget is not None
                  else self.assessments.prefetch(domain))
        seen = _seen(lookup)
        self.msg.recipients[domain] = Recipient(domain, seen=seen, lookup=lookup)
        return seen

    def _warm_up(self, domain: str) -> Future[tuple[State, Entry | None]]:
        """``prefetch`` while the budgets allow, charging them when it may have started a
        probe; past them only the cache read (a sensitive message has the domain probed at
        end-of-message)."""
        assert self.budget is not None
        client = self.getsymval("{client_addr}") or "-"
        spent = self.budget.spent(client, self.msg.warmups)
        if spent is None:
            lookup = self.assessments.prefetch(domain)
            if not lookup.done() or lookup.exception() is not None \
                    or lookup.result()[0] is not State.HIT:
                self.msg.warmups += 1
                self.budget.charge(client)
            return lookup
        metrics.WARMUP_DROPPED.labels(reason=spent).inc()
        if isinstance(self.assessments, ReadsInBackground):  # Redis: RCPT never waits on it
            return self.assessments.peek(domain)
        read: Future[tuple[State, Entry | None]] = Future()
        read.set_result(self.assessments.get(domain))  # the embedded cache: in memory
        return read

    def _invalid(self, name: str, why: str) -> RecipientLevel:
        """A recipient that cannot be assessed: ``none`` for sensitive mail, with ``why``."""
        self.msg.recipients.setdefault(name.lower(), Recipient(name, why, RecipientLevel.INVALID))
        return RecipientLevel.INVALID

    def data(self) -> int:
        # Overridden so Postfix's DATA-stage macro packet gets an answer (DESIGN pitfall).
        return CONTINUE

    @_noreply
    @_fail_safe("header", Stage.HEADER)
    def header(self, name: str, value: str) -> int:
        lower = name.lower()
        if lower in self.watched:
            self.msg.headers.append((name, value))
        elif lower in self.internal:
            self.msg.forged[lower] = self.msg.forged.get(lower, 0) + 1
        elif lower == "tls-required":
            self.msg.tls_required_count += 1
            if value.strip().lower() == "no":
                self.msg.tls_required_no.append(self.msg.tls_required_count)
        elif lower == "subject" and self.msg.subject is None:
            self.msg.subject = value
        elif lower == LABELS_HEADER and self.label_rules:
            self.msg.label_headers.append(value)
        elif lower == "from" and self.rules.from_header:
            self.msg.from_headers.append(value)
        return CONTINUE

    def eom(self) -> int:
        started = time.perf_counter()
        try:
            return self._eom()
        finally:
            metrics.CALLBACK_SECONDS.labels(stage=Stage.EOM.value).observe(
                time.perf_counter() - started)

    def _eom(self) -> int:
        queue_id = printable(self.getsymval("i") or "-", MAX_QUEUE_ID)
        try:
            self._strip_forged()
            marking = classify(self._facts(), self.rules, self.policies)
        except Exception:
            log.exception("queue_id=%s internal error classifying the message", queue_id)
            instrument.fail_safe(FailSafe.CLASSIFY_ERROR)
            # Sensitive when it carries a marking header or a label; keyword and sender
            # rules are not known to match without classifying: normal mail must pass.
            return self._fail(queue_id, labels.UNCLASSIFIED,
                              sensitive=bool(self.msg.headers or self.msg.label_headers))
        if marking is None:
            self._count(labels.NOT_SENSITIVE, Action.ACCEPT)
            return ACCEPT  # not sensitive: untouched and not delayed
        policy, trigger = marking.policy, marking.trigger.value
        if self.failed:  # counted as a fail-safe activation where it happened
            log.warning("queue_id=%s an earlier callback failed", queue_id)
            return self._fail(queue_id, policy.name, sensitive=True, trigger=trigger)
        try:
            statuses, applied = self._overridden(self._statuses(policy), policy)
            verdict = decide(policy, statuses, monitor=self.settings.milter.monitor,
                             sensitivity=marking.value)
            self._log(queue_id, marking, statuses, verdict, applied)
            result = self._apply(verdict, statuses, marking, applied)
        except CacheUnavailable as exc:  # expected while Redis is down: no traceback
            # The outage has its own two lines (store/redis/connection.py's Health) and each
            # message its decision line: one more WARNING per message would flood the log.
            log.debug("queue_id=%s %s", queue_id, exc)
            instrument.fail_safe(FailSafe.CACHE_UNAVAILABLE)
            return self._fail(queue_id, policy.name, sensitive=True, trigger=trigger)
        except Exception as exc:
            log.exception("queue_id=%s internal error deciding a sensitive message", queue_id)
            instrument.fail_safe(_fail_safe_reason(exc, FailSafe.DECIDE_ERROR))
            return self._fail(queue_id, policy.name, sensitive=True, trigger=trigger)
        try:  # the verdict is applied: counting it must not change it
            self._count(policy.name, verdict.action)
            for failing in verdict.failing:
                instrument.refused_domain(self.msg.reason_codes.get(failing.domain, UNKNOWN))
        except Exception:
            log.exception("queue_id=%s internal error counting the decision", queue_id)
        return result

    def abort(self) -> int:
        self.msg = MessageState()
        return CONTINUE

    def close(self) -> int:
        metrics.MILTER_SESSIONS_ACTIVE.dec()
        return CONTINUE

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _count(sensitivity: str, action: Action) -> None:
        metrics.MESSAGES.labels(sensitivity=sensitivity, verdict=action.value).inc()

    def _facts(self) -> Facts:
        """What classifying the message needs of what the callbacks gathered."""
        addresses = [self.msg.sender] if self.msg.sender else []
        if self.rules.from_header and self.msg.from_headers:
            addresses += senders.header_addresses(self.msg.from_headers)
        return Facts(self.msg.headers, self.msg.label_headers, self.msg.subject, addresses)

    def _fail(self, queue_id: str, sensitivity: str, *, sensitive: bool,
              trigger: str = "") -> int:
        if not sensitive:
            self._count(sensitivity, Action.ACCEPT)
            return ACCEPT
        log.warning("%s", format_fail_safe(queue_id, sensitivity, trigger))
        self._count(sensitivity, Action.TEMPFAIL)
        self.setreply(*FAIL_SAFE_REPLY)
        return TEMPFAIL

    def _strip_forged(self) -> None:
        for lower, count in self.msg.forged.items():
            for index in range(count, 0, -1):
                self.chgheader(self.internal[lower], index, "")

    def _statuses(self, policy: Policy) -> list[DomainStatus]:
        """Each recipient domain's level, after waiting for the ones still being assessed.

        Only a sensitive message comes here, and only it waits, within ``milter.eom_wait``:
        for the lookups RCPT started, then for the domains they found unassessed, which
        are read again once the wait is over. A lookup that failed raises
        ``CacheUnavailable`` (the fail-safe reply). The reason a domain falls short is read
        (unpacked from the cache) only for domains that fail ``policy``: only their
        reasons reach the reply, the log and the metrics.
        """
        started = time.perf_counter()
        deadline = time.monotonic() + self.settings.milter.eom_wait
        domains = [d for d, r in self.msg.recipients.items() if not r.invalid]
        running = any(not self._lookup(d).done() for d in domains)
        entries = {d: self._looked_up(d, deadline) for d in domains}
        pending = [d for d in domains if self._level(entries[d]) is None]
        if pending:
            self.assessments.wait(pending, max(0.0, deadline - time.monotonic()))
            entries.update((d, self.assessments.get(d)[1]) for d in pending)
        if running or pending:
            metrics.EOM_WAIT_SECONDS.observe(time.perf_counter() - started)
        statuses = []
        codes = self.msg.reason_codes
        for domain, recipient in self.msg.recipients.items():
            if recipient.invalid:
                statuses.append(DomainStatus(domain, Level.NONE, recipient.invalid))
                codes[domain] = INVALID_DOMAIN
                continue
            entry = entries[domain]
            level = self._level(entry)
            if entry is None:
                statuses.append(DomainStatus(domain, level, "not assessed in time"))
                codes[domain] = NOT_ASSESSED
                metrics.EOM_UNASSESSED.inc()
                continue
            if level is not None and level >= policy.require:
                statuses.append(DomainStatus(domain, level))
                continue
            why, code = first_problem(entry.assessment)
            statuses.append(DomainStatus(domain, level, why))
            codes[domain] = code or (UNKNOWN if level is None else LEVEL_TOO_LOW)
        return statuses

    def _overridden(self, statuses: list[DomainStatus], policy: Policy
                    ) -> tuple[list[DomainStatus], dict[str, Override]]:
        """``statuses`` with the per-domain overrides applied, and the overrides that were.

        An override past its expiry date no longer applies: that is logged and counted once
        per domain and process, as is applying one within ``overrides.warn_days`` of it.
        """
        overrides = self.compiled.overrides
        if not overrides:
            return statuses, {}
        today = datetime.datetime.now(datetime.UTC).date()
        applied: dict[str, Override] = {}
        result = []
        for status in statuses:
            override = overrides.get(status.domain)
            if override is None:
                result.append(status)
                continue
            if override.expired(today):
                self._notice_expiry(override, "expired")
                result.append(status)
                continue
            if override.expiring(today, self.compiled.warn_days):
                self._notice_expiry(override, "expiring")
            overridden = apply_override(status, override)
            if overridden.below(policy.require) and not status.below(policy.require):
                self.msg.reason_codes[status.domain] = (
                    OVERRIDE_DENY if override.kind is Kind.DENY else OVERRIDE_REQUIRE)
            elif override.kind is Kind.DENY:
                self.msg.reason_codes[status.domain] = OVERRIDE_DENY
            applied[status.domain] = override
            metrics.OVERRIDES_APPLIED.labels(kind=override.kind.value).inc()
            result.append(overridden)
        return result, applied

    def _notice_expiry(self, override: Override, what: str) -> None:
        if not self.compiled.first_notice(override.domain, what):
            return
        if what == "expired":
            log.warning("override for %s (%s) expired on %s and no longer applies; remove it "
                        "from overrides.domains", override.domain, override.label,
                        override.expires)
            metrics.OVERRIDES_EXPIRED.inc()
        else:
            log.warning("override for %s (%s) expires on %s", override.domain, override.label,
                        override.expires)

    def _lookup(self, domain: str) -> Future[tuple[State, Entry | None]]:
        lookup = self.msg.recipients[domain].lookup
        assert lookup is not None, "RCPT starts a lookup for every valid domain"
        return lookup

    def _looked_up(self, domain: str, deadline: float) -> Entry | None:
        """The entry the lookup RCPT started found, waited for until ``deadline``."""
        try:
            return self._lookup(domain).result(timeout=max(0.0, deadline - time.monotonic()))[1]
        except TimeoutError:
            return None  # still running: read again after the wait, like a miss

    @staticmethod
    def _level(entry: Entry | None) -> Level | None:
        if entry is None or entry.level == UNKNOWN:
            return None
        return Level(entry.level)

    def _apply(self, verdict: Verdict, statuses: list[DomainStatus], marking: Marking,
               applied: dict[str, Override]) -> int:
        if verdict.action in (Action.REJECT, Action.TEMPFAIL):
            self._setreply(verdict)
            return REJECT if verdict.action is Action.REJECT else Milter.TEMPFAIL
        overridden = f"; overrides={_overrides_text(applied)}" if applied else ""
        self.addheader(ASSESSMENT_HEADER,
                       f"policy={verdict.policy.name}; require={verdict.policy.require.value}; "
                       f"verdict={verdict.action.value}; {_summary(statuses)}; "
                       f"trigger={marking.trigger.value}{overridden}")
        subject_now = self.msg.subject
        if self.rules.strip_keyword and marking.keywords and subject_now is not None \
                and len(subject_now) <= subject.MAX_SUBJECT:  # never cut a longer one
            for keyword in marking.keywords:
                subject_now = subject.strip(subject.decode(subject_now), keyword)
            self.chgheader("Subject", 1, subject_now)
        for index in reversed(self.msg.tls_required_no):
            self.chgheader(TLS_REQUIRED, index, "")  # RFC 8689 must not relax TLS for it
        if verdict.action is Action.ACCEPT:
            if statuses:
                # FILTER moves every recipient to the secure transport, local ones too: only
                # route when some recipient actually leaves this server.
                self.addheader(ROUTE_HEADER, _route(verdict.policy, statuses).value)
        elif verdict.action is Action.TAG:
            self.addheader(TAG_HEADER, tag_text(verdict))
            tag = self.settings.milter.subject_tag
            if tag and subject_now is not None:
                self.chgheader("Subject", 1, f"{tag} {subject_now}")
        elif verdict.action is Action.QUARANTINE:
            self.quarantine(cap("; ".join(verdict.reply[1:]), MAX_QUARANTINE_REASON)
                            or "insecure recipient domain")
        return ACCEPT

    def _setreply(self, verdict: Verdict) -> None:
        """The verdict's reply; if libmilter refuses it, a short one with the same code.

        The reply lines are already safe (``core.verdict``); this is the last line of defence,
        so a reply that cannot be built never turns a 550 into the fail-safe 451.
        """
        try:
            self.setreply(verdict.smtp_code, verdict.enhanced_code, *_escape(verdict.reply))
        except (Milter.milter.error, ValueError) as exc:
            log.warning("reply refused by libmilter (%s); sending the short %s reply instead",
                        exc, verdict.smtp_code)
            self.setreply(verdict.smtp_code, verdict.enhanced_code, short_reply(verdict))

    def _log(self, queue_id: str, marking: Marking, statuses: list[DomainStatus],
             verdict: Verdict, applied: dict[str, Override]) -> None:
        log.info("%s", format_decision(queue_id, marking.value, statuses, verdict,
                                       self.msg.reason_codes, marking.trigger.value,
                                       {d: o.label for d, o in applied.items()}))


def _route(policy: Policy, statuses: list[DomainStatus]) -> Level:
    """The transport level: the policy's, or the highest floor of a ``require`` override
    when every recipient domain meets it, so delivery enforces it too.

    Postfix routes the whole message by one transport: were another recipient domain below
    the floor, that transport would defer it for good. The message then goes by the policy's
    transport, where the policy server still holds each domain to its assessed level.
    """
    top = max([policy.require, *(s.floor for s in statuses if s.floor is not None)])
    if all(s.level is not None and s.level >= top for s in statuses):
        return top
    return policy.require


def _overrides_text(applied: dict[str, Override]) -> str:
    return ", ".join(f"{domain_list([d])}:{o.label}"
                     for d, o in list(applied.items())[:MAX_SUMMARY_DOMAINS])


MAX_QUARANTINE_REASON = 900  # Postfix logs it in one line; libmilter refuses over 980 bytes


def _summary(statuses: list[DomainStatus]) -> str:
    """The assessment header's domain list: safe names, a bounded count of them."""
    if len(statuses) <= MAX_SUMMARY_DOMAINS:
        return "; ".join(f"{domain_list([s.domain])}={s.level.value if s.level else UNKNOWN}"
                         for s in statuses)
    by_level: dict[str, list[str]] = {}  # many recipients: grouped, each group capped
    for status in statuses:
        by_level.setdefault(status.level.value if status.level else UNKNOWN, []).append(
            status.domain)
    return "; ".join(f"{level}: {domain_list(domains)}" for level, domains in by_level.items())


MAX_SUMMARY_DOMAINS = 20


def _escape(lines: tuple[str, ...]) -> tuple[str, ...]:
    """Reply lines as libmilter takes them: a '%' doubled (it drops a lone one), and only
    printable ASCII with no CR or LF (``core.safetext.reply_line`` made them so; this makes
    sure, as a line with CR/LF would have libmilter refuse the whole reply)."""
    return tuple("".join(c if " " <= c <= "~" else "?" for c in line).replace("%", "%%")
                 for line in lines)
