"""The fleet's MTA-STS policy cache on Redis (RFC 8461 3.3), as the workers' probers use it.

Each domain's last valid policy is one key (``records.Keys.sts_policy``) holding
``CachedPolicy.to_json``, with a Redis TTL that ends when the policy expires, so every worker
applies the policy any of them fetched, and a blocked policy fetch cannot make the fleet forget
it. Redis trouble never fails an assessment: without the cache the prober simply fetches, as
RFC 8461 has a sender without a cached policy do.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable

import redis
import redis.asyncio

from tlsmilter.assess.mtasts import CachedPolicy
from tlsmilter.store.redis.records import Keys

log = logging.getLogger(__name__)


class RedisPolicyCache:
    """An ``assess.mtasts.PolicyCache`` on the shared Redis (asyncio client)."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._keys = keys
        self._clock = clock

    async def get(self, domain: str) -> CachedPolicy | None:
        try:
            raw = await self._client.get(self._keys.sts_policy(domain))
        except redis.RedisError as exc:
            log.debug("MTA-STS policy cache: reading %s failed: %s", domain, exc)
            return None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return CachedPolicy.from_json(data)

    async def put(self, domain: str, cached: CachedPolicy) -> None:
        ttl_ms = math.ceil((cached.expires_at - self._clock()) * 1000)
        if ttl_ms <= 0:
            return
        text = json.dumps(cached.to_json(), sort_keys=True, separators=(",", ":"))
        try:
            await self._client.set(self._keys.sts_policy(domain), text, px=ttl_ms)
        except redis.RedisError as exc:
            log.debug("MTA-STS policy cache: storing %s failed: %s", domain, exc)
