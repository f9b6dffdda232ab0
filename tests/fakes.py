"""The suite's one stand-in for the network: a prober that answers from a table.

Tests of the milter, the backends and the worker use the real ``Assessments`` backends
(cache, event loop, Redis, in-flight bookkeeping) with this prober behind them, since they
are about the glue, not the network. The prober tests (tests/assess) use the real one against
the lab.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tlsmilter import config

T0 = 1_800_000_000.0  # a wall-clock time for records (Redis keeps wall-clock lifetimes)


def assessment(domain: str, level: str = "verified") -> dict[str, Any]:
    """A minimal ``check --json`` object; a ``none`` one carries a STARTTLS problem."""
    reasons = [] if level != "none" else [
        {"code": "no_starttls", "severity": "problem", "host": f"mx1.{domain}",
         "text": "MX does not offer STARTTLS: mail would travel in clear text (127.0.0.1)"}]
    return {"domain": domain, "level": level, "score": 60, "reasons": reasons}


class Result:
    """What ``Prober.assess`` returns, as far as the backends read it."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def to_json(self) -> dict[str, Any]:
        return self.data


class TableProber:
    """Answers from ``levels`` (``unknown`` for the rest) after ``delay`` seconds (or the
    domain's own, from ``delays``).

    Records every call in ``calls`` and, in ``log``, ``(name, domain, started, ended)``;
    ``boom.test`` raises, as a prober bug would.
    """

    def __init__(self, levels: dict[str, str] | None = None, delay: float = 0.0, *,
                 name: str = "prober", default: str = "unknown",
                 log: list[tuple[str, str, float, float]] | None = None,
                 delays: Callable[[str], float | None] = lambda _domain: None) -> None:
        self.levels = levels or {}
        self.delay = delay
        self.delays = delays  # a domain's own delay, None for ``delay``
        self.name = name
        self.default = default
        self.calls: list[str] = []
        self.log = [] if log is None else log

    async def assess(self, domain: str) -> Result:
        self.calls.append(domain)
        started = time.monotonic()
        own = self.delays(domain)
        await asyncio.sleep(self.delay if own is None else own)
        if domain == "boom.test":
            raise RuntimeError("prober bug")
        self.log.append((self.name, domain, started, time.monotonic()))
        return Result(assessment(domain, self.levels.get(domain, self.default)))


class Clock:
    """A clock the test moves by hand: ``clock.now += 60``."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def clock_of(cache: Any) -> Clock:
    """The ``Clock`` a cache was built with."""
    clock = cache._clock
    assert isinstance(clock, Clock)
    return clock


def redis_settings(url: str, **redis_options: Any) -> config.Config:
    """Settings for the shared backend at ``url``, with short, round lifetimes."""
    return config.from_mapping({"cache": {"backend": "redis", "ttl": 600.0, "ttl_none": 60.0,
                                          "ttl_unknown": 30.0, "stale_max": 300.0,
                                          "refresh_before": 100.0},
                                "redis": {"url": url, "prefix": "t:", **redis_options}})


# --- assessments as the policy server sees them (core.delivery) ------------------------------


def mx(host: str, *auth: str) -> dict[str, Any]:
    """An MX entry of an assessment, authenticated by ``auth`` ("dnssec", "mta-sts")."""
    return {"host": host, "authenticated_by": list(auth)}


def sts_only(*mxs: dict[str, Any], mode: str = "enforce") -> dict[str, Any]:
    """A ``verified`` assessment resting on MTA-STS alone (no DNSSEC)."""
    return {"level": "verified", "dnssec": False, "mta_sts": mode, "mx": list(mxs)}


VERIFY = "verify match=hostname servername=hostname"  # policy_for of a DNSSEC-verified domain
FALLBACK = "secure match=nexthop:dot-nexthop servername=hostname"
