"""``tlsmilter serve``: the milter with the embedded cache and prober, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from pathlib import Path

import Milter

from tlsmilter import config
from tlsmilter.assess.prober import Prober
from tlsmilter.daemons import instrument
from tlsmilter.daemons.milter import TlsMilter, policies_from
from tlsmilter.daemons.policy_server import start_policy_server, unix_path
from tlsmilter.daemons.sdnotify import sd_notify
from tlsmilter.errors import TlsmilterError
from tlsmilter.store.base import Assessments
from tlsmilter.store.embedded import EmbeddedAssessments
from tlsmilter.store.redis.connection import describe
from tlsmilter.store.shared import SharedAssessments

log = logging.getLogger(__name__)


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


def make_assessments(settings: config.Config) -> Assessments:
    """The configured backend: embedded (probing in-process) or shared (Redis)."""
    if settings.cache.backend is config.CacheBackend.REDIS:
        return SharedAssessments(settings)
    return EmbeddedAssessments(
        settings, make_prober=lambda: Prober(settings.prober, observer=instrument.ProbeMetrics()),
        state_dir=settings.cache.state_dir)


def serve(settings: config.Config) -> int:
    """Run until SIGTERM/SIGINT (libmilter handles them and returns from its main loop)."""
    sock_path = unix_path(settings.milter.socket)
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
    instrument.init_labels(settings)
    stop_metrics = instrument.start_metrics_server(settings.metrics.listen)
    try:
        assessments = make_assessments(settings)
        assessments.start()
    except BaseException:
        if stop_metrics is not None:
            stop_metrics()
        raise
    policy_server = None
    if isinstance(assessments, EmbeddedAssessments):
        try:
            policy_server = start_policy_server(assessments, settings.policy_server,
                                                assessments.loop)
        except BaseException:
            assessments.stop()
            if stop_metrics is not None:
                stop_metrics()
            raise
    else:
        log.info("shared cache on %s: run tlsmilter policy-server for Postfix's TLS policy "
                 "lookups, and tlsmilter worker for probes", describe(settings.redis))
    policies = policies_from(settings)
    Milter.factory = lambda: TlsMilter(assessments, settings, policies)
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
        if policy_server is not None and isinstance(assessments, EmbeddedAssessments):
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(policy_server.stop(),
                                                 assessments.loop).result(10)
        assessments.stop()
        if stop_metrics is not None:
            stop_metrics()
        if sock_path is not None:
            with contextlib.suppress(OSError):
                sock_path.unlink()
    log.info("milter stopped")
    return 0
