"""The fleet's MTA-STS policy cache against a real redis-server: stored until the policy
expires, shared by every worker, and never an error when Redis is away."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from tests.lab.redis_server import LabRedis, free_port
from tlsmilter.assess.mtasts import CachedPolicy, Mode, Policy
from tlsmilter.store.redis.records import Keys
from tlsmilter.store.redis.stspolicies import RedisPolicyCache

pytestmark = pytest.mark.lab

NOW = 1_800_000_000.0
POLICY = Policy(Mode.ENFORCE, 86400, ("mx1.sts.test", "*.sts.test"))


def run_with(url: str, scenario: object) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(url, socket_timeout=0.5,
                                              socket_connect_timeout=0.5)
        try:
            await scenario(client)  # type: ignore[operator]
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_policy_is_shared_until_it_expires(redis_server: LabRedis) -> None:
    keys = Keys("sts-test:")

    async def scenario(client: redis.asyncio.Redis) -> None:
        await client.flushdb()
        one = RedisPolicyCache(client, keys, clock=lambda: NOW)
        other = RedisPolicyCache(client, keys, clock=lambda: NOW + 10)  # another worker
        cached = CachedPolicy("id1", POLICY, NOW - 3600)
        await one.put("sts.test", cached)
        assert await other.get("sts.test") == cached
        ttl = await client.pttl(keys.sts_policy("sts.test"))
        assert 86400_000 - 3600_000 - 1000 < ttl <= 86400_000 - 3600_000
        await one.put("old.test", CachedPolicy("id2", POLICY, NOW - 86400))  # expired
        assert await other.get("old.test") is None
        await client.set(keys.sts_policy("junk.test"), b"\xff not json")
        assert await other.get("junk.test") is None
        await client.set(keys.sts_policy("odd.test"), '{"id": "x"}')
        assert await other.get("odd.test") is None

    run_with(redis_server.url, scenario)


def test_redis_away_means_no_cache_not_an_error() -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        cache = RedisPolicyCache(client, Keys("t:"), clock=lambda: NOW)
        await cache.put("sts.test", CachedPolicy("id1", POLICY, NOW))
        assert await cache.get("sts.test") is None

    run_with(f"redis://127.0.0.1:{free_port('127.0.0.1')}/0", scenario)
