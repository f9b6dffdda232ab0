"""``tlsmilter proof``: per sensitive message, the evidence that it left as securely as required.

Joins three logs by queue ID: tlsmilter's decision line (``core.decisionlog``: sensitivity,
policy, verdict, the level assessed per domain), its policy server's answer lines
(``core.policylog``: the TLS policy each delivery was given) and Postfix's mail log
(``commands.maillog``: sender, Message-ID, transport, relay, the TLS Postfix negotiated, the
final status). Reads files (rotated and ``.gz`` ones too) or standard input, e.g.
``journalctl -u postfix@- -u tlsmilter -o short-iso | tlsmilter proof``. docs/proof.md
documents the record and its JSON form.

A delivery of an enforced (``accept``) sensitive message that was sent in clear, below the
level the message required, or through a transport other than the one of that level is a
*violation*: it is flagged and the command exits 5. One below the level the domain was
assessed at when the message was accepted, but not below the required level, is a *warning*
only: the domain got weaker after acceptance and the policy server let it go at its current
level, which still meets the requirement (docs/proof.md, "Why below assessed is a warning").
"""

from __future__ import annotations

import argparse
import csv
import enum
import gzip
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from tlsmilter.commands import maillog
from tlsmilter.core import decisionlog, policylog
from tlsmilter.core.levels import Level
from tlsmilter.errors import UsageError

EXIT_VIOLATION = 5  # some sensitive delivery left below its level (README, Commands)

# The transport of each required level (contrib/postfix/master.cf.snippet) and the suffix of
# the policy map that transport asks.
TRANSPORTS = {"encrypted": "tlsmilter-secure", "verified": "tlsmilter-verified",
              "dane": "tlsmilter-dane"}
MAP_SUFFIX = {"tlsmilter-secure": "-strict", "tlsmilter-verified": "-verified",
              "tlsmilter-dane": "-dane"}
RANK = {"none": 0, "encrypted": 1, "verified": 2, "dane": 3}
# The starts of the Postfix lines about a queue ID that proof reads; every other is dropped.
KEPT = ("to=<", "message-id=", "from=<", "milter-header-filter: ", "milter-reject: ")
MAX_FOLLOWED = 100_000  # messages (and domains' policy answers) --follow keeps in memory
MAX_ANSWERS_FOLLOWED = 8  # policy answers kept per domain while following


class ProofResult(enum.Enum):
    """What proof found for one sensitive delivery; values double as metric labels."""

    OK = "ok"
    BELOW_ASSESSED = "below_assessed"  # a warning: the required level was met
    VIOLATION = "violation"  # in clear, below the required level, or the wrong transport
    UNENFORCED = "unenforced"  # monitor mode, tag or quarantine: not held to a level


@dataclass
class Recipient:
    """One recipient's latest delivery attempt, with the TLS and policy it used."""

    recipient: str
    domain: str
    transport: str
    relay: str
    relay_ip: str
    status: str
    time: datetime | None
    reply: str
    attempts: int = 1
    tls: str = "none"  # Verified, Trusted, Untrusted, Anonymous or none
    tls_version: str = ""
    cipher: str = ""
    policy: str = ""  # the policy server's answer for this transport's map, if logged
    assessed: str = ""  # the domain's level in the decision line
    delivered_level: str = ""
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Message:
    """What the logs say about one queue ID. Reading keeps raw text (``stamp``, ``decision_
    stamp``, ``deliveries``); ``resolve`` parses it, for the messages that become records."""

    queue_id: str
    stamp: str = ""  # of Postfix's first line with the message's Message-ID or sender
    message_id: str = ""
    sender: str | None = None
    route: str = ""  # the transport milter_header_checks sent it to
    decision: decisionlog.Decision | None = None
    decision_stamp: str = ""
    # (service, stamp, "to=<...>, relay=..." text, the TLS line of its connection or "")
    deliveries: list[tuple[str, str, str, str]] = field(default_factory=list)
    time: datetime | None = None
    decision_time: datetime | None = None
    recipients: dict[str, Recipient] = field(default_factory=dict)


