"""Classifying a message's sensitivity from its headers. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
