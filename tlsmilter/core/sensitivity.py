"""Classifying a message's sensitivity: from its sensitivity headers, Purview labels, Subject
keywords and sender rules, the strictest policy of all winning. Pure.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tlsmilter.core import labels, senders, subject
from tlsmilter.core.verdict import Policy

NOT_SENSITIVE = ""  # a value mapped to this (e.g. "normal") marks the message as not sensitive


def classify_sensitivity(headers: Iterable[tuple[str, str]], *, watched: Iterable[str],
             values: Mapping[str, str], fail_safe: str,
             policies: Mapping[str, Policy]) -> tuple[Policy | None, str]:
    """The strictest policy named by the watched headers, and the value that chose it.

    Header names and values compare case-insensitively; surrounding whitespace and a trailing
    comment in parentheses are ignored. An unrecognised non-empty value gets ``fail_safe``: a
    typo must never make sensitive mail look ordinary.
    """
    names = {n.lower() for n in watched}
    chosen: Policy | None = None
    chosen_value = ""
    for name, raw in headers:
        if name.lower() not in names:
            continue
        value = _clean(raw)
        if not value:
            if not raw.strip():
                continue
            value = " ".join(raw.split()).lower()  # only a comment or quotes: unrecognised
        policy_name = values.get(value, fail_safe)
        if policy_name == NOT_SENSITIVE:
            continue
        policy = policies[policy_name]
        if chosen is None or policy.strictness() > chosen.strictness():
            chosen, chosen_value = policy, value
    return chosen, chosen_value


def _clean(raw: str) -> str:
    value = " ".join(raw.split())  # unfold continuation lines
    if "(" in value:
        value = value.split("(", 1)[0]
    return value.strip().strip('"').lower()


class Trigger(enum.Enum):
    """What made a message sensitive; values are decision-log and header fields."""

    HEADER = "header"
    LABEL = "label"
    SUBJECT = "subject"
    SENDER = "sender"


@dataclass(frozen=True)
class Rules:
    """Every way the configuration marks mail sensitive, compiled once per (re)load."""

    watched: frozenset[str]  # sensitivity header names, lower case
    values: Mapping[str, str]
    fail_safe: str
    labels: labels.LabelRules
    keywords: subject.KeywordRules
    senders: senders.SenderRules
    strip_keyword: bool = False
    from_header: bool = False  # sender rules also read the From: header


@dataclass(frozen=True)
class Facts:
    """What the milter gathered of one message."""

    headers: Sequence[tuple[str, str]] = ()  # the watched sensitivity headers
    label_headers: Sequence[str] = ()  # msip_labels values
    subject: str | None = None  # the first Subject, raw
    senders: Sequence[str] = ()  # the envelope sender, then From: addresses where configured


@dataclass(frozen=True)
class Marking:
    """Why a message is sensitive: the winning policy, the value or rule key that chose it,
    and the trigger; ``keywords`` are the Subject keywords found (to strip)."""

    policy: Policy
    value: str
    trigger: Trigger
    keywords: tuple[str, ...] = ()


def classify(facts: Facts, rules: Rules, policies: Mapping[str, Policy]) -> Marking | None:
    """The strictest marking of the message, or None if nothing marks it sensitive.

    On a tie the earlier trigger is named: header, label, subject, then sender.
    """
    found: list[Marking] = []
    policy, value = classify_sensitivity(facts.headers, watched=rules.watched,
                                         values=rules.values, fail_safe=rules.fail_safe,
                                         policies=policies)
    if policy is not None:
        found.append(Marking(policy, value, Trigger.HEADER))
    fallback = policies[rules.fail_safe]
    if facts.label_headers and (rules.labels.by_guid or rules.labels.by_name):
        found += [Marking(policies.get(name, fallback), key, Trigger.LABEL)
                  for name, key in labels.matches(labels.parse(facts.label_headers),
                                                  rules.labels)]
    keywords: tuple[str, ...] = ()
    if facts.subject is not None and rules.keywords.keywords:
        hits = list(subject.matches(subject.decode(facts.subject), rules.keywords))
        keywords = tuple(keyword for _name, keyword in hits)
        found += [Marking(policies.get(name, fallback), keyword, Trigger.SUBJECT)
                  for name, keyword in hits]
    found += [Marking(policies.get(name, fallback), key, Trigger.SENDER)
              for name, key in senders.matches(facts.senders, rules.senders)]
    if not found:
        return None
    best = found[0]
    for marking in found[1:]:
        if marking.policy.strictness() > best.policy.strictness():
            best = marking
    return Marking(best.policy, best.value, best.trigger, keywords)
