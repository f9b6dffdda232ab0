"""Connecting to Redis: unix socket, TLS with a private CA, Sentinel; outages; no secret leaks."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import redis

from tests.fakes import assessment
from tests.fakes import redis_settings as settings_for
from tests.lab.model import Cert
from tests.lab.pki import LabCA
from tests.lab.redis_server import LabRedis, LabSentinel
from tlsmilter.errors import CacheUnavailable
from tlsmilter.store.memory import State
from tlsmilter.store.redis.cache import RedisCache
from tlsmilter.store.redis.connection import Health, redact

pytestmark = pytest.mark.lab


def test_unix_socket_url(redis_server: LabRedis) -> None:
    cache = RedisCache(settings_for(f"unix://{redis_server.socket_path}?db=0"))
    try:
        cache.put(assessment("unix.test", "dane"))
        assert cache.get("unix.test")[0] is State.HIT
    finally:
        cache.client.close()


def test_tls_url_with_a_private_ca(redis_workdir: Path) -> None:
    ca = LabCA(redis_workdir / "ca")
    issued = ca.issue("localhost", Cert.CA)
    redis_server = LabRedis(redis_workdir / "tls",
                            tls=(str(issued.cert_file), str(issued.key_file)))
    redis_server.start()
    try:
        url = f"rediss://localhost:{redis_server.port}/0"
        cache = RedisCache(settings_for(url, ca_file=str(ca.ca_file)))
        cache.put(assessment("tls.test", "dane"))
        assert cache.get("tls.test")[0] is State.HIT
        cache.client.close()
        # Without the CA the redis_server's certificate is not trusted: an outage, not a crash.
        untrusted = RedisCache(settings_for(url))
        with pytest.raises(CacheUnavailable, match="certificate verify failed"):
            untrusted.get("tls.test")
        untrusted.client.close()
    finally:
        redis_server.stop()


def test_sentinel_finds_the_master(redis_workdir: Path, redis_server: LabRedis) -> None:
    sentinel = LabSentinel(redis_workdir / "sentinel", redis_server)
    sentinel.start()
    try:
        settings = settings_for("redis:///0", sentinels=[sentinel.address],
                                sentinel_service=sentinel.service)
        cache = RedisCache(settings)
        cache.put(assessment("sentinel.test", "verified"))
        # Written through the Sentinel-found master: the redis_server itself has it.
        assert redis.Redis.from_url(redis_server.url).exists("t:a:sentinel.test")
        assert cache.get("sentinel.test")[0] is State.HIT
        cache.client.close()
    finally:
        sentinel.stop()


def test_outage_fails_cleanly_logs_once_and_recovers(
        redis_workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    redis_server = LabRedis(redis_workdir / "outage")
    redis_server.start()
    cache = RedisCache(settings_for(redis_server.url, timeout=0.5))
    try:
        cache.put(assessment("up.test", "dane"))
        redis_server.stop()
        caplog.set_level(logging.WARNING, logger="tlsmilter.store.redis.cache")
        for _ in range(3):
            with pytest.raises(CacheUnavailable):
                cache.get("up.test")
        with pytest.raises(CacheUnavailable):
            cache.put(assessment("up.test", "dane"))
        assert not cache.health.up
        down = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(down) == 1, "one line per outage, not one per command"
        redis_server.start()  # empty again: Redis keeps nothing on disk here
        # The breaker's probe finds it back (within a second), then commands go through.
        deadline = time.monotonic() + 10
        while not cache.health.up:
            assert time.monotonic() < deadline, "the breaker never closed"
            time.sleep(0.05)
        assert cache.get("up.test") == (State.MISS, None)  # reconnected by itself
        assert sum("is back after" in r.getMessage() for r in caplog.records) == 1
    finally:
        cache.client.close()
        redis_server.stop()


def test_passwords_never_reach_messages() -> None:
    assert redact("redis://:s3cret@db.example:6379/0") == "redis://:***@db.example:6379/0"
    assert redact("rediss://user:s3cret@db.example/1") == "rediss://user:***@db.example/1"
    assert redact("unix:///run/redis.sock") == "unix:///run/redis.sock"
    health = Health(redact("redis://:s3cret@db.example:6379/0"))
    error = health.failed(redis.ConnectionError("refused"))
    assert "s3cret" not in str(error)
