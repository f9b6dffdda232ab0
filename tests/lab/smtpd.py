"""SMTP servers that behave as a scenario declares.

``SmtpServer`` is one MX host: a small threaded ESMTP server on a loopback address that does
what ``model.Smtp`` says about STARTTLS and presents a certificate from ``pki.LabCA``. It speaks
enough SMTP for Postfix's smtp client and ``smtplib`` (no PIPELINING, so Postfix waits for
every reply), accepts every recipient and records each message it receives.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.lab.model import Smtp, Tls
from tests.lab.pki import LabCA
from tests.lab.service import Service

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024  # far above RFC 5321's 1000; only guards memory against junk
MAX_MESSAGE = 10 * 1024 * 1024
COMMAND_TIMEOUT = 300.0  # RFC 5321 section 4.5.3.2.7
STOP_TIMEOUT = 3.0
# How long ``sessions`` waits for server-side TLS handshakes still unwinding (see there).
HANDSHAKE_SETTLE = 2.0
BREAK_GARBAGE = b"this is not a TLS handshake\r\n" * 8

_MAIL_FROM = re.compile(r"FROM:\s*<([^>]*)>", re.IGNORECASE)
_RCPT_TO = re.compile(r"TO:\s*<([^>]+)>", re.IGNORECASE)


@dataclass(frozen=True)
class Received:
    """One message accepted by an ``SmtpServer``."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # dot-unstuffed, line endings as sent, without the final "."
    tls_version: str | None  # e.g. "TLSv1.3"; None for plaintext
    cipher: str | None
    peer: tuple[str, int]
    helo: str | None
    timestamp: float


@dataclass
class Session:
    """One accepted TCP connection; the handler thread updates it while the session runs."""

    peer: tuple[str, int]
    tls: Tls  # behaviour in force when the connection was accepted
    commands: list[str] = field(default_factory=list)  # verbs in order, upper case
    helo: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    tls_error: str | None = None  # why the server-side handshake failed
    closed: bool = False


class _Disconnect(Exception):
    """The client went away or the server is stopping; end the session quietly."""


def tls_context(tls: Tls, cert_file: str, key_file: str) -> ssl.SSLContext:
    """Return a server context that negotiates the TLS versions ``tls`` allows."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    if tls is Tls.TLS12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif tls is Tls.TLS10:
        # Python deprecates TLS 1.0, and the test suite turns warnings into errors.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1
        # OpenSSL 3 refuses TLS 1.0's SHA-1 signatures above security level 0.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


class _LineReader:
    """Reads CRLF lines from a socket that may be swapped for its TLS wrapper."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def readline(self) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line, self._buf = self._buf[: end + 1], self._buf[end + 1 :]
                return line
            if len(self._buf) > MAX_LINE:
                raise _Disconnect("line too long")
            try:
                chunk = self.sock.recv(65536)
            except (OSError, ValueError) as e:  # ValueError: socket closed under us
                raise _Disconnect(str(e)) from e
            if not chunk:
                raise _Disconnect("client closed the connection")
            self._buf += chunk

    def discard_buffer(self) -> None:
        # Plaintext sent after STARTTLS must not be read as if it came over TLS (CVE-2011-0411).
        self._buf = b""


