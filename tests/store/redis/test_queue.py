"""The probe queue on a real redis-server: each domain queued once, the queue bounded."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from tests.fakes import redis_settings as settings_for
from tests.lab.redis_server import LabRedis
from tlsmilter.store.redis.cache import RedisCache
from tlsmilter.store.redis.queue import ProbeRequests

pytestmark = pytest.mark.lab


def empty_queue(redis_server: LabRedis, queue_max: int = 10_000
                ) -> tuple[RedisCache, ProbeRequests]:
    """The cache and the milter's side of the queue, bounded by ``queue_max``, on an empty
    Redis."""
    settings = settings_for(redis_server.url)
    settings = dataclasses.replace(settings, worker=dataclasses.replace(settings.worker,
                                                                         queue_max=queue_max))
    cache = RedisCache(settings)
    cache.client.flushdb()
    return cache, ProbeRequests(settings, cache.client, cache.health)


def test_requests_are_queued_once_and_bounded(redis_server: LabRedis) -> None:
    cache, requests = empty_queue(redis_server, queue_max=2)
    try:
        assert requests.request("one.test")
        assert requests.request("one.test")  # already waiting: not queued again
        assert requests.length() == 1
        assert requests.request("two.test")
        assert not requests.request("three.test")  # the bound: dropped and counted
        assert requests.length() == 2
        assert cache.stats().overflow == 1
        # Every key tlsmilter wrote carries the prefix, and the per-domain ones a TTL.
        keys = sorted(k.decode() for k in cache.client.keys("*"))
        assert keys == ["t:overflow", "t:probes", "t:queued:one.test", "t:queued:two.test"]
        assert all(cache.client.pttl(key) > 0 for key in keys), "every key has a TTL"
        # a later request for a dropped domain gets in once there is room
        cache.client.delete("t:probes", "t:queued:one.test")
        assert requests.request("three.test") and requests.length() == 1
    finally:
        cache.client.close()


def test_urgent_requests_have_their_own_stream_and_overtake_warm_up_ones(
        redis_server: LabRedis) -> None:
    cache, requests = empty_queue(redis_server)
    try:
        assert requests.request("warm.test")  # RCPT's warm-up request
        # A sensitive message waits for it: queued once more, on the urgent stream ...
        assert requests.request("warm.test", urgent=True)
        assert requests.length() == 1 and requests.length(urgent=True) == 1
        # ... once only, and a warm-up request for an urgently queued domain adds nothing.
        assert requests.request("warm.test", urgent=True)
        assert requests.request("warm.test")
        assert requests.length() == 1 and requests.length(urgent=True) == 1
        assert requests.request("new.test", urgent=True)  # never requested before
        assert requests.length(urgent=True) == 2 and requests.length() == 1
        assert cache.client.get("t:queued:warm.test") == b"u"
        assert cache.client.pttl("t:probes:urgent") > 0
    finally:
        cache.client.close()


def test_an_overload_logs_one_line_when_it_starts_and_one_when_it_ends(
        redis_server: LabRedis, caplog: pytest.LogCaptureFixture) -> None:
    cache, requests = empty_queue(redis_server, queue_max=10)
    caplog.set_level(logging.INFO, logger="tlsmilter")
    try:
        queued = [requests.request(f"d{i}.test") for i in range(1000)]
        assert sum(queued) == 10 and cache.stats().overflow == 990
        cache.client.delete("t:probes")  # the workers drained the queue
        assert requests.request("later.test")
        lines = [r.getMessage() for r in caplog.records]
        assert lines == [
            "probe queue full (10): new domains are not assessed until it drains; one line "
            "will say when", lines[1]], lines
        assert lines[1].startswith("probe queue drained: 990 requests dropped in ")
    finally:
        cache.client.close()
