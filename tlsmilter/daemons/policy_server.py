"""The socketmap policy server on either backend, and ``tlsmilter policy-server``.

``policy_lookup`` answers Postfix from any ``Assessments``; ``start_policy_server`` runs the
socketmap server with it on a given event loop. ``tlsmilter serve`` hosts it on the embedded
backend's loop (the assessments the milter decided on live in that process); with the shared
cache, ``tlsmilter policy-server`` runs it as a process of its own, answering from the
assessments every milter decided on. A lookup the backend cannot answer gets ``TEMP``:
Postfix defers the delivery and tries again, never weakening TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

from tlsmilter import config
from tlsmilter.core.delivery import DomainPolicy
from tlsmilter.core.overrides import Override
from tlsmilter.daemons import instrument
from tlsmilter.daemons.sdnotify import sd_notify
from tlsmilter.daemons.socketmap import Lookup, PolicyServer, PolicyServerError
from tlsmilter.errors import TlsmilterError
from tlsmilter.store.base import Assessments
from tlsmilter.store.redis.connection import describe
from tlsmilter.store.shared import SharedAssessments

log = logging.getLogger(__name__)

HEALTH_EVERY = 5.0  # seconds between Redis pings while no lookups come


def policy_lookup(assessments: Assessments) -> Lookup:
    """The policy server's lookup: the cached domain's policy, never waited for.

    A missing or stale domain is assessed again at once, so a delivery the strict map
    deferred finds it assessed at its next try.
    """
    return _PolicyLookup(assessments)


class _PolicyLookup:
    """``policy_lookup``'s lookup; ``aclose`` (``PolicyServer.stop`` awaits it) closes the
    backend's connections of the server's loop."""

    def __init__(self, assessments: Assessments) -> None:
        self._assessments = assessments

    async def __call__(self, domain: str) -> DomainPolicy | None:
        _state, entry = await self._assessments.lookup_async(domain)
        return entry.policy if entry else None

    async def aclose(self) -> None:
        await self._assessments.close_async()


def unix_path(spec: str) -> Path | None:
    """The path of a ``unix:/PATH`` socket spec; None for other kinds."""
    kind, _, rest = spec.partition(":")
    return Path(rest) if kind == "unix" else None


def overrides_of(current: Callable[[], config.Config]) -> Callable[[], Mapping[str, Override]]:
    """The per-domain overrides of the configuration ``current()`` returns, built once per
    configuration (``serve`` replaces it on SIGHUP)."""
    built: list[tuple[config.Config, Mapping[str, Override]]] = []

    def overrides() -> Mapping[str, Override]:
        settings = current()
        if not built or built[0][0] is not settings:
            built[:] = [(settings, config.domain_overrides(settings))]
        return built[0][1]
    return overrides


async def open_policy_server(assessments: Assessments,
                             settings: config.PolicyServerSettings, path: Path,
                             current: Callable[[], config.Config] | None = None
                             ) -> PolicyServer:
    """The socketmap server on ``path``, listening; ``current`` gives the configuration whose
    per-domain overrides apply. A socket that cannot be set up is a ``TlsmilterError`` that
    names ``policy_server.socket``."""
    server = PolicyServer(policy_lookup(assessments), str(path), map_name=settings.map_name,
                          mode=int(settings.socket_mode, 8),
                          overrides=overrides_of(current) if current else None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        await server.start()
    except (OSError, TlsmilterError) as exc:
        reason = (exc.reason if isinstance(exc, PolicyServerError)
                  else exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        raise TlsmilterError(f"policy_server.socket {settings.socket}: {reason}") from None
    return server


def start_policy_server(assessments: Assessments, settings: config.PolicyServerSettings,
                        loop: asyncio.AbstractEventLoop,
                        current: Callable[[], config.Config] | None = None
                        ) -> PolicyServer | None:
    """``open_policy_server`` on ``loop`` (running in another thread); None when
    ``policy_server.socket`` is no unix socket."""
    path = unix_path(settings.socket)
    if path is None:
        return None
    return asyncio.run_coroutine_threadsafe(
        open_policy_server(assessments, settings, path, current), loop).result(10)


def run_policy_server(settings: config.Config) -> int:
    """``tlsmilter policy-server``: serve Postfix's lookups until SIGTERM or SIGINT."""
    if settings.cache.backend is not config.CacheBackend.REDIS:
        raise TlsmilterError('policy-server needs cache.backend = "redis": with the embedded '
                             "cache, tlsmilter serve runs the policy server itself")
    path = unix_path(settings.policy_server.socket)
    assert path is not None  # config accepts only unix:/PATH here
    instrument.init_labels(settings)
    stop_metrics = instrument.start_metrics_server(settings.policy_server.metrics_listen)
    assessments = SharedAssessments(settings)

    async def main() -> None:
        server = await open_policy_server(assessments, settings.policy_server, path,
                                          lambda: settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("policy server on %s answering from %s", path, describe(settings.redis))
        sd_notify("READY=1")
        try:
            # Deliveries may be rare: ping so that an outage, and its end, show while idle.
            while not stop.is_set():
                await asyncio.to_thread(assessments.ping)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), HEALTH_EVERY)
        finally:
            sd_notify("STOPPING=1")
            await server.stop()

    # The listener: a notice of a new assessment makes the server forget what it read.
    assessments.start()
    try:
        asyncio.run(main())
    finally:
        assessments.stop()
        assessments.close()
        if stop_metrics is not None:
            stop_metrics()
    log.info("policy server stopped")
    return 0
