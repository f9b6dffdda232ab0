"""What tlsmilter keeps in Redis: the key layout and the stored record. Pure, no I/O.

Every milter, worker and policy server pointed at the same Redis (and ``redis.prefix``)
shares one view of the domains. A record is the ``check --json`` object wrapped with a schema
version and wall-clock lifetimes (several hosts read it, so no monotonic clock); every key
carries a Redis TTL, so nothing outlives its use. The cache and the worker both write records
through ``encode``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tlsmilter import config
from tlsmilter.store.base import Entry

SCHEMA = 1


class Keys:
    """Every Redis key and channel tlsmilter uses, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}probes"  # the probe queue (a Stream): warm-up requests
        self.urgent = f"{prefix}probes:urgent"  # probes a waiting sensitive message needs
        self.group = "workers"  # its consumer group
        self.assessed = f"{prefix}assessed"  # pub/sub: a domain's new assessment is stored
        self.slots = f"{prefix}slots"  # sorted set: probes running fleet-wide
        self.overflow = f"{prefix}overflow"  # counter: requests the full queue dropped

    def assessment(self, domain: str) -> str:
        return f"{self.prefix}a:{domain}"

    def queued(self, domain: str) -> str:
        """Set while the domain waits in the queue or is probed: no second request."""
        return f"{self.prefix}queued:{domain}"

    def lock(self, domain: str) -> str:
        """Held by the worker probing the domain."""
        return f"{self.prefix}lock:{domain}"

    def ip_lock(self, address: str) -> str:
        """Held by the worker probing an MX address, fleet-wide politeness."""
        return f"{self.prefix}ip:{address}"

    def sts_policy(self, domain: str) -> str:
        """The domain's last valid MTA-STS policy (RFC 8461 3.3), until it expires."""
        return f"{self.prefix}sts:{domain}"

    def domain_of(self, key: bytes | str) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        return text.removeprefix(f"{self.prefix}a:")


def encode(assessment: dict[str, Any], now: float,
           settings: config.CacheSettings) -> tuple[Entry, str, int]:
    """The entry for ``assessment`` stored ``now``, its record, and its Redis TTL in ms.

    The TTL (at least 1 ms) ends when the entry stops being usable, so Redis drops it then.
    """
    entry = Entry.new(assessment, now, settings)
    text = json.dumps({"schema": SCHEMA, "stored_at": entry.stored_at,
                       "fresh_until": entry.fresh_until, "usable_until": entry.usable_until,
                       "assessment": entry.assessment}, sort_keys=True, separators=(",", ":"))
    return entry, text, max(1, math.ceil((entry.usable_until - now) * 1000))


def decode(raw: bytes | str | None) -> Entry | None:
    """The stored entry, or None when absent, unreadable or of another schema version."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if data.get("schema") != SCHEMA:
            return None
        return Entry(data["assessment"], float(data["stored_at"]), float(data["fresh_until"]),
                     float(data["usable_until"]))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
