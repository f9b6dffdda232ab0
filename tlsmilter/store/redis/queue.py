"""The shared probe queue on Redis: milters ask, workers probe, each domain once at a time.

A request is one Stream entry (``XADD``), read by ``tlsmilter worker`` processes through one
consumer group. Three guards keep the work to one probe per domain and bounded:

- ``queued:<domain>`` is set (``NX``) with the entry and removed when the probe is done, so
  a domain that is waiting or being probed is not queued again;
- the Stream is bounded: past ``worker.queue_max`` entries a request is dropped and counted
  (``overflow``), and asked for again at the domain's next lookup;
- ``lock:<domain>`` is held by the worker that probes it, so even a duplicate entry (an
  expired marker, a reclaimed entry) is never probed twice at the same time.

A worker that dies leaves its entries pending; another worker takes them over with
``XAUTOCLAIM`` once they have been idle for ``worker.claim_after`` seconds. Locks expire
before that, so the new owner can always take the domain's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, cast

import redis
import redis.asyncio

from tlsmilter import config, metrics
from tlsmilter.store.redis.connection import Health
from tlsmilter.store.redis.records import Keys

log = logging.getLogger(__name__)

# KEYS: marker, stream, overflow counter. ARGV: domain, marker TTL (ms), queue bound, idle
# TTL (ms). Returns 1 queued, 0 already queued or being probed, -1 dropped: queue full.
# The stream and the counter live while requests come; idle for IDLE_TTL they expire (the
# workers recreate the group), so every key tlsmilter writes has a TTL.
_ENQUEUE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) == false then return 0 end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return -1
end
redis.call('XADD', KEYS[2], '*', 'domain', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""
IDLE_TTL = 7 * 86400.0  # seconds the queue and its counter outlive the last request

# KEYS: lock. ARGV: owner token. Delete the lock only if we still hold it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: slots (sorted set). ARGV: token, now (ms), expiry (ms), limit.
# A fleet-wide semaphore: members are running probes scored by when they expire, so the
# slot of a worker that died comes back by itself.
_ACQUIRE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return 1
"""


def lock_ttl(settings: config.Config) -> float:
    """Seconds a domain lock lives: the probe's whole budget, and shorter than a takeover."""
    return min(settings.prober.timeouts.domain + 5.0,
               (settings.prober.timeouts.domain + settings.worker.claim_after) / 2)


def marker_ttl(settings: config.Config) -> float:
    """Seconds a queued marker lives: long enough for a takeover of a dead worker's probe."""
    return 2 * settings.worker.claim_after + settings.prober.timeouts.domain


class ProbeRequests:
    """The milter's side: ask for a domain to be probed (blocking client, callback threads)."""

    def __init__(self, settings: config.Config, client: redis.Redis, health: Health) -> None:
        self.keys = Keys(settings.redis.prefix)
        self._client = client
        self._health = health
        self._script = client.register_script(_ENQUEUE)
        self._marker_ms = int(marker_ttl(settings) * 1000)
        self._bound = settings.worker.queue_max

    def request(self, domain: str) -> bool:
        """Queue ``domain`` unless it is queued already; False when the queue is full."""
        k = self.keys
        result = self._health.call(lambda: self._script(
            keys=[k.queued(domain), k.stream, k.overflow],
            args=[domain, self._marker_ms, self._bound, int(IDLE_TTL * 1000)]))
        if result == -1:
            metrics.PROBE_QUEUE_OVERFLOW.inc()
            log.warning("probe queue full (%d waiting): %s not assessed now", self._bound, domain)
            return False
        return True

    def length(self) -> int:
        return int(self._health.call(lambda: self._client.xlen(self.keys.stream)))


