"""The ``Assessments`` interface, cache entries, and freshness, written once for every backend.

An entry is fresh until ``fresh_until`` (a hit), then may still be served until
``usable_until`` while a new assessment is made (stale), then is gone (a miss). A fresh entry
within ``cache.refresh_before`` of going stale is due: it is served as a hit, and assessed
again now, so domains in use never go stale. Both backends keep those times on their own
clock (the memory cache a monotonic one, Redis wall-clock time shared by several hosts).
"""

from __future__ import annotations

import abc
import enum
import sys
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, Protocol

from tlsmilter import config
from tlsmilter.core.delivery import DomainPolicy, domain_policy
from tlsmilter.core.levels import UNKNOWN
from tlsmilter.store.packing import pack, unpack


class State(enum.Enum):
    """Lookup outcome; values double as metric labels."""

    HIT = "hit"
    STALE = "stale"  # served, but a refresh should be started
    MISS = "miss"


class Entry:
    """A cached assessment with its lifetimes (seconds on the owning cache's clock).

    With ``packed`` the assessment is kept as zlib-compressed JSON (``store.packing``), so
    the memory backend holds 100k domains in about 100 MB. The hot paths read only
    ``level``; ``assessment`` unpacks on demand (a refusal text); ``policy``, what the policy
    server answers from, is computed once, at the first lookup.
    """

    __slots__ = ("_data", "_policy", "fresh_until", "level", "stored_at", "usable_until")

    def __init__(self, assessment: dict[str, Any], stored_at: float, fresh_until: float,
                 usable_until: float, *, packed: bool = False) -> None:
        self.level = sys.intern(str(assessment.get("level", UNKNOWN)))
        self.stored_at = stored_at
        self.fresh_until = fresh_until
        self.usable_until = usable_until
        self._data: dict[str, Any] | bytes = pack(assessment) if packed else assessment
        self._policy: DomainPolicy | None = None  # computed at the first lookup

    @classmethod
    def new(cls, assessment: dict[str, Any], now: float, settings: config.CacheSettings, *,
            packed: bool = False) -> Entry:
        """An entry stored ``now``, with the lifetimes its level gets (``lifetimes``)."""
        ttl, grace = lifetimes(str(assessment.get("level", UNKNOWN)), settings)
        return cls(assessment, now, now + ttl, now + ttl + grace, packed=packed)

    @classmethod
    def from_packed(cls, packed: bytes, level: str, stored_at: float, fresh_until: float,
                    usable_until: float) -> Entry:
        """An entry from an assessment packed earlier (a snapshot), without unpacking it."""
        entry = cls.__new__(cls)
        entry.level = sys.intern(level)
        entry.stored_at = stored_at
        entry.fresh_until = fresh_until
        entry.usable_until = usable_until
        entry._data = packed
        entry._policy = None
        return entry

    @property
    def assessment(self) -> dict[str, Any]:
        if isinstance(self._data, bytes):
            return unpack(self._data)
        return self._data

    @property
    def policy(self) -> DomainPolicy:
        """``core.delivery.domain_policy`` of the assessment, computed at the first call."""
        policy = self._policy
        if policy is None:
            # Two threads may both compute it: the same value, and no lock on the hot path.
            policy = self._policy = domain_policy(self.assessment)
        return policy

    @property
    def packed(self) -> bytes:
        """The assessment as ``store.packing`` packs it."""
        return self._data if isinstance(self._data, bytes) else pack(self._data)

    def __repr__(self) -> str:
        return f"Entry(level={self.level!r}, stored_at={self.stored_at})"


def lifetimes(level: str, settings: config.CacheSettings) -> tuple[float, float]:
    """Seconds a result of ``level`` stays fresh, and how long after that it may be served."""
    ttl = {UNKNOWN: settings.ttl_unknown, "none": settings.ttl_none}.get(level, settings.ttl)
    # Unknown is never served stale: it is a temporary state, not a finding.
    return ttl, (0.0 if level == UNKNOWN else settings.stale_max)


def freshness(entry: Entry | None, now: float) -> State:
    """Whether ``entry`` is a hit, stale (served while refreshed) or gone, at ``now``."""
    if entry is None or now >= entry.usable_until:
        return State.MISS
    return State.HIT if now < entry.fresh_until else State.STALE


def is_due(entry: Entry, now: float, refresh_before: float) -> bool:
    """Whether a fresh ``entry`` is close enough to going stale to be re-assessed now."""
    return now >= entry.fresh_until - refresh_before


class Cache(Protocol):
    """What the backends' caches offer the ``Assessments`` around them."""

    def get(self, domain: str) -> tuple[State, Entry | None]: ...

    def now(self) -> float: ...


class Assessments(abc.ABC):
    """Where the milter and the policy server get assessments: embedded or shared (Redis).

    ``get`` reads; ``lookup`` reads and has a missing, stale or due domain assessed (it never
    waits for the assessment); ``prefetch`` starts a ``lookup`` without waiting even for the
    cache; ``wait`` blocks until domains being assessed are done, or a timeout. Callers
    never learn which backend they have. A backend that cannot answer raises
    ``CacheUnavailable``; callers fail safe.
    """

    backend: str  # the ``backend`` metric label of its cache

    def __init__(self, cache: Cache, settings: config.CacheSettings) -> None:
        self.cache = cache
        self._refresh_before = settings.refresh_before

    def get(self, domain: str) -> tuple[State, Entry | None]:
        """The cached assessment of ``domain`` and its freshness; starts nothing."""
        return self.cache.get(domain)

    def lookup(self, domain: str) -> tuple[State, Entry | None]:
        """Like ``get``, and has the domain assessed when missing, stale or due."""
        state, entry = self.cache.get(domain)
        if state is not State.HIT or (
                entry is not None and is_due(entry, self.cache.now(), self._refresh_before)):
            self._request(domain)
        return state, entry

    async def lookup_async(self, domain: str) -> tuple[State, Entry | None]:
        """``lookup`` on an event loop (the policy server's), which it must never block.

        This default is ``lookup`` itself, for a backend that reads its own memory.
        """
        return self.lookup(domain)

    async def close_async(self) -> None:
        """Close what ``lookup_async`` opened on the running loop; a no-op by default."""
        return None

    def prefetch(self, domain: str) -> Future[tuple[State, Entry | None]]:
        """Start ``lookup(domain)`` and return at once: its outcome, or its error, later.

        The milter's RCPT: it must never wait on the cache. This default does the lookup
        right away, for a backend that reads its own memory; one that asks a server runs it
        in the background.
        """
        future: Future[tuple[State, Entry | None]] = Future()
        try:
            future.set_result(self.lookup(domain))
        except Exception as exc:  # the caller reads it where it needs the answer
            future.set_exception(exc)
        return future

    @abc.abstractmethod
    def _request(self, domain: str) -> None:
        """Start assessing ``domain`` (unless that is under way); never wait for it."""

    @abc.abstractmethod
    def wait(self, domains: Iterable[str], timeout: float) -> None:
        """Block until each of ``domains`` being assessed is done, or ``timeout`` seconds."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start what the backend runs in the background (threads, connections)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop it again; idempotent."""
