"""``tlsmilter serve``: the milter with the embedded cache and prober, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import Milter

from tlsmilter import config
from tlsmilter.assess.prober import Prober
from tlsmilter.daemons import instrument
from tlsmilter.daemons.milter import LiveConfig, TlsMilter
from tlsmilter.daemons.policy_server import start_policy_server, unix_path
from tlsmilter.daemons.sdnotify import sd_notify
from tlsmilter.errors import TlsmilterError
from tlsmilter.store.base import Assessments
from tlsmilter.store.embedded import EmbeddedAssessments
from tlsmilter.store.redis.connection import describe
from tlsmilter.store.scheduling import WarmupBudget
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
        settings, make_prober=lambda sts: Prober(settings.prober, sts_cache=sts,
                                                 observer=instrument.ProbeMetrics()),
        state_dir=settings.cache.state_dir)


def serve(settings: config.Config,
          reread: Callable[[], config.Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT (libmilter handles them and returns from its main loop).

    On SIGHUP, ``reread`` gives the new settings (it raises ``TlsmilterError`` for an
    invalid file, which leaves the running ones in force).
    """
    sock_path = unix_path(settings.milter.socket)
    if sock_path is not None:
        try:
            sock_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TlsmilterError(f"milter.socket: cannot create {sock_path.parent}: "
                                 f"{exc.strerror}") from None
        # A socket left by a crash (kill -9) would pass for the new one in _when_listening,
        # which would report readiness and set the mode before libmilter replaced it.
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
    # libmilter stops on SIGTERM/SIGINT/SIGHUP through a thread that sigwait()s for them; that
    # only works if no other thread can take the signal, so block them before any thread
    # starts (threads inherit the mask). Otherwise Python's default SIGTERM kills us mid-way.
    # SIGHUP alone is unblocked again in our reload thread, which starts before libmilter's:
    # see Reloader.
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
    live = LiveConfig(settings)
    if isinstance(assessments, EmbeddedAssessments):
        try:  # the per-domain overrides follow reloads, like the milter's
            policy_server = start_policy_server(assessments, settings.policy_server,
                                                assessments.loop, lambda: live.current[0])
        except BaseException:
            assessments.stop()
            if stop_metrics is not None:
                stop_metrics()
            raise
    else:
        log.info("shared cache on %s: run tlsmilter policy-server for Postfix's TLS policy "
                 "lookups, and tlsmilter worker for probes", describe(settings.redis))
    # Both backends probe, urgently, what end-of-message waits for: RCPT keeps to budgets.
    prober = settings.prober
    budget = WarmupBudget(prober.warmup_per_message, prober.warmup_per_client,
                          prober.warmup_window)
    Milter.factory = lambda: TlsMilter(assessments, *live.current, live=live, budget=budget)
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE)
    Reloader(live, reread or (lambda: settings)).start()
    stop = threading.Event()
    watcher = threading.Thread(target=_when_listening, daemon=True,
                               args=(sock_path, int(settings.milter.socket_mode, 8), stop))
    watcher.start()
    try:
        _run_milter("tlsmilter", settings.milter.socket, settings.milter.timeout)
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


# -- reloading on SIGHUP ---------------------------------------------------------------------

# Keys whose new value needs a restart: the sockets, the backend and what it was built with.
RESTART_SECTIONS = ("cache", "redis", "prober", "policy_server", "metrics", "worker")
RESTART_MILTER_KEYS = ("socket", "socket_mode", "timeout")


