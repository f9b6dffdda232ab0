"""Probe priorities and bounds (issue 12): hostile mail cannot delay a sensitive verdict.

The gate and the overload log are tested on their own; then the embedded backend with the
suite's stand-in prober, where thousands of warm-up probes hang (as with a hanging resolver)
and a sensitive message's domain must still be assessed at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest

from tests.fakes import TableProber
from tlsmilter import config, metrics
from tlsmilter.store.embedded import EmbeddedAssessments
from tlsmilter.store.scheduling import Overload, SlotGate, WarmupBudget


def test_warm_up_probes_leave_the_reserved_slots_free() -> None:
    async def scenario() -> list[str]:
        gate, started, release = SlotGate(3, reserved=1), [], asyncio.Event()

        async def probe(domain: str, urgent: bool) -> None:
            async with gate.slot(domain, urgent=urgent):
                started.append(domain)
                await release.wait()

        tasks = [asyncio.create_task(probe(f"warm{i}", False)) for i in range(10)]
        await asyncio.sleep(0)
        assert started == ["warm0", "warm1"] and gate.waiting == 8
        tasks.append(asyncio.create_task(probe("urgent", True)))
        await asyncio.sleep(0)
        assert started[-1] == "urgent"  # the reserved slot
        gate.promote("warm7")  # a sensitive message now waits for this one
        release.set()
        await asyncio.gather(*tasks)
        return started

    order = asyncio.run(scenario())
    assert order[3] == "warm7", order  # first of the waiting ones once slots free up
    assert sorted(order) == sorted([*(f"warm{i}" for i in range(10)), "urgent"])


def test_waiting_urgent_probes_go_before_waiting_warm_ones() -> None:
    async def scenario() -> list[str]:
        gate, started = SlotGate(1, reserved=0), []

        async def probe(domain: str, urgent: bool) -> None:
            async with gate.slot(domain, urgent=urgent):
                started.append(domain)
                await asyncio.sleep(0.001)

        await asyncio.gather(probe("w1", False), probe("w2", False), probe("w3", False),
                             probe("u1", True))
        return started

    assert asyncio.run(scenario()) == ["w1", "u1", "w2", "w3"]


def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    async def scenario() -> int:
        gate = SlotGate(1, reserved=0)
        hold = asyncio.Event()

        async def probe(domain: str) -> None:
            async with gate.slot(domain, urgent=False):
                await hold.wait()

        first = asyncio.create_task(probe("a"))
        second = asyncio.create_task(probe("b"))
        await asyncio.sleep(0)
        second.cancel()
        hold.set()
        await first
        await asyncio.gather(second, return_exceptions=True)
        return gate.running + gate.waiting

    assert asyncio.run(scenario()) == 0


def test_an_overload_logs_one_line_at_start_and_one_at_end(
        caplog: pytest.LogCaptureFixture) -> None:
    overload = Overload("probe queue", clock=iter([100.0, 112.5]).__next__)
    with caplog.at_level(logging.INFO, "tlsmilter.store.scheduling"):
        for _ in range(4003):
            overload.dropped(1000)
        overload.relieved()
        overload.relieved()
    assert [r.getMessage() for r in caplog.records] == [
        "probe queue full (1000): new domains are not assessed until it drains; one line "
        "will say when",
        "probe queue drained: 4003 requests dropped in 12.5 s",
    ]


# -- the embedded backend under a flood ------------------------------------------------------

HANG = 30.0  # a warm-up probe whose DNS hangs; far longer than the test


@pytest.fixture
def flooded() -> Iterator[tuple[EmbeddedAssessments, TableProber]]:
    settings = config.from_mapping({"prober": {"concurrency": 4, "reserved_slots": 1,
                                               "queue_limit": 100}})
    prober = TableProber({"healthy.test": "verified", "queued.test": "verified"},
                         delays=lambda d: HANG if d.startswith("hang") else 0.05)
    engine = EmbeddedAssessments(settings, prober=prober)  # type: ignore[arg-type]
    engine.start()
    yield engine, prober
    engine.stop()


def overflow() -> float:
    return metrics.REGISTRY.get_sample_value("tlsmilter_probe_queue_overflow_total") or 0.0


def test_a_5000_domain_flood_does_not_delay_a_sensitive_verdict(
        flooded: tuple[EmbeddedAssessments, TableProber],
        caplog: pytest.LogCaptureFixture) -> None:
    engine, _prober = flooded
    dropped_before = overflow()
    with caplog.at_level(logging.INFO, "tlsmilter"):
        for i in range(5000):  # RCPT of one hostile message: warm-up requests
            engine.lookup(f"hang{i}.test")
            if i == 2:  # the 3 warm-up slots hang: this one waits behind them
                engine.lookup("queued.test")
        engine.lookup("healthy.test")  # dropped: the warm-up queue is full
    assert overflow() - dropped_before == 4902  # 3 running, 97 waiting
    assert len([r for r in caplog.records if "probe queue" in r.getMessage()]) == 1

    # End-of-message of a sensitive message to both: each is assessed within its wait.
    started = time.monotonic()
    engine.wait(["healthy.test", "queued.test"], 5.0)
    assert time.monotonic() - started < 5.0
    assert engine.get("healthy.test")[1] is not None
    assert engine.get("queued.test")[1] is not None


def test_warm_up_budgets_per_message_and_per_client() -> None:
    clock = [0.0]
    budget = WarmupBudget(per_message=3, per_client=5, window=60.0, clock=lambda: clock[0])
    assert [budget.spent("192.0.2.1", used) for used in range(4)] == [None, None, None,
                                                                      "message"]
    for _ in range(5):
        budget.charge("192.0.2.1")
    assert budget.spent("192.0.2.1", 0) == "client"
    assert budget.spent("192.0.2.2", 0) is None  # another client has its own budget
    clock[0] = 60.0  # a new window
    assert budget.spent("192.0.2.1", 0) is None
    budget.charge("192.0.2.1")
    assert budget._clients["192.0.2.1"] == (60.0, 1)


def test_the_client_table_is_bounded() -> None:
    budget = WarmupBudget(per_message=10, per_client=1, window=60.0, clock=lambda: 0.0)
    budget.MAX_CLIENTS = 100
    for i in range(1000):
        assert budget.spent(f"client{i}", 0) is None
        budget.charge(f"client{i}")
    assert len(budget._clients) == 100
    assert budget.spent("client999", 0) == "client"  # the newest are remembered
    assert budget.spent("client0", 0) is None  # the oldest forgotten
