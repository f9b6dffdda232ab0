"""The pymilter glue: gather recipients and headers, apply the verdict of ``policy.decide``.

Fail-safe rules (DESIGN.md): a fault never delays or refuses a normal message, and never lets
a sensitive one through unchecked; sensitive mail is tempfailed with a clear text instead.
Headers tlsmilter adds are stripped from every message if a sender forged them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import Milter

from tlsmilter import config
from tlsmilter.cache import Entry
from tlsmilter.domains import InvalidDomain, normalize_domain
from tlsmilter.engine import Assessments
from tlsmilter.levels import UNKNOWN, Level
from tlsmilter.policy import Action, DomainStatus, Policy, Verdict, decide
from tlsmilter.sensitivity import classify

log = logging.getLogger(__name__)

ROUTE_HEADER = "X-TLSMilter-Route"
ASSESSMENT_HEADER = "X-TLSMilter-Assessment"
TAG_HEADER = "X-TLSMilter-Tag"
INTERNAL_HEADERS = (ROUTE_HEADER, ASSESSMENT_HEADER, TAG_HEADER)
TLS_REQUIRED = "TLS-Required"

FAIL_SAFE_REPLY = ("451", "4.3.0",
                   "tlsmilter could not check this sensitive message's recipients; "
                   "it was not sent and will be retried")

F = TypeVar("F", bound=Callable[..., Any])

# pymilter is untyped: give its reply codes a type once.
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL


def policies_from(settings: config.Config) -> dict[str, Policy]:
    return {
        name: Policy(name, Level(p.require.value), Action(p.on_insecure.value),
                     Action(p.on_unknown.value), tuple(p.reply))
        for name, p in settings.policies.items()
    }


@dataclass
class Recipient:
    domain: str
    invalid: str = ""  # why the domain cannot be assessed at all (address literal, bad name)


@dataclass
class MessageState:
    recipients: dict[str, Recipient] = field(default_factory=dict)  # by domain
    headers: list[tuple[str, str]] = field(default_factory=list)  # watched sensitivity headers
    forged: dict[str, int] = field(default_factory=dict)  # internal header -> occurrences
    tls_required_no: list[int] = field(default_factory=list)  # occurrence indexes
    tls_required_count: int = 0
    subject: str | None = None


def _fail_safe(stage: str) -> Callable[[F], F]:
    """Catch every exception of a callback: log it, then CONTINUE (EOM has its own rule)."""
    def wrap(func: F) -> F:
        @functools.wraps(func)
        def guarded(self: TlsMilter, *args: Any) -> Any:
            try:
                return func(self, *args)
            except Exception:
                log.exception("internal error in %s; message passes to end-of-message", stage)
                self.failed = True
                return CONTINUE
        return guarded  # type: ignore[return-value]
    return wrap


class TlsMilter(Milter.Base):  # type: ignore[misc]  # pymilter is untyped
    """One instance per SMTP connection (libmilter calls it from one thread at a time)."""

    def __init__(self, engine: Assessments, settings: config.Config,
                 policies: dict[str, Policy]) -> None:
        self.engine = engine
        self.settings = settings
        self.policies = policies
        self.watched = {h.lower() for h in settings.sensitivity.headers}
        self.internal = {h.lower(): h for h in INTERNAL_HEADERS}
        self.local_transports = set(settings.milter.local_transports)
        self.skip_domains = {d.lower().rstrip(".") for d in settings.milter.skip_domains}
        self.msg = MessageState()
        self.failed = False

    @_fail_safe("MAIL FROM")
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self.msg = MessageState()
        self.failed = False
        return CONTINUE

    @_fail_safe("RCPT TO")
    def envrcpt(self, to: str, *params: str) -> int:
        mailer = self.getsymval("{rcpt_mailer}")
        if mailer in self.local_transports:
            return CONTINUE
        address = to.strip().strip("<>")
        local, at, raw_domain = address.rpartition("@")
        if not at or not local:
            return CONTINUE  # "postmaster" and friends: delivered locally by definition
        try:
            domain = normalize_domain(raw_domain)
        except InvalidDomain as exc:
            self.msg.recipients.setdefault(raw_domain.lower(), Recipient(raw_domain, exc.why))
            return CONTINUE
        if domain in self.skip_domains or domain in self.msg.recipients:
            return CONTINUE
        self.msg.recipients[domain] = Recipient(domain)
        self.engine.lookup(domain)  # starts the probe now, so it is likely done by EOM
        return CONTINUE

    def data(self) -> int:
        # Overridden so Postfix's DATA-stage macro packet gets an answer (DESIGN pitfall).
        return CONTINUE

    @_fail_safe("header")
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
        return CONTINUE

    def eom(self) -> int:
        queue_id = self.getsymval("i") or "-"
        try:
            self._strip_forged()
            policy, value = classify(
                self.msg.headers, watched=self.watched,
                values=self.settings.sensitivity.values,
                fail_safe=self.settings.sensitivity.fail_safe_policy, policies=self.policies)
        except Exception:
            log.exception("queue_id=%s internal error classifying the message", queue_id)
            return self._fail(queue_id, sensitive=bool(self.msg.headers))
        if policy is None:
            return ACCEPT  # not sensitive: untouched and not delayed
        try:
            if self.failed:
                raise RuntimeError("an earlier callback failed")
            statuses = self._statuses()
            verdict = decide(policy, statuses, monitor=self.settings.milter.monitor,
                             sensitivity=value)
            self._log(queue_id, value, statuses, verdict)
            return self._apply(verdict, statuses)
        except Exception:
            log.exception("queue_id=%s internal error deciding a sensitive message", queue_id)
            return self._fail(queue_id, sensitive=True)

    def abort(self) -> int:
        self.msg = MessageState()
        return CONTINUE

    def close(self) -> int:
        return CONTINUE

    # -- helpers -------------------------------------------------------------------------

    def _fail(self, queue_id: str, *, sensitive: bool) -> int:
        if not sensitive:
            return ACCEPT
        log.warning("decision queue_id=%s verdict=tempfail reason=internal_error", queue_id)
        self.setreply(*FAIL_SAFE_REPLY)
        return TEMPFAIL

    def _strip_forged(self) -> None:
        for lower, count in self.msg.forged.items():
            for index in range(count, 0, -1):
                self.chgheader(self.internal[lower], index, "")

    def _statuses(self) -> list[DomainStatus]:
        pending = [d for d, r in self.msg.recipients.items() if not r.invalid
                   and self._level(self.engine.cache.get(d)[1]) is None]
        if pending:
            self.engine.wait(pending, self.settings.milter.eom_wait)
        statuses = []
        for domain, recipient in self.msg.recipients.items():
            if recipient.invalid:
                statuses.append(DomainStatus(domain, Level.NONE, recipient.invalid))
                continue
            _state, entry = self.engine.cache.get(domain)
            level = self._level(entry)
            why = _why(entry) if entry else "not assessed in time"
            statuses.append(DomainStatus(domain, level, why))
        return statuses

    @staticmethod
    def _level(entry: Entry | None) -> Level | None:
        if entry is None or entry.level == UNKNOWN:
            return None
        return Level(entry.level)

    def _apply(self, verdict: Verdict, statuses: list[DomainStatus]) -> int:
        if verdict.action in (Action.REJECT, Action.TEMPFAIL):
            self.setreply(verdict.smtp_code, verdict.enhanced_code, *_escape(verdict.reply))
            return REJECT if verdict.action is Action.REJECT else Milter.TEMPFAIL
        summary = "; ".join(f"{s.domain}={s.level.value if s.level else UNKNOWN}"
                            for s in statuses)
        self.addheader(ASSESSMENT_HEADER,
                       f"policy={verdict.policy.name}; require={verdict.policy.require.value}; "
                       f"verdict={verdict.action.value}; {summary}")
        if verdict.action is Action.ACCEPT:
            for index in reversed(self.msg.tls_required_no):
                self.chgheader(TLS_REQUIRED, index, "")  # RFC 8689 must not relax our TLS
            if statuses:
                # FILTER moves every recipient to the secure transport, local ones too: only
                # route when some recipient actually leaves this server.
                self.addheader(ROUTE_HEADER, verdict.policy.require.value)
        elif verdict.action is Action.TAG:
            failing = ", ".join(d.domain for d in verdict.failing)
            would = f" (would {verdict.would_be.value})" if verdict.would_be else ""
            self.addheader(TAG_HEADER, f"insecure: {failing}{would}")
            tag = self.settings.milter.subject_tag
            if tag and self.msg.subject is not None:
                self.chgheader("Subject", 1, f"{tag} {self.msg.subject}")
        elif verdict.action is Action.QUARANTINE:
            self.quarantine("; ".join(verdict.reply[1:]) or "insecure recipient domain")
        return ACCEPT

    def _log(self, queue_id: str, value: str, statuses: list[DomainStatus],
             verdict: Verdict) -> None:
        levels = ",".join(f"{s.domain}:{s.level.value if s.level else UNKNOWN}"
                          for s in statuses) or "-"
        log.info(
            "decision queue_id=%s sensitivity=%s policy=%s require=%s verdict=%s%s "
            "domains=%s failing=%s",
            queue_id, _printable(value), verdict.policy.name, verdict.policy.require.value,
            verdict.action.value,
            f" would_be={verdict.would_be.value}" if verdict.would_be else "",
            levels, ",".join(d.domain for d in verdict.failing) or "-",
        )


def _why(entry: Entry) -> str:
    """The first problem the assessment found, in plain language."""
    for reason in entry.assessment.get("reasons", []):
        if reason.get("severity") == "problem":
            host = f" ({reason['host']})" if reason.get("host") else ""
            return f"{reason['text'].split(' (')[0]}{host}"
    return ""


def _printable(text: str) -> str:
    """Header-derived text for a log line: ASCII, no spaces or control characters."""
    return "".join(c if c.isascii() and c.isprintable() and c != " " else "?" for c in text) \
        or "-"


def _escape(lines: tuple[str, ...]) -> tuple[str, ...]:
    # libmilter drops a reply containing a lone '%'; printable ASCII only in SMTP replies.
    return tuple(line.replace("%", "%%").encode("ascii", "replace").decode() for line in lines)
