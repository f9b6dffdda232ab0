"""The shared probe queue on Redis: milters ask, workers probe, each domain once at a time.

A request is one Stream entry (``XADD``), read by ``tlsmilter worker`` processes through one
consumer group. There are two Streams (issue 12): ``probes`` holds the warm-up requests a
lookup makes (RCPT, the policy server), ``probes:urgent`` the domains a sensitive message is
waiting for at end-of-message. Workers read the urgent one first and keep
``prober.reserved_slots`` of their slots (and of the fleet's) for it, so a flood of warm-up
probes that hang never delays a verdict. Three guards keep the work to one probe per domain
and bounded:

- ``queued:<domain>`` is set with the entry and removed when the probe is done, so a domain
  that is waiting or being probed is not queued again; its value says which Stream
  (``w`` or ``u``), so a domain waiting among warm-up requests is queued once more, urgently,
  when a sensitive message needs it;
- each Stream is bounded: past ``worker.queue_max`` entries a request is dropped and counted
  (``overflow``), and asked for again at the domain's next lookup; the log says when such an
  overload starts and when it ends (``store.scheduling.Overload``), not each drop;
- ``lock:<domain>`` is held by the worker that probes it, so even a duplicate entry (an
  expired marker, a reclaimed entry) is never probed twice at the same time.

A worker that dies leaves its entries pending; another worker takes them over with
``XAUTOCLAIM`` once they have been idle for ``worker.claim_after`` seconds. Locks expire
before that, so the new owner can always take the domain's lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable
from typing import Any, NamedTuple, cast

import redis
import redis.asyncio

from tlsmilter import config, metrics
from tlsmilter.store.redis.connection import Health
from tlsmilter.store.redis.records import Keys
from tlsmilter.store.scheduling import Overload

log = logging.getLogger(__name__)

# KEYS: marker, stream (warm-up or urgent), overflow counter. ARGV: domain, marker TTL (ms),
# queue bound, idle TTL (ms), marker value ('w' warm-up, 'u' urgent). Returns {status, the
# stream's length}; status 1 queued, 0 already queued (urgently, or warm-up for a warm-up
# request) or being probed, -1 dropped: the stream is full. A marker of another value (an
# older version's) counts as warm-up. The streams and the counter live while requests come;
# idle for IDLE_TTL they expire (the workers recreate the group), so every key tlsmilter
# writes has a TTL.
_ENQUEUE = """
local was = redis.call('GET', KEYS[1])
if was and (was == 'u' or ARGV[5] ~= 'u') then
  return {0, redis.call('XLEN', KEYS[2])}
end
local length = redis.call('XLEN', KEYS[2])
if length >= tonumber(ARGV[3]) then
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return {-1, length}
end
redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[2])
redis.call('XADD', KEYS[2], '*', 'domain', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1, length + 1}
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
        # One line when a stream starts dropping requests, one when it is half empty again.
        self._overloads = {False: Overload("probe queue"), True: Overload("urgent probe queue")}
        self._lock = threading.Lock()  # the overloads are shared by the callback threads

    def request(self, domain: str, *, urgent: bool = False) -> bool:
        """Queue ``domain`` unless it is queued already; False when the queue is full.

        ``urgent``: a sensitive message waits for it; it goes to the urgent stream, even when
        the domain already waits among the warm-up requests.
        """
        k = self.keys
        stream = k.urgent if urgent else k.stream
        status, length = self._health.call(lambda: self._script(
            keys=[k.queued(domain), stream, k.overflow],
            args=[domain, self._marker_ms, self._bound, int(IDLE_TTL * 1000),
                  "u" if urgent else "w"]))
        overload = self._overloads[urgent]
        if status == -1:
            metrics.PROBE_QUEUE_OVERFLOW.inc()
            with self._lock:
                overload.dropped(self._bound)  # logs the start of an episode only
            return False
        if overload.active and int(length) <= self._bound // 2:
            with self._lock:
                overload.relieved()  # half empty: the episode is over
        return True

    def length(self, *, urgent: bool = False) -> int:
        stream = self.keys.urgent if urgent else self.keys.stream
        return int(self._health.call(lambda: self._client.xlen(stream)))


