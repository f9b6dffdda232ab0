"""The embedded engine: cache plus prober on an asyncio loop in its own thread.

libmilter calls the milter from its own threads; they ask the engine for assessments and wait
on ``concurrent.futures`` with a bound. One probe per domain is in flight at a time, and the
number in flight is bounded so a flood of new domains cannot grow memory without limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from tlsmilter import config, metrics
from tlsmilter.assess.prober import Prober
from tlsmilter.cache import Entry, MemoryCache, State

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 1000


class Cache(Protocol):
    def get(self, domain: str) -> tuple[State, Entry | None]: ...


class Assessments(Protocol):
    """What the milter needs: the embedded ``Engine`` or the Redis ``SharedEngine``."""

    @property
    def cache(self) -> Cache: ...

    def lookup(self, domain: str) -> tuple[State, Entry | None]: ...

    def wait(self, domains: Iterable[str], timeout: float) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Engine:
    def __init__(self, settings: config.Config, *, prober: Prober | None = None,
                 cache: MemoryCache | None = None) -> None:
        self.settings = settings
        self.cache = cache or MemoryCache(settings.cache)
        self._prober = prober
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tlsmilter-engine", daemon=True)
        self._pending: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.overflow = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def start(self) -> None:
        self._thread.start()
        # The prober's semaphores and locks belong to the engine loop: build it there.
        asyncio.run_coroutine_threadsafe(self._make_prober(), self._loop).result(timeout=10)

    async def _make_prober(self) -> None:
        if self._prober is None:
            self._prober = Prober(self.settings.prober)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            # Cancel probes still running so the loop closes without leaking sockets.
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def lookup(self, domain: str) -> tuple[State, Entry | None]:
        """Cache lookup that starts a probe on a miss or a stale entry."""
        state, entry = self.cache.get(domain)
        if state is not State.HIT or (entry is not None and self.cache.due(entry)):
            self.request(domain)
        return state, entry

    def request(self, domain: str) -> concurrent.futures.Future[dict[str, Any]] | None:
        """Start assessing ``domain`` unless already in flight; None when over capacity."""
        with self._lock:
            future = self._pending.get(domain)
            if future is not None:
                return future
            if len(self._pending) >= MAX_IN_FLIGHT:
                self.overflow += 1
                metrics.PROBE_QUEUE_OVERFLOW.inc()
                log.warning("probe queue full (%d in flight): %s not assessed now",
                            MAX_IN_FLIGHT, domain)
                return None
            future = asyncio.run_coroutine_threadsafe(self._assess(domain), self._loop)
            self._pending[domain] = future
            self._gauges()
        future.add_done_callback(lambda _f: self._done(domain))
        return future

    def _done(self, domain: str) -> None:
        with self._lock:
            self._pending.pop(domain, None)
            self._gauges()

    def _gauges(self) -> None:
        # Requests past the prober's concurrency wait for a slot: that is the queue.
        running = min(len(self._pending), self.settings.prober.concurrency)
        metrics.PROBES_IN_FLIGHT.set(running)
        metrics.PROBE_QUEUE_LENGTH.set(len(self._pending) - running)

    async def _assess(self, domain: str) -> dict[str, Any]:
        assert self._prober is not None
        try:
            result = (await self._prober.assess(domain)).to_json()
        except Exception:
            log.exception("assessing %s failed", domain)
            raise
        self.cache.put(result)
        return result

    def wait(self, domains: Iterable[str], timeout: float) -> None:
        """Block until every domain with a probe in flight has finished, or ``timeout``."""
        with self._lock:
            futures = [f for d in domains if (f := self._pending.get(d)) is not None]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout)
