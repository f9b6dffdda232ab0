"""The embedded assessment cache: bounded, LRU, TTL by level, stale-while-revalidate.

Shared by libmilter's callback threads and the prober's event loop, hence the lock. Values
are the ``check --json`` objects, so a Redis backend can store the same thing.
"""

from __future__ import annotations

import enum
import json
import sys
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from tlsmilter import config, metrics
from tlsmilter.levels import UNKNOWN


class State(enum.Enum):
    """Lookup outcome; values double as metric labels."""

    HIT = "hit"
    STALE = "stale"  # served, but a refresh should be started
    MISS = "miss"


def _preset_dictionary() -> bytes:
    """What most assessments share (key names, reason texts), as a zlib preset dictionary.

    It halves the packed size of a typical assessment (measured: ~720 to ~330 bytes). It
    only ever lives in this process's memory, so it may change from release to release.
    """
    from tlsmilter.assess.rating import reason_texts

    reasons = "".join(json.dumps({"code": code.value, "severity": severity.value,
                                  "text": text}, separators=(",", ":"))
                      for code, (severity, text) in reason_texts().items())
    mx = {"host": "", "preference": 10, "canonical": "", "addresses": [], "level": "verified",
          "starttls": True, "tls_version": "TLSv1.3", "pkix_valid": True, "dane": "match",
          "authenticated_by": ["dnssec", "mta-sts"], "tlsa": [], "tlsa_secure": True,
          "probes": [{"address": "", "connected": True, "starttls": True,
                      "tls_version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
                      "chain": [], "error": None}]}
    skeleton = {"schema": 1, "domain": "", "level": "verified", "score": 50, "reasons": [],
                "dnssec": True, "mta_sts": None, "mta_sts_detail": {
                    "mode": "enforce", "record_id": "", "outcome": "ok",
                    "detail": "mode enforce, max_age 86400", "mx": []},
                "tlsrpt": False, "implicit_mx": False, "null_mx": False, "mx": [mx],
                "assessed_at": "2026-01-01T00:00:00+00:00", "duration": 0.5}
    # zlib prefers the most common strings at the end of the dictionary.
    return (reasons + json.dumps(skeleton, separators=(",", ":"))).encode()


_ZDICT = _preset_dictionary()


def _pack(assessment: dict[str, Any]) -> bytes:
    packer = zlib.compressobj(6, zdict=_ZDICT)
    data = json.dumps(assessment, separators=(",", ":")).encode()
    return packer.compress(data) + packer.flush()


def _unpack(packed: bytes) -> dict[str, Any]:
    unpacker = zlib.decompressobj(zdict=_ZDICT)
    unpacked: dict[str, Any] = json.loads(unpacker.decompress(packed) + unpacker.flush())
    return unpacked


class Entry:
    """A cached assessment with its lifetimes (seconds on the owning cache's clock).

    With ``pack`` the assessment is kept as zlib-compressed JSON: about 1 KiB per domain
    instead of about 11 KiB as Python objects, so the memory backend holds 100k domains in
    about 100 MB. The hot paths read only ``level``; ``assessment`` unpacks on demand (a
    refusal text, a policy lookup).
    """

    __slots__ = ("_data", "fresh_until", "level", "stored_at", "usable_until")

    def __init__(self, assessment: dict[str, Any], stored_at: float, fresh_until: float,
                 usable_until: float, *, pack: bool = False) -> None:
        self.level = sys.intern(str(assessment.get("level", UNKNOWN)))
        self.stored_at = stored_at
        self.fresh_until = fresh_until
        self.usable_until = usable_until
        self._data: dict[str, Any] | bytes = _pack(assessment) if pack else assessment

    @property
    def assessment(self) -> dict[str, Any]:
        if isinstance(self._data, bytes):
            return _unpack(self._data)
        return self._data

    def __repr__(self) -> str:
        return f"Entry(level={self.level!r}, stored_at={self.stored_at})"


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
        # Labelled series resolved once: get() runs several times per message.
        self._get_seconds = metrics.CACHE_SECONDS.labels(backend=self.backend, op="get")
        self._put_seconds = metrics.CACHE_SECONDS.labels(backend=self.backend, op="put")
        self._requests = {state: metrics.CACHE_REQUESTS.labels(backend=self.backend,
                                                               result=state.value)
                          for state in State}

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
            if entry is None:
                return State.MISS, None
            if now >= entry.usable_until:
                del self._entries[domain]
                return State.MISS, None
            self._entries.move_to_end(domain)
        return (State.HIT if now < entry.fresh_until else State.STALE), entry

    def put(self, assessment: dict[str, Any]) -> Entry:
        started = time.perf_counter()
        now = self._clock()
        ttl, grace = lifetimes(str(assessment.get("level", UNKNOWN)), self._settings)
        entry = Entry(assessment, now, now + ttl, now + ttl + grace, pack=True)
        with self._lock:
            self._entries[assessment["domain"]] = entry
            self._entries.move_to_end(assessment["domain"])
            while len(self._entries) > self._settings.max_entries:
                self._entries.popitem(last=False)
        self._put_seconds.observe(time.perf_counter() - started)
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
