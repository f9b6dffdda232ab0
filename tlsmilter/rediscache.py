"""The Redis backend: one connection recipe, the key layout, and the shared assessment cache.

Every milter, worker and policy server pointed at the same Redis (and ``redis.prefix``)
shares one view of the domains. Values are the ``check --json`` objects wrapped in a record
with a schema version and wall-clock lifetimes (several hosts read them, so no monotonic
clock); every key carries a Redis TTL, so nothing outlives its use.

Redis being down is a state, not a crash: each operation raises ``CacheUnavailable``, the
callers fail safe (DESIGN.md), redis-py reconnects on the next command, and ``Health`` logs
one line when an outage starts and one when it ends.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from tlsmilter import config, metrics
from tlsmilter.cache import Entry, State, lifetimes
from tlsmilter.errors import CacheUnavailable

log = logging.getLogger(__name__)

SCHEMA = 1
T = TypeVar("T")


def redact(url: str) -> str:
    """``url`` with any password replaced, fit for logs and error messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def describe(settings: config.Redis) -> str:
    """Where Redis is, for humans: the redacted URL or the Sentinel service."""
    if settings.sentinels:
        return f"sentinel {settings.sentinel_service} via {', '.join(settings.sentinels)}"
    return redact(settings.url)


def _sentinel_kwargs(settings: config.Redis) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Sentinel addresses, and the master connection options taken from ``url``."""
    addresses = [config.parse_host_port(a, default_port=26379) for a in settings.sentinels]
    parsed = urllib.parse.urlsplit(settings.url)
    options: dict[str, Any] = {"socket_timeout": settings.timeout,
                               "socket_connect_timeout": settings.timeout}
    if parsed.password:
        options["password"] = urllib.parse.unquote(parsed.password)
    if parsed.username:
        options["username"] = urllib.parse.unquote(parsed.username)
    db = parsed.path.lstrip("/") or urllib.parse.parse_qs(parsed.query).get("db", ["0"])[0]
    options["db"] = int(db) if db.isdigit() else 0
    if parsed.scheme == "rediss":
        options.update(_tls_options(settings))
    return addresses, options


def _tls_options(settings: config.Redis) -> dict[str, Any]:
    """TLS options for ``rediss://``; other schemes get none."""
    if not settings.url.startswith("rediss://"):
        return {}
    options: dict[str, Any] = {"ssl": True}
    if settings.ca_file:
        options["ssl_ca_certs"] = settings.ca_file
    return options


def connect(settings: config.Redis) -> redis.Redis:
    """A blocking client (the milter's callback threads, the CLI)."""
    if settings.sentinels:
        addresses, options = _sentinel_kwargs(settings)
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            addresses, socket_timeout=settings.timeout,
            sentinel_kwargs={"socket_timeout": settings.timeout})
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            settings.sentinel_service, **options)
        return master
    return redis.Redis.from_url(settings.url, socket_timeout=settings.timeout,
                                socket_connect_timeout=settings.timeout,
                                **_url_tls(settings))


def connect_async(settings: config.Redis) -> redis.asyncio.Redis:
    """An asyncio client (workers, the standalone policy server)."""
    if settings.sentinels:
        addresses, options = _sentinel_kwargs(settings)
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            addresses, socket_timeout=settings.timeout,
            sentinel_kwargs={"socket_timeout": settings.timeout})
        master: redis.asyncio.Redis = sentinel.master_for(settings.sentinel_service, **options)
        return master
    return redis.asyncio.Redis.from_url(settings.url, socket_timeout=settings.timeout,
                                        socket_connect_timeout=settings.timeout,
                                        **_url_tls(settings))


def _url_tls(settings: config.Redis) -> dict[str, Any]:
    # from_url picks the TLS connection class from the scheme itself.
    return {k: v for k, v in _tls_options(settings).items() if k != "ssl"}


