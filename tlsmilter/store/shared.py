"""The shared backend: the Redis cache of a fleet; look up, ask the workers, wait for them.

It offers the same ``Assessments`` as the embedded backend, but probes nothing itself: a
miss queues the domain for the ``tlsmilter worker`` fleet. A worker
publishes each stored assessment on a channel; a listener thread wakes the callback threads
waiting at end-of-message, so the wait ends as soon as the result is there. The wait also
re-reads the cache every ``POLL`` seconds, so a notice lost while the listener reconnects
costs at most that much.

The milter's RCPT never waits on Redis: ``prefetch`` runs the lookup on a few background
threads, and only a sensitive message waits for it at end-of-message. The connection's
circuit breaker (``redis.connection.Health``) makes every lookup fail at once during an
outage, so a Redis that hangs costs one ``redis.timeout``, not one per recipient.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import redis

from tlsmilter import config
from tlsmilter.errors import CacheUnavailable
from tlsmilter.store.base import Assessments, Entry, State, freshness, is_due
from tlsmilter.store.recent import RecentEntries
from tlsmilter.store.redis.cache import RedisCache
from tlsmilter.store.redis.queue import ProbeRequests

log = logging.getLogger(__name__)

POLL = 0.25  # seconds between cache re-reads of a waiting callback
LISTEN_TICK = 0.25  # seconds between the listener's looks at whether it should stop
LISTEN_RETRY = 1.0  # seconds between attempts to resubscribe while Redis is down
LOOKUP_THREADS = 4  # background threads running the milter's lookups
LOOKUPS_MAX = 1000  # lookups running or waiting for a thread; past it one fails at once


def _now(read: Callable[[str], tuple[State, Entry | None]],
         domain: str) -> Future[tuple[State, Entry | None]]:
    """``read(domain)`` done right here, as a finished future (its result or its error)."""
    future: Future[tuple[State, Entry | None]] = Future()
    try:
        future.set_result(read(domain))
    except Exception as exc:  # the caller reads it where it needs the answer
        future.set_exception(exc)
    return future


class SharedAssessments(Assessments):
    """Assessments from the shared Redis cache, probed by the worker fleet.

    ``start`` runs the listener that wakes waiting callers when a worker stores a result;
    a process that never waits (the policy server) still starts it: its subscription also
    notices an outage, and its end, while no lookups come.
    """

    backend = RedisCache.backend

    def __init__(self, settings: config.Config, *, cache: RedisCache | None = None) -> None:
        self.redis = cache or RedisCache(settings)
        super().__init__(self.redis, settings.cache)
        self.settings = settings
        self.requests = ProbeRequests(settings, self.redis.client, self.redis.health)
        self._waiters: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="tlsmilter-assessed",
                                          daemon=True)
        self._lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="tlsmilter-lookup")
        self._running: dict[str, Future[tuple[State, Entry | None]]] = {}
        self.recent = RecentEntries()  # the policy server's reads, forgotten on a notice
        self._peeks = 0  # reads ``peek`` started and not finished

    def start(self) -> None:
        self._listener.start()

    def stop(self) -> None:
        self._stop.set()
        self._lookups.shutdown(wait=False, cancel_futures=True)
        self.redis.health.stop()
        if self._listener.is_alive():
            self._listener.join(timeout=LISTEN_RETRY + 2)

    def _request(self, domain: str) -> None:
        self.requests.request(domain)

    def prefetch(self, domain: str) -> Future[tuple[State, Entry | None]]:
        """``lookup`` on a background thread; one at a time per domain.

        While the breaker is open the lookup fails at once, so it runs right here.
        """
        if self.redis.health.open:
            return super().prefetch(domain)
        with self._lock:
            running = self._running.get(domain)
            if running is not None:
                return running
            if len(self._running) >= LOOKUPS_MAX:
                busy: Future[tuple[State, Entry | None]] = Future()
                busy.set_exception(CacheUnavailable(
                    f"{len(self._running)} redis lookups already waiting"))
                return busy
            future = self._lookups.submit(self._lookup, domain)
            self._running[domain] = future
        future.add_done_callback(lambda done: self._forget(domain, done))
        return future

    def peek(self, domain: str) -> Future[tuple[State, Entry | None]]:
        """``get`` on a background thread: the cache read alone, no probe requested.

        The milter's RCPT past its warm-up budget (issue 12); like ``prefetch`` it never
        waits on Redis, and counts against the same bound.
        """
        if self.redis.health.open:
            return _now(self.get, domain)
        with self._lock:
            if len(self._running) + self._peeks >= LOOKUPS_MAX:
                busy: Future[tuple[State, Entry | None]] = Future()
                busy.set_exception(CacheUnavailable(
                    f"{len(self._running) + self._peeks} redis lookups already waiting"))
                return busy
            self._peeks += 1
            future = self._lookups.submit(self.get, domain)
        future.add_done_callback(self._peeked)
        return future

    def _peeked(self, _done: Future[tuple[State, Entry | None]]) -> None:
        with self._lock:
            self._peeks -= 1

    async def lookup_async(self, domain: str) -> tuple[State, Entry | None]:
        """``lookup`` with the asyncio client, from an entry read moments ago if any.

        A fresh entry read less than ``recent.TTL`` seconds ago (and not assessed anew since,
        as the listener hears) answers without Redis, unless the breaker is open: during an
        outage every lookup fails, as ``lookup`` does. The request to assess a domain (a miss,
        stale or due) runs in a thread, the blocking client's; it is the rare case.
        """
        entry = self.recent.get(domain)
        if entry is not None and not self.redis.health.open:
            now = self.redis.now()
            state = freshness(entry, now)
            if state is State.HIT and not is_due(entry, now, self._refresh_before):
                self.redis.count(state, entry, now)
                return state, entry
        generation = self.recent.generation
        state, entry = await self.redis.get_async(domain)
        if entry is not None:
            self.recent.put(domain, entry, generation)
        if state is not State.HIT or (
                entry is not None and is_due(entry, self.redis.now(), self._refresh_before)):
            await asyncio.to_thread(self._request, domain)
        return state, entry

    async def close_async(self) -> None:
        await self.redis.close_async()

    def _lookup(self, domain: str) -> tuple[State, Entry | None]:
        try:
            return self.lookup(domain)
        except CacheUnavailable:
            raise
        except Exception:  # a bug: only a sensitive message would ever read the future
            log.exception("looking up %s failed", domain)
            raise

    def _forget(self, domain: str, done: Future[tuple[State, Entry | None]]) -> None:
        with self._lock:
            if self._running.get(domain) is done:
                del self._running[domain]

    def ping(self) -> bool:
        """Whether Redis answers; keeps tlsmilter_redis_up current while idle."""
        return self.redis.ping()

    def close(self) -> None:
        """Close the Redis connections (after ``stop``), and end the breaker's probe."""
        self.redis.health.stop()
        self.redis.client.close()

    def wait(self, domains: Iterable[str], timeout: float) -> None:
        """Block until every domain has a usable assessment, or ``timeout``.

        A sensitive message waits: a domain not in the cache is queued again, urgently, so
        the workers probe it before every warm-up request (issue 12), even if RCPT's
        request waits among them or was never made (a warm-up budget spent, a full queue).
        """
        pending = set(domains)
        if not pending:
            return
        event = threading.Event()
        with self._lock:
            for domain in pending:
                self._waiters.setdefault(domain, set()).add(event)
        deadline = time.monotonic() + timeout
        try:
            pending = {d for d in pending if self._missing(d)}
            for domain in pending:
                if time.monotonic() >= deadline:
                    break
                self._urgently(domain)
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                event.wait(min(POLL, remaining))
                event.clear()
                pending = {d for d in pending if self._missing(d)}
        finally:
            with self._lock:
                for domain in set(domains):
                    waiting = self._waiters.get(domain)
                    if waiting is not None:
                        waiting.discard(event)
                        if not waiting:
                            del self._waiters[domain]

    def _urgently(self, domain: str) -> None:
        # Redis failing: nothing to wait for; the milter fails safe on its own read.
        with contextlib.suppress(CacheUnavailable):
            self.requests.request(domain, urgent=True)

    def _missing(self, domain: str) -> bool:
        try:
            state, _entry = self.redis.get(domain)
        except CacheUnavailable:
            return False  # nothing to wait for: the milter fails safe on its own read
        return state is State.MISS

    def _notify(self, domain: str) -> None:
        self.recent.invalidate(domain)
        with self._lock:
            events = list(self._waiters.get(domain, ()))
        for event in events:
            event.set()

    def _listen(self) -> None:
        channel = self.redis.keys.assessed
        while not self._stop.is_set():
            pubsub = self.redis.client.pubsub(  # type: ignore[no-untyped-call]
                ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                # The subscription is a connection that notices an outage while the milter
                # is idle. It cannot tell an outage's end (SUBSCRIBE is sent, not answered,
                # so it "succeeds" on a Redis that hangs): the breaker's probe does that.
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=LISTEN_TICK)
                    if message and message.get("type") == "message":
                        data = message["data"]
                        self._notify(data.decode() if isinstance(data, bytes) else str(data))
            except (redis.RedisError, OSError) as exc:
                self.redis.health.failed(exc)
                self._stop.wait(LISTEN_RETRY)
            except Exception:  # a bug must not end the listener: waits would only poll
                log.exception("the assessment listener failed; starting it again")
                self._stop.wait(LISTEN_RETRY)
            finally:
                try:
                    pubsub.close()
                except (redis.RedisError, OSError):
                    log.debug("closing the pub/sub connection failed", exc_info=True)
