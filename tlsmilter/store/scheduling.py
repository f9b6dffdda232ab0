"""Which probe runs first, and what is dropped when too many are asked for (issue 12).

Probes come in two kinds. A *warm-up* probe is speculative: RCPT starts it so the answer is
likely cached by end-of-message, and for most mail nobody ever waits for it. An *urgent*
probe is one a sensitive message is waiting for at end-of-message. Hostile mail (one message
to thousands of new domains whose DNS or SMTP hangs) may slow down warming the cache, but must
never delay a verdict: so urgent probes go ahead of every waiting warm-up probe, some probe
slots are kept for them alone, and warm-up requests beyond a bounded queue are dropped and
counted, never queued without bound.

``SlotGate`` orders probes on the backend's event loop; ``Overload`` logs one line when
requests start being dropped and one when that ends, with counts, instead of one per request;
``WarmupBudget`` bounds the warm-up probes one message, and one client, may start.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

log = logging.getLogger(__name__)


class SlotGate:
    """``slots`` probes at a time; warm-up probes may use all but ``reserved`` of them.

    Waiting urgent probes start before any waiting warm-up probe; a warm-up probe becomes
    urgent when ``promote`` is called for its domain (a sensitive message needs it), even if
    it has not reached the gate yet. Only for use on one event loop.
    """

    MAX_PROMOTED = 10_000  # promotions for domains never requested are forgotten past this

    def __init__(self, slots: int, reserved: int) -> None:
        self.slots = slots
        self.reserved = min(reserved, slots - 1) if slots > 1 else 0
        self.running = 0
        self.running_warm = 0
        # Waiting probes by domain; a waiter's result says whether it started as warm-up.
        self._urgent: dict[str, asyncio.Future[bool]] = {}
        self._warm: dict[str, asyncio.Future[bool]] = {}
        self._promoted: set[str] = set()

    @asynccontextmanager
    async def slot(self, domain: str, *, urgent: bool) -> AsyncIterator[None]:
        """Hold a probe slot for ``domain`` while the block runs."""
        if domain in self._promoted:
            self._promoted.discard(domain)
            urgent = True
        if self._may_start(urgent) and not self._urgent and (urgent or not self._warm):
            warm = self._take(urgent)
        else:
            warm = await self._queue(domain, urgent)
        try:
            yield
        finally:
            self._release(warm)

    def promote(self, domain: str) -> None:
        """``domain`` is needed by a waiting sensitive message: let it go first."""
        waiter = self._warm.pop(domain, None)
        if waiter is not None:
            self._urgent[domain] = waiter
            self._wake()
        elif domain not in self._urgent:
            if len(self._promoted) >= self.MAX_PROMOTED:
                self._promoted.clear()
            self._promoted.add(domain)

    @property
    def waiting(self) -> int:
        return len(self._urgent) + len(self._warm)

    def _may_start(self, urgent: bool) -> bool:
        if self.running >= self.slots:
            return False
        return urgent or self.running_warm < self.slots - self.reserved

    def _take(self, urgent: bool) -> bool:
        self.running += 1
        self.running_warm += not urgent
        return not urgent

    def _release(self, warm: bool) -> None:
        self.running -= 1
        self.running_warm -= warm
        self._wake()

    async def _queue(self, domain: str, urgent: bool) -> bool:
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        (self._urgent if urgent else self._warm)[domain] = waiter
        try:
            return await waiter
        except BaseException:
            if self._urgent.get(domain) is waiter:
                del self._urgent[domain]
            if self._warm.get(domain) is waiter:
                del self._warm[domain]
            if waiter.done() and not waiter.cancelled():  # granted, then cancelled
                self._release(waiter.result())
            raise

    def _wake(self) -> None:
        for queue, urgent in ((self._urgent, True), (self._warm, False)):
            while queue and self._may_start(urgent) and (urgent or not self._urgent):
                domain = next(iter(queue))
                waiter = queue.pop(domain)
                if not waiter.done():
                    waiter.set_result(self._take(urgent))


class Overload:
    """One warning when requests start being dropped, one line when none were for a while.

    ``dropped`` counts a request that was not queued; ``relieved`` is called when there is room
    again. The metrics count every drop; the log says when an episode began and ended, and
    how many requests it dropped.
    """

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self._clock = clock
        self.count = 0
        self._since: float | None = None

    @property
    def active(self) -> bool:
        return self._since is not None

    def dropped(self, limit: int) -> None:
        self.count += 1
        if self._since is None:
            self._since = self._clock()
            log.warning("%s full (%d): new domains are not assessed until it drains; "
                        "one line will say when", self.what, limit)

    def relieved(self) -> None:
        if self._since is None:
            return
        log.warning("%s drained: %d requests dropped in %.1f s", self.what, self.count,
                    self._clock() - self._since)
        self._since = None
        self.count = 0


WARMUP_BUDGETS = ("message", "client")  # what ``WarmupBudget.spent`` says is spent


class WarmupBudget:
    """How many warm-up probes one message, and one client over a window, may start.

    RCPT asks before it starts a lookup that may probe; past either budget it starts none
    (a sensitive message still gets its domains probed, urgently, at end-of-message). Clients
    are keyed by address; the table of clients is bounded, the oldest forgotten first.
    Thread-safe: libmilter calls from many threads.
    """

    MAX_CLIENTS = 10_000

    def __init__(self, per_message: int, per_client: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_message = per_message
        self.per_client = per_client
        self.window = window
        self._clock = clock
        self._clients: dict[str, tuple[float, int]] = {}  # client -> (window start, count)
        self._lock = threading.Lock()

    def spent(self, client: str, used_by_message: int) -> str | None:
        """Which budget is spent (``message`` or ``client``), or None: one more may start."""
        if used_by_message >= self.per_message:
            return "message"
        now = self._clock()
        with self._lock:
            since, count = self._clients.get(client, (now, 0))
        return "client" if now - since < self.window and count >= self.per_client else None

    def charge(self, client: str) -> None:
        """Count one warm-up probe ``client`` started."""
        now = self._clock()
        with self._lock:
            since, count = self._clients.pop(client, (now, 0))
            if now - since >= self.window:
                since, count = now, 0
            self._clients[client] = (since, count + 1)  # re-inserted: newest last
            while len(self._clients) > self.MAX_CLIENTS:
                del self._clients[next(iter(self._clients))]