@dataclass
class Answer:
    map_name: str
    answer: str
    time: datetime | None


class Evidence:
    """Everything read so far, joined by queue ID (messages) and domain (policy answers).

    ``add`` sees every line of a large log, so it does the least it can: it drops a line by
    its first words, keeps the rest as text, and leaves parsing to ``resolve``.
    """

    def __init__(self, on_delivery: Callable[[Message], None] | None = None) -> None:
        """``on_delivery``, for ``--follow``: called after each delivery line of a sensitive
        message, which is then forgotten once Postfix logs it ``removed``."""
        self.messages: dict[str, Message] = {}
        self.answers: dict[str, list[Answer]] = {}  # domain -> answers in log order
        self._tls = maillog.TlsJoin()
        self._now = datetime.now().astimezone()
        self._on_delivery = on_delivery
        self._kept = KEPT if on_delivery is None else (*KEPT, "removed")

    def _message(self, qid: str) -> Message:
        found = self.messages.get(qid)
        if found is None:
            found = self.messages[qid] = Message(qid)
            if self._on_delivery is not None and len(self.messages) > MAX_FOLLOWED:
                # Following for months: messages never logged "removed" (refused ones)
                # must not pile up. The oldest goes.
                del self.messages[next(iter(self.messages))]
        return found

    def _time(self, stamp: str) -> datetime | None:
        return maillog.parse_time(stamp, self._now) if stamp else None

    def feed(self, lines: Iterable[str]) -> None:
        add = self.add
        for text in lines:
            add(text)

    def add(self, text: str) -> None:
        # Offsets, not slices: most lines are dropped here without a copy.
        end = text.find("]: ")
        if end < 0:  # tlsmilter's own lines, as a file without syslog prefixes
            self._add_tlsmilter(text, "")
            return
        start = end + 3
        colon = text.find(": ", start, start + 21)
        if colon >= start + 5 and text[start:colon].isalnum():
            if text.startswith(self._kept, colon + 2):
                self._add_postfix(text, end, text[start:colon], text[colon + 2:])
            return
        if text.startswith(maillog.TRUST, start):
            if " TLS connection " in text:
                self._tls.connected(maillog.process_key(text, end), text[start:])
            return
        if "postfix" not in text[:end]:
            self._add_tlsmilter(text, maillog.stamp(text, end))

    def _add_postfix(self, text: str, end: int, qid: str, tail: str) -> None:
        if tail.startswith("to=<"):
            relay = maillog.delivery_relay(tail)
            key = maillog.process_key(text, end)
            tls = self._tls.delivered(key, qid, relay)
            message = self._message(qid)
            message.deliveries.append((maillog.service(key), maillog.stamp(text, end), tail,
                                       tls))
            if self._on_delivery is not None and message.decision is not None:
                self._on_delivery(message)
        elif tail.startswith("removed"):
            if self._on_delivery is not None:  # following: done with this message
                self.messages.pop(qid, None)
        elif tail.startswith("message-id="):
            message = self._message(qid)
            message.message_id = maillog.address(tail, "message-id") or ""
            message.stamp = message.stamp or maillog.stamp(text, end)
        elif tail.startswith("from=<"):
            message = self._message(qid)
            message.sender = maillog.address(tail, "from")
            message.stamp = message.stamp or maillog.stamp(text, end)
        elif tail.startswith("milter-header-filter: ") and "X-TLSMilter-Route:" in tail:
            self._message(qid).route = tail.rstrip().rstrip(":").rpartition(" ")[2]
        elif tail.startswith("milter-reject: "):
            message = self._message(qid)
            message.sender = maillog.address(tail, "from")
            message.stamp = message.stamp or maillog.stamp(text, end)

    def _add_tlsmilter(self, text: str, stamp: str) -> None:
        if decisionlog.MARK in text:
            decision = decisionlog.parse(text)
            if decision is not None:
                message = self._message(decision.queue_id)
                message.decision, message.decision_stamp = decision, stamp
        elif policylog.MARK in text:
            answer = policylog.parse(text)
            if answer is not None:
                answers = self.answers.setdefault(answer.domain, [])
                answers.append(Answer(answer.map_name, answer.answer, self._time(stamp)))
                if self._on_delivery is not None:  # following: the recent ones suffice
                    del answers[:-MAX_ANSWERS_FOLLOWED]
                    if len(self.answers) > MAX_FOLLOWED:
                        del self.answers[next(iter(self.answers))]

    def resolve(self, message: Message) -> None:
        """Parse what reading kept of ``message``: its times and its recipients."""
        message.time = self._time(message.stamp)
        message.decision_time = self._time(message.decision_stamp)
        message.recipients = {}
        for service, stamp, tail, tls_text in message.deliveries:
            delivery = maillog.parse_delivery(tail)
            if delivery is None:
                continue
            tls = maillog.parse_tls(tls_text) if tls_text else None
            earlier = message.recipients.get(delivery.recipient)
            message.recipients[delivery.recipient] = Recipient(
                recipient=delivery.recipient,
                domain=delivery.recipient.rpartition("@")[2].lower(),
                transport=service, relay=delivery.relay_host, relay_ip=delivery.relay_ip,
                status=delivery.status, time=self._time(stamp), reply=delivery.reply,
                attempts=earlier.attempts + 1 if earlier else 1,
                tls=tls.trust if tls else "none", tls_version=tls.protocol if tls else "",
                cipher=tls.cipher if tls else "")

    def policy(self, recipient: Recipient) -> str:
        """The answer the transport's map gave for the domain last before the delivery."""
        suffix = MAP_SUFFIX.get(recipient.transport)
        if suffix is None:
            return ""
        chosen = ""
        for answer in self.answers.get(recipient.domain, ()):
            if not answer.map_name.endswith(suffix):
                continue
            if answer.time and recipient.time and answer.time > recipient.time:
                break
            chosen = answer.answer
        return chosen