class _SmtpSession:
    """One client connection, run on its own thread."""

    def __init__(
        self,
        server: SmtpServer,
        sock: socket.socket,
        session: Session,
        behaviour: Smtp,
        ctx: ssl.SSLContext | None,
    ) -> None:
        self.server = server
        self.session = session
        self.behaviour = behaviour
        self.ctx = ctx
        self.reader = _LineReader(sock)
        self.tls: ssl.SSLSocket | None = None
        self._reset_transaction()

    @property
    def sock(self) -> socket.socket:
        return self.reader.sock

    def _reset_transaction(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []

    def send(self, reply: str) -> None:
        try:
            self.sock.sendall(reply.encode() + b"\r\n")
        except (OSError, ValueError) as e:
            raise _Disconnect(str(e)) from e

    def run(self) -> None:
        if self.behaviour.tls is Tls.HANG:
            self._hang()
            return
        self.send(f"220 {self.server.host} ESMTP lab")
        handlers: dict[str, Callable[[str], bool]] = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "STARTTLS": self._starttls,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "QUIT": self._quit,
        }
        while True:
            line = self.reader.readline().rstrip(b"\r\n").decode("utf-8", "replace")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            self.session.commands.append(verb)
            handler = handlers.get(verb)
            if handler is None:
                self.send("502 5.5.2 Error: command not recognized")
            elif not handler(arg.strip()):
                return

    def _hang(self) -> None:
        # Read and drop whatever arrives, so only the client's close or stop() ends this.
        while True:
            self.reader.readline()

    def _ehlo(self, arg: str) -> bool:
        if not arg:
            self.send("501 5.5.4 Syntax: EHLO hostname")
            return True
        self.session.helo = arg
        self._reset_transaction()
        lines = [self.server.host, f"SIZE {MAX_MESSAGE}", "8BITMIME"]
        if self.behaviour.tls is not Tls.NONE and self.tls is None:
            lines.append("STARTTLS")
        # One write for the whole reply: line-by-line writes stall ~40 ms each on Nagle
        # and the client's delayed ACK, which would dominate any timing through the lab.
        self.send("\r\n".join([*(f"250-{line}" for line in lines[:-1]), f"250 {lines[-1]}"]))
        return True

    def _helo(self, arg: str) -> bool:
        if not arg:
            self.send("501 5.5.4 Syntax: HELO hostname")
            return True
        self.session.helo = arg
        self._reset_transaction()
        self.send(f"250 {self.server.host}")
        return True

    def _starttls(self, arg: str) -> bool:
        if self.behaviour.tls is Tls.NONE:
            self.send("502 5.5.1 Error: command not implemented")
            return True
        if self.tls is not None:
            self.send("503 5.5.1 Error: TLS already active")
            return True
        if arg:
            self.send("501 5.5.4 Syntax: STARTTLS")
            return True
        self.send("220 2.0.0 go ahead")
        if self.behaviour.tls is Tls.BREAK:
            self._send_garbage()
            return False
        assert self.ctx is not None  # every behaviour that gets here has a context
        self.reader.discard_buffer()
        # Swap in the wrapper before the handshake, so that stop() can cut a stalled one, and
        # under the lock, so that stop() never sees the detached plain socket.
        with self.server._lock:
            tls = self.ctx.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            self.reader.sock = tls
        self.server._handshake_started()
        try:
            try:
                tls.do_handshake()
            except (OSError, ValueError) as e:
                self.session.tls_error = str(e)
                log.debug("%s: TLS handshake with %s failed: %s", self.server, self.session.peer,
                          e)
                return False
            self.tls = tls
            self.session.tls_version = tls.version()
            cipher = tls.cipher()
            self.session.cipher = cipher[0] if cipher else None
        finally:
            self.server._handshake_ended()
        # RFC 3207 section 4.2: forget everything learnt before TLS, the client must EHLO again.
        self.session.helo = None
        self._reset_transaction()
        return True

    def _send_garbage(self) -> None:
        # Wait for the ClientHello, answer with junk, then half-close and drain: closing with
        # unread input would send a RST that can overtake the junk, and the client would see a
        # reset instead of a failed handshake.
        sock = self.sock
        with contextlib.suppress(OSError):
            sock.settimeout(5.0)
            sock.recv(65536)
            sock.sendall(BREAK_GARBAGE)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass

    def _mail(self, arg: str) -> bool:
        if self.session.helo is None:
            self.send("503 5.5.1 Error: send HELO/EHLO first")
        elif self.mail_from is not None:
            self.send("503 5.5.1 Error: nested MAIL command")
        elif (m := _MAIL_FROM.match(arg)) is None:
            self.send("501 5.5.4 Syntax: MAIL FROM:<address>")
        else:
            self.mail_from = m.group(1)
            self.send("250 2.1.0 Ok")
        return True

    def _rcpt(self, arg: str) -> bool:
        if self.mail_from is None:
            self.send("503 5.5.1 Error: need MAIL command")
        elif (m := _RCPT_TO.match(arg)) is None:
            self.send("501 5.5.4 Syntax: RCPT TO:<address>")
        else:
            self.rcpt_tos.append(m.group(1))
            self.send("250 2.1.5 Ok")
        return True

    def _data(self, arg: str) -> bool:
        if arg:
            self.send("501 5.5.4 Syntax: DATA")
            return True
        if self.mail_from is None or not self.rcpt_tos:
            self.send("503 5.5.1 Error: need RCPT command")
            return True
        self.send("354 End data with <CR><LF>.<CR><LF>")
        chunks: list[bytes] = []
        size = 0
        while True:
            line = self.reader.readline()
            if line in (b".\r\n", b".\n"):
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            # keep reading an oversized message to its end so the session stays in sync
            if size <= MAX_MESSAGE:
                chunks.append(line)
        if size > MAX_MESSAGE:
            self.send("552 5.3.4 Error: message too big")
        else:
            number = self.server._record(
                Received(
                    mail_from=self.mail_from,
                    rcpt_tos=tuple(self.rcpt_tos),
                    data=b"".join(chunks),
                    tls_version=self.session.tls_version,
                    cipher=self.session.cipher,
                    peer=self.session.peer,
                    helo=self.session.helo,
                    timestamp=time.time(),
                )
            )
            self.send(f"250 2.0.0 Ok: queued as LAB{number}")
        self._reset_transaction()
        return True

    def _rset(self, arg: str) -> bool:
        self._reset_transaction()
        self.send("250 2.0.0 Ok")
        return True

    def _noop(self, arg: str) -> bool:
        self.send("250 2.0.0 Ok")
        return True

    def _quit(self, arg: str) -> bool:
        self.send("221 2.0.0 Bye")
        return False


