"""A private Redis server for the lab.

``LabRedis`` runs ``redis-server`` in the foreground as a child of the test process, bound to
one loopback address, with persistence off and its log in the work directory. It can be
stopped and restarted on the same port, so tests can cut the milter off from Redis and give
it back. Named ``redis_server`` so that it does not shadow the ``redis`` client package.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.lab.service import LabError, Service

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

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.log_file = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis-py URL of database 0."""
        return f"redis://{self.host}:{self.port}/0"

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
            "--bind", self.host,
            "--port", str(self.port),
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

    def _wait_ping(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                status = self._proc.returncode
                raise LabError(f"redis-server exited with status {status}:\n{self._diagnostics()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    reply = conn.recv(64)
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

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a bound); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop and start again on the same port; the data is gone (no persistence)."""
        self.stop()
        self.start()

