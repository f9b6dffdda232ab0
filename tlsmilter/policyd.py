"""``tlsmilter policy-server``: the socketmap policy server as its own process, on Redis.

With the shared cache any number of policy servers answer from the assessments every milter
decided on (with the embedded cache, ``serve`` runs the server itself). A lookup Redis cannot
answer gets ``TEMP``: Postfix defers the delivery and tries again, never weakening TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

from tlsmilter import config, metrics
from tlsmilter.errors import TlsmilterError
from tlsmilter.policyserver import PolicyServer
from tlsmilter.rediscache import RedisCache, describe
from tlsmilter.serve import sd_notify
from tlsmilter.sharedengine import SharedEngine

log = logging.getLogger(__name__)

HEALTH_EVERY = 5.0  # seconds between Redis pings while no lookups come


def run_policy_server(settings: config.Config) -> int:
    """Serve Postfix's TLS policy lookups until SIGTERM or SIGINT."""
    if settings.cache.backend is not config.CacheBackend.REDIS:
        raise TlsmilterError('policy-server needs cache.backend = "redis": with the embedded '
                             "cache, tlsmilter serve runs the policy server itself")
    path = Path(settings.policy_server.socket.removeprefix("unix:"))
    cache = RedisCache(settings)
    metrics.init_labels(settings)
    stop_metrics = metrics.start_metrics_server(settings.policy_server.metrics_listen)

    # The milter's lookup (without its listener): a missing or stale domain is queued for
    # the workers, so a delivery the strict map deferred finds it assessed at its next try.
    engine = SharedEngine(settings, cache=cache)

    async def lookup(domain: str) -> dict[str, Any] | None:
        # redis-py's blocking client in a thread: the same RedisCache the milter uses.
        _state, entry = await asyncio.to_thread(engine.lookup, domain)
        return entry.assessment if entry else None

    async def main() -> None:
        server = PolicyServer(lookup, str(path), map_name=settings.policy_server.map_name,
                              mode=int(settings.policy_server.socket_mode, 8))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            await server.start()
        except OSError as exc:
            raise TlsmilterError(f"policy_server.socket {settings.policy_server.socket}: "
                                 f"{exc.strerror or exc}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("policy server on %s answering from %s", path, describe(settings.redis))
        sd_notify("READY=1")
        try:
            # Deliveries may be rare: ping so that an outage, and its end, show while idle.
            while not stop.is_set():
                await asyncio.to_thread(cache.check)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), HEALTH_EVERY)
        finally:
            sd_notify("STOPPING=1")
            await server.stop()

    try:
        asyncio.run(main())
    finally:
        cache.client.close()
        if stop_metrics is not None:
            stop_metrics()
    log.info("policy server stopped")
    return 0
