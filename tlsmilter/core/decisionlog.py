"""The decision-log line: one per sensitive message, formatted and parsed here only.

The milter logs it (``format_decision``, ``format_fail_safe``); ``tlsmilter report`` and the
tests read it back (``parse``). docs/metrics.md, "The decision log line", documents the
fields::

    decision queue_id=4XyZ1 sensitivity=private trigger=header policy=private
    require=verified verdict=reject domains=a.example:none,b.example:verified
    failing=a.example reasons=a.example:no_starttls

``trigger=`` (header, label, subject or sender) says what made the message sensitive; lines
written before it existed have none, and parse with an empty ``trigger``.

Every value a sender controls (the sensitivity header's value, recipient domains) is made
printable ASCII without spaces and capped at 256 characters, so a line always splits back
into its fields and stays short.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from tlsmilter.core.levels import UNKNOWN
from tlsmilter.core.safetext import MAX_LOG_VALUE, cap
from tlsmilter.core.verdict import DomainStatus, Verdict

MARK = "decision queue_id="
UNRECORDED = "unrecorded"  # a line from before decision lines carried reasons=
INTERNAL_ERROR = "internal_error"  # reason= of a fail-safe tempfail
MAX_QUEUE_ID = 64  # Postfix's long queue IDs have about 20 characters
# A message may have a thousand recipients: the lists name this many, omitted= counts the rest.
MAX_LOGGED_DOMAINS = 20


def printable(text: str, limit: int = MAX_LOG_VALUE) -> str:
    """Sender-controlled text for a log line: ASCII, no spaces or control characters, and
    at most ``limit`` characters (cut ones end in ``...``), so one value cannot flood the log.
    """
    return cap("".join(c if c.isascii() and c.isprintable() and c != " " else "?"
                       for c in text[:limit + 1]), limit) or "-"


def format_decision(queue_id: str, sensitivity: str, statuses: Sequence[DomainStatus],
                    verdict: Verdict, reason_codes: Mapping[str, str],
                    trigger: str = "", overrides: Mapping[str, str] | None = None) -> str:
    """The line for a decided message; ``reason_codes`` maps failing domains to codes,
    ``trigger`` names what made it sensitive (``core.sensitivity.Trigger``), ``overrides``
    maps recipient domains to the override that applied (``require-dane``, ``deny``).

    Each list names at most ``MAX_LOGGED_DOMAINS`` domains (the failing ones first in
    ``domains=``); ``omitted=`` then says how many recipient domains went unnamed.
    """
    shown_failing = verdict.failing[:MAX_LOGGED_DOMAINS]
    shown = list(statuses)
    if len(shown) > MAX_LOGGED_DOMAINS:
        failing_names = {d.domain for d in shown_failing}
        shown = [s for s in statuses if s.domain in failing_names]
        shown += [s for s in statuses if s.domain not in failing_names][
            :MAX_LOGGED_DOMAINS - len(shown)]
    levels = ",".join(f"{printable(s.domain)}:{s.level.value if s.level else UNKNOWN}"
                      for s in shown) or "-"
    would_be = f" would_be={verdict.would_be.value}" if verdict.would_be else ""
    failing = ",".join(printable(d.domain) for d in shown_failing) or "-"
    reasons = ",".join(f"{printable(d.domain)}:{reason_codes.get(d.domain, UNKNOWN)}"
                       for d in shown_failing) or "-"
    omitted = f" omitted={len(statuses) - len(shown)}" if len(statuses) > len(shown) else ""
    named = list((overrides or {}).items())[:MAX_LOGGED_DOMAINS]
    overridden = " overrides=" + ",".join(f"{printable(d)}:{printable(o, 32)}"
                                          for d, o in named) if named else ""
    return (f"{MARK}{queue_id} sensitivity={printable(sensitivity)}{_trigger(trigger)} "
            f"policy={verdict.policy.name} require={verdict.policy.require.value} "
            f"verdict={verdict.action.value}{would_be} domains={levels} failing={failing} "
            f"reasons={reasons}{omitted}{overridden}")


def format_fail_safe(queue_id: str, sensitivity: str, trigger: str = "") -> str:
    """The line for a sensitive message tempfailed because tlsmilter itself failed."""
    return (f"{MARK}{queue_id} sensitivity={printable(sensitivity)}{_trigger(trigger)} "
            f"verdict=tempfail reason={INTERNAL_ERROR}")


def _trigger(trigger: str) -> str:
    return f" trigger={printable(trigger, 16)}" if trigger else ""


@dataclass(frozen=True)
class Decision:
    """One parsed decision line."""

    queue_id: str
    verdict: str
    sensitivity: str = ""
    trigger: str = ""  # header, label, subject or sender; "" on lines from before it
    policy: str = ""
    require: str = ""
    would_be: str = ""
    levels: dict[str, str] = field(default_factory=dict)  # domain -> level
    failing: tuple[str, ...] = ()
    reasons: dict[str, str] = field(default_factory=dict)  # failing domain -> reason code
    internal_error: bool = False
    omitted: int = 0  # recipient domains the line did not name (it names at most 20)
    overrides: dict[str, str] = field(default_factory=dict)  # domain -> "require-dane", "deny"

    @property
    def refused(self) -> bool:
        """Refused, held, or (in monitor mode, or by a tag policy) let through flagged."""
        return self.verdict != "accept"


def parse(line: str) -> Decision | None:
    """The decision on ``line``, or None if it carries none (any prefix is ignored)."""
    start = line.find(MARK)
    if start < 0:
        return None
    fields = dict(part.partition("=")[::2] for part in line[start:].split()[1:] if "=" in part)
    if "verdict" not in fields:
        return None
    failing = tuple(d for d in fields.get("failing", "-").split(",") if d and d != "-")
    reasons = _pairs(fields["reasons"]) if "reasons" in fields else dict.fromkeys(
        failing, UNRECORDED)
    return Decision(
        queue_id=fields["queue_id"], verdict=fields["verdict"],
        sensitivity=fields.get("sensitivity", ""), trigger=fields.get("trigger", ""),
        policy=fields.get("policy", ""),
        require=fields.get("require", ""), would_be=fields.get("would_be", ""),
        levels=_pairs(fields.get("domains", "-")), failing=failing, reasons=reasons,
        internal_error=fields.get("reason") == INTERNAL_ERROR,
        omitted=int(fields["omitted"]) if fields.get("omitted", "").isdigit() else 0,
        overrides=_pairs(fields.get("overrides", "-")))


def _pairs(text: str) -> dict[str, str]:
    """``a.example:none,b.example:dane`` as a dict; the last colon splits (IPv6 literals)."""
    pairs = {}
    for item in text.split(","):
        key, sep, value = item.rpartition(":")
        if sep and key:
            pairs[key] = value
    return pairs


def decisions(lines: Iterable[str]) -> Iterator[Decision]:
    """The decisions among ``lines``; other lines are skipped."""
    for line in lines:
        decision = parse(line)
        if decision is not None:
            yield decision
