"""The embedded backend: the memory cache, filled by a prober on an asyncio loop of its own.

libmilter calls the milter from its own threads; they ask for assessments and wait on
``concurrent.futures`` with a bound. One probe per domain is in flight at a time, and the
number in flight is bounded so a flood of new domains cannot grow memory without limit.

With a state directory the cache is loaded from a snapshot at start, saved every
``cache.snapshot_interval`` seconds by a thread of its own, and saved once more at stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from tlsmilter import config, metrics
from tlsmilter.assess.model import Assessment
from tlsmilter.assess.mtasts import MemoryPolicyCache, PolicyCache
from tlsmilter.assess.prober import Prober
from tlsmilter.store.base import Assessments
from tlsmilter.store.memory import MemoryCache
from tlsmilter.store.scheduling import Overload, SlotGate
from tlsmilter.store.snapshot import StateFile
from tlsmilter.store.stsfile import FILE_NAME as STS_FILE_NAME
from tlsmilter.store.stsfile import load_policies, save_policies

log = logging.getLogger(__name__)


class DomainProber(Protocol):
    """What the embedded backend needs of a prober: ``assess.prober.Prober`` or a fake."""

    async def assess(self, domain: str) -> Assessment: ...


class EmbeddedAssessments(Assessments):
    """Assessments from the in-process cache, probed in-process: ``tlsmilter serve`` alone.

    ``make_prober(sts_policies)`` builds the prober on the backend's loop (its semaphores and
    locks belong there) with the backend's MTA-STS policy cache; by default a plain
    ``Prober``. ``prober`` gives a ready one instead (tests).
    ``state_dir`` (``cache.state_dir``, passed by ``serve``) keeps the cache across restarts;
    empty: it starts empty every time.
    """

    backend = MemoryCache.backend

    def __init__(self, settings: config.Config, *, prober: DomainProber | None = None,
                 make_prober: Callable[[PolicyCache], DomainProber] | None = None,
                 cache: MemoryCache | None = None, state_dir: str = "") -> None:
        self.memory = cache or MemoryCache(settings.cache)
        super().__init__(self.memory, settings.cache)
        self.settings = settings
        self._prober = prober
        self._make_prober = make_prober or (
            lambda sts: Prober(settings.prober, sts_cache=sts))
        # RFC 8461's policy cache, saved with the snapshot: a restart must not forget it.
        self.sts_policies = MemoryPolicyCache()
        self._saved_policies = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tlsmilter-engine", daemon=True)
        self._pending: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
        # Priorities and bounds (store/scheduling.py): warm-up probes from RCPT are bounded
        # and dropped past queue_limit; probes a waiting sensitive message needs go first.
        self._gate = SlotGate(settings.prober.concurrency, settings.prober.reserved_slots)
        self._overload = Overload("probe queue")
        self._lock = threading.Lock()
        self._state_dir = state_dir
        self._state: StateFile | None = None
        self._saved_changes = -1
        self._stopping = threading.Event()
        self._saver = threading.Thread(target=self._save_periodically,
                                       name="tlsmilter-snapshot", daemon=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The backend's event loop: daemons may host the policy server on it."""
        return self._loop

    def start(self) -> None:
        if self._state_dir:
            self._state = StateFile.open(self._state_dir)
        if self._state is not None:
            self._load(self._state)
            self._saver.start()
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._build_prober(), self._loop).result(timeout=10)

    def _load(self, state: StateFile) -> None:
        started = time.perf_counter()
        records = state.load()
        added = self.memory.restore(records)
        self._saved_changes = self.memory.changes  # nothing new to save yet
        policies = self.sts_policies.restore(
            load_policies(state.path.with_name(STS_FILE_NAME)), time.time())
        self._saved_policies = self.sts_policies.changes
        if policies:
            log.info("cache: %d MTA-STS policies loaded", policies)
        if records:
            log.info("cache: %d assessments loaded from %s in %.2f s (%d expired or "
                     "superseded, dropped)", added, state.path, time.perf_counter() - started,
                     len(records) - added)

    def _save_periodically(self) -> None:
        interval = self.settings.cache.snapshot_interval
        while not self._stopping.wait(interval):
            self.save()

    def save(self) -> None:
        """Write the snapshot now, if there is a state directory and the cache changed."""
        if self._state is None:
            return
        policy_changes = self.sts_policies.changes
        if policy_changes != self._saved_policies and save_policies(
                self._state.path.with_name(STS_FILE_NAME), self.sts_policies.items()):
            self._saved_policies = policy_changes
        changes = self.memory.changes
        if changes == self._saved_changes:
            return
        started = time.perf_counter()
        records = self.memory.export()
        if self._state.save(records):
            self._saved_changes = changes
            log.debug("cache: %d assessments saved to %s in %.2f s", len(records),
                      self._state.path, time.perf_counter() - started)

    async def _build_prober(self) -> None:
        if self._prober is None:
            self._prober = self._make_prober(self.sts_policies)

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
        self._stopping.set()
        if self._saver.is_alive():
            self._saver.join()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        # After the loop: probes that finished while stopping are in the snapshot too.
        self.save()

    def _request(self, domain: str) -> None:
        self.assess(domain)

    def assess(self, domain: str, *, urgent: bool = False
               ) -> concurrent.futures.Future[dict[str, Any]] | None:
        """Start assessing ``domain`` unless already in flight; None when over capacity.

        ``urgent``: a sensitive message waits for it; never dropped, and it goes first.
        """
        with self._lock:
            future = self._pending.get(domain)
            if future is not None:
                return future
            limit = self.settings.prober.queue_limit
            if not urgent and len(self._pending) >= limit:
                metrics.PROBE_QUEUE_OVERFLOW.inc()
                self._overload.dropped(limit)  # logs the start of an episode only
                return None
            future = asyncio.run_coroutine_threadsafe(self._assess(domain, urgent), self._loop)
            self._pending[domain] = future
            self._gauges()
        future.add_done_callback(lambda _f: self._done(domain))
        return future

    def _done(self, domain: str) -> None:
        with self._lock:
            self._pending.pop(domain, None)
            self._gauges()
            if self._overload.active and \
                    len(self._pending) <= self.settings.prober.queue_limit // 2:
                self._overload.relieved()  # half empty: the episode is over

    def _gauges(self) -> None:
        # Requests past the prober's concurrency wait for a slot: that is the queue.
        running = min(len(self._pending), self.settings.prober.concurrency)
        metrics.PROBES_IN_FLIGHT.set(running)
        metrics.PROBE_QUEUE_LENGTH.set(len(self._pending) - running)

    async def _assess(self, domain: str, urgent: bool = False) -> dict[str, Any]:
        assert self._prober is not None
        try:
            async with self._gate.slot(domain, urgent=urgent):
                result = (await self._prober.assess(domain)).to_json()
        except Exception:
            log.exception("assessing %s failed", domain)
            raise
        self.memory.put(result)
        return result

    def wait(self, domains: Iterable[str], timeout: float) -> None:
        # A sensitive message waits: its probes go first, and one RCPT could not start
        # (the warm-up queue was full) starts now.
        domains = list(domains)
        for domain in domains:
            if domain in self._pending:
                self._loop.call_soon_threadsafe(self._gate.promote, domain)
            elif self.memory.get(domain)[1] is None:
                self.assess(domain, urgent=True)
        with self._lock:
            futures = [f for d in domains if (f := self._pending.get(d)) is not None]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout)
