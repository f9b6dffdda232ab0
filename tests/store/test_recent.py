"""store.recent, and the policy server's reads of the shared cache through it: an entry read
moments ago answers again, a notice of a new assessment makes it forgotten, and an outage
fails every read as before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tests.fakes import Clock, assessment
from tests.fakes import redis_settings as settings_for
from tests.lab.redis_server import LabRedis
from tlsmilter.errors import CacheUnavailable
from tlsmilter.store.base import Entry, State
from tlsmilter.store.recent import RecentEntries
from tlsmilter.store.shared import SharedAssessments

ENTRY = Entry(assessment("a.test", "dane"), 0.0, 10.0, 20.0)


def test_an_entry_is_kept_for_its_ttl() -> None:
    clock = Clock(100.0)
    recent = RecentEntries(ttl=2.0, clock=clock)
    recent.put("a.test", ENTRY, recent.generation)
    clock.now += 1.9
    assert recent.get("a.test") is ENTRY
    clock.now += 0.1
    assert recent.get("a.test") is None
    assert len(recent) == 0


def test_a_notice_forgets_the_domain_and_a_read_it_overtook() -> None:
    recent = RecentEntries(ttl=60.0, clock=Clock())
    recent.put("a.test", ENTRY, recent.generation)
    before = recent.generation  # a read of b.test starts ...
    recent.invalidate("a.test")  # ... a notice comes while it waits for Redis ...
    recent.put("b.test", ENTRY, before)  # ... so what it read may be outdated: not kept
    assert recent.get("a.test") is None
    assert recent.get("b.test") is None
    recent.put("b.test", ENTRY, recent.generation)
    assert recent.get("b.test") is ENTRY


def test_the_oldest_go_past_the_bound() -> None:
    recent = RecentEntries(ttl=60.0, max_entries=3, clock=Clock())
    for name in ("a", "b", "c", "a", "d"):  # "a" read again: now the newest
        recent.put(f"{name}.test", ENTRY, recent.generation)
    assert [recent.get(f"{n}.test") is not None for n in "abcd"] == [True, False, True, True]


# --- through the shared backend, on a real Redis ------------------------------------------------


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.lab
def test_a_policy_read_is_answered_again_until_a_notice_says_otherwise(
        redis_server: LabRedis) -> None:
    engine = SharedAssessments(settings_for(redis_server.url))
    engine.redis.client.flushdb()
    engine.recent = RecentEntries(ttl=600.0)  # only the notice may end it here
    engine.start()

    async def level() -> str | None:
        _state, entry = await engine.lookup_async("moving.test")
        return entry.level if entry else None

    async def scenario() -> None:
        engine.redis.put(assessment("moving.test", "dane"))
        assert await level() == "dane"
        # Stored anew without a notice (a worker of another fleet, a lost message): the
        # entry read a moment ago still answers ...
        engine.redis.put(assessment("moving.test", "encrypted"))
        assert await level() == "dane"
        # ... until the notice a worker publishes with each assessment is heard.
        engine.redis.client.publish(engine.redis.keys.assessed, "moving.test")
        deadline = time.monotonic() + 10
        while await level() != "encrypted":
            assert time.monotonic() < deadline, "the notice never reached the reader"
            await asyncio.sleep(0.05)
        await engine.close_async()

    try:
        eventually(lambda: engine.redis.client.pubsub_numsub(engine.redis.keys.assessed)[0][1]
                   == 1, "the listener never subscribed")
        run(scenario())
    finally:
        engine.stop()
        engine.close()


@pytest.mark.lab
def test_an_open_breaker_fails_even_a_read_kept_in_memory(redis_server: LabRedis) -> None:
    engine = SharedAssessments(settings_for(redis_server.url, timeout=0.5))
    engine.redis.client.flushdb()
    engine.redis.put(assessment("kept.test", "dane"))

    async def scenario() -> None:
        assert (await engine.lookup_async("kept.test"))[0] is State.HIT  # now kept
        with redis_server.paused():
            # Another read finds Redis hung: the breaker opens ...
            with pytest.raises(CacheUnavailable):
                await asyncio.to_thread(engine.lookup, "other.test")
            assert engine.redis.health.open
            # ... and the domain read a moment ago fails too: TEMP, as without the cache.
            with pytest.raises(CacheUnavailable):
                await engine.lookup_async("kept.test")
        await engine.close_async()

    try:
        run(scenario())
    finally:
        engine.stop()
        engine.close()
