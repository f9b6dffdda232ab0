"""The probe queue on a real redis-server: each domain queued once, the queue bounded."""

from __future__ import annotations

import dataclasses

import pytest

from tests.fakes import redis_settings as settings_for
from tests.lab.redis_server import LabRedis
from tlsmilter.store.redis.cache import RedisCache
from tlsmilter.store.redis.queue import ProbeRequests

pytestmark = pytest.mark.lab


def test_requests_are_queued_once_and_bounded(redis_server: LabRedis) -> None:
    settings = settings_for(redis_server.url)
    settings = dataclasses.replace(settings, worker=dataclasses.replace(settings.worker,
                                                                         queue_max=2))
    cache = RedisCache(settings)
    cache.client.flushdb()
    requests = ProbeRequests(settings, cache.client, cache.health)
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
