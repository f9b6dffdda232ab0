"""``tlsmilter worker`` against a real redis-server: politeness, fleet slots, the group."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from tests.fakes import TableProber
from tests.fakes import redis_settings as settings_for
from tests.lab.redis_server import LabRedis
from tlsmilter import config
from tlsmilter.daemons.worker import Worker
from tlsmilter.store.redis.cache import RedisCache
from tlsmilter.store.redis.queue import ProbeRequests

pytestmark = pytest.mark.lab


def test_workers_take_turns_on_one_mx_address(redis_server: LabRedis) -> None:
    settings = settings_for(redis_server.url)
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


def test_a_domain_waiting_for_a_fleet_slot_is_never_probed_twice(redis_server: LabRedis) -> None:
    # One fleet-wide slot, three domains of 1.5 s each: the last waits ~3 s for the slot,
    # longer than its domain lock lives (2.5 s) and than a takeover needs (claim_after 3 s).
    # A worker taking over that entry must neither probe alongside nor probe again.
    settings = config.from_mapping({
        "cache": {"backend": "redis"}, "redis": {"url": redis_server.url, "prefix": "slots:"},
        "prober": {"concurrency": 3, "timeouts": {"domain": 2.0}},
        "worker": {"claim_after": 3.0, "fleet_concurrency": 1}})
    domains = ["a.test", "b.test", "c.test"]
    probes: list[tuple[str, str, float, float]] = []
    cache = RedisCache(settings)
    cache.client.flushdb()

    async def scenario() -> None:
        first = Worker(settings, prober=TableProber(
            delay=1.5, name="first", default="verified", log=probes))  # type: ignore[arg-type]
        second = Worker(settings, prober=TableProber(
            delay=1.5, name="second", default="verified", log=probes))  # type: ignore[arg-type]
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


def test_workers_leave_the_group_and_gone_ones_are_forgotten(redis_server: LabRedis) -> None:
    settings = settings_for(redis_server.url)

    async def scenario() -> None:
        worker = Worker(settings, prober=TableProber(delay=0.1, default="verified"))  # type: ignore[arg-type]
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


def test_urgent_probes_overtake_a_flood_of_hanging_warm_up_probes(
        redis_server: LabRedis) -> None:
    # 4 slots, 1 kept for urgent probes; 50 warm-up requests whose probes hang (60 s).
    settings = config.from_mapping({
        "cache": {"backend": "redis"}, "redis": {"url": redis_server.url, "prefix": "urgent:"},
        "prober": {"concurrency": 4, "reserved_slots": 1}})
    cache = RedisCache(settings)
    cache.client.flushdb()
    prober = TableProber(default="verified",
                         delays=lambda d: 60.0 if d.startswith("hang") else 0.0)

    async def scenario() -> float:
        worker = Worker(settings, prober=prober)  # type: ignore[arg-type]
        requests = ProbeRequests(settings, cache.client, cache.health)
        running = asyncio.create_task(worker.run())
        try:
            for i in range(50):
                assert requests.request(f"hang{i}.test")
            while len(prober.calls) < 3:  # the three warm-up slots all hang
                await asyncio.sleep(0.05)
            # A domain queued among the warm-up requests, then needed by a sensitive message,
            # and one a sensitive message needs that no RCPT asked for (a spent budget).
            assert requests.request("queued.test")
            await asyncio.sleep(0.3)
            started = time.monotonic()
            assert requests.request("queued.test", urgent=True)
            assert requests.request("new.test", urgent=True)
            while cache.get("queued.test")[1] is None or cache.get("new.test")[1] is None:
                assert time.monotonic() - started < 5, prober.calls
                await asyncio.sleep(0.02)
            seconds = time.monotonic() - started
            # The worker took no more warm-up requests than it may run: the rest wait in
            # Redis for other workers, and no fourth hanging probe took the reserved slot.
            assert sorted(prober.calls[:3]) == ["hang0.test", "hang1.test", "hang2.test"]
            assert sorted(prober.calls[3:]) == ["new.test", "queued.test"]
            pending = await worker.client.xpending(worker.queue.keys.stream,
                                                   worker.queue.keys.group)
            assert pending["pending"] == 3
            return seconds
        finally:
            worker.stop()
            for task in list(worker._tasks):  # the hanging probes
                task.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await worker.client.aclose()

    try:
        seconds = asyncio.run(scenario())
    finally:
        cache.client.close()
    print(f"urgent probes done {seconds:.2f} s after the request")


def test_a_worker_remakes_an_urgent_queue_that_expired_while_idle(
        redis_server: LabRedis, caplog: pytest.LogCaptureFixture) -> None:
    # Each Stream expires after a week without requests; the urgent one may go alone.
    settings = settings_for(redis_server.url)
    cache = RedisCache(settings)
    cache.client.flushdb()
    prober = TableProber(default="verified")

    async def scenario() -> None:
        worker = Worker(settings, prober=prober)  # type: ignore[arg-type]
        requests = ProbeRequests(settings, cache.client, cache.health)
        running = asyncio.create_task(worker.run())
        try:
            assert requests.request("warm.test")
            deadline = time.monotonic() + 5
            while cache.get("warm.test")[1] is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await worker.client.delete(worker.queue.keys.urgent)  # expired, the worker running
            worker._next_claim = 0.0  # its next look for gone workers and stuck entries: now
            await asyncio.sleep(0.5)
            assert requests.request("urgent.test", urgent=True)
            while cache.get("urgent.test")[1] is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        finally:
            worker.stop()
            await running
            await worker.client.aclose()

    with caplog.at_level("INFO", logger="tlsmilter"):
        try:
            asyncio.run(scenario())
        finally:
            cache.client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
