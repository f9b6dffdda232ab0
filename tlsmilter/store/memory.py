"""The embedded assessment cache: bounded, LRU, TTL by level, stale-while-revalidate.

Shared by libmilter's callback threads and the prober's event loop, hence the lock. Values
are the ``check --json`` objects, packed (``store.packing``); freshness is ``store.base``'s.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from tlsmilter import config, metrics
from tlsmilter.store.base import Entry, State, freshness


class MemoryCache:
    backend = "memory"

    def __init__(self, settings: config.CacheSettings,
                 clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._clock = clock
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
        self._put_seconds.observe(time.perf_counter() - started)
        return entry

    def flush(self, domain: str | None = None) -> int:
        with self._lock:
            if domain is None:
                count = len(self._entries)
                self._entries.clear()
                return count
            return 1 if self._entries.pop(domain, None) else 0

    def __len__(self) -> int:
        return len(self._entries)
