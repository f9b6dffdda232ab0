"""``tlsmilter report``: the per-domain view that Prometheus must not carry.

Reads the milter's decision log lines (``core.decisionlog``; docs/metrics.md, "The decision
log line") from files or standard input, e.g. ``journalctl -u tlsmilter -o cat | tlsmilter
report``, and prints the
domains most often refused for sensitive mail with their reasons, and the level mix of the
recipient domains seen. With ``cache.backend = "redis"`` it adds the level mix of the shared
cache. Lines that are not decision lines are skipped, so a whole log can be piped in.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tlsmilter import config
from tlsmilter.core.decisionlog import UNRECORDED, Decision, decisions
from tlsmilter.core.levels import UNKNOWN, Level
from tlsmilter.errors import TlsmilterError, UsageError

LEVELS = (*(level.value for level in reversed(Level)), UNKNOWN)


@dataclass
class Summary:
    messages: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    policies: Counter[str] = field(default_factory=Counter)
    internal_errors: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # domain -> refusals
    reasons: dict[str, Counter[str]] = field(default_factory=dict)  # domain -> reason counts
    levels: dict[str, str] = field(default_factory=dict)  # domain -> latest level seen
    triggers: Counter[str] = field(default_factory=Counter)  # header, label, subject, sender
    overrides: Counter[tuple[str, str]] = field(default_factory=Counter)  # (domain, override)

    def add(self, decision: Decision) -> None:
        self.messages += 1
        self.verdicts[decision.verdict] += 1
        if decision.policy:
            self.policies[decision.policy] += 1
        self.internal_errors += decision.internal_error
        self.levels.update(decision.levels)
        if decision.trigger:
            self.triggers[decision.trigger] += 1
        self.overrides.update(decision.overrides.items())
        if decision.refused:
            for domain in decision.failing:
                self.refused[domain] += 1
                self.reasons.setdefault(domain, Counter())[
                    decision.reasons.get(domain, UNRECORDED)] += 1


def summarize(lines: Iterable[str]) -> Summary:
    summary = Summary()
    for decision in decisions(lines):
        summary.add(decision)
    return summary


def render(summary: Summary, top: int) -> str:
    out = [f"tlsmilter report: {summary.messages} sensitive message decisions"]
    if summary.messages:
        out.append("  verdicts: " + _mix(summary.verdicts))
        out.append("  policies: " + _mix(summary.policies))
    if summary.triggers:
        out.append("  marked by: " + _mix(summary.triggers))
    if summary.internal_errors:
        out.append(f"  fail-safe tempfails (internal errors): {summary.internal_errors}")
    out.append("")
    shown = summary.refused.most_common(top)
    out.append(f"Top {len(shown)} of {len(summary.refused)} domains refused for sensitive mail:")
    if shown:
        width = max(len(domain) for domain, _ in shown)
        out.append(f"  {'refused':>7}  {'domain':<{width}}  {'level':<9}  why")
        for domain, count in shown:
            why = ", ".join(f"{code} {n}" for code, n in summary.reasons[domain].most_common())
            level = summary.levels.get(domain, "-")
            out.append(f"  {count:>7}  {domain:<{width}}  {level:<9}  {why}")
    else:
        out.append("  none")
    out.append("")
    if summary.overrides:
        out.append(f"Per-domain overrides applied ({len(summary.overrides)}):")
        out.extend(f"  {count:>7}  {domain}  {override}"
                   for (domain, override), count in summary.overrides.most_common(top))
        out.append("")
    out.append(f"Levels of the {len(summary.levels)} recipient domains seen (latest decision):")
    out.extend(_level_lines(Counter(summary.levels.values())))
    return "\n".join(out)


def render_cache(levels: dict[str, int]) -> str:
    return "\n".join([f"Levels of the {sum(levels.values())} domains in the shared cache:",
                      *_level_lines(Counter(levels))])


def _mix(counts: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.most_common()) or "-"


def _level_lines(counts: Counter[str]) -> list[str]:
    total = sum(counts.values())
    names = [*LEVELS, *sorted(set(counts) - set(LEVELS))]
    return [f"  {name:<10} {counts[name]:>6}  {100 * counts[name] / total:5.1f}%"
            for name in names if total] or ["  none"]


def _read(paths: list[str], stdin: TextIO) -> Iterator[str]:
    if not paths:
        yield from stdin
        return
    for path in paths:
        try:
            with Path(path).open(encoding="utf-8", errors="replace") as handle:
                yield from handle
        except OSError as exc:
            raise UsageError(f"{path}: cannot read: {exc.strerror}") from None


def _cache_levels(settings: config.Config) -> dict[str, int] | None:
    if settings.cache.backend is not config.CacheBackend.REDIS:
        return None
    from tlsmilter.store.redis.cache import RedisCache  # only with Redis: imports the client

    try:
        return dict(RedisCache(settings).stats().levels)
    except TlsmilterError as exc:
        raise TlsmilterError(f"shared cache: {exc}") from None


def run_report(settings: config.Config, args: argparse.Namespace) -> int:
    """The ``report`` command: summarise ``args.logs`` (stdin when empty), top ``args.top``."""
    if args.top < 1:
        raise UsageError("--top must be at least 1")
    summary = summarize(_read(list(args.logs), sys.stdin))
    print(render(summary, args.top))
    cache_levels = _cache_levels(settings)
    if cache_levels is not None:
        print()
        print(render_cache(cache_levels))
    return 0
