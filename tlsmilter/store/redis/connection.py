"""Connecting to Redis (a URL or Sentinel, TLS) and telling when it is down.

Redis being down is a state, not a crash: each operation raises ``CacheUnavailable``, the
callers fail safe (docs/design.md), and ``Health`` logs one line when an outage starts and one
when it ends. ``Health`` is also the circuit breaker of a connection: from the first failure
or timeout on, operations fail at once instead of each waiting ``redis.timeout`` on a Redis
that hangs, and one background probe finds the end of the outage.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from tlsmilter import config, metrics
from tlsmilter.errors import CacheUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


def redact(url: str) -> str:
    """``url`` with any password replaced, fit for logs and error messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def describe(settings: config.RedisSettings) -> str:
    """Where Redis is, for humans: the redacted URL or the Sentinel service."""
    if settings.sentinels:
        return f"sentinel {settings.sentinel_service} via {', '.join(settings.sentinels)}"
    return redact(settings.url)


def _sentinel_kwargs(
        settings: config.RedisSettings) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Sentinel addresses, and the master connection options taken from ``url``."""
    addresses = [config.parse_host_port(a, default_port=26379) for a in settings.sentinels]
    parsed = urllib.parse.urlsplit(settings.url)
    options: dict[str, Any] = {"socket_timeout": settings.timeout,
                               "socket_connect_timeout": settings.timeout}
    if parsed.password:
        options["password"] = urllib.parse.unquote(parsed.password)
    if parsed.username:
        options["username"] = urllib.parse.unquote(parsed.username)
    db = parsed.path.lstrip("/") or urllib.parse.parse_qs(parsed.query).get("db", ["0"])[0]
    options["db"] = int(db) if db.isdigit() else 0
    if parsed.scheme == "rediss":
        options.update(_tls_options(settings))
    return addresses, options


def _tls_options(settings: config.RedisSettings) -> dict[str, Any]:
    """TLS options for ``rediss://``; other schemes get none."""
    if not settings.url.startswith("rediss://"):
        return {}
    options: dict[str, Any] = {"ssl": True}
    if settings.ca_file:
        options["ssl_ca_certs"] = settings.ca_file
    return options


def connect(settings: config.RedisSettings) -> redis.Redis:
    """A blocking client (the milter's callback threads, the CLI)."""
    if settings.sentinels:
        addresses, options = _sentinel_kwargs(settings)
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            addresses, socket_timeout=settings.timeout,
            sentinel_kwargs={"socket_timeout": settings.timeout})
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            settings.sentinel_service, **options)
        return master
    return redis.Redis.from_url(settings.url, socket_timeout=settings.timeout,
                                socket_connect_timeout=settings.timeout,
                                **_url_tls(settings))


def connect_async(settings: config.RedisSettings) -> redis.asyncio.Redis:
    """An asyncio client (workers, the standalone policy server)."""
    if settings.sentinels:
        addresses, options = _sentinel_kwargs(settings)
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            addresses, socket_timeout=settings.timeout,
            sentinel_kwargs={"socket_timeout": settings.timeout})
        master: redis.asyncio.Redis = sentinel.master_for(settings.sentinel_service, **options)
        return master
    return redis.asyncio.Redis.from_url(settings.url, socket_timeout=settings.timeout,
                                        socket_connect_timeout=settings.timeout,
                                        **_url_tls(settings))


def _url_tls(settings: config.RedisSettings) -> dict[str, Any]:
    # from_url picks the TLS connection class from the scheme itself.
    return {k: v for k, v in _tls_options(settings).items() if k != "ssl"}


# --- outage bookkeeping ------------------------------------------------------------------------


PROBE_EVERY = 1.0  # seconds between the recovery probes of an open breaker


