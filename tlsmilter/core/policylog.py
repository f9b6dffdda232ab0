"""The policy-answer log line: one per TLS policy lookup answered, formatted and parsed here.

The policy server (``daemons.socketmap``) logs it at INFO for every lookup it answers in one
of its maps; ``tlsmilter proof`` reads it back (``parse``) to show which TLS policy a delivery
used. docs/proof.md documents it::

    policy answer map=tlspolicy-verified domain=dnssec-ca.test answer=verify
    policy answer map=tlspolicy-dane domain=falls.test answer=temp reason=tlsmilter: ...

The line is bounded: the map is one of the server's own names, the domain is a normalised
domain name (at most 253 characters), the answer a ``PolicyAnswer`` value, and a TEMP reason
(only TEMP answers carry one) is capped. Postfix asks once per delivery attempt of a
tlsmilter transport, so the log grows with sensitive deliveries, not with normal mail.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlsmilter.core.decisionlog import printable
from tlsmilter.core.delivery import PolicyAnswer

MARK = "policy answer map="
MAX_REASON = 200


def format_answer(map_name: str, domain: str, answer: PolicyAnswer, reason: str = "") -> str:
    """The line for one answered lookup; ``reason`` is the TEMP text (others have none)."""
    line = (f"{MARK}{printable(map_name, 64)} domain={printable(domain)} "
            f"answer={answer.value}")
    if reason:
        # Free text, last on the line: spaces are kept, control characters are not.
        shown = "".join(c if c.isprintable() else "?" for c in reason[:MAX_REASON])
        line += f" reason={shown}"
    return line


@dataclass(frozen=True)
class PolicyLine:
    """One parsed policy-answer line."""

    map_name: str
    domain: str
    answer: str  # a PolicyAnswer value
    reason: str = ""


def parse(line: str) -> PolicyLine | None:
    """The answer on ``line``, or None if it carries none (any prefix is ignored)."""
    start = line.find(MARK)
    if start < 0:
        return None
    head, _, reason = line[start + len("policy answer "):].partition(" reason=")
    fields = dict(part.partition("=")[::2] for part in head.split() if "=" in part)
    if not {"map", "domain", "answer"} <= fields.keys():
        return None
    return PolicyLine(fields["map"], fields["domain"], fields["answer"], reason.rstrip("\n"))