def judge(message: Message, evidence: Evidence) -> None:
    """Fill in each recipient's policy, levels, problems and warnings."""
    decision = message.decision
    assert decision is not None
    enforced = decision.verdict == "accept" and not decision.would_be
    for rcpt in message.recipients.values():
        rcpt.policy = evidence.policy(rcpt)
        rcpt.assessed = decision.levels.get(rcpt.domain, "")
        rcpt.delivered_level = delivered_level(rcpt)
        if not enforced or rcpt.status != "sent":
            continue
        required = decision.require
        if rcpt.tls == "none":
            rcpt.problems.append("sent in clear")
        elif required in RANK and RANK[rcpt.delivered_level] < RANK[required]:
            rcpt.problems.append(f"sent {rcpt.delivered_level}, below the required {required}")
        expected = TRANSPORTS.get(required)
        if expected and rcpt.transport != expected:
            rcpt.problems.append(f"sent through {rcpt.transport}, not {expected}")
        if not rcpt.problems and rcpt.assessed in RANK \
                and RANK[rcpt.delivered_level] < RANK[rcpt.assessed]:
            rcpt.warnings.append(f"sent {rcpt.delivered_level}, below the {rcpt.assessed} "
                                 "assessed at acceptance")


def result(message: Message, rcpt: Recipient) -> ProofResult:
    """What proof found for ``rcpt`` of ``message``, once ``judge`` has run."""
    decision = message.decision
    if decision is None or decision.verdict != "accept" or decision.would_be:
        return ProofResult.UNENFORCED
    if rcpt.problems:
        return ProofResult.VIOLATION
    return ProofResult.BELOW_ASSESSED if rcpt.warnings else ProofResult.OK


def delivered_level(rcpt: Recipient) -> str:
    """The level Postfix's TLS line proves. "Verified" is DANE when the policy was
    ``dane-only`` or the transport was tlsmilter-dane, whose map answers nothing else."""
    if rcpt.tls == "none":
        return "none"
    if rcpt.tls != "Verified":
        return Level.ENCRYPTED.value
    if rcpt.policy == "dane-only" or (rcpt.transport == TRANSPORTS["dane"] and not rcpt.policy):
        return Level.DANE.value
    return Level.VERIFIED.value


