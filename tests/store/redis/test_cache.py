"""The shared cache on a real redis-server: records, lifetimes, schema, flush.

Lifetimes are checked with a controlled clock: the records carry wall-clock times, so the
test moves the cache's clock instead of waiting.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.fakes import T0, Clock, assessment, clock_of
from tests.fakes import redis_settings as settings_for
from tests.lab.redis_server import LabRedis
from tlsmilter.store.base import is_due
from tlsmilter.store.memory import State
from tlsmilter.store.redis.cache import RedisCache
from tlsmilter.store.redis.records import SCHEMA

pytestmark = pytest.mark.lab


@pytest.fixture
def cache(redis_server: LabRedis) -> Iterator[RedisCache]:
    instance = RedisCache(settings_for(redis_server.url), clock=Clock())
    instance.client.flushdb()
    yield instance
    instance.client.close()


def test_a_stored_assessment_reads_back_with_its_schema_prefix_and_ttl(
        cache: RedisCache) -> None:
    cache.put(assessment("example.test", "verified"))
    state, entry = cache.get("example.test")
    assert state is State.HIT and entry is not None
    assert entry.assessment == assessment("example.test", "verified")
    raw = json.loads(cache.client.get("t:a:example.test") or b"")
    assert raw["schema"] == SCHEMA and raw["stored_at"] == T0
    # The Redis TTL covers freshness plus the stale grace, and nothing more.
    assert 899_000 < cache.client.pttl("t:a:example.test") <= 900_000


@pytest.mark.parametrize(("level", "fresh", "grace"), [
    ("dane", 600.0, 300.0),
    ("none", 60.0, 300.0),
    ("unknown", 30.0, 0.0),  # never served stale
])
def test_lifetimes_by_level(cache: RedisCache, level: str, fresh: float, grace: float) -> None:
    clock = clock_of(cache)
    cache.put(assessment("d.test", level))
    clock.now = T0 + fresh - 1
    assert cache.get("d.test")[0] is State.HIT
    clock.now = T0 + fresh + 1
    assert cache.get("d.test")[0] is (State.STALE if grace else State.MISS)
    clock.now = T0 + fresh + grace + 1
    assert cache.get("d.test") == (State.MISS, None)


def test_refresh_is_due_shortly_before_expiry(cache: RedisCache) -> None:
    clock = clock_of(cache)
    entry = cache.put(assessment("d.test", "dane"))
    clock.now = T0 + 499  # refresh_before = 100, ttl = 600
    assert not is_due(entry, cache.now(), cache._settings.refresh_before)
    clock.now = T0 + 500
    assert is_due(entry, cache.now(), cache._settings.refresh_before)


def test_another_schema_version_reads_as_a_miss(cache: RedisCache) -> None:
    cache.client.set("t:a:old.test", json.dumps({"schema": SCHEMA + 1, "assessment": {}}))
    cache.client.set("t:a:junk.test", b"\xff not json")
    assert cache.get("old.test") == (State.MISS, None)
    assert cache.get("junk.test") == (State.MISS, None)


def test_flush_and_list_touch_only_our_prefix(cache: RedisCache) -> None:
    for name in ("a.test", "b.test", "c.test"):
        cache.put(assessment(name, "encrypted"))
    cache.client.set("other:a:a.test", "kept")
    assert sorted(d for d, _e in cache.items()) == ["a.test", "b.test", "c.test"]
    assert cache.flush("b.test") == 1
    assert cache.flush("b.test") == 0
    assert cache.flush() == 2
    assert list(cache.items()) == []
    assert cache.client.get("other:a:a.test") == b"kept"
