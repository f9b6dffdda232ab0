"""``tlsmilter serve``: the milter with the embedded cache and prober, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import Milter

from tlsmilter import config, metrics
from tlsmilter.engine import Engine
from tlsmilter.errors import TlsmilterError
from tlsmilter.milter import TlsMilter, policies_from
from tlsmilter.policyserver import PolicyServer
from tlsmilter.rediscache import describe
from tlsmilter.sharedengine import SharedEngine

log = logging.getLogger(__name__)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
            contextlib.suppress(OSError):
        sock.sendto(message.encode(), address)


def _unix_path(spec: str) -> Path | None:
    kind, _, rest = spec.partition(":")
    return Path(rest) if kind == "unix" else None


def _when_listening(path: Path | None, mode: int, stop: threading.Event) -> None:
    """Fix the socket's mode once libmilter created it, then report readiness."""
    if path is not None:
        while not stop.is_set() and not path.exists():
            time.sleep(0.02)
        with contextlib.suppress(OSError):
            path.chmod(mode)
    if not stop.is_set():
        log.info("milter listening on %s", path or "inet socket")
        sd_notify("READY=1")


def _start_policy_server(engine: Engine, settings: config.PolicyServer) -> PolicyServer | None:
    """The socketmap server shares the embedded cache, so it runs inside ``serve``."""
    path = _unix_path(settings.socket)
    if path is None:
        return None

    def lookup(domain: str) -> dict[str, Any] | None:
        # A missing or stale domain is probed again at once (not waited for): a delivery the
        # strict map deferred then finds it assessed at its next try.
        _state, entry = engine.lookup(domain)
        return entry.assessment if entry else None

    server = PolicyServer(lookup, str(path), map_name=settings.map_name,
                          mode=int(settings.socket_mode, 8))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        asyncio.run_coroutine_threadsafe(server.start(), engine.loop).result(10)
    except (OSError, TlsmilterError) as exc:
        engine.stop()
        raise TlsmilterError(f"policy_server.socket {settings.socket}: {exc}") from None
    return server


def make_engine(settings: config.Config) -> Engine | SharedEngine:
    """The embedded engine, or the one on the shared Redis cache."""
    if settings.cache.backend is config.CacheBackend.REDIS:
        return SharedEngine(settings)
    return Engine(settings)


def serve(settings: config.Config) -> int:
    """Run until SIGTERM/SIGINT (libmilter handles them and returns from its main loop)."""
    sock_path = _unix_path(settings.milter.socket)
    if sock_path is not None:
        try:
            sock_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TlsmilterError(f"milter.socket: cannot create {sock_path.parent}: "
                                 f"{exc.strerror}") from None
    # libmilter stops on SIGTERM/SIGINT/SIGHUP through a thread that sigwait()s for them; that
    # only works if no other thread can take the signal, so block them before any thread
    # starts (threads inherit the mask). Otherwise Python's default SIGTERM kills us mid-way.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    metrics.init_labels(settings)
    stop_metrics = metrics.start_metrics_server(settings.metrics.listen)
    try:
        engine = make_engine(settings)
        engine.start()
    except BaseException:
        if stop_metrics is not None:
            stop_metrics()
        raise
    policy_server = None
    if isinstance(engine, Engine):
        policy_server = _start_policy_server(engine, settings.policy_server)
    else:
        log.info("shared cache on %s: run tlsmilter policy-server for Postfix's TLS policy "
                 "lookups, and tlsmilter worker for probes", describe(settings.redis))
    policies = policies_from(settings)
    Milter.factory = lambda: TlsMilter(engine, settings, policies)
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE)
    stop = threading.Event()
    watcher = threading.Thread(target=_when_listening, daemon=True,
                               args=(sock_path, int(settings.milter.socket_mode, 8), stop))
    watcher.start()
    try:
        Milter.runmilter("tlsmilter", settings.milter.socket, timeout=300)
    except Milter.milter.error as exc:
        raise TlsmilterError(f"milter.socket {settings.milter.socket}: {exc}") from None
    finally:
        stop.set()
        sd_notify("STOPPING=1")
        if policy_server is not None and isinstance(engine, Engine):
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(policy_server.stop(), engine.loop).result(10)
        engine.stop()
        if stop_metrics is not None:
            stop_metrics()
        if sock_path is not None:
            with contextlib.suppress(OSError):
                sock_path.unlink()
    log.info("milter stopped")
    return 0
