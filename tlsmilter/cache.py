"""The embedded assessment cache: bounded, LRU, TTL by level, stale-while-revalidate.

Shared by libmilter's callback threads and the prober's event loop, hence the lock. Values
are the ``check --json`` objects, so a Redis backend can store the same thing.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tlsmilter import config, metrics
from tlsmilter.levels import UNKNOWN


class State(enum.Enum):
    """Lookup outcome; values double as metric labels."""

    HIT = "hit"
    STALE = "stale"  # served, but a refresh should be started
    MISS = "miss"


@dataclass(frozen=True)
class Entry:
    assessment: dict[str, Any]
    stored_at: float
    fresh_until: float
    usable_until: float

    @property
    def level(self) -> str:
        return str(self.assessment.get("level", UNKNOWN))


def lifetimes(level: str, settings: config.Cache) -> tuple[float, float]:
    """Seconds a result of ``level`` stays fresh, and how long after that it may be served."""
    ttl = {UNKNOWN: settings.ttl_unknown, "none": settings.ttl_none}.get(level, settings.ttl)
    # Unknown is never served stale: it is a temporary state, not a finding.
    return ttl, (0.0 if level == UNKNOWN else settings.stale_max)


class MemoryCache:
    backend = "memory"

    def __init__(self, settings: config.Cache, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, domain: str) -> tuple[State, Entry | None]:
        started = time.perf_counter()
        state, entry = self._get(domain)
        metrics.CACHE_SECONDS.labels(backend=self.backend, op="get").observe(
            time.perf_counter() - started)
        metrics.CACHE_REQUESTS.labels(backend=self.backend, result=state.value).inc()
        if entry is not None:
            metrics.ASSESSMENT_AGE.observe(max(0.0, self._clock() - entry.stored_at))
        return state, entry

    def _get(self, domain: str) -> tuple[State, Entry | None]:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(domain)
            if entry is None:
                return State.MISS, None
            if now >= entry.usable_until:
                del self._entries[domain]
                return State.MISS, None
            self._entries.move_to_end(domain)
        return (State.HIT if now < entry.fresh_until else State.STALE), entry

    def put(self, assessment: dict[str, Any]) -> Entry:
        now = self._clock()
        ttl, grace = lifetimes(str(assessment.get("level", UNKNOWN)), self._settings)
        entry = Entry(assessment, now, now + ttl, now + ttl + grace)
        with self._lock:
            self._entries[assessment["domain"]] = entry
            self._entries.move_to_end(assessment["domain"])
            while len(self._entries) > self._settings.max_entries:
                self._entries.popitem(last=False)
        return entry

    def due(self, entry: Entry) -> bool:
        """Whether a fresh ``entry`` is close enough to expiry to be re-assessed now."""
        return self._clock() >= entry.fresh_until - self._settings.refresh_before

    def flush(self, domain: str | None = None) -> int:
        with self._lock:
            if domain is None:
                count = len(self._entries)
                self._entries.clear()
                return count
            return 1 if self._entries.pop(domain, None) else 0

    def __len__(self) -> int:
        return len(self._entries)