class SmtpServer(Service):
    """An MX host on ``(address, port)`` that behaves as ``behaviour`` declares.

    ``behaviour`` may be replaced at any time; connections accepted afterwards follow the new
    one, running sessions keep theirs. With ``port=0`` the kernel picks one (see ``port``).
    """

    def __init__(
        self,
        host: str,
        address: str,
        behaviour: Smtp,
        ca: LabCA,
        port: int = 25,
    ) -> None:
        """Prepare a server for ``host`` (its greeting and certificate name); ``start`` binds."""
        self.host = host
        self.address = address
        self.port = port
        self._ca = ca
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._behaviour = behaviour
        self._ctx = self._context_for(behaviour)
        self._messages: list[Received] = []
        self._sessions: list[Session] = []
        self._open: dict[threading.Thread, _SmtpSession] = {}
        self._handshakes = 0  # server-side TLS handshakes in progress
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"SmtpServer({self.host!r}, [{self.address}]:{self.port})"

    def _context_for(self, behaviour: Smtp) -> ssl.SSLContext | None:
        if behaviour.tls in (Tls.NONE, Tls.HANG, Tls.BREAK):
            return None
        issued = self._ca.issue(self.host, behaviour.cert)
        return tls_context(behaviour.tls, str(issued.cert_file), str(issued.key_file))

    @property
    def behaviour(self) -> Smtp:
        """The behaviour new connections get."""
        with self._lock:
            return self._behaviour

    @behaviour.setter
    def behaviour(self, behaviour: Smtp) -> None:
        ctx = self._context_for(behaviour)
        with self._lock:
            self._behaviour, self._ctx = behaviour, ctx

    @property
    def messages(self) -> list[Received]:
        """A snapshot of the messages received so far, oldest first."""
        with self._lock:
            return list(self._messages)

    @property
    def sessions(self) -> list[Session]:
        """A snapshot of all connections accepted so far, oldest first.

        A handshake the client has already given up on (it got the server's alert) may still
        be unwinding in the session's thread: the snapshot waits, up to ``HANDSHAKE_SETTLE``
        seconds, until no handshake is in progress, so that its outcome (``tls_error``, or
        ``tls_version``) is recorded. Without that, a loaded machine let a test read a session
        whose failed handshake was not recorded yet.
        """
        with self._changed:
            self._changed.wait_for(lambda: self._handshakes == 0, HANDSHAKE_SETTLE)
            return list(self._sessions)

    def _handshake_started(self) -> None:
        with self._changed:
            self._handshakes += 1

    def _handshake_ended(self) -> None:
        with self._changed:
            self._handshakes -= 1
            self._changed.notify_all()

    @property
    def connections(self) -> int:
        """How many TCP connections have been accepted, whatever the behaviour."""
        with self._lock:
            return len(self._sessions)

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least ``n`` messages are recorded and return them all.

        Raises ``TimeoutError`` if that takes longer than ``timeout`` seconds.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._messages) >= n, timeout):
                raise TimeoutError(f"{self}: {len(self._messages)} of {n} messages arrived")
            return list(self._messages)

    def wait_for_connections(self, n: int, timeout: float = 10.0) -> list[Session]:
        """Block until at least ``n`` connections were accepted and return their sessions.

        Raises ``TimeoutError`` if that takes longer than ``timeout`` seconds.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._sessions) >= n, timeout):
                raise TimeoutError(f"{self}: {len(self._sessions)} of {n} connections arrived")
            return list(self._sessions)

    def _record(self, message: Received) -> int:
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()
            return len(self._messages)

    def start(self) -> None:
        """Bind and listen; returns once connections are accepted."""
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            self.address, self.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )[0]
        listener = socket.socket(family, kind, proto)
        try:
            # a restarted server must not wait for the previous one's TIME_WAIT connections
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(sockaddr)
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._listener = listener
        # select() on this pair lets stop() wake the acceptor at once
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"{self}", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        while True:
            ready, _, _ = select.select([self._listener, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                sock, peer = self._listener.accept()
            except OSError as e:
                log.debug("%s: accept failed: %s", self, e)
                continue
            # Replies are single writes, but the client's pipelined commands still meet
            # delayed ACKs; real MTAs disable Nagle too.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(sock, (peer[0], peer[1]))

    def _spawn(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        with self._changed:
            behaviour, ctx = self._behaviour, self._ctx
            session = Session(peer=peer, tls=behaviour.tls)
            self._sessions.append(session)
            self._changed.notify_all()
            if behaviour.tls is not Tls.HANG:
                sock.settimeout(COMMAND_TIMEOUT)
            smtp = _SmtpSession(self, sock, session, behaviour, ctx)
            thread = threading.Thread(
                target=self._serve, args=(smtp,), name=f"{self} {peer}", daemon=True
            )
            self._open[thread] = smtp
        thread.start()

    def _serve(self, smtp: _SmtpSession) -> None:
        try:
            smtp.run()
        except _Disconnect as e:
            log.debug("%s: session with %s ended: %s", self, smtp.session.peer, e)
        finally:
            # Untracked first: stop() must never shut down a descriptor number already reused.
            with self._lock:
                self._open.pop(threading.current_thread(), None)
            smtp.sock.close()
            smtp.session.closed = True

    def stop(self) -> None:
        """Stop listening, cut every open connection and wait (boundedly) for the threads."""
        if self._acceptor is None:
            return
        assert self._wake_w is not None and self._wake_r is not None
        assert self._listener is not None
        self._wake_w.send(b"x")
        self._acceptor.join(STOP_TIMEOUT)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._acceptor = self._listener = self._wake_r = self._wake_w = None
        with self._lock:
            open_sessions = dict(self._open)
            for smtp in open_sessions.values():
                # The plain socket method: SSLSocket.shutdown would drop the TLS object the
                # handler thread may be using. Shutting down the descriptor wakes its recv().
                with contextlib.suppress(OSError, ValueError):
                    socket.socket.shutdown(smtp.sock, socket.SHUT_RDWR)
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in open_sessions:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s: %s did not stop", self, thread.name)

