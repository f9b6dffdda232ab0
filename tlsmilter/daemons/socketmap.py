"""Postfix TLS policy server: a socketmap answering ``smtp_tls_policy_maps`` lookups.

Postfix asks, per next-hop domain, which TLS security level to enforce at delivery::

    smtp_tls_policy_maps = socketmap:unix:/run/tlsmilter/policy.sock:tlspolicy

The protocol (socketmap_table(5)): each request is one netstring ``<name> <key>``, each
reply one netstring ``OK <data>``, ``NOTFOUND ``, ``TEMP <reason>``, ``TIMEOUT <reason>`` or
``PERM <reason>``; one connection carries many requests in turn. The answer comes from the
cached assessment of the domain (``core.delivery.policy_for``); the server never waits for a
probe.

Per request the server does no more than it must: the answer comes from the domain's
``DomainPolicy`` (computed once per stored assessment), one timer per connection watches for
idleness, and the metric series are resolved at start.

The maps it answers, and what each answers, are ``core.delivery``'s (``policy_maps``,
``answer``): ``tlspolicy`` (the configured name), ``tlspolicy-strict``, and one per level the
milter routes accepted sensitive mail by (``tlspolicy-encrypted``, ``-verified``, ``-dane``).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import inspect
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from tlsmilter import metrics
from tlsmilter.core.delivery import (
    STRICT_SUFFIX,
    AssessmentJson,
    DomainPolicy,
    PolicyAnswer,
    answer_overridden,
    domain_policy,
    normalize_key,
    policy_maps,
)
from tlsmilter.core.overrides import Override
from tlsmilter.core.policylog import format_answer
from tlsmilter.daemons.netstring import NetstringDecoder, NetstringError, encode_netstring
from tlsmilter.errors import CacheUnavailable, TlsmilterError

log = logging.getLogger(__name__)

MAX_REPLY = 100_000  # Postfix's socketmap client refuses longer replies
IDLE_TIMEOUT = 100.0  # Postfix closes idle connections after 10 s and any after 100 s
READ_SIZE = 4096
STOP_GRACE = 5.0  # seconds stop() lets a handler finish its lookup
CLOSE_GRACE = 1.0  # seconds to flush the last replies of a closing connection
DEFAULT_MODE = 0o666  # access control belongs to the socket's directory, see PolicyServer

Found = DomainPolicy | AssessmentJson | None
Lookup = Callable[[str], Found | Awaitable[Found]]

# The log line of an answer: the same few answers are given over and over.
_answer_line = functools.lru_cache(maxsize=4096)(format_answer)


__all__ = ["STRICT_SUFFIX", "Lookup", "PolicyServer", "PolicyServerError"]


# --- the server -----------------------------------------------------------------------------


class PolicyServerError(TlsmilterError):
    """The socket cannot be set up at ``path``."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"policy server socket {path}: {reason}")


