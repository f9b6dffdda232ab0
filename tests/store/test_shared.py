"""The shared backend: refresh-ahead, failing safe while Redis is down, woken by notices."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.fakes import T0, Clock, assessment
from tests.fakes import redis_settings as settings_for
from tests.lab.redis_server import LabRedis
from tlsmilter import metrics
from tlsmilter.errors import CacheUnavailable
from tlsmilter.store.memory import State
from tlsmilter.store.redis.cache import RedisCache
from tlsmilter.store.shared import SharedAssessments as SharedEngine

pytestmark = pytest.mark.lab


def test_a_lookup_close_to_expiry_queues_a_refresh(redis_server: LabRedis) -> None:
    clock = Clock()
    settings = settings_for(redis_server.url)
    cache = RedisCache(settings, clock=clock)
    cache.client.flushdb()
    engine = SharedEngine(settings, cache=cache)  # not started: no listener needed here
    try:
        cache.put(assessment("busy.test", "dane"))
        assert engine.lookup("busy.test")[0] is State.HIT
        assert engine.requests.length() == 0  # fresh: nothing to do
        clock.now = T0 + 550  # ttl 600, refresh_before 100: due, still served as a hit
        assert engine.lookup("busy.test")[0] is State.HIT
        assert engine.requests.length() == 1
        assert engine.lookup("never.test") == (State.MISS, None)
        assert engine.requests.length() == 2
    finally:
        cache.client.close()




def redis_up() -> float:
    value = metrics.REGISTRY.get_sample_value("tlsmilter_redis_up")
    assert value is not None
    return value


def test_a_milter_started_while_redis_is_down_fails_safe_and_recovers_idle(
        redis_workdir: Path) -> None:
    redis_server = LabRedis(redis_workdir / "late")  # not running yet
    engine = SharedEngine(settings_for(redis_server.url, timeout=0.5))
    engine.start()
    try:
        with pytest.raises(CacheUnavailable):
            engine.lookup("a.test")
        assert redis_up() == 0
        redis_server.start()
        # No lookup: the breaker's probe alone notices that Redis is back.
        deadline = time.monotonic() + 10
        while not engine.redis.health.up:
            assert time.monotonic() < deadline, "Redis back, still reported down"
            time.sleep(0.1)
        assert redis_up() == 1
        assert engine.lookup("a.test") == (State.MISS, None)
        assert engine.requests.length() == 1  # queued for the workers
    finally:
        engine.stop()
        engine.redis.client.close()
        redis_server.stop()


def test_a_waiting_milter_is_woken_by_the_notice_not_the_poll(
        redis_server: LabRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tlsmilter.store.shared.POLL", 30.0)  # polling alone would miss it
    settings = settings_for(redis_server.url)
    engine = SharedEngine(settings)
    engine.redis.client.flushdb()
    engine.start()
    try:
        time.sleep(0.5)  # the listener subscribes
        waited: list[float] = []
        waiter = threading.Thread(target=lambda: waited.append(timed_wait(engine)))
        waiter.start()
        time.sleep(0.3)  # the callback thread is waiting
        engine.redis.put(assessment("woken.test", "dane"))  # as a worker stores it ...
        engine.redis.client.publish(engine.redis.keys.assessed, "woken.test")  # ... and tells
        waiter.join(timeout=25)
        assert waited and waited[0] < 10, waited  # ended by the notice, long before 20 s
    finally:
        engine.stop()
        engine.redis.client.close()


def timed_wait(engine: SharedEngine) -> float:
    started = time.monotonic()
    engine.wait(["woken.test"], 20.0)
    return time.monotonic() - started
