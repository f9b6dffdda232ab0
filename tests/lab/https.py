"""HTTPS servers that publish MTA-STS policies.

``HttpsServer`` is one ``mta-sts.<domain>`` host: it serves ``/.well-known/mta-sts.txt`` over
TLS 1.2+ with a certificate from ``pki.LabCA``, and can misbehave in the ways a policy fetcher
must cope with (redirects, a wrong media type, an oversized body; RFC 8461 section 3.3).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, cast

from tests.lab.model import Cert
from tests.lab.pki import LabCA
from tests.lab.service import Service

log = logging.getLogger(__name__)

POLICY_PATH = "/.well-known/mta-sts.txt"
REQUEST_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0


@dataclass(frozen=True)
class PolicyResponse:
    """What the server answers to a policy request."""

    body: str = ""
    content_type: str = "text/plain"
    redirect: str | None = None  # answer "301 Moved Permanently" to this URL instead
    pad_to: int = 0  # append ignorable "x-lab-padding" lines until the body has this many bytes

    def encoded_body(self) -> bytes:
        """Return the body as sent, padding included."""
        body = self.body.encode()
        if len(body) >= self.pad_to:
            return body
        if body and not body.endswith(b"\n"):
            body += b"\r\n"
        # RFC 8461 section 3.2: parsers ignore unknown fields, so only a size limit can reject
        # the padded policy.
        line = b"x-lab-padding: " + b"a" * 80 + b"\r\n"
        count = -(-(self.pad_to - len(body)) // len(line))
        return body + line * count


@dataclass(frozen=True)
class Request:
    """One HTTP request the server answered."""

    method: str
    path: str
    host: str | None  # the Host header
    peer: tuple[str, int]
    timestamp: float


class _Handler(BaseHTTPRequestHandler):
    server_version = "lab-https"
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:
        lab = cast(_Server, self.server).lab
        lab._record(
            Request(
                method=self.command,
                path=self.path,
                host=self.headers.get("Host"),
                peer=(self.client_address[0], self.client_address[1]),
                timestamp=time.time(),
            )
        )
        response = lab.response
        if self.path != POLICY_PATH:
            self._reply(404, "text/plain", b"not found\n")
        elif response.redirect is not None:
            self.send_response(301)
            self.send_header("Location", response.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._reply(200, response.content_type, response.encoded_body())

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: %s", self.client_address, format % args)


class _Server(HTTPServer):
    """HTTPServer that does the TLS handshake on the connection's own thread (so a stalled
    client cannot block accept) and tracks connections so stop() can cut them."""

    # Newer Pythons turn SO_REUSEPORT on for HTTPServer; it would let two lab servers share an
    # address and port silently instead of failing.
    allow_reuse_port = False

    def __init__(self, lab: HttpsServer, family: socket.AddressFamily) -> None:
        self.lab = lab
        self.address_family = family
        super().__init__((lab.address, lab.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the address up in DNS (getfqdn).
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.lab.host
        self.server_port = self.socket.getsockname()[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve,
            args=(request, client_address),
            name=f"{self.lab} {client_address}",
            daemon=True,
        )
        self.lab._track(thread, request)
        thread.start()

    def _serve(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        sock: socket.socket = request
        try:
            request.settimeout(REQUEST_TIMEOUT)
            tls = self.lab._wrap(threading.current_thread(), request)
            sock = tls
            tls.do_handshake()
            self.finish_request(tls, client_address)
        except (OSError, ValueError) as e:
            log.debug("%s: connection from %s failed: %s", self.lab, client_address, e)
        finally:
            # Untracked first: stop() must never shut down a descriptor number already reused.
            self.lab._untrack(threading.current_thread())
            sock.close()


class HttpsServer(Service):
    """An MTA-STS policy host on ``(address, port)`` presenting a ``cert`` certificate.

    ``response`` may be replaced at any time. With ``port=0`` the kernel picks one.
    """

    def __init__(
        self,
        host: str,
        address: str,
        ca: LabCA,
        response: PolicyResponse | None = None,
        cert: Cert = Cert.CA,
        port: int = 443,
    ) -> None:
        """Prepare a server for ``host`` (its certificate name); ``start`` binds."""
        self.host = host
        self.address = address
        self.port = port
        issued = ca.issue(host, cert)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2 minimum by default
        self._ctx.load_cert_chain(issued.cert_file, issued.key_file)
        self._lock = threading.Lock()
        self._response = response or PolicyResponse()
        self._requests: list[Request] = []
        self._open: dict[threading.Thread, socket.socket] = {}
        self._server: _Server | None = None
        self._loop: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"HttpsServer({self.host!r}, [{self.address}]:{self.port})"

    @property
    def response(self) -> PolicyResponse:
        """What policy requests get."""
        with self._lock:
            return self._response

    @response.setter
    def response(self, response: PolicyResponse) -> None:
        with self._lock:
            self._response = response

    @property
    def requests(self) -> list[Request]:
        """A snapshot of the requests answered so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """How many HTTP requests arrived, whatever the path."""
        with self._lock:
            return len(self._requests)

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def _track(self, thread: threading.Thread, sock: socket.socket) -> None:
        with self._lock:
            self._open[thread] = sock

    def _wrap(self, thread: threading.Thread, sock: socket.socket) -> ssl.SSLSocket:
        # Under the lock, so that stop() never sees the detached plain socket.
        with self._lock:
            tls = self._ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self._open[thread] = tls
            return tls

    def _untrack(self, thread: threading.Thread) -> None:
        with self._lock:
            self._open.pop(thread, None)

    def start(self) -> None:
        """Bind and listen; returns once connections are accepted."""
        family = socket.getaddrinfo(
            self.address, self.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )[0][0]
        self._server = _Server(self, family)
        self.port = self._server.server_port
        self._loop = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"{self}", daemon=True
        )
        self._loop.start()

    def stop(self) -> None:
        """Stop listening, cut every open connection and wait (boundedly) for the threads."""
        if self._server is None or self._loop is None:
            return
        self._server.shutdown()
        self._loop.join(STOP_TIMEOUT)
        self._server.server_close()
        self._server = self._loop = None
        with self._lock:
            open_connections = dict(self._open)
            for sock in open_connections.values():
                # The plain socket method: SSLSocket.shutdown would drop the TLS object the
                # handler thread may be using. Shutting down the descriptor wakes its recv().
                with contextlib.suppress(OSError, ValueError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in open_connections:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s: %s did not stop", self, thread.name)