class PolicyServer:
    """Socketmap server on a unix socket, answering from ``lookup(domain)``.

    ``lookup`` gets a normalised domain and returns what is cached of it: its
    ``DomainPolicy`` (what a store keeps), or its assessment (the ``to_json`` dict), or None;
    it may be a coroutine function, and may have an ``aclose`` coroutine that ``stop``
    awaits last. It may start a probe of a missing or stale domain, but must not wait for
    it: Postfix waits. Requests name one of the maps ``core.delivery.policy_maps(map_name)``
    lists.

    The socket gets ``mode`` (default 0666: the map is read-only and holds public DNS
    facts, and Postfix's smtp processes must be able to connect); restrict who may connect
    through the socket's directory (e.g. ``/run/tlsmilter`` mode 0750, group postfix).
    Every reply is counted in ``tlsmilter_policy_lookups_total{answer}``.
    """

    def __init__(
        self,
        lookup: Lookup,
        path: str,
        *,
        map_name: str = "tlspolicy",
        mode: int = DEFAULT_MODE,
        idle_timeout: float = IDLE_TIMEOUT,
        overrides: Callable[[], Mapping[str, Override]] | None = None,
    ) -> None:
        self.lookup = lookup
        # The per-domain overrides in force (config.domain_overrides); read at each lookup,
        # so a reload applies at once.
        self.overrides = overrides
        self.path = path
        self.map_name = map_name
        # The map names Postfix may ask for, and what each asks of an answer.
        self._maps = {name.encode(): what for name, what in policy_maps(map_name).items()}
        self.mode = mode
        self.idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._logged_errors: set[str] = set()
        self._answers = {answer: metrics.POLICY_LOOKUPS.labels(answer=answer.value)
                         for answer in PolicyAnswer}

    async def start(self) -> None:
        """Listen on ``path``, replacing a stale socket left by a dead process."""
        sock = _bind_atomically(Path(self.path), self.mode)
        st = Path(self.path).stat()
        self._inode = (st.st_dev, st.st_ino)
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("policy server listening on %s (maps %s)", self.path,
                 ", ".join(name.decode() for name in self._maps))

    async def stop(self) -> None:
        """Stop listening, close every connection and remove the socket file."""
        if self._server is not None:
            self._server.close()
            # Closing a transport ends its handler's read with EOF; cancelling is for
            # handlers stuck in a lookup, since 3.11's wait_for can swallow a cancellation.
            for writer in self._connections.values():
                writer.close()
            pending = set(self._connections)
            if pending:
                _, pending = await asyncio.wait(pending, timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            await self._server.wait_closed()
            self._server = None
            close = getattr(self.lookup, "aclose", None)  # e.g. the backend's connections
            if close is not None:
                await close()
        self._unlink()

    def _unlink(self) -> None:
        # Only our own socket: a newer server may already have replaced it.
        try:
            st = Path(self.path).stat()
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._inode:
            Path(self.path).unlink(missing_ok=True)
        self._inode = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections[task] = writer
        try:
            await self._converse(reader, writer)
        except asyncio.CancelledError:
            # Only stop() cancels, and only a stuck handler; asyncio's stream machinery
            # would log a cancelled handler task as an error, so end it normally.
            log.debug("policy client connection cancelled at shutdown")
        except OSError as exc:
            log.debug("policy client connection lost: %s", exc)
        finally:
            await _close(writer)
            if task is not None:
                self._connections.pop(task, None)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = NetstringDecoder()
        idle = _IdleTimer(writer.transport, self.idle_timeout)
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    if idle.expired:
                        log.debug("policy client idle for %ss: closing", self.idle_timeout)
                    elif decoder.pending:
                        log.debug("policy client closed the connection mid-request")
                    return
                idle.touch()
                decoder.feed(data)
                replies, ok = await self._answer_frames(decoder)
                writer.write(b"".join(replies))
                await writer.drain()  # a client reading no replies: the timer aborts it
                if not ok:
                    return
        finally:
            idle.cancel()

    async def _answer_frames(self, decoder: NetstringDecoder) -> tuple[list[bytes], bool]:
        """Replies to every complete request; False once the input stopped making sense."""
        replies = []
        try:
            while (payload := decoder.next_frame()) is not None:
                replies.append(encode_netstring(await self._respond(payload)))
        except NetstringError as exc:
            # Framing is lost: nothing later on this connection can be trusted. Postfix
            # reconnects for its next lookup.
            log.warning("policy client sent a malformed request (%s): closing", exc.reason)
            self._count(PolicyAnswer.PERM)
            replies.append(encode_netstring(b"PERM malformed request"))
            return replies, False
        return replies, True

    async def _respond(self, payload: bytes) -> bytes:
        name, space, raw_key = payload.partition(b" ")
        if not space:
            self._count(PolicyAnswer.PERM)
            return b"PERM malformed request"
        policy_map = self._maps.get(name)
        if policy_map is None:
            self._count(PolicyAnswer.PERM)
            shown = name[:64].decode("ascii", "backslashreplace")
            return f"PERM unknown map {shown}".encode()
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            key = ""  # not UTF-8: names no domain we can have assessed
        domain = normalize_key(key)
        if domain is None:
            log.debug("policy %r: NOTFOUND (not an assessable domain)", key)
            self._count(PolicyAnswer.NOTFOUND)
            return b"NOTFOUND "
        try:
            found = self.lookup(domain)
            if inspect.isawaitable(found):
                found = await found
            if not isinstance(found, DomainPolicy):
                found = domain_policy(found) if isinstance(found, Mapping) else None
            counted, reply = answer_overridden(domain, found, policy_map,
                                               self._override(domain))
        except Exception as exc:  # the cache's failure, never Postfix's problem to parse
            self._log_error("lookup", exc)
            self._count(PolicyAnswer.TEMP)
            return b"TEMP cache unavailable"
        if len(reply) > MAX_REPLY:
            log.warning("policy for %s is longer than Postfix accepts", domain)
            self._count(PolicyAnswer.PERM)
            return b"PERM policy too long"
        # One bounded line per answered lookup (core.policylog): tlsmilter proof shows
        # from it which policy a delivery used. Only tlsmilter's transports ask.
        if log.isEnabledFor(logging.INFO):
            log.info("%s", _answer_line(name.decode(), domain, counted,
                                        reply[5:] if counted is PolicyAnswer.TEMP else ""))
        self._count(counted)
        return reply.encode()

    def _override(self, domain: str) -> Override | None:
        """The override of ``domain`` that applies today, if any."""
        override = self.overrides().get(domain) if self.overrides is not None else None
        if override is None or override.expired(datetime.datetime.now(datetime.UTC).date()):
            return None
        return override

    def _count(self, answer: PolicyAnswer) -> None:
        self._answers[answer].inc()

    def _log_error(self, where: str, exc: Exception) -> None:
        """Log the first error of each kind in full, repeats at debug: no log flood."""
        kind = f"{where}:{type(exc).__qualname__}"
        if kind in self._logged_errors:
            log.debug("policy %s failed again: %s", where, exc)
            return
        self._logged_errors.add(kind)
        # The cache being down is expected (Redis logs its outage itself): no traceback.
        log.error("policy %s failed (%s); further %s errors at debug level", where, exc,
                  type(exc).__name__, exc_info=None if isinstance(exc, CacheUnavailable) else exc)


class _IdleTimer:
    """Aborts a connection after ``timeout`` seconds without a request.

    One timer per connection, re-armed only when it fires early: a request costs a clock
    read, where a timeout around each read and each drain cost two timers. A client that
    stops reading its replies is aborted too (its drain never ends, so no request comes).
    """

    def __init__(self, transport: asyncio.WriteTransport, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        self._timeout = timeout
        self.expired = False
        self._last = self._loop.time()
        self._handle = self._loop.call_at(self._last + timeout, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        due = self._last + self._timeout
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self.expired = True
        self._transport.abort()  # the pending read ends with EOF, a pending drain with an error


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close gracefully, or abort when unsent replies would keep the socket open."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_GRACE):
            await writer.wait_closed()
    except (TimeoutError, OSError, asyncio.CancelledError):
        writer.transport.abort()


def _bind_atomically(path: Path, mode: int) -> socket.socket:
    """A listening-ready socket at ``path`` with ``mode``, with no window without a socket.

    Bound under a temporary name, given its mode, then renamed over ``path``: Postfix never
    finds the socket missing or with the wrong mode, and a stale socket is replaced.
    """
    _refuse_live(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        tmp.chmod(mode)
        tmp.replace(path)
    except OSError as exc:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise PolicyServerError(str(path), str(exc)) from exc
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    return sock


def _refuse_live(path: Path) -> None:
    """Raise unless ``path`` is free or a socket nobody listens on (left by a dead process)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PolicyServerError(str(path), "exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            log.info("replacing stale socket %s", path)
            return
        except OSError as exc:
            raise PolicyServerError(str(path), f"cannot tell whether it is in use: {exc}") from exc
    raise PolicyServerError(str(path), "another server is listening on it")
