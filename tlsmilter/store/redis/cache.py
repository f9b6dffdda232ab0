"""The shared assessment cache on Redis, as the milter and the policy server read it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from tlsmilter import config, metrics
from tlsmilter.errors import CacheUnavailable
from tlsmilter.labels import CACHE_ERROR
from tlsmilter.store.base import Entry, State, freshness
from tlsmilter.store.redis.connection import Health, connect, connect_async, describe
from tlsmilter.store.redis.records import Keys, decode, encode


@dataclass(frozen=True)
class Stats:
    entries: int
    levels: dict[str, int]
    queue_length: int
    overflow: int
    workers: int
    probing: int


class RedisCache:
    """The shared cache, with the same ``get``/``put``/``flush``/``now`` as ``MemoryCache``."""

    backend = "redis"

    def __init__(self, settings: config.Config, client: redis.Redis | None = None,
                 clock: Callable[[], float] = time.time, health: Health | None = None) -> None:
        self._settings = settings.cache
        self.keys = Keys(settings.redis.prefix)
        self.client = client or connect(settings.redis)
        self._clock = clock
        # The breaker's recovery probe: a PING with the normal timeout.
        self.health = health or Health(describe(settings.redis), probe=self.client.ping)
        self._redis_settings = settings.redis
        self._async_client: redis.asyncio.Redis | None = None
        # Labelled series resolved once: get() runs per recipient and per policy lookup.
        self._get_seconds = metrics.CACHE_SECONDS.labels(backend=self.backend, op="get")
        self._put_seconds = metrics.CACHE_SECONDS.labels(backend=self.backend, op="put")
        self._requests = {state: metrics.CACHE_REQUESTS.labels(backend=self.backend,
                                                               result=state.value)
                          for state in State}
        self._errors = metrics.CACHE_REQUESTS.labels(backend=self.backend, result=CACHE_ERROR)

    def now(self) -> float:
        return self._clock()

    def get(self, domain: str) -> tuple[State, Entry | None]:
        started = time.perf_counter()
        try:
            raw = self.health.call(lambda: self.client.get(self.keys.assessment(domain)))
        except CacheUnavailable:
            self._errors.inc()
            raise
        return self._found(raw, started)

    async def get_async(self, domain: str) -> tuple[State, Entry | None]:
        """``get`` with the asyncio client (made at the first call, on the caller's loop)."""
        started = time.perf_counter()
        client = self._async_client
        if client is None:
            client = self._async_client = connect_async(self._redis_settings)
        try:
            raw = await self.health.call_async(
                lambda: client.get(self.keys.assessment(domain)))
        except CacheUnavailable:
            self._errors.inc()
            raise
        return self._found(raw, started)

    def _found(self, raw: bytes | str | None, started: float) -> tuple[State, Entry | None]:
        self._get_seconds.observe(time.perf_counter() - started)
        entry = decode(raw)
        now = self._clock()
        state = freshness(entry, now)
        self.count(state, entry, now)
        return (state, None) if state is State.MISS else (state, entry)

    def count(self, state: State, entry: Entry | None, now: float) -> None:
        """Count a read of the cache (also one answered from an entry read just before)."""
        self._requests[state].inc()
        if entry is not None and state is not State.MISS:
            metrics.ASSESSMENT_AGE.observe(max(0.0, now - entry.stored_at))

    async def close_async(self) -> None:
        """Close the asyncio client's connections, if it was ever used."""
        client, self._async_client = self._async_client, None
        if client is not None:
            await client.aclose()

    def ping(self) -> bool:
        """Ping Redis: keeps ``health`` (and tlsmilter_redis_up) current while idle."""
        try:
            self.health.call(self.client.ping)
        except CacheUnavailable:
            return False
        return True

    def put(self, assessment: dict[str, Any]) -> Entry:
        started = time.perf_counter()
        entry, text, ttl_ms = encode(assessment, self._clock(), self._settings)
        key = self.keys.assessment(str(assessment["domain"]))
        self.health.call(lambda: self.client.set(key, text, px=ttl_ms))
        self._put_seconds.observe(time.perf_counter() - started)
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