# --- selection and output --------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    queue_ids: frozenset[str] = frozenset()
    message_ids: frozenset[str] = frozenset()
    senders: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None

    def wants(self, message: Message) -> bool:
        when = record_time(message)
        return ((not self.queue_ids or message.queue_id in self.queue_ids)
                and (not self.message_ids or message.message_id in self.message_ids)
                and (not self.senders or (message.sender or "").lower() in self.senders)
                and (self.since is None or (when is not None and when >= self.since))
                and (self.until is None or (when is not None and when < self.until)))


def record_time(message: Message) -> datetime | None:
    """When the message was decided on, or else first seen by Postfix or first delivered."""
    times = [r.time for r in message.recipients.values() if r.time]
    return message.decision_time or message.time or (min(times) if times else None)


def records(evidence: Evidence, selection: Selection) -> Iterator[Message]:
    """The sensitive messages (those with a decision line) selected, in time order."""
    sensitive = [m for m in evidence.messages.values() if m.decision]
    for message in sensitive:
        evidence.resolve(message)
    chosen = [m for m in sensitive if selection.wants(m)]
    # In time order; a message with no time stamp at all (decision lines read without a
    # syslog prefix, no Postfix line) last; otherwise in the order the logs named them.
    chosen.sort(key=lambda m: (when.timestamp() if (when := record_time(m)) else float("inf")))
    for message in chosen:
        judge(message, evidence)
        yield message


def flagged(message: Message) -> bool:
    return any(r.problems for r in message.recipients.values())


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


def to_json(message: Message) -> dict[str, Any]:
    decision = message.decision
    assert decision is not None
    return {
        "time": _iso(record_time(message)), "queue_id": message.queue_id,
        "message_id": message.message_id or None, "sender": message.sender,
        "sensitivity": decision.sensitivity, "policy": decision.policy,
        "require": decision.require or None, "verdict": decision.verdict,
        "would_be": decision.would_be or None, "route": message.route or None,
        "domains": decision.levels, "flagged": flagged(message),
        "recipients": [{
            "recipient": r.recipient, "domain": r.domain, "assessed": r.assessed or None,
            "transport": r.transport, "policy": r.policy or None, "relay": r.relay,
            "relay_ip": r.relay_ip or None, "tls": r.tls, "tls_version": r.tls_version or None,
            "cipher": r.cipher or None, "delivered_level": r.delivered_level,
            "status": r.status, "status_time": _iso(r.time), "attempts": r.attempts,
            "reply": r.reply, "problems": r.problems, "warnings": r.warnings,
        } for r in message.recipients.values()],
    }


CSV_FIELDS = ("time", "queue_id", "message_id", "sender", "sensitivity", "policy", "require",
              "verdict", "recipient", "domain", "assessed", "transport", "tls_policy", "relay",
              "relay_ip", "tls", "tls_version", "cipher", "delivered_level", "status",
              "status_time", "flag")


def csv_rows(message: Message) -> Iterator[list[str]]:
    data = to_json(message)
    head = [data["time"] or "", message.queue_id, message.message_id, message.sender or "",
            data["sensitivity"], data["policy"], data["require"] or "", data["verdict"]]
    for r in data["recipients"] or [None]:
        if r is None:
            yield [*head, *[""] * (len(CSV_FIELDS) - len(head))]
            continue
        flag = "; ".join([*r["problems"], *r["warnings"]])
        yield [*head, r["recipient"], r["domain"], r["assessed"] or "", r["transport"],
               r["policy"] or "", r["relay"], r["relay_ip"] or "", r["tls"],
               r["tls_version"] or "", r["cipher"] or "", r["delivered_level"], r["status"],
               r["status_time"] or "", flag]


