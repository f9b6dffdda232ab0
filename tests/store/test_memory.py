"""The embedded cache: lifetimes by level, LRU bound, refresh-ahead, and packed entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tlsmilter import config
from tlsmilter.core.delivery import domain_policy
from tlsmilter.store.base import Entry, State, is_due
from tlsmilter.store.memory import MemoryCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SETTINGS = config.CacheSettings(max_entries=3, ttl=600.0, ttl_none=60.0, ttl_unknown=30.0,
                        stale_max=300.0, refresh_before=100.0)


def assessment(domain: str, level: str = "verified") -> dict[str, Any]:
    return {"domain": domain, "level": level, "score": 60,
            "reasons": [{"code": "cert_valid", "severity": "good",
                         "text": "certificate is valid for the MX host name"}],
            "mx": [{"host": f"mx1.{domain}", "addresses": ["192.0.2.1"]}]}


@pytest.mark.parametrize(("level", "fresh", "grace"), [
    ("dane", 600.0, 300.0), ("none", 60.0, 300.0), ("unknown", 30.0, 0.0)])
def test_lifetimes_by_level(level: str, fresh: float, grace: float) -> None:
    clock = Clock()
    cache = MemoryCache(SETTINGS, clock)
    cache.put(assessment("d.test", level))
    clock.now += fresh - 1
    assert cache.get("d.test")[0] is State.HIT
    clock.now += 2
    assert cache.get("d.test")[0] is (State.STALE if grace else State.MISS)
    clock.now += grace
    assert cache.get("d.test") == (State.MISS, None)


def test_least_recently_used_goes_first() -> None:
    cache = MemoryCache(SETTINGS, Clock())
    for name in ("a.test", "b.test", "c.test"):
        cache.put(assessment(name))
    cache.get("a.test")  # a is now the most recently used
    cache.put(assessment("d.test"))
    assert cache.get("b.test")[0] is State.MISS
    assert all(cache.get(n)[0] is State.HIT for n in ("a.test", "c.test", "d.test"))
    assert len(cache) == 3


def test_refresh_is_due_shortly_before_expiry() -> None:
    clock = Clock()
    cache = MemoryCache(SETTINGS, clock)
    entry = cache.put(assessment("d.test"))
    clock.now += 499
    assert not is_due(entry, cache.now(), SETTINGS.refresh_before)
    clock.now += 1
    assert is_due(entry, cache.now(), SETTINGS.refresh_before)


def test_packed_entries_give_back_the_assessment_exactly() -> None:
    original = assessment("pack.test", "dane")
    packed = Entry(original, 1.0, 2.0, 3.0, packed=True)
    assert packed.level == "dane"
    assert packed.assessment == original
    assert packed.assessment is not packed.assessment  # unpacked afresh: callers may mutate


def test_an_entry_computes_its_delivery_policy_once() -> None:
    assessment = {"domain": "sts.test", "level": "verified", "dnssec": False,
                  "mta_sts": "enforce", "mx": [{"host": "mx1.sts.test",
                                                "authenticated_by": ["mta-sts"]}]}
    entry = Entry(assessment, 0.0, 10.0, 20.0, packed=True)
    restored = Entry.from_packed(entry.packed, entry.level, 0.0, 10.0, 20.0)
    for each in (entry, restored):
        assert each.policy == domain_policy(assessment)
        assert each.policy.policy == "secure match=mx1.sts.test servername=hostname"
        assert each.policy is each.policy  # kept, not unpacked and computed again


def test_a_real_assessment_packs_small() -> None:
    # A lab assessment of a DANE domain with two TLSA records, as the prober writes it.
    real = json.loads((Path(__file__).parents[1] / "data" / "assessment-dane-full.json")
                      .read_text())
    entry = Entry(real, 0.0, 1.0, 2.0, packed=True)
    assert entry.assessment == real
    packed = entry._data
    assert isinstance(packed, bytes)
    assert len(packed) < len(json.dumps(real)) / 3  # ~400 of ~1800 bytes measured