class Reloader:
    """Rereads the configuration on SIGHUP; new messages use it, connections and the cache stay.

    libmilter's signal thread sigwait()s for SIGHUP too, and stops the milter when it gets
    it. A process-directed signal goes to the first thread that does not block it, searching
    from the last thread that took one (Linux's complete_signal); the main thread blocks
    SIGHUP, every thread ours blocks it but this one, and this one starts before libmilter's.
    It never blocks SIGHUP, so it is always a taker: Python's C-level handler runs in it and
    writes the signal number to the wakeup pipe, which the thread reads.
    """

    def __init__(self, live: LiveConfig, reread: Callable[[], config.Config]) -> None:
        self.live = live
        self.reread = reread
        self.started = live.current[0]  # what the sockets and the backend were built with
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def start(self) -> None:
        """Call from the main thread (Python installs signal handlers only there)."""
        signal.signal(signal.SIGHUP, lambda _signum, _frame: None)  # the wakeup pipe acts
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._run, name="tlsmilter-reload", daemon=True).start()

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        while True:
            if signal.SIGHUP in os.read(self._read_fd, 64):
                self.reload()

    def reload(self) -> None:
        """Apply the new configuration, or log why not in one line and keep the old one."""
        try:
            new = self.reread()
        except TlsmilterError as exc:
            log.error("SIGHUP: configuration not reloaded, the running one stays in force: %s",
                      "; ".join(line.strip() for line in str(exc).splitlines()))
            return
        except Exception:  # a reload must never stop the milter
            log.exception("SIGHUP: configuration not reloaded, the running one stays in force")
            return
        self.live.replace(new)
        instrument.init_labels(new)
        logging.getLogger().setLevel(new.log.level.value.upper())
        ignored = restart_only_changes(self.started, new)
        log.info("SIGHUP: configuration reloaded; policies %s%s", ", ".join(new.policies),
                 f"; these changes need a restart: {', '.join(ignored)}" if ignored else "")


def restart_only_changes(old: config.Config, new: config.Config) -> list[str]:
    """The changed keys (sections) a reload cannot apply."""
    changed = [f"milter.{key}" for key in RESTART_MILTER_KEYS
               if getattr(old.milter, key) != getattr(new.milter, key)]
    return changed + [f"[{name}]" for name in RESTART_SECTIONS
                      if getattr(old, name) != getattr(new, name)]


# -- libmilter's main loop -------------------------------------------------------------------

_early_logged = threading.Event()


def _instance(ctx: Any) -> Any:
    """The connection's milter; created here for a command before option negotiation or
    CONNECT (pymilter's own lambdas then fail with AttributeError and a traceback)."""
    milter = ctx.getpriv()
    if milter is None:
        if not _early_logged.is_set():
            _early_logged.set()
            log.warning("a milter client sent a command before negotiating options; "
                        "answered as if it had (logged once)")
        milter = Milter.factory()
        milter._setctx(ctx)
    return milter


def _run_milter(name: str, socket: str, timeout: float) -> None:
    """``Milter.runmilter`` with its callbacks made safe for any order of commands, and
    libmilter's timeout for a stalled conversation."""
    lib: Any = Milter.milter
    lib.set_connect_callback(Milter.connect_callback)
    lib.set_helo_callback(lambda ctx, host: _instance(ctx).hello(host))
    lib.set_envfrom_callback(lambda ctx, *b: _instance(ctx).envfrom_bytes(*b))
    lib.set_envrcpt_callback(lambda ctx, *b: _instance(ctx).envrcpt_bytes(*b))
    lib.set_header_callback(lambda ctx, f, v: _instance(ctx).header_bytes(f, v))
    lib.set_eoh_callback(lambda ctx: _instance(ctx).eoh())
    lib.set_body_callback(lambda ctx, chunk: _instance(ctx).body(chunk))
    lib.set_eom_callback(lambda ctx: _instance(ctx).eom())
    lib.set_abort_callback(lambda ctx: _instance(ctx).abort())
    lib.set_close_callback(Milter.close_callback)
    lib.setconn(socket)
    lib.settimeout(max(1, round(timeout)))
    lib.register(name, data=lambda ctx: _instance(ctx).data(),
                 unknown=lambda ctx, cmd: _instance(ctx).unknown(cmd),
                 negotiate=Milter.negotiate_callback)
    lib.opensocket(True)
    lib.main()
