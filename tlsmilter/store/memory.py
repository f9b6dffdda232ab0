"""The embedded assessment cache: bounded, LRU, TTL by level, stale-while-revalidate.

Shared by libmilter's callback threads and the prober's event loop, hence the lock. Values
are the ``check --json`` objects, packed (``store.packing``); freshness is ``store.base``'s.
``export`` and ``restore`` move entries to and from a snapshot (``store.snapshot``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from tlsmilter import config, metrics
from tlsmilter.store.base import Entry, State, freshness, lifetimes
from tlsmilter.store.snapshot import Record


class MemoryCache:
    backend = "memory"

    def __init__(self, settings: config.CacheSettings,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self._settings = settings
        self._clock = clock
        self._wall_clock = wall_clock
        self.changes = 0  # counts puts and flushes: a snapshot is saved only after a change
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()
        # Labelled series resolved once: get() runs several times per message.
        self._get_seconds = metrics.CACHE_SECONDS.labels(backend=self.backend, op="get")
        self._put_seconds = metrics.CACHE_SECONDS.labels(backend=self.backend, op="put")
        self._requests = {state: metrics.CACHE_REQUESTS.labels(backend=self.backend,
                                                               result=state.value)
                          for state in State}

    def now(self) -> float:
        return self._clock()

    def get(self, domain: str) -> tuple[State, Entry | None]:
        started = time.perf_counter()
        now = self._clock()
        state, entry = self._get(domain, now)
        self._get_seconds.observe(time.perf_counter() - started)
        self._requests[state].inc()
        if entry is not None:
            metrics.ASSESSMENT_AGE.observe(max(0.0, now - entry.stored_at))
        return state, entry

    def _get(self, domain: str, now: float) -> tuple[State, Entry | None]:
        with self._lock:
            entry = self._entries.get(domain)
            state = freshness(entry, now)
            if state is State.MISS:
                if entry is not None:
                    del self._entries[domain]
                return state, None
            self._entries.move_to_end(domain)
        return state, entry

    def put(self, assessment: dict[str, Any]) -> Entry:
        started = time.perf_counter()
        entry = Entry.new(assessment, self._clock(), self._settings, packed=True)
        with self._lock:
            self._entries[assessment["domain"]] = entry
            self._entries.move_to_end(assessment["domain"])
            while len(self._entries) > self._settings.max_entries:
                self._entries.popitem(last=False)
            self.changes += 1
        self._put_seconds.observe(time.perf_counter() - started)
        return entry

    def flush(self, domain: str | None = None) -> int:
        with self._lock:
            self.changes += 1
            if domain is None:
                count = len(self._entries)
                self._entries.clear()
                return count
            return 1 if self._entries.pop(domain, None) else 0

    def export(self) -> list[Record]:
        """Every entry still usable, least recently used first, with wall-clock times."""
        with self._lock:
            now = self._clock()
            items = list(self._entries.items())
        to_wall = self._wall_clock() - now
        return [Record(domain, entry.level, entry.stored_at + to_wall,
                       entry.fresh_until + to_wall, entry.usable_until + to_wall, entry.packed)
                for domain, entry in items if entry.usable_until > now]

    def restore(self, records: Iterable[Record]) -> int:
        """Add saved entries that are still usable; how many were added.

        Their times go back onto this cache's clock, and no entry lives longer than its level
        gets now (``cache.ttl`` may have been lowered since). An entry already here is newer
        and stays. Past ``max_entries``, the least recently used go, as always.
        """
        now, wall = self._clock(), self._wall_clock()
        to_clock = now - wall
        added = 0
        by_level: dict[str, tuple[float, float]] = {}
        with self._lock:
            for record in records:
                if (spans := by_level.get(record.level)) is None:
                    spans = by_level[record.level] = lifetimes(record.level, self._settings)
                ttl, grace = spans
                stored_at = min(record.stored_at, wall)  # a clock stepped back since
                fresh_until = min(record.fresh_until, stored_at + ttl)
                usable_until = min(record.usable_until, stored_at + ttl + grace)
                if usable_until <= wall or record.domain in self._entries:
                    continue
                self._entries[record.domain] = Entry.from_packed(
                    record.packed, record.level, stored_at + to_clock, fresh_until + to_clock,
                    usable_until + to_clock)
                added += 1
            while len(self._entries) > self._settings.max_entries:
                self._entries.popitem(last=False)
        return added

    def __len__(self) -> int:
        return len(self._entries)
