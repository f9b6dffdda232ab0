"""Sensitivity policies and the pure ``decide`` function.

``decide`` turns a policy and the assessment of every recipient domain into one verdict for the
whole message (headers arrive after RCPT, so a header-triggered decision can only be taken at
end-of-message). It never does I/O; the milter only applies what it returns.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from tlsmilter.core.levels import Level
from tlsmilter.core.safetext import MAX_QUOTED, domain_name, reply_line, safe


class Action(enum.Enum):
    """What happens to a message; values double as metric labels and log fields."""

    ACCEPT = "accept"
    TAG = "tag"
    QUARANTINE = "quarantine"
    TEMPFAIL = "tempfail"
    REJECT = "reject"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Action.ACCEPT: 0, Action.TAG: 1, Action.QUARANTINE: 2, Action.TEMPFAIL: 3,
             Action.REJECT: 4}


@dataclass(frozen=True)
class Policy:
    name: str
    require: Level
    on_insecure: Action  # a domain below ``require``
    on_unknown: Action  # a domain that could not be assessed
    reply: tuple[str, ...] = ()  # extra reply lines, e.g. a link to a secure portal

    def strictness(self) -> tuple[int, int, int]:
        """Orders policies: when several headers apply, the strictest wins."""
        return self.require.rank, self.on_insecure.severity, self.on_unknown.severity


@dataclass(frozen=True)
class DomainStatus:
    """What the milter knows of one recipient domain at end-of-message."""

    domain: str
    level: Level | None  # None: unknown (not assessed in time, or a temporary failure)
    why: str = ""  # plain-language reason for people, e.g. "mx1 does not offer STARTTLS"
    floor: Level | None = None  # a level this domain needs whatever the policy (an override)
    denied: bool = False  # sensitive mail may never go there (an override)

    def below(self, require: Level) -> bool:
        """Insecure for a policy requiring ``require``: denied, or assessed below it or below
        the domain's own floor."""
        if self.denied:
            return True
        needed = require if self.floor is None or self.floor < require else self.floor
        return self.level is not None and self.level < needed


@dataclass(frozen=True)
class Verdict:
    action: Action
    policy: Policy
    failing: tuple[DomainStatus, ...] = ()
    would_be: Action | None = None  # in monitor mode: the action that was not taken
    smtp_code: str = ""
    enhanced_code: str = ""
    reply: tuple[str, ...] = field(default=())


# RFC 3463 / RFC 5248: X.7.10 "Encryption needed"; X.4.3 "Directory server failure" for
# domains we could not assess (DNS trouble or timeouts): a retry may well succeed.
REJECT_CODES = ("550", "5.7.10")
TEMPFAIL_INSECURE_CODES = ("450", "4.7.10")
TEMPFAIL_UNKNOWN_CODES = ("451", "4.4.3")


def decide(policy: Policy, domains: Sequence[DomainStatus], *, monitor: bool = False,
           sensitivity: str = "") -> Verdict:
    """One verdict for the whole message; names every failing domain in the reply."""
    insecure = tuple(d for d in domains if d.below(policy.require))
    unknown = tuple(d for d in domains if d.level is None and not d.denied)
    candidates = [Action.ACCEPT]
    if insecure:
        candidates.append(policy.on_insecure)
    if unknown:
        candidates.append(policy.on_unknown)
    action = max(candidates, key=lambda a: a.severity)
    failing = insecure + unknown
    if action is Action.ACCEPT:
        return Verdict(Action.ACCEPT, policy)
    reply = _reply_lines(policy, insecure, unknown, sensitivity)
    if monitor and action is not Action.TAG:
        return Verdict(Action.TAG, policy, failing, would_be=action, reply=reply)
    if action is Action.REJECT:
        code, xcode = REJECT_CODES
    elif action is Action.TEMPFAIL:
        code, xcode = TEMPFAIL_INSECURE_CODES if insecure else TEMPFAIL_UNKNOWN_CODES
    else:
        code, xcode = "", ""
    return Verdict(action, policy, failing, smtp_code=code, enhanced_code=xcode, reply=reply)


# libmilter sends at most 32 lines in one SMTP reply (smfi_setmlreply).
MAX_REPLY_LINES = 32
MAX_EXTRA_LINES = 8  # policies.*.reply: the config check holds it to this


def _reply_lines(policy: Policy, insecure: tuple[DomainStatus, ...],
                 unknown: tuple[DomainStatus, ...], sensitivity: str) -> tuple[str, ...]:
    # Sender-controlled text (the header's value, names that are no valid domain, and
    # reasons that may quote a remote server) is escaped and each line capped: libmilter
    # refuses a line with CR/LF or over 980 bytes, and SMTP allows 512 with the code.
    marked = f"marked '{safe(sensitivity, MAX_QUOTED)}'" if sensitivity else "marked sensitive"
    head = (f"This message is {marked} and needs {policy.require.value} transport security; "
            f"it was not sent.")
    domains = [f"{domain_name(d.domain)}: cannot receive mail securely enough"
               f"{': ' + d.why if d.why else ''}" for d in insecure]
    domains += [f"{domain_name(d.domain)}: transport security not known yet"
                f"{': ' + d.why if d.why else ''}; try again later" for d in unknown]
    extra = policy.reply[:MAX_EXTRA_LINES]
    room = MAX_REPLY_LINES - 1 - len(extra)
    if len(domains) > room:
        hidden = len(domains) - (room - 1)
        domains = [*domains[:room - 1], f"... and {hidden} more recipient domains fall short too"]
    return tuple(reply_line(line) for line in (head, *domains, *extra))


def short_reply(verdict: Verdict) -> str:
    """A reply text that always fits: for when the MTA library refuses the full one."""
    if verdict.action is Action.REJECT or verdict.smtp_code.startswith("450"):
        return "This sensitive message was not sent: a recipient domain is not secure enough."
    return ("This sensitive message was not sent: a recipient domain's transport security "
            "is not known yet; it will be retried.")


MAX_TAG_DOMAINS = 20  # domains named in a header tlsmilter adds; the rest are counted


def tag_text(verdict: Verdict) -> str:
    """The tag header's value: insecure and unknown domains, each named as such."""
    insecure = [d.domain for d in verdict.failing if d.level is not None or d.denied]
    unknown = [d.domain for d in verdict.failing if d.level is None and not d.denied]
    parts = [f"{label}: {domain_list(names)}"
             for label, names in (("insecure", insecure), ("unknown", unknown)) if names]
    would = f" (would {verdict.would_be.value})" if verdict.would_be else ""
    return "; ".join(parts) + would


def domain_list(domains: Sequence[str], limit: int = MAX_TAG_DOMAINS) -> str:
    """``a.example, b.example`` for a header: safe names, at most ``limit`` of them."""
    named = ", ".join(domain_name(d) for d in domains[:limit])
    return named + (f", and {len(domains) - limit} more" if len(domains) > limit else "")
