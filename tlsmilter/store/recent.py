"""Entries read from a shared cache moments ago, kept for a reader that asks again and again.

The policy server asks Redis once per delivery attempt; most attempts go to domains it was
asked about a moment ago. ``RecentEntries`` keeps each entry it read for ``ttl`` seconds, and
forgets a domain as soon as a notice says it was assessed anew (``invalidate``, from the
pub/sub listener's thread). A notice lost while the listener reconnects, or a ``cache flush``
(which sends none), is outlived by at most ``ttl``: the entry itself still says how long it
is fresh.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tlsmilter.store.base import Entry

TTL = 2.0  # seconds an entry read from Redis is answered from memory
MAX_ENTRIES = 10_000


class RecentEntries:
    """Entries by domain with a short lifetime; ``invalidate`` may come from another thread.

    ``generation`` changes with every invalidation: a reader takes it before asking Redis and
    passes it to ``put``, which keeps nothing when a notice came in between (the entry read
    may be the one the notice replaced).
    """

    def __init__(self, ttl: float = TTL, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, Entry]] = {}
        self.generation = 0
        self._lock = threading.Lock()  # get() needs none: one dict lookup is atomic

    def get(self, domain: str) -> Entry | None:
        """The entry read for ``domain`` less than ``ttl`` seconds ago, if any."""
        kept = self._entries.get(domain)
        if kept is None:
            return None
        if self._clock() >= kept[0]:
            self._entries.pop(domain, None)
            return None
        return kept[1]

    def put(self, domain: str, entry: Entry, generation: int) -> None:
        expires = self._clock() + self._ttl
        with self._lock:
            if generation != self.generation:
                return
            self._entries.pop(domain, None)  # re-inserted last: the oldest go first
            self._entries[domain] = (expires, entry)
            while len(self._entries) > self._max:
                del self._entries[next(iter(self._entries))]

    def invalidate(self, domain: str) -> None:
        """Forget ``domain``: a newer assessment of it is stored (any thread)."""
        with self._lock:
            self.generation += 1
            self._entries.pop(domain, None)

    def __len__(self) -> int:
        return len(self._entries)