class WorkQueue:
    """The worker's side (asyncio client): read, take over, lock, finish."""

    def __init__(self, settings: config.Config, client: redis.asyncio.Redis,
                 consumer: str) -> None:
        self.keys = Keys(settings.redis.prefix)
        self.client = client
        self.consumer = consumer
        self._lock_ms = int(lock_ttl(settings) * 1000)
        self._claim_ms = int(settings.worker.claim_after * 1000)
        self._limit = settings.worker.fleet_concurrency
        self._release = client.register_script(_RELEASE)
        self._acquire_slot = client.register_script(_ACQUIRE_SLOT)

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.keys.stream, self.keys.group, id="0",
                                            mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        # A stream made here has no TTL until the first request sets it.
        await self.client.pexpire(self.keys.stream, int(IDLE_TTL * 1000), nx=True)

    async def read(self, count: int, block_ms: int) -> list[tuple[str, str]]:
        """New entries for this worker, as (entry id, domain)."""
        reply: Any = await self.client.xreadgroup(self.keys.group, self.consumer,
                                             {self.keys.stream: ">"}, count=count,
                                             block=block_ms)
        return [entry for _stream, entries in reply or [] for entry in _entries(entries)]

    async def claim(self, count: int) -> list[tuple[str, str]]:
        """Entries idle past ``claim_after``: their worker died mid-probe; take them over."""
        reply = await self.client.xautoclaim(self.keys.stream, self.keys.group, self.consumer,
                                             min_idle_time=self._claim_ms, start_id="0-0",
                                             count=count)
        claimed = _entries(reply[1])
        deleted: list[Any] = list(reply[2]) if len(reply) > 2 else []
        if deleted:  # entries trimmed away while pending: nothing left to probe
            await self.client.xack(self.keys.stream, self.keys.group, *deleted)
        return claimed

    async def forget_gone_consumers(self, idle_ms: int) -> list[str]:
        """Remove consumers of workers that are gone: nothing pending, silent for ``idle_ms``.

        Every worker process joins the group under a name of its own, so without this the
        group would keep one consumer per worker ever started. One with entries pending is
        kept: removing it would drop them before a takeover.
        """
        consumers = await self.client.xinfo_consumers(self.keys.stream, self.keys.group)
        names = ((c, c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"]))
                 for c in consumers)
        gone = [name for c, name in names
                if c["pending"] == 0 and c["idle"] >= idle_ms and name != self.consumer]
        for name in gone:
            await self.client.xgroup_delconsumer(self.keys.stream, self.keys.group, name)
        return gone

    async def leave(self) -> bool:
        """Remove this worker's consumer from the group, unless it still has entries pending."""
        try:
            pending = await self.client.xpending_range(
                self.keys.stream, self.keys.group, min="-", max="+", count=1,
                consumername=self.consumer)
            if pending:
                return False
            await self.client.xgroup_delconsumer(self.keys.stream, self.keys.group,
                                                 self.consumer)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return True  # the idle queue expired: nothing to leave
            raise
        return True

    async def lock(self, domain: str) -> bool:
        return bool(await self.client.set(self.keys.lock(domain), self.consumer, nx=True,
                                          px=self._lock_ms))

    async def unlock(self, domain: str) -> None:
        await cast(Awaitable[Any], self._release(keys=[self.keys.lock(domain)],
                                                 args=[self.consumer]))

    async def ip_lock(self, address: str, ttl_ms: int) -> bool:
        return bool(await self.client.set(self.keys.ip_lock(address), self.consumer, nx=True,
                                          px=ttl_ms))

    async def ip_unlock(self, address: str) -> None:
        await cast(Awaitable[Any], self._release(keys=[self.keys.ip_lock(address)],
                                                 args=[self.consumer]))

    async def acquire_slot(self, token: str, now_ms: int) -> bool:
        return bool(await cast(Awaitable[Any], self._acquire_slot(
            keys=[self.keys.slots], args=[token, now_ms, now_ms + self._lock_ms, self._limit])))

    async def release_slot(self, token: str) -> None:
        await self.client.zrem(self.keys.slots, token)

    async def finish(self, entry_id: str, domain: str, *, done: bool) -> None:
        """Acknowledge and delete the entry; with ``done`` also allow new requests."""
        k = self.keys
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xack(k.stream, k.group, entry_id)
            pipe.xdel(k.stream, entry_id)
            if done:
                pipe.delete(k.queued(domain))
            await pipe.execute()

    async def announce(self, domain: str) -> None:
        await self.client.publish(self.keys.assessed, domain)


def _entries(raw: Any) -> list[tuple[str, str]]:
    out = []
    for entry_id, fields in raw or []:
        if not fields:  # an entry deleted while pending reads as (id, None)
            continue
        domain = fields.get(b"domain") or fields.get("domain")
        ident = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if domain:
            out.append((ident, domain.decode() if isinstance(domain, bytes) else str(domain)))
    return out