class Health:
    """Whether Redis answers; one log line when an outage starts, one when it ends.

    With ``probe`` (a PING with the normal timeout) it is a circuit breaker too: after a
    failure ``call`` fails at once with ``CacheUnavailable`` (counted as short-circuited)
    and a single background thread runs ``probe`` every ``probe_every`` seconds until it
    answers, which closes the breaker. So an outage costs a process one ``redis.timeout``,
    not one per command. Without ``probe`` (the worker, which paces its own retries) every
    command is tried, and the first that succeeds ends the outage.
    """

    def __init__(self, where: str, clock: Callable[[], float] = time.monotonic, *,
                 probe: Callable[[], object] | None = None,
                 probe_every: float = PROBE_EVERY) -> None:
        self.where = where
        self._clock = clock
        self._probe = probe
        self._probe_every = probe_every
        self._down_since: float | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._prober: threading.Thread | None = None
        metrics.REDIS_UP.set(1)
        if probe is not None:
            metrics.REDIS_BREAKER_OPEN.set(0)

    @property
    def up(self) -> bool:
        return self._down_since is None

    @property
    def open(self) -> bool:
        """Whether the breaker is open: commands fail at once until the probe succeeds."""
        return self._probe is not None and self._down_since is not None

    @property
    def probing(self) -> bool:
        """Whether the recovery probe runs now."""
        return self._prober is not None

    def ok(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            metrics.REDIS_UP.set(1)
            if self._probe is not None:
                metrics.REDIS_BREAKER_OPEN.set(0)
            log.warning("redis at %s is back after %.1f s", self.where, self._clock() - since)

    def failed(self, exc: BaseException) -> CacheUnavailable:
        metrics.REDIS_ERRORS.inc()
        with self._lock:
            starting = self._down_since is None
            if starting:
                self._down_since = self._clock()
        if starting:
            metrics.REDIS_UP.set(0)
            metrics.REDIS_OUTAGES.inc()
            log.warning("redis at %s unavailable: %s; failing safe until it is back",
                        self.where, exc)
            if self._probe is not None:
                metrics.REDIS_BREAKER_OPEN.set(1)
                self._start_prober()
        return CacheUnavailable(f"redis at {self.where} unavailable: {exc}")

    def call(self, operation: Callable[[], T]) -> T:
        self._short_circuit()
        try:
            result = operation()
        except redis.RedisError as exc:
            raise self.failed(exc) from None
        self.ok()
        return result

    async def call_async(self, operation: Callable[[], Awaitable[T]]) -> T:
        """``call`` for an asyncio client's command."""
        self._short_circuit()
        try:
            result = await operation()
        except redis.RedisError as exc:
            raise self.failed(exc) from None
        self.ok()
        return result

    def _short_circuit(self) -> None:
        if self.open:
            metrics.REDIS_SHORT_CIRCUITED.inc()
            raise CacheUnavailable(f"redis at {self.where} unavailable for "
                                   f"{self.down_for():.1f} s; not tried until it answers")

    def down_for(self) -> float:
        """Seconds since the outage began; 0 while Redis is up."""
        since = self._down_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def stop(self) -> None:
        """End the recovery probe, if one runs (at shutdown); idempotent."""
        self._stopped.set()
        prober = self._prober
        if prober is not None and prober is not threading.current_thread():
            prober.join(timeout=self._probe_every + 1)

    def _start_prober(self) -> None:
        with self._lock:
            if self._stopped.is_set() or self._prober is not None:
                return  # one probe per connection: the running one sees this outage too
            self._prober = threading.Thread(target=self._recover, name="tlsmilter-redis-probe",
                                            daemon=True)
            self._prober.start()

    def _recover(self) -> None:
        """Probe until Redis answers, then close the breaker."""
        assert self._probe is not None
        surprised = False
        while not self._stopped.wait(self._probe_every):
            try:
                self._probe()
            except (redis.RedisError, OSError) as exc:
                log.debug("redis at %s still unavailable: %s", self.where, exc)
                continue
            except Exception:  # a bug: logged once, and the breaker must not stay open for good
                if not surprised:
                    log.exception("the probe of redis at %s failed; trying on", self.where)
                surprised = True
                continue
            self.ok()
            with self._lock:
                if self._down_since is None:  # else a failure came meanwhile: go on probing
                    self._prober = None
                    return
        with self._lock:
            self._prober = None
