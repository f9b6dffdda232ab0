"""The embedded backend's MTA-STS policy cache on disk: it outlives a restart of serve."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tests.fakes import TableProber
from tlsmilter import config
from tlsmilter.assess.mtasts import CachedPolicy, MemoryPolicyCache, Mode, Policy
from tlsmilter.store.embedded import EmbeddedAssessments
from tlsmilter.store.stsfile import FILE_NAME, load_policies, save_policies

POLICY = Policy(Mode.ENFORCE, 86400, ("mx1.sts.test",))


def test_policies_round_trip(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    items = [("sts.test", CachedPolicy("id1", POLICY, 1000.0)),
             ("other.test", CachedPolicy("id2", Policy(Mode.TESTING, 60, ()), 2000.0))]
    assert save_policies(path, items)
    assert load_policies(path) == items
    assert load_policies(tmp_path / "missing.json") == []


@pytest.mark.parametrize("content", [b"\xff not json", b'{"version": 2, "policies": {}}',
                                     b'{"version": 1}', b"[]"])
def test_an_unusable_file_is_set_aside(tmp_path: Path, content: bytes,
                                       caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / FILE_NAME
    path.write_bytes(content)
    assert load_policies(path) == []
    assert not path.exists() and (tmp_path / f"{FILE_NAME}.corrupt").read_bytes() == content
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_bad_entries_are_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    good = CachedPolicy("id1", POLICY, 1000.0)
    path.write_text(json.dumps({"version": 1, "policies": {
        "sts.test": good.to_json(), "bad.test": {"id": "x"}, "worse.test": 7}}))
    assert load_policies(path) == [("sts.test", good)]


def test_expired_policies_are_dropped_at_restore() -> None:
    cache = MemoryPolicyCache()
    now = 1_800_000_000.0
    added = cache.restore([("fresh.test", CachedPolicy("a", POLICY, now - 3600)),
                           ("old.test", CachedPolicy("b", POLICY, now - 86400))], now)
    assert added == 1 and [d for d, _ in cache.items()] == ["fresh.test"]


def test_serve_keeps_its_policy_cache_across_a_restart(tmp_path: Path) -> None:
    settings = config.from_mapping({"cache": {"state_dir": str(tmp_path)}})
    cached = CachedPolicy("id1", POLICY, time.time() - 60)
    first = EmbeddedAssessments(settings, prober=TableProber(), state_dir=str(tmp_path))
    first.start()
    try:
        asyncio.run(first.sts_policies.put("sts.test", cached))
    finally:
        first.stop()
    assert (tmp_path / FILE_NAME).exists()
    second = EmbeddedAssessments(settings, prober=TableProber(), state_dir=str(tmp_path))
    second.start()
    try:
        assert asyncio.run(second.sts_policies.get("sts.test")) == cached
    finally:
        second.stop()


def test_the_default_prober_uses_the_backends_policy_cache(tmp_path: Path) -> None:
    backend = EmbeddedAssessments(config.Config())
    backend.start()
    try:
        assert backend._prober is not None
        assert backend._prober.sts_cache is backend.sts_policies  # type: ignore[attr-defined]
    finally:
        backend.stop()
