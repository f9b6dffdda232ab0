"""A private Redis server for the lab.

``LabRedis`` runs ``redis-server`` in the foreground as a child of the test process, bound to
one loopback address, with persistence off and its log in the work directory. It can be
stopped and restarted on the same port, so tests can cut the milter off from Redis and give
it back, or hung (SIGSTOP) and resumed, as a Redis that stops answering. Named
``redis_server`` so that it does not shadow the ``redis`` client package.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.lab.service import LabError, Service, stop_process

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port(host: str) -> int:
    """Return a TCP port nothing listens on at ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class LabRedis(Service):
    """A ``redis-server`` on ``host:port`` with its files under ``workdir``.

    ``port`` None picks a free port once, at construction; ``restart()`` keeps it.
    """

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None, *,
                 unix_socket: bool = False, tls: tuple[str, str] | None = None) -> None:
        """``unix_socket`` adds a socket file; ``tls`` (cert file, key file) makes the TCP
        port speak TLS only."""
        self.workdir = workdir
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.log_file = workdir / "redis.log"
        self.socket_path = workdir / "redis.sock" if unix_socket else None
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        """The redis-py URL of database 0."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/0"

    def _listen_args(self) -> list[str]:
        args = ["--bind", self.host]
        if self.tls:
            cert, key = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                     "--tls-key-file", key, "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.socket_path:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return args

    @property
    def pid(self) -> int:
        """The PID of the running server."""
        if self._proc is None:
            raise LabError("Redis is not running")
        return self._proc.pid

    def start(self) -> None:
        """Start the server; return once it answers PING."""
        if self._proc is not None:
            raise LabError(f"Redis on {self.host}:{self.port} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            "redis-server",
            *self._listen_args(),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--logfile", str(self.log_file),
        ]  # fmt: skip
        # Redis writes command-line errors to stderr before it opens its log file.
        with (self.workdir / "redis.stderr").open("ab") as stderr:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        try:
            self._wait_ping()
        except BaseException:
            self.stop()
            raise

    def _ping(self) -> bytes:
        if self.socket_path is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(1)
                conn.connect(str(self.socket_path))
                conn.sendall(b"PING\r\n")
                return conn.recv(64)
        with socket.create_connection((self.host, self.port), timeout=1) as raw:
            if not self.tls:
                raw.sendall(b"PING\r\n")
                return raw.recv(64)
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # only asking whether it is up
            with context.wrap_socket(raw) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64)

    def _wait_ping(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                status = self._proc.returncode
                raise LabError(f"redis-server exited with status {status}:\n{self._diagnostics()}")
            try:
                reply = self._ping()
                if reply.startswith(b"+PONG"):
                    return
                last_error = f"unexpected reply {reply!r}"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.05)
        raise LabError(
            f"Redis on {self.host}:{self.port} did not answer PING within {START_TIMEOUT:.0f} s "
            f"({last_error}):\n{self._diagnostics()}"
        )

    def _diagnostics(self) -> str:
        parts = []
        for name in ("redis.stderr", "redis.log"):
            try:
                text = (self.workdir / name).read_text(errors="replace")
            except FileNotFoundError:
                continue
            parts.append(f"{name}:\n" + "\n".join(text.splitlines()[-20:]))
        return "\n".join(parts)

    def pause(self) -> None:
        """Hang the server (SIGSTOP): connections are still accepted, nothing is answered."""
        if self._proc is None or self._proc.poll() is not None:
            raise LabError("Redis is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT); idempotent."""
        if self._paused and self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hung for the ``with`` block, and always resumed after it."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a bound); idempotent. A paused
        server is resumed first, or it would not act on the SIGTERM."""
        self.resume()
        proc, self._proc = self._proc, None
        stop_process(proc, STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop and start again on the same port; the data is gone (no persistence)."""
        self.stop()
        self.start()



class LabSentinel(Service):
    """A Redis Sentinel (``redis-server --sentinel``) watching ``master`` as ``service``."""

    def __init__(self, workdir: Path, master: LabRedis, service: str = "labmaster",
                 host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.master = master
        self.service = service
        self.host = host
        self.port = free_port(host)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"  # Sentinel rewrites it: it must be writable
        conf.write_text(
            f"bind {self.host}\nport {self.port}\ndir {self.workdir}\n"
            f"logfile {self.workdir / 'sentinel.log'}\n"
            f"sentinel monitor {self.service} {self.master.host} {self.master.port} 1\n")
        with (self.workdir / "sentinel.stderr").open("ab") as stderr:
            self._proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                          stdin=subprocess.DEVNULL, stdout=stderr,
                                          stderr=stderr)
        deadline = time.monotonic() + START_TIMEOUT
        query = (f"*3\r\n$8\r\nSENTINEL\r\n$23\r\nget-master-addr-by-name\r\n"
                 f"${len(self.service)}\r\n{self.service}\r\n").encode()
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as conn:
                    conn.sendall(query)
                    if str(self.master.port).encode() in conn.recv(256):
                        return
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise LabError(f"Sentinel on {self.address} did not come up")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, STOP_TIMEOUT)
