"""A redis-server that hangs (SIGSTOP): lookups never queue up behind it, the breaker opens once
and closes once after SIGCONT. The milter's lookups (``prefetch``) and the policy server's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes import assessment
from tests.fakes import redis_settings as settings_for
from tests.lab.redis_server import LabRedis
from tlsmilter import metrics
from tlsmilter.daemons.netstring import NetstringDecoder, encode_netstring
from tlsmilter.daemons.policy_server import policy_lookup
from tlsmilter.daemons.socketmap import PolicyServer
from tlsmilter.errors import CacheUnavailable
from tlsmilter.store.base import State
from tlsmilter.store.shared import LOOKUP_THREADS, SharedAssessments

pytestmark = pytest.mark.lab

TIMEOUT = 0.5  # redis.timeout of these tests
DOMAINS = [f"d{n}.hang.test" for n in range(40)]
CONNECTION_LOG = "tlsmilter.store.redis.connection"


def sample(name: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def hung(redis_workdir: Path) -> Iterator[tuple[LabRedis, SharedAssessments]]:
    """A Redis of the test's own with one assessment in it, and a started shared backend."""
    server = LabRedis(redis_workdir / "hang")
    server.start()
    engine = SharedAssessments(settings_for(server.url, timeout=TIMEOUT))
    try:
        engine.redis.put(assessment("known.test", "dane"))
        engine.start()
        yield server, engine
    finally:
        engine.stop()
        engine.redis.client.close()
        server.stop()  # resumes it first if a test left it hung


def test_rcpt_lookups_never_wait_and_an_outage_costs_one_timeout(
        hung: tuple[LabRedis, SharedAssessments], caplog: pytest.LogCaptureFixture) -> None:
    server, engine = hung
    caplog.set_level(logging.DEBUG, logger="tlsmilter")
    assert engine.prefetch("known.test").result(timeout=5)[1] is not None
    errors = sample("tlsmilter_redis_errors_total")
    short_circuited = sample("tlsmilter_redis_short_circuited_total")
    with server.paused():
        started = time.monotonic()
        lookups = [engine.prefetch(domain) for domain in DOMAINS]
        started_all = time.monotonic() - started
        for lookup in lookups:
            with pytest.raises(CacheUnavailable):
                lookup.result(timeout=10)
        all_failed = time.monotonic() - started
        # Forty RCPTs started forty lookups without waiting for Redis once, and all forty
        # failed after one timeout (the first few ran at once), not after forty.
        assert started_all < TIMEOUT, started_all
        assert all_failed < 4 * TIMEOUT, all_failed
        assert engine.redis.health.open
        assert sample("tlsmilter_redis_errors_total") - errors <= LOOKUP_THREADS
        assert sample("tlsmilter_redis_short_circuited_total") - short_circuited >= (
            len(DOMAINS) - LOOKUP_THREADS)
        assert sample("tlsmilter_redis_breaker_open") == 1
        # Open: a lookup fails at once, on the caller's own thread.
        at_once = engine.prefetch("known.test")
        assert at_once.done() and isinstance(at_once.exception(), CacheUnavailable)
        time.sleep(3 * TIMEOUT)  # the probe keeps trying, and keeps still
    eventually(lambda: engine.redis.health.up, 10, "the breaker never closed after SIGCONT")
    assert sample("tlsmilter_redis_breaker_open") == 0
    state, entry = engine.prefetch("known.test").result(timeout=5)
    assert state is State.HIT and entry is not None and entry.level == "dane"
    lines = [r for r in caplog.records if r.name == CONNECTION_LOG and r.levelno >= logging.WARNING]
    assert [("unavailable" in r.getMessage(), "is back after" in r.getMessage())
            for r in lines] == [(True, False), (False, True)]
    assert not any(r.exc_info for r in caplog.records), "an outage is no bug: no traceback"


async def ask_many(path: Path, domains: list[str]) -> list[tuple[bytes, float]]:
    """Ask the policy server for each domain over one connection, as Postfix does; each
    answer with the seconds it took."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    decoder = NetstringDecoder()
    answers = []
    try:
        for domain in domains:
            started = time.monotonic()
            writer.write(encode_netstring(f"tlspolicy {domain}".encode()))
            await writer.drain()
            while (frame := decoder.next_frame()) is None:
                data = await reader.read(4096)
                assert data, "the policy server closed the connection"
                decoder.feed(data)
            answers.append((frame, time.monotonic() - started))
    finally:
        writer.close()
        await writer.wait_closed()
    return answers


def test_the_policy_server_answers_temp_at_once_while_redis_hangs(
        hung: tuple[LabRedis, SharedAssessments], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    server, engine = hung
    caplog.set_level(logging.DEBUG, logger="tlsmilter")
    sock = tmp_path / "policy.sock"

    async def scenario() -> tuple[list[tuple[bytes, float]], list[tuple[bytes, float]]]:
        policy = PolicyServer(policy_lookup(engine), str(sock))
        await policy.start()
        try:
            with server.paused():
                during = await ask_many(sock, ["known.test", *DOMAINS[:20]])
            await asyncio.to_thread(eventually, lambda: engine.redis.health.up, 10,
                                    "the breaker never closed after SIGCONT")
            after = await ask_many(sock, ["known.test"])
        finally:
            await policy.stop()
        return during, after

    during, after = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [answer for answer, _seconds in during] == [b"TEMP cache unavailable"] * 21
    first, rest = during[0][1], [seconds for _answer, seconds in during[1:]]
    assert first < 3 * TIMEOUT, first  # the one timeout of this outage
    assert sum(rest) < TIMEOUT, rest  # twenty lookups, none waiting on Redis
    assert after[0][0] == b"OK dane-only"
    assert not any(r.exc_info for r in caplog.records), "an outage is no bug: no traceback"
