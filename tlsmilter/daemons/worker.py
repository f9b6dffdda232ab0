"""``tlsmilter worker``: probe the domains milters queue on the shared Redis.

Each worker reads the probe Streams through the consumer group, runs up to
``prober.concurrency`` probes at once (and, fleet-wide, ``worker.fleet_concurrency``),
stores each assessment with its TTL and announces it, so the milters waiting for it go on.
Probes a sensitive message waits for (the urgent Stream) go first: warm-up probes may take
all but ``prober.reserved_slots`` of the worker's slots and of the fleet's, and urgent ones
waiting for a slot start before warm-up ones (``store.scheduling.SlotGate``), so a flood of
warm-up probes that hang cannot delay a verdict (issue 12).
On SIGTERM it stops reading, lets running probes finish (up to one probe budget) and exits;
what it leaves unfinished is taken over by another worker after ``worker.claim_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable

import redis

from tlsmilter import config, metrics
from tlsmilter.assess.prober import Prober
from tlsmilter.core.domains import InvalidDomain, normalize_domain
from tlsmilter.core.safetext import safe
from tlsmilter.daemons import instrument
from tlsmilter.daemons.sdnotify import sd_notify
from tlsmilter.errors import TlsmilterError
from tlsmilter.store.base import State, freshness
from tlsmilter.store.redis.connection import Health, connect_async, describe
from tlsmilter.store.redis.queue import Request, WorkQueue
from tlsmilter.store.redis.records import decode, encode
from tlsmilter.store.redis.stspolicies import RedisPolicyCache
from tlsmilter.store.scheduling import SlotGate

log = logging.getLogger(__name__)

SLOT_RETRY = 0.2  # seconds between tries for a fleet-wide probe slot
IP_RETRY = 0.05  # seconds between tries for a fleet-wide MX address lock
HANDLE_ATTEMPTS = 5  # tries of one request while Redis commands fail
HANDLE_RETRY = 1.0  # seconds between them
QUEUE_GAUGE_EVERY = 5.0  # seconds between updates of the queue-length gauge
# A consumer silent this long with nothing pending is a worker that is gone. A live worker
# reads the queue every fraction of redis.timeout, so an hour only spares idle-time slop.
CONSUMER_GONE_AFTER = 3600.0


class Worker:
    def __init__(self, settings: config.Config, *, prober: Prober | None = None,
                 client: redis.asyncio.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or connect_async(settings.redis)
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.queue = WorkQueue(settings, self.client, self.consumer)
        self.health = Health(describe(settings.redis))
        self.prober = prober
        self.capacity = settings.prober.concurrency
        self.gate = SlotGate(self.capacity, settings.prober.reserved_slots)
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._taken = {True: 0, False: 0}  # requests taken and not finished, urgent or not
        self._next_claim = 0.0
        self._next_gauge = 0.0

    @contextlib.asynccontextmanager
    async def ip_guard(self, address: str) -> AsyncIterator[None]:
        """Fleet-wide politeness: one probe of an MX address at a time across all workers.

        Best effort: while Redis fails, or after a quarter of the domain budget of waiting,
        the probe goes ahead (an assessment is never lost to politeness). A lock lives at
        most one domain budget, so a dead worker's lock is gone before its probe is taken
        over (``worker.claim_after`` exceeds that budget).
        """
        timeouts = self.settings.prober.timeouts
        hold_ms = int(min(timeouts.connect + 3 * timeouts.smtp + timeouts.tls,
                          timeouts.domain) * 1000)
        deadline = time.monotonic() + timeouts.domain / 4
        held = False
        while not held and time.monotonic() < deadline:
            try:
                held = await self.queue.ip_lock(address, hold_ms)
            except redis.RedisError:
                break
            if not held:
                await asyncio.sleep(IP_RETRY)
        try:
            yield
        finally:
            if held:
                await self._quietly(self.queue.ip_unlock(address))

    async def run(self) -> None:
        if self.prober is None:
            self.prober = Prober(self.settings.prober, ip_guard=self.ip_guard,
                                 observer=instrument.ProbeMetrics(),
                                 sts_cache=RedisPolicyCache(self.client, self.queue.keys))
        metrics.WORKER_SLOTS.set(self.capacity)
        metrics.WORKER_SLOTS_BUSY.set(0)
        grouped = False
        block_ms = max(50, int(self.settings.redis.timeout * 500))
        while not self.stopping.is_set():
            # Take no more than can start: urgent requests up to every slot, warm-up ones up
            # to the slots not reserved; the rest stay in Redis for other workers.
            urgent = self.capacity - self._taken[True]
            warm = self.capacity - self.gate.reserved - self._taken[False]
            if urgent <= 0:
                await asyncio.wait(self._tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                if not grouped:
                    await self.queue.ensure_group()
                    grouped = True
                entries = await self._claim(urgent) or await self.queue.read(urgent, warm,
                                                                             block_ms)
                await self._update_gauge()
                self.health.ok()
            except redis.RedisError as exc:
                grouped = False
                if isinstance(exc, redis.ResponseError) and (
                        "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc)):
                    # An idle queue expired (while read: UNBLOCKED), or Redis restarted
                    # empty: remake it.
                    continue
                self.health.failed(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)
                continue
            for request in entries:
                self._taken[request.urgent] += 1
                task = asyncio.create_task(self._handle(request))
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._finished, request.urgent))
        await self._drain()

    def _finished(self, urgent: bool, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._taken[urgent] -= 1

    async def _claim(self, count: int) -> list[Request]:
        now = time.monotonic()
        if now < self._next_claim:
            return []
        self._next_claim = now + max(1.0, self.settings.worker.claim_after / 4)
        gone = await self.queue.forget_gone_consumers(int(CONSUMER_GONE_AFTER * 1000))
        if gone:
            log.info("removed %d worker(s) gone from the queue: %s", len(gone), ", ".join(gone))
        claimed = await self.queue.claim(count)
        if claimed:
            log.info("took over %d probe(s) from a worker that stopped answering: %s",
                     len(claimed), ", ".join(r.domain for r in claimed))
        return claimed

    async def _update_gauge(self) -> None:
        now = time.monotonic()
        if now >= self._next_gauge:
            self._next_gauge = now + QUEUE_GAUGE_EVERY
            keys = self.queue.keys
            metrics.PROBE_QUEUE_LENGTH.set(await self.client.xlen(keys.stream)
                                           + await self.client.xlen(keys.urgent))

    async def _drain(self) -> None:
        if self._tasks:
            log.info("stopping: waiting for %d running probe(s)", len(self._tasks))
            _done, pending = await asyncio.wait(self._tasks,
                                                timeout=self.settings.prober.timeouts.domain)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Leave the group, unless entries are still pending: another worker takes those over.
        await self._quietly(self.queue.leave())

    async def _handle(self, request: Request) -> None:
        try:
            domain = normalize_domain(request.domain)
        except InvalidDomain as exc:
            log.warning("dropping probe request for %s: %s", safe(request.domain, 200), exc)
            await self._quietly(self.queue.finish(request, done=True))
            return
        for attempt in range(1, HANDLE_ATTEMPTS + 1):
            try:
                # Keyed by entry: a domain may have two entries (a takeover, an urgent copy).
                async with self.gate.slot(request.id, urgent=request.urgent):
                    await self._handle_once(request, domain)
                return
            except redis.RedisError as exc:
                # Often a pooled connection that died with a Redis restart: try again soon.
                # After the last attempt the entry stays pending and is taken over later.
                self.health.failed(exc)
                if attempt == HANDLE_ATTEMPTS or self.stopping.is_set():
                    return
                await asyncio.sleep(HANDLE_RETRY)
            except Exception:
                log.exception("probing %s failed", domain)
                await self._quietly(self.queue.finish(request, done=True))
                return

    async def _handle_once(self, request: Request, domain: str) -> None:
        # The fleet-wide slot first, then the domain lock. The slot may take long to come;
        # a domain lock held through that wait could expire before the probe ends, and a
        # worker that took the entry over would then probe the domain at the same time.
        token = f"{self.consumer}:{domain}"
        while not await self.queue.acquire_slot(token, int(time.time() * 1000),
                                                urgent=request.urgent):
            await asyncio.sleep(SLOT_RETRY)
        try:
            if not await self.queue.lock(domain):
                # Another worker probes it right now. Leave the entry pending: it is taken
                # over later, and then finds the fresh result and is simply acknowledged.
                return
            try:
                await self._probe_locked(request, domain)
            finally:
                await self._quietly(self.queue.unlock(domain))
        finally:
            await self._quietly(self.queue.release_slot(token))

    async def _probe_locked(self, request: Request, domain: str) -> None:
        keys = self.queue.keys
        requested_at = int(request.id.split("-")[0]) / 1000
        stored = decode(await self.client.get(keys.assessment(domain)))
        if (stored is not None and stored.stored_at >= requested_at
                and freshness(stored, time.time()) is State.HIT):
            await self.queue.finish(request, done=True)  # done since it was asked for
            return
        assert self.prober is not None
        metrics.WORKER_SLOTS_BUSY.inc()
        metrics.PROBES_IN_FLIGHT.inc()
        try:
            assessment = (await self.prober.assess(domain)).to_json()
        finally:
            metrics.WORKER_SLOTS_BUSY.dec()
            metrics.PROBES_IN_FLIGHT.dec()
        _entry, text, ttl_ms = encode(assessment, time.time(), self.settings.cache)
        started = time.perf_counter()
        await self.client.set(keys.assessment(domain), text, px=ttl_ms)
        metrics.CACHE_SECONDS.labels(backend="redis", op="put").observe(
            time.perf_counter() - started)
        await self.queue.announce(domain)
        await self.queue.finish(request, done=True)
        # Debug: a flood of new domains must not flood the log (issue 12); metrics count.
        log.debug("assessed %s: %s", domain, assessment.get("level"))

    async def _quietly(self, operation: Awaitable[object]) -> None:
        try:
            await operation
        except redis.RedisError as exc:
            self.health.failed(exc)

    def stop(self) -> None:
        self.stopping.set()


def run_worker(settings: config.Config) -> int:
    """Run a worker until SIGTERM or SIGINT."""
    if settings.cache.backend is not config.CacheBackend.REDIS:
        raise TlsmilterError('worker needs cache.backend = "redis": with the embedded cache, '
                             "tlsmilter serve probes by itself")
    instrument.init_labels(settings)
    stop_metrics = instrument.start_metrics_server(settings.worker.metrics_listen)

    async def main() -> None:
        worker = Worker(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        log.info("worker %s on %s", worker.consumer, describe(settings.redis))
        sd_notify("READY=1")
        try:
            await worker.run()
        finally:
            sd_notify("STOPPING=1")
            await worker.client.aclose()

    try:
        asyncio.run(main())
    finally:
        if stop_metrics is not None:
            stop_metrics()
    log.info("worker stopped")
    return 0
