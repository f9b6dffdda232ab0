"""The circuit breaker of a Redis connection (``Health`` with a probe), on a fake clock.

No Redis here: the operations and the probe are plain functions that fail or answer as the
test says. tests/store/redis/test_hang.py runs the breaker against a redis-server that hangs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
import redis

from tests.fakes import T0, Clock
from tlsmilter import metrics
from tlsmilter.errors import CacheUnavailable
from tlsmilter.store.redis.connection import Health

TEST_TIMEOUT = 10.0


def sample(name: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


class Probe:
    """A recovery probe that fails until ``answering`` is set; counts its calls."""

    def __init__(self) -> None:
        self.answering = threading.Event()
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        if not self.answering.is_set():
            raise redis.TimeoutError("Timeout reading from socket")
        return True


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TEST_TIMEOUT
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def timed_out() -> object:
    raise redis.TimeoutError("Timeout reading from socket")


@pytest.fixture
def breaker() -> tuple[Health, Probe, Clock]:
    probe, clock = Probe(), Clock()
    return Health("redis://db.test", clock, probe=probe, probe_every=0.01), probe, clock


def test_after_a_timeout_commands_fail_at_once_without_reaching_redis(
        breaker: tuple[Health, Probe, Clock]) -> None:
    health, _probe, clock = breaker
    short_circuited = sample("tlsmilter_redis_short_circuited_total")
    errors = sample("tlsmilter_redis_errors_total")
    assert health.call(lambda: "answer") == "answer" and not health.open
    with pytest.raises(CacheUnavailable, match="Timeout reading"):
        health.call(timed_out)
    assert health.open and not health.up
    assert sample("tlsmilter_redis_breaker_open") == 1
    tried: list[int] = []
    clock.now = T0 + 2.5
    for _ in range(40):  # forty recipients: none waits on Redis again
        with pytest.raises(CacheUnavailable, match=r"unavailable for 2\.5 s; not tried"):
            health.call(lambda: tried.append(1))
    assert tried == []
    assert sample("tlsmilter_redis_short_circuited_total") - short_circuited == 40
    assert sample("tlsmilter_redis_errors_total") - errors == 1  # the one real timeout
    health.stop()


def test_one_probe_closes_the_breaker_and_one_line_each_marks_start_and_end(
        breaker: tuple[Health, Probe, Clock], caplog: pytest.LogCaptureFixture) -> None:
    health, probe, clock = breaker
    caplog.set_level(logging.DEBUG, logger="tlsmilter.store.redis.connection")
    outages = sample("tlsmilter_redis_outages_total")
    for _ in range(5):  # failures from several threads at once: one outage
        health.failed(redis.ConnectionError("Connection refused"))
    eventually(lambda: probe.calls >= 3, "the probe never ran")
    assert health.open and health.probing  # one probe: a second would find it running
    clock.now = T0 + 30
    probe.answering.set()
    eventually(lambda: not health.open, "the breaker never closed")
    assert health.up and health.call(lambda: "answer") == "answer"
    assert sample("tlsmilter_redis_breaker_open") == 0
    assert sample("tlsmilter_redis_outages_total") - outages == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "redis at redis://db.test unavailable: Connection refused; failing safe until it is back",
        "redis at redis://db.test is back after 30.0 s"]
    assert not any(r.exc_info for r in caplog.records), "an outage is no bug: no traceback"
    eventually(lambda: not health.probing, "the probe outlived the outage")


def test_a_new_outage_gets_a_new_probe(breaker: tuple[Health, Probe, Clock]) -> None:
    health, probe, _clock = breaker
    probe.answering.set()
    health.failed(redis.TimeoutError("first"))
    eventually(lambda: health.up, "the first outage never ended")
    probe.answering.clear()
    calls = probe.calls
    health.failed(redis.TimeoutError("second"))
    assert health.open
    eventually(lambda: probe.calls > calls, "no probe for the second outage")
    probe.answering.set()
    eventually(lambda: health.up, "the second outage never ended")
    health.stop()


def test_stop_ends_the_probe_and_no_outage_starts_one_afterwards(
        breaker: tuple[Health, Probe, Clock]) -> None:
    health, probe, _clock = breaker
    health.failed(redis.TimeoutError("hung"))
    eventually(lambda: probe.calls >= 1, "the probe never ran")
    health.stop()
    assert not health.probing
    health.failed(redis.TimeoutError("still hung"))
    assert not health.probing
    assert health.open  # still failing at once: shutting down, nothing to wait for


def test_without_a_probe_every_command_is_tried_and_a_success_ends_the_outage(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    health = Health("redis://db.test", clock)  # the worker's: it paces its own retries
    caplog.set_level(logging.WARNING, logger="tlsmilter.store.redis.connection")
    with pytest.raises(CacheUnavailable):
        health.call(timed_out)
    assert not health.up and not health.open
    clock.now = T0 + 4
    assert health.call(lambda: "answer") == "answer"
    assert health.up
    assert [r.getMessage() for r in caplog.records][-1] == (
        "redis at redis://db.test is back after 4.0 s")
    assert not health.probing


def test_a_probe_that_breaks_unexpectedly_is_logged_once_and_tried_on(
        caplog: pytest.LogCaptureFixture) -> None:
    bugs_left = [5]

    def buggy() -> bool:
        if bugs_left[0]:
            bugs_left[0] -= 1
            raise KeyError("a bug")
        return True

    health = Health("redis://db.test", Clock(), probe=buggy, probe_every=0.01)
    health.failed(redis.TimeoutError("hung"))
    eventually(lambda: health.up, "a bug in the probe left the breaker open")
    assert bugs_left == [0]
    assert sum(r.exc_info is not None for r in caplog.records) == 1
