"""The Redis cache and probe queue against a real redis-server the test starts on its own port.

Lifetimes are checked with a controlled clock: the records carry wall-clock times, so the
test moves the cache's clock instead of waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import world_searchable_dir
from tests.lab.model import Cert
from tests.lab.pki import LabCA
from tests.lab.redis_server import LabRedis, LabSentinel
from tlsmilter import config, metrics
from tlsmilter.daemons.worker import Worker
from tlsmilter.errors import CacheUnavailable
from tlsmilter.store.base import is_due
from tlsmilter.store.memory import State
from tlsmilter.store.redis.cache import RedisCache
from tlsmilter.store.redis.connection import Health, redact
from tlsmilter.store.redis.queue import ProbeRequests
from tlsmilter.store.redis.records import SCHEMA
from tlsmilter.store.shared import SharedAssessments as SharedEngine

pytestmark = pytest.mark.lab

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = world_searchable_dir("tlsmilter-redis-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[LabRedis]:
    instance = LabRedis(workdir / "plain", unix_socket=True)
    instance.start()
    yield instance
    instance.stop()


def settings_for(url: str, **redis_options: Any) -> config.Config:
    return config.from_mapping({"cache": {"backend": "redis", "ttl": 600.0, "ttl_none": 60.0,
                                          "ttl_unknown": 30.0, "stale_max": 300.0,
                                          "refresh_before": 100.0},
                                "redis": {"url": url, "prefix": "t:", **redis_options}})


def assessment(domain: str, level: str) -> dict[str, Any]:
    return {"domain": domain, "level": level, "score": 60, "reasons": []}


@pytest.fixture
def cache(server: LabRedis) -> Iterator[RedisCache]:
    instance = RedisCache(settings_for(server.url), clock=Clock())
    instance.client.flushdb()
    yield instance
    instance.client.close()


def clock_of(cache: RedisCache) -> Clock:
    clock = cache._clock
    assert isinstance(clock, Clock)
    return clock


def test_a_stored_assessment_reads_back_with_its_schema_prefix_and_ttl(
        cache: RedisCache) -> None:
    cache.put(assessment("example.test", "verified"))
    state, entry = cache.get("example.test")
    assert state is State.HIT and entry is not None
    assert entry.assessment == assessment("example.test", "verified")
    raw = json.loads(cache.client.get("t:a:example.test") or b"")
    assert raw["schema"] == SCHEMA and raw["stored_at"] == T0
    # The Redis TTL covers freshness plus the stale grace, and nothing more.
    assert 899_000 < cache.client.pttl("t:a:example.test") <= 900_000


@pytest.mark.parametrize(("level", "fresh", "grace"), [
    ("dane", 600.0, 300.0),
    ("none", 60.0, 300.0),
    ("unknown", 30.0, 0.0),  # never served stale
])
def test_lifetimes_by_level(cache: RedisCache, level: str, fresh: float, grace: float) -> None:
    clock = clock_of(cache)
    cache.put(assessment("d.test", level))
    clock.now = T0 + fresh - 1
    assert cache.get("d.test")[0] is State.HIT
    clock.now = T0 + fresh + 1
    assert cache.get("d.test")[0] is (State.STALE if grace else State.MISS)
    clock.now = T0 + fresh + grace + 1
    assert cache.get("d.test") == (State.MISS, None)


def test_refresh_is_due_shortly_before_expiry(cache: RedisCache) -> None:
    clock = clock_of(cache)
    entry = cache.put(assessment("d.test", "dane"))
    clock.now = T0 + 499  # refresh_before = 100, ttl = 600
    assert not is_due(entry, cache.now(), cache._settings.refresh_before)
    clock.now = T0 + 500
    assert is_due(entry, cache.now(), cache._settings.refresh_before)


def test_another_schema_version_reads_as_a_miss(cache: RedisCache) -> None:
    cache.client.set("t:a:old.test", json.dumps({"schema": SCHEMA + 1, "assessment": {}}))
    cache.client.set("t:a:junk.test", b"\xff not json")
    assert cache.get("old.test") == (State.MISS, None)
    assert cache.get("junk.test") == (State.MISS, None)


def test_flush_and_list_touch_only_our_prefix(cache: RedisCache) -> None:
    for name in ("a.test", "b.test", "c.test"):
        cache.put(assessment(name, "encrypted"))
    cache.client.set("other:a:a.test", "kept")
    assert sorted(d for d, _e in cache.items()) == ["a.test", "b.test", "c.test"]
    assert cache.flush("b.test") == 1
    assert cache.flush("b.test") == 0
    assert cache.flush() == 2
    assert list(cache.items()) == []
    assert cache.client.get("other:a:a.test") == b"kept"


def test_requests_are_queued_once_and_bounded(server: LabRedis) -> None:
    settings = settings_for(server.url)
    settings = dataclasses.replace(settings, worker=dataclasses.replace(settings.worker,
                                                                         queue_max=2))
    cache = RedisCache(settings)
    cache.client.flushdb()
    requests = ProbeRequests(settings, cache.client, cache.health)
    try:
        assert requests.request("one.test")
        assert requests.request("one.test")  # already waiting: not queued again
        assert requests.length() == 1
        assert requests.request("two.test")
        assert not requests.request("three.test")  # the bound: dropped and counted
        assert requests.length() == 2
        assert cache.stats().overflow == 1
        # Every key tlsmilter wrote carries the prefix, and the per-domain ones a TTL.
        keys = sorted(k.decode() for k in cache.client.keys("*"))
        assert keys == ["t:overflow", "t:probes", "t:queued:one.test", "t:queued:two.test"]
        assert all(cache.client.pttl(key) > 0 for key in keys), "every key has a TTL"
        # a later request for a dropped domain gets in once there is room
        cache.client.delete("t:probes", "t:queued:one.test")
        assert requests.request("three.test") and requests.length() == 1
    finally:
        cache.client.close()


def test_unix_socket_url(server: LabRedis) -> None:
    cache = RedisCache(settings_for(f"unix://{server.socket_path}?db=0"))
    try:
        cache.put(assessment("unix.test", "dane"))
        assert cache.get("unix.test")[0] is State.HIT
    finally:
        cache.client.close()


def test_tls_url_with_a_private_ca(workdir: Path) -> None:
    ca = LabCA(workdir / "ca")
    issued = ca.issue("localhost", Cert.CA)
    server = LabRedis(workdir / "tls", tls=(str(issued.cert_file), str(issued.key_file)))
    server.start()
    try:
        url = f"rediss://localhost:{server.port}/0"
        cache = RedisCache(settings_for(url, ca_file=str(ca.ca_file)))
        cache.put(assessment("tls.test", "dane"))
        assert cache.get("tls.test")[0] is State.HIT
        cache.client.close()
        # Without the CA the server's certificate is not trusted: an outage, not a crash.
        untrusted = RedisCache(settings_for(url))
        with pytest.raises(CacheUnavailable, match="certificate verify failed"):
            untrusted.get("tls.test")
        untrusted.client.close()
    finally:
        server.stop()


def test_sentinel_finds_the_master(workdir: Path, server: LabRedis) -> None:
    sentinel = LabSentinel(workdir / "sentinel", server)
    sentinel.start()
    try:
        settings = settings_for("redis:///0", sentinels=[sentinel.address],
                                sentinel_service=sentinel.service)
        cache = RedisCache(settings)
        cache.put(assessment("sentinel.test", "verified"))
        # Written through the Sentinel-found master: the server itself has it.
        assert redis.Redis.from_url(server.url).exists("t:a:sentinel.test")
        assert cache.get("sentinel.test")[0] is State.HIT
        cache.client.close()
    finally:
        sentinel.stop()


def test_outage_fails_cleanly_logs_once_and_recovers(
        workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = LabRedis(workdir / "outage")
    server.start()
    cache = RedisCache(settings_for(server.url, timeout=0.5))
    try:
        cache.put(assessment("up.test", "dane"))
        server.stop()
        caplog.set_level(logging.WARNING, logger="tlsmilter.store.redis.cache")
        for _ in range(3):
            with pytest.raises(CacheUnavailable):
                cache.get("up.test")
        with pytest.raises(CacheUnavailable):
            cache.put(assessment("up.test", "dane"))
        assert not cache.health.up
        down = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(down) == 1, "one line per outage, not one per command"
        server.start()  # empty again: Redis keeps nothing on disk here
        assert cache.get("up.test") == (State.MISS, None)  # reconnected by itself
        assert cache.health.up
        assert sum("is back after" in r.getMessage() for r in caplog.records) == 1
    finally:
        cache.client.close()
        server.stop()


def test_passwords_never_reach_messages() -> None:
    assert redact("redis://:s3cret@db.example:6379/0") == "redis://:***@db.example:6379/0"
    assert redact("rediss://user:s3cret@db.example/1") == "rediss://user:***@db.example/1"
    assert redact("unix:///run/redis.sock") == "unix:///run/redis.sock"
    health = Health(redact("redis://:s3cret@db.example:6379/0"))
    error = health.failed(redis.ConnectionError("refused"))
    assert "s3cret" not in str(error)


def run_cli(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlsmilter.cli", "--config", str(config_file),
                           *args], capture_output=True, text=True, timeout=30, check=False)


def test_cache_command(server: LabRedis, tmp_path: Path) -> None:
    conf = tmp_path / "t.toml"
    conf.write_text(f'[cache]\nbackend = "redis"\n[redis]\nurl = "{server.url}"\n'
                    'prefix = "cli:"\n')
    cache = RedisCache(config.load(conf))
    try:
        cache.client.flushdb()
        cache.put(assessment("b.test", "dane"))
        cache.put({**assessment("a.test", "none"),
                   "reasons": [{"code": "no_starttls", "text": "MX does not offer STARTTLS"}]})
        got = run_cli(conf, "cache", "get", "A.TEST.")  # normalised like the milter does
        assert got.returncode == 0, got.stderr
        assert got.stdout.startswith("a.test  none  score 60  hit  assessed ")
        assert "no_starttls: MX does not offer STARTTLS" in got.stdout
        as_json = run_cli(conf, "cache", "get", "b.test", "--json")
        assert json.loads(as_json.stdout) == assessment("b.test", "dane")
        listed = run_cli(conf, "cache", "list", "--json").stdout.splitlines()
        assert [json.loads(line)["domain"] for line in listed] == ["a.test", "b.test"]
        stats = run_cli(conf, "cache", "stats").stdout
        assert "entries: 2" in stats and "dane: 1" in stats and "none: 1" in stats
        assert run_cli(conf, "cache", "flush", "a.test").stdout == "a.test: flushed\n"
        missing = run_cli(conf, "cache", "get", "a.test")
        assert missing.returncode == 1 and missing.stdout == "a.test: not cached\n"
        assert run_cli(conf, "cache", "flush").stdout == "flushed 1 cached assessment(s)\n"
        bad = run_cli(conf, "cache", "get", "not a domain")
        assert bad.returncode == 1 and "Traceback" not in bad.stderr
    finally:
        cache.client.close()


def test_cache_command_explains_itself_without_redis(tmp_path: Path) -> None:
    memory = tmp_path / "memory.toml"
    memory.write_text("")
    done = run_cli(memory, "cache", "stats")
    assert done.returncode == 1
    assert 'cache needs cache.backend = "redis"' in done.stderr
    down = tmp_path / "down.toml"
    down.write_text('[cache]\nbackend = "redis"\n[redis]\nurl = "redis://:pw@127.0.0.1:1/0"\n')
    done = run_cli(down, "cache", "list")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "unavailable" in done.stderr and ":pw@" not in done.stderr


def test_a_lookup_close_to_expiry_queues_a_refresh(server: LabRedis) -> None:
    clock = Clock()
    settings = settings_for(server.url)
    cache = RedisCache(settings, clock=clock)
    cache.client.flushdb()
    engine = SharedEngine(settings, cache=cache)  # not started: no listener needed here
    try:
        cache.put(assessment("busy.test", "dane"))
        assert engine.lookup("busy.test")[0] is State.HIT
        assert engine.requests.length() == 0  # fresh: nothing to do
        clock.now = T0 + 550  # ttl 600, refresh_before 100: due, still served as a hit
        assert engine.lookup("busy.test")[0] is State.HIT
        assert engine.requests.length() == 1
        assert engine.lookup("never.test") == (State.MISS, None)
        assert engine.requests.length() == 2
    finally:
        cache.client.close()


def test_workers_take_turns_on_one_mx_address(server: LabRedis) -> None:
    settings = settings_for(server.url)
    order: list[str] = []

    async def scenario() -> None:
        first, second = Worker(settings), Worker(settings)
        try:
            await first.client.flushdb()
            async with first.ip_guard("192.0.2.25"):
                waiting = asyncio.create_task(enter(second, "second"))
                await asyncio.sleep(0.3)
                assert not order, "the second worker probed the address alongside the first"
                order.append("first done")
            await asyncio.wait_for(waiting, 5)
            async with first.ip_guard("192.0.2.26"):  # another address: no waiting
                order.append("other address")
        finally:
            await first.client.aclose()
            await second.client.aclose()

    async def enter(worker: Worker, name: str) -> None:
        async with worker.ip_guard("192.0.2.25"):
            order.append(name)

    asyncio.run(scenario())
    assert order == ["first done", "second", "other address"]


class SlowProber:
    """Takes ``seconds`` per domain and records who probed what, and when."""

    def __init__(self, name: str, seconds: float, log: list[tuple[str, str, float, float]]):
        self.name = name
        self.seconds = seconds
        self.log = log

    async def assess(self, domain: str) -> Any:
        started = time.monotonic()
        await asyncio.sleep(self.seconds)
        self.log.append((self.name, domain, started, time.monotonic()))
        return types.SimpleNamespace(to_json=lambda: assessment(domain, "verified"))


def test_a_domain_waiting_for_a_fleet_slot_is_never_probed_twice(server: LabRedis) -> None:
    # One fleet-wide slot, three domains of 1.5 s each: the last waits ~3 s for the slot,
    # longer than its domain lock lives (2.5 s) and than a takeover needs (claim_after 3 s).
    # A worker taking over that entry must neither probe alongside nor probe again.
    settings = config.from_mapping({
        "cache": {"backend": "redis"}, "redis": {"url": server.url, "prefix": "slots:"},
        "prober": {"concurrency": 3, "timeouts": {"domain": 2.0}},
        "worker": {"claim_after": 3.0, "fleet_concurrency": 1}})
    domains = ["a.test", "b.test", "c.test"]
    probes: list[tuple[str, str, float, float]] = []
    cache = RedisCache(settings)
    cache.client.flushdb()

    async def scenario() -> None:
        first = Worker(settings, prober=SlowProber("first", 1.5, probes))  # type: ignore[arg-type]
        second = Worker(settings, prober=SlowProber("second", 1.5, probes))  # type: ignore[arg-type]
        await first.queue.ensure_group()
        requests = ProbeRequests(settings, cache.client, cache.health)
        for domain in domains:
            assert requests.request(domain)
        running = [asyncio.create_task(first.run())]
        await asyncio.sleep(0.5)  # the first worker reads all three entries
        running.append(asyncio.create_task(second.run()))
        keys = first.queue.keys
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pending = await first.client.xpending(keys.stream, keys.group)
            if all(cache.get(d)[1] for d in domains) and not pending["pending"]:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # room for a late duplicate to show
        for worker in (first, second):
            worker.stop()
        await asyncio.gather(*running)
        for worker in (first, second):
            await worker.client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        cache.client.close()
    assert sorted(d for _w, d, _s, _e in probes) == domains, probes
    spans = sorted((start, end) for _w, _d, start, end in probes)
    assert all(end <= later for (_s, end), (later, _e) in itertools.pairwise(spans)), probes


def test_workers_leave_the_group_and_gone_ones_are_forgotten(server: LabRedis) -> None:
    settings = settings_for(server.url)

    async def scenario() -> None:
        worker = Worker(settings, prober=SlowProber("w", 0.1, []))  # type: ignore[arg-type]
        queue, client = worker.queue, worker.client
        try:
            await client.flushdb()
            await queue.ensure_group()
            keys = queue.keys

            async def consumers() -> set[str]:
                found = await client.xinfo_consumers(keys.stream, keys.group)
                return {c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                        for c in found}

            # Two workers that died: one with an entry still pending, one without.
            await client.xadd(keys.stream, {"domain": "held.test"})
            await client.xreadgroup(keys.group, "dead-busy", {keys.stream: ">"}, count=1)
            await client.xgroup_createconsumer(keys.stream, keys.group, "dead-idle")
            assert await queue.forget_gone_consumers(0) == ["dead-idle"]
            assert await consumers() == {"dead-busy"}  # its entry awaits a takeover
            # A worker that stops cleanly leaves the group (it joins by reading an entry).
            await client.xadd(keys.stream, {"domain": "fresh.test"})
            running = asyncio.create_task(worker.run())
            while worker.consumer not in await consumers():
                await asyncio.sleep(0.05)
            worker.stop()
            await running
            assert worker.consumer not in await consumers()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def redis_up() -> float:
    value = metrics.REGISTRY.get_sample_value("tlsmilter_redis_up")
    assert value is not None
    return value


def test_a_milter_started_while_redis_is_down_fails_safe_and_recovers_idle(
        workdir: Path) -> None:
    server = LabRedis(workdir / "late")  # not running yet
    engine = SharedEngine(settings_for(server.url, timeout=0.5))
    engine.start()
    try:
        with pytest.raises(CacheUnavailable):
            engine.lookup("a.test")
        assert redis_up() == 0
        server.start()
        # No lookup: the listener's resubscription alone notices that Redis is back.
        deadline = time.monotonic() + 10
        while not engine.redis.health.up:
            assert time.monotonic() < deadline, "Redis back, still reported down"
            time.sleep(0.1)
        assert redis_up() == 1
        assert engine.lookup("a.test") == (State.MISS, None)
        assert engine.requests.length() == 1  # queued for the workers
    finally:
        engine.stop()
        engine.redis.client.close()
        server.stop()


def test_a_waiting_milter_is_woken_by_the_notice_not_the_poll(
        server: LabRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tlsmilter.store.shared.POLL", 30.0)  # polling alone would miss it
    settings = settings_for(server.url)
    engine = SharedEngine(settings)
    engine.redis.client.flushdb()
    engine.start()
    try:
        time.sleep(0.5)  # the listener subscribes
        waited: list[float] = []
        waiter = threading.Thread(target=lambda: waited.append(timed_wait(engine)))
        waiter.start()
        time.sleep(0.3)  # the callback thread is waiting
        engine.redis.put(assessment("woken.test", "dane"))  # as a worker stores it ...
        engine.redis.client.publish(engine.redis.keys.assessed, "woken.test")  # ... and tells
        waiter.join(timeout=25)
        assert waited and waited[0] < 10, waited  # ended by the notice, long before 20 s
    finally:
        engine.stop()
        engine.redis.client.close()


def timed_wait(engine: SharedEngine) -> float:
    started = time.monotonic()
    engine.wait(["woken.test"], 20.0)
    return time.monotonic() - started