class Keys:
    """Every Redis key and channel tlsmilter uses, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}probes"  # the probe queue (a Stream)
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

    def domain_of(self, key: bytes | str) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        return text.removeprefix(f"{self.prefix}a:")


# --- records: pure encoding shared by every process ------------------------------------------


def make_entry(assessment: dict[str, Any], now: float, settings: config.Cache) -> Entry:
    ttl, grace = lifetimes(str(assessment.get("level")), settings)
    return Entry(assessment, now, now + ttl, now + ttl + grace)


def encode(entry: Entry, now: float) -> tuple[str, int]:
    """The stored JSON and its Redis TTL in milliseconds (at least 1)."""
    text = json.dumps({"schema": SCHEMA, "stored_at": entry.stored_at,
                       "fresh_until": entry.fresh_until, "usable_until": entry.usable_until,
                       "assessment": entry.assessment}, sort_keys=True, separators=(",", ":"))
    return text, max(1, math.ceil((entry.usable_until - now) * 1000))


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


def classify(entry: Entry | None, now: float) -> State:
    if entry is None or now >= entry.usable_until:
        return State.MISS
    return State.HIT if now < entry.fresh_until else State.STALE


# --- outage bookkeeping ------------------------------------------------------------------------


class Health:
    """Tracks whether Redis answers; logs once when an outage starts and once when it ends."""

    def __init__(self, where: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.where = where
        self._clock = clock
        self._down_since: float | None = None
        self._lock = threading.Lock()
        metrics.REDIS_UP.set(1)

    @property
    def up(self) -> bool:
        return self._down_since is None

    def ok(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            metrics.REDIS_UP.set(1)
            log.warning("redis at %s is back after %.1f s", self.where, self._clock() - since)

    def failed(self, exc: BaseException) -> CacheUnavailable:
        metrics.REDIS_ERRORS.inc()
        with self._lock:
            starting = self._down_since is None
            if starting:
                self._down_since = self._clock()
        if starting:
            metrics.REDIS_UP.set(0)
            metrics.REDIS_OUTAGES.inc()
            log.warning("redis at %s unavailable: %s; failing safe until it is back",
                        self.where, exc)
        return CacheUnavailable(f"redis at {self.where} unavailable: {exc}")

    def call(self, operation: Callable[[], T]) -> T:
        try:
            result = operation()
        except redis.RedisError as exc:
            raise self.failed(exc) from None
        self.ok()
        return result


# --- the cache -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    entries: int
    levels: dict[str, int]
    queue_length: int
    overflow: int
    workers: int
    probing: int


class RedisCache:
    """The shared cache, with the same ``get``/``put``/``flush`` as ``MemoryCache``."""

    backend = "redis"

    def __init__(self, settings: config.Config, client: redis.Redis | None = None,
                 clock: Callable[[], float] = time.time, health: Health | None = None) -> None:
        self._settings = settings.cache
        self.keys = Keys(settings.redis.prefix)
        self.client = client or connect(settings.redis)
        self._clock = clock
        self.health = health or Health(describe(settings.redis))

    def now(self) -> float:
        return self._clock()

    def get(self, domain: str) -> tuple[State, Entry | None]:
        started = time.perf_counter()
        try:
            raw = self.health.call(lambda: self.client.get(self.keys.assessment(domain)))
        except CacheUnavailable:
            metrics.CACHE_REQUESTS.labels(backend=self.backend, result="error").inc()
            raise
        metrics.CACHE_SECONDS.labels(backend=self.backend, op="get").observe(
            time.perf_counter() - started)
        entry = decode(raw)
        now = self._clock()
        state = classify(entry, now)
        metrics.CACHE_REQUESTS.labels(backend=self.backend, result=state.value).inc()
        if state is State.MISS:
            return state, None
        assert entry is not None
        metrics.ASSESSMENT_AGE.observe(max(0.0, now - entry.stored_at))
        return state, entry

    def due(self, entry: Entry) -> bool:
        """Whether a fresh ``entry`` is close enough to expiry to be re-assessed now."""
        return self._clock() >= entry.fresh_until - self._settings.refresh_before

    def check(self) -> bool:
        """Ping Redis: keeps ``health`` (and tlsmilter_redis_up) current while idle."""
        try:
            self.health.call(self.client.ping)
        except CacheUnavailable:
            return False
        return True

    def put(self, assessment: dict[str, Any]) -> Entry:
        started = time.perf_counter()
        now = self._clock()
        entry = make_entry(assessment, now, self._settings)
        text, ttl_ms = encode(entry, now)
        key = self.keys.assessment(str(assessment["domain"]))
        self.health.call(lambda: self.client.set(key, text, px=ttl_ms))
        metrics.CACHE_SECONDS.labels(backend=self.backend, op="put").observe(
            time.perf_counter() - started)
        return entry

    def flush(self, domain: str | None = None) -> int:
        if domain is not None:
            return int(self.health.call(lambda: self.client.delete(self.keys.assessment(domain))))
        keys = list(self._scan())
        removed = 0
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            removed += int(self.health.call(lambda: self.client.unlink(*chunk)))  # noqa: B023
        return removed

    def _scan(self) -> Iterator[bytes]:
        pattern = self.keys.assessment("*")
        try:
            yield from self.client.scan_iter(match=pattern, count=500)
        except redis.RedisError as exc:
            raise self.health.failed(exc) from None

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Every cached domain and entry (a SCAN: fine for a CLI, not for the mail path)."""
        keys: list[bytes] = []
        for key in self._scan():
            keys.append(key)
            if len(keys) >= 500:
                yield from self._fetch(keys)
                keys = []
        yield from self._fetch(keys)

    def _fetch(self, keys: list[bytes]) -> Iterator[tuple[str, Entry]]:
        if not keys:
            return
        values = self.health.call(lambda: self.client.mget(keys))
        for key, raw in zip(keys, values, strict=True):
            entry = decode(raw)
            if entry is not None:
                yield self.keys.domain_of(key), entry

    def stats(self) -> Stats:
        levels: dict[str, int] = {}
        for _domain, entry in self.items():
            levels[entry.level] = levels.get(entry.level, 0) + 1
        k = self.keys

        def queue_facts() -> tuple[int, int, int, int]:
            length = int(self.client.xlen(k.stream)) if self.client.exists(k.stream) else 0
            workers = 0
            if length or self.client.exists(k.stream):
                try:
                    workers = len(self.client.xinfo_consumers(k.stream, k.group))
                except redis.ResponseError:  # no group yet: no worker ever ran
                    workers = 0
            overflow = int(self.client.get(k.overflow) or 0)
            probing = int(self.client.zcard(k.slots))
            return length, overflow, workers, probing

        length, overflow, workers, probing = self.health.call(queue_facts)
        return Stats(sum(levels.values()), levels, length, overflow, workers, probing)
