"""A flood of hanging domains cannot delay a sensitive verdict (issue 12), through ``serve``.

One ordinary message names 5000 new domains whose DNS hangs: a resolver in front of the lab's
Unbound forwards every query but those for ``flood*`` names, which it never answers. Then a
sensitive message to a healthy domain nobody has assessed yet must get its final verdict
within its ``eom_wait`` plus 1 s: with the default warm-up budgets, and with the budgets
lifted so that only the probe priorities and the reserved slots protect it; on both backends
(embedded, and Redis with a real redis-server and a ``tlsmilter worker`` process). Meanwhile
the daemons' logs gain at most a handful of lines.
"""

from __future__ import annotations

import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from tests.lab import daemons
from tests.lab.lab import Lab
from tests.lab.milterproto import ACCEPT, Mail, one_mail
from tests.lab.redis_server import LabRedis

pytestmark = pytest.mark.lab

EOM_WAIT = 8.0
FLOOD = 5000
HANDFUL = 5  # lines a daemon's log may gain from the flood and the sensitive message


class HangingResolver:
    """Forwards DNS queries (UDP and TCP) to ``upstream``; those for ``flood*`` names hang."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.hung = 0
        forward = self._forward

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                answer = forward(data, tcp=False)
                if answer is not None:
                    sock.sendto(answer, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                (length,) = struct.unpack("!H", self.rfile.read(2))
                answer = forward(self.rfile.read(length), tcp=True)
                if answer is not None:
                    self.wfile.write(struct.pack("!H", len(answer)) + answer)

        socketserver.ThreadingUDPServer.daemon_threads = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
        port = self.udp.server_address[1]
        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", port), Tcp)
        self.address = f"127.0.0.1:{port}"

    def _forward(self, data: bytes, *, tcp: bool) -> bytes | None:
        query = dns.message.from_wire(data)
        if query.question and str(query.question[0].name).startswith("flood"):
            self.hung += 1
            return None  # hangs: the prober waits for its DNS timeout
        host, port = self.upstream
        send = dns.query.tcp if tcp else dns.query.udp
        return send(query, host, port=port, timeout=5.0).to_wire()  # type: ignore[no-any-return]

    def __enter__(self) -> HangingResolver:
        for server in (self.udp, self.tcp):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        for server in (self.udp, self.tcp):
            server.shutdown()
            server.server_close()


@pytest.fixture
def resolver(lab: Lab) -> Iterator[HangingResolver]:
    with HangingResolver(lab.resolver) as running:
        yield running


def start_daemons(lab: Lab, workdir: Path, resolver: HangingResolver,
                  tables: dict[str, dict[str, Any]],
                  redis: LabRedis | None) -> list[daemons.Daemon]:
    """``serve``, and with ``redis`` a worker, on a Redis prefix of their own (empty)."""
    # A worker lets its running probes finish when stopped: with Redis, hanging probes end
    # in time for a clean stop (the test is over long before).
    budget = 10.0 if redis else 60.0
    config = daemons.write_config(
        workdir / "tlsmilter.toml", lab, workdir, redis_url=redis.url if redis else None,
        overrides={"milter": {"eom_wait": EOM_WAIT}, "log": {"level": "info"},
                   "prober": {"resolver": resolver.address, **tables.get("prober", {})},
                   "worker": tables.get("worker", {}),
                   "prober.timeouts": {"dns": budget, "domain": budget},
                   **({"redis": {"url": redis.url, "prefix": f"{workdir.name}:"}}
                      if redis else {})})
    started = [daemons.serve(config, workdir / "serve.log")]
    if redis:
        started.append(daemons.worker(config, workdir / "worker.log"))
    try:
        for daemon in started:
            daemon.start()
    except BaseException:
        daemons.stop_all(started)
        raise
    return started


def lines(daemon: daemons.Daemon) -> int:
    return len(daemon.text().splitlines())


@pytest.mark.parametrize("backend", ["embedded", "redis"])
@pytest.mark.parametrize("tables", [
    {},  # the default budgets: one message starts at most 100 warm-up probes
    # Priorities alone, and on Redis a probe queue of 100 that overflows.
    {"prober": {"warmup_per_message": 100_000, "warmup_per_client": 100_000},
     "worker": {"queue_max": 100}},
], ids=["budgets", "priorities"])
def test_a_sensitive_verdict_is_not_delayed_by_5000_hanging_domains(
        lab: Lab, tmp_path: Path, resolver: HangingResolver, tables: dict[str, dict[str, Any]],
        backend: str, request: pytest.FixtureRequest) -> None:
    redis = request.getfixturevalue("redis_server") if backend == "redis" else None
    running = start_daemons(lab, tmp_path, resolver, tables, redis)
    try:
        before = [lines(daemon) for daemon in running]
        sock = str(tmp_path / "milter.sock")
        flood = Mail([f"u@flood{i}.example" for i in range(FLOOD)], [("Subject", "Hi")])
        started = time.monotonic()
        assert one_mail(sock, flood).code == ACCEPT  # ordinary: not delayed
        print(f"{backend}: the flood message accepted in {time.monotonic() - started:.2f} s")
        deadline = time.monotonic() + 10
        while resolver.hung < 15:  # the 15 warm-up slots (20 less 5 reserved) all hang
            assert time.monotonic() < deadline, resolver.hung
            time.sleep(0.05)

        started = time.monotonic()
        healthy = Mail([f"u@{lab.domain('dane-full')}"],
                       [("Subject", "Patient file"), ("X-Sensitivity", "private")])
        answer = one_mail(sock, healthy)
        seconds = time.monotonic() - started
        # Assessed (dane) and accepted, routed to the transport the policy requires.
        assert answer.code == ACCEPT and ("X-TLSMilter-Route", "verified") in answer.added, answer
        assert "dane-full.test=dane" in dict(answer.added)["X-TLSMilter-Assessment"]
        assert seconds < EOM_WAIT + 1, seconds
        print(f"{backend}: sensitive verdict after the flood in {seconds:.2f} s")

        gained = [lines(daemon) - count for daemon, count in zip(running, before, strict=True)]
        print(f"{backend}: log lines gained: {gained}; 'queue full' lines: "
              f"{[daemon.text().count('probe queue full') for daemon in running]}")
        for daemon, more in zip(running, gained, strict=True):
            log = daemon.text()
            assert "Traceback" not in log
            # At most one line says the queue was full (one per overload episode), not one
            # per request; in all, a handful of lines.
            assert log.count("probe queue full") <= 1
            assert more <= HANDFUL, log[-3000:]
    finally:
        daemons.stop_all(running)