class Request(NamedTuple):
    """One probe request a worker took: its Stream entry, the domain, which Stream."""

    id: str
    domain: str
    urgent: bool = False


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
        # Fleet-wide, warm-up probes leave prober.reserved_slots to urgent ones, as each
        # worker does with its own slots.
        self._warm_limit = max(1, self._limit - settings.prober.reserved_slots)
        self._release = client.register_script(_RELEASE)
        self._acquire_slot = client.register_script(_ACQUIRE_SLOT)

    def _stream(self, urgent: bool) -> str:
        return self.keys.urgent if urgent else self.keys.stream

    async def ensure_group(self) -> None:
        for stream in (self.keys.urgent, self.keys.stream):
            try:
                await self.client.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            # A stream made here has no TTL until the first request sets it.
            await self.client.pexpire(stream, int(IDLE_TTL * 1000), nx=True)

    async def read(self, urgent: int, warm: int, block_ms: int) -> list[Request]:
        """New entries for this worker: up to ``urgent`` urgent ones and ``warm`` warm-up
        ones (with both, at most the smaller of the two from each Stream); urgent first."""
        streams: dict[Any, Any] = {self.keys.urgent: ">"}
        count = urgent
        if warm > 0:
            streams[self.keys.stream] = ">"
            count = min(urgent, warm)
        reply: Any = await self.client.xreadgroup(self.keys.group, self.consumer, streams,
                                                  count=count, block=block_ms)
        requests = [Request(entry_id, domain, _name(name) == self.keys.urgent)
                    for name, entries in reply or [] for entry_id, domain in _entries(entries)]
        return sorted(requests, key=lambda r: not r.urgent)

    async def claim(self, count: int) -> list[Request]:
        """Entries idle past ``claim_after``: their worker died mid-probe; take them over."""
        claimed: list[Request] = []
        for urgent in (True, False):
            stream = self._stream(urgent)
            reply = await self.client.xautoclaim(stream, self.keys.group, self.consumer,
                                                 min_idle_time=self._claim_ms, start_id="0-0",
                                                 count=count)
            claimed += [Request(i, d, urgent) for i, d in _entries(reply[1])]
            deleted: list[Any] = list(reply[2]) if len(reply) > 2 else []
            if deleted:  # entries trimmed away while pending: nothing left to probe
                await self.client.xack(stream, self.keys.group, *deleted)
        return claimed

    async def forget_gone_consumers(self, idle_ms: int) -> list[str]:
        """Remove consumers of workers that are gone: nothing pending, silent for ``idle_ms``.

        Every worker process joins the group under a name of its own, so without this the
        group would keep one consumer per worker ever started. One with entries pending is
        kept: removing it would drop them before a takeover.
        """
        gone: set[str] = set()
        for stream in (self.keys.urgent, self.keys.stream):
            try:
                consumers = await self.client.xinfo_consumers(stream, self.keys.group)
            except redis.ResponseError as exc:
                if "no such key" in str(exc).lower():
                    continue  # expired while idle: reading it remakes it (NOGROUP)
                raise
            names = ((c, _name(c["name"])) for c in consumers)
            leaving = [name for c, name in names
                       if c["pending"] == 0 and c["idle"] >= idle_ms and name != self.consumer]
            for name in leaving:
                await self.client.xgroup_delconsumer(stream, self.keys.group, name)
            gone.update(leaving)
        return sorted(gone)

    async def leave(self) -> bool:
        """Remove this worker's consumer from the group, unless it still has entries pending."""
        left = True
        for stream in (self.keys.urgent, self.keys.stream):
            try:
                pending = await self.client.xpending_range(
                    stream, self.keys.group, min="-", max="+", count=1,
                    consumername=self.consumer)
                if pending:
                    left = False
                    continue
                await self.client.xgroup_delconsumer(stream, self.keys.group, self.consumer)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):  # NOGROUP: the idle queue expired
                    raise
        return left

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

    async def acquire_slot(self, token: str, now_ms: int, *, urgent: bool = False) -> bool:
        limit = self._limit if urgent else self._warm_limit
        return bool(await cast(Awaitable[Any], self._acquire_slot(
            keys=[self.keys.slots], args=[token, now_ms, now_ms + self._lock_ms, limit])))

    async def release_slot(self, token: str) -> None:
        await self.client.zrem(self.keys.slots, token)

    async def finish(self, request: Request, *, done: bool) -> None:
        """Acknowledge and delete the entry; with ``done`` also allow new requests."""
        k = self.keys
        stream = self._stream(request.urgent)
        domain = request.domain
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xack(stream, k.group, request.id)
            pipe.xdel(stream, request.id)
            if done:
                pipe.delete(k.queued(domain))
            await pipe.execute()

    async def announce(self, domain: str) -> None:
        await self.client.publish(self.keys.assessed, domain)


def _name(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


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