def render(message: Message) -> str:
    """The readable record: a head line, then one line per recipient."""
    data = to_json(message)
    mark = "!!! VIOLATION " if data["flagged"] else ""
    out = [f"{mark}{data['time'] or '-'}  {message.queue_id}  "
           f"<{message.message_id or '-'}>  from=<{message.sender or ''}>",
           f"  sensitivity={data['sensitivity'] or '-'} policy={data['policy'] or '-'} "
           f"require={data['require'] or '-'} verdict={data['verdict']}"
           + (f" would_be={data['would_be']}" if data["would_be"] else "")
           + (f" route={data['route']}" if data["route"] else "")]
    for r in data["recipients"]:
        tls = r["tls"] if r["tls"] == "none" else f"{r['tls']} {r['tls_version']} {r['cipher']}"
        out.append(f"  {r['recipient']}: assessed={r['assessed'] or '-'} "
                   f"via={r['transport']} policy={r['policy'] or '-'} "
                   f"relay={r['relay']}[{r['relay_ip'] or ''}] tls={tls} "
                   f"{r['status']} {r['status_time'] or '-'}"
                   + (f" ({r['attempts']} attempts)" if r["attempts"] > 1 else ""))
        out.extend(f"    !!! {problem}" for problem in r["problems"])
        out.extend(f"    warning: {warning}" for warning in r["warnings"])
    if not data["recipients"]:
        out.append("  no delivery logged" if data["verdict"] == "accept"
                   else "  not accepted: no delivery")
    return "\n".join(out)


# --- input -----------------------------------------------------------------------------------

_ROTATED = re.compile(r"\.(\d+)(?:\.gz)?$")


def oldest_first(paths: list[str]) -> list[str]:
    """Rotated files in the order they were written: mail.log.2.gz, mail.log.1, mail.log."""
    def key(path: str) -> tuple[str, int]:
        match = _ROTATED.search(path)
        base = path[:match.start()] if match else path.removesuffix(".gz")
        return base, -int(match.group(1)) if match else 0
    return sorted(paths, key=key)


def read(paths: list[str], stdin: TextIO) -> Iterator[str]:
    if not paths:
        yield from stdin
        return
    for path in oldest_first(paths):
        try:
            if path.endswith(".gz"):
                with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
                    yield from handle
            else:
                with Path(path).open(encoding="utf-8", errors="replace") as handle:
                    yield from handle
        except (OSError, EOFError) as exc:
            raise UsageError(f"{path}: cannot read: {exc}") from None


def parse_when(text: str, option: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option}: expected an ISO date or time, e.g. 2026-12-01 or "
                         f"2026-12-01T08:00, not {text!r}") from None
    return parsed if parsed.tzinfo else parsed.astimezone()


def run_proof(args: argparse.Namespace) -> int:
    """The ``proof`` command; exit 5 if any record is flagged."""
    if args.json and args.csv:
        raise UsageError("--json and --csv exclude each other")
    selection = Selection(
        queue_ids=frozenset(args.queue_id or ()),
        message_ids=frozenset(m.strip("<>") for m in args.message_id or ()),
        senders=frozenset(s.strip("<>").lower() for s in args.sender or ()),
        since=parse_when(args.since, "--since") if args.since else None,
        until=parse_when(args.until, "--until") if args.until else None)
    evidence = Evidence()
    evidence.feed(read(list(args.logs), sys.stdin))
    try:
        return write(records(evidence, selection), args, sys.stdout)
    except BrokenPipeError:  # proof | head: the reader stopped reading, so not all was shown
        # What is still buffered goes nowhere, so the final flush at exit cannot fail
        # (Python's documented way, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def write(messages: Iterable[Message], args: argparse.Namespace, out: TextIO) -> int:
    any_flagged = False
    writer = csv.writer(out) if args.csv else None
    if writer is not None:
        writer.writerow(CSV_FIELDS)
    count = 0
    for message in messages:
        count += 1
        any_flagged |= flagged(message)
        if writer is not None:
            writer.writerows(csv_rows(message))
        elif args.json:
            out.write(json.dumps(to_json(message), sort_keys=True) + "\n")
        else:
            out.write(render(message) + "\n\n")
    if not args.json and writer is None:
        verdict = "VIOLATIONS FOUND" if any_flagged else "no violation"
        out.write(f"{count} sensitive message{'' if count == 1 else 's'}: {verdict}\n")
    if any_flagged:
        print("tlsmilter proof: sensitive mail left below its level (records marked !!!)",
              file=sys.stderr)
    return EXIT_VIOLATION if any_flagged else 0

