"""The embedded cache on disk: the file format, loading what is still usable, and every way
a state directory or a snapshot file can be unusable without stopping the start."""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import pytest

from tests.fakes import T0, Clock, TableProber, assessment
from tlsmilter import config
from tlsmilter.store import snapshot
from tlsmilter.store.base import State
from tlsmilter.store.embedded import EmbeddedAssessments
from tlsmilter.store.memory import MemoryCache
from tlsmilter.store.packing import pack
from tlsmilter.store.snapshot import Record, SnapshotError, StateFile

SETTINGS = config.CacheSettings(max_entries=10, ttl=600.0, ttl_none=60.0, ttl_unknown=30.0,
                                stale_max=300.0, refresh_before=0.0)


def record(domain: str, level: str = "verified", stored_at: float = T0) -> Record:
    return Record(domain, level, stored_at, stored_at + 600.0, stored_at + 900.0,
                  pack(assessment(domain, level)))


def caches(settings: config.CacheSettings = SETTINGS) -> tuple[MemoryCache, Clock, Clock]:
    """A memory cache with a monotonic clock unrelated to its wall clock, as after a boot."""
    monotonic, wall = Clock(5_000.0), Clock(T0)
    return MemoryCache(settings, monotonic, wall), monotonic, wall


def test_records_round_trip_in_order() -> None:
    records = [record("a.test"), record("b.test", "none", T0 + 1.5),
               record("xn--bcher-kva.test", "dane", T0 - 0.25)]
    assert snapshot.decode(snapshot.encode(records)) == records
    assert snapshot.decode(snapshot.encode([])) == []


def test_the_cache_survives_a_save_and_a_load_on_another_clock(tmp_path: Path) -> None:
    before, monotonic, wall = caches()
    for domain, level in (("a.test", "verified"), ("b.test", "none"), ("c.test", "dane")):
        before.put(assessment(domain, level))
        monotonic.now += 10
        wall.now += 10
    before.get("a.test")  # now the most recently used
    state = StateFile(tmp_path / snapshot.FILE_NAME)
    assert state.save(before.export())

    after, monotonic2, wall2 = caches()
    monotonic2.now, wall2.now = 77.0, wall.now  # a new boot: monotonic time starts again
    assert after.restore(state.load()) == 3
    # Least recently used first, as before the save.
    assert [r.domain for r in after.export()] == ["b.test", "c.test", "a.test"]
    for domain, level in (("a.test", "verified"), ("b.test", "none"), ("c.test", "dane")):
        state_, entry = after.get(domain)
        assert state_ is State.HIT and entry is not None
        assert entry.level == level and entry.assessment == assessment(domain, level)
        original = before.get(domain)[1]
        assert original is not None
        # The same time left, on the new clock.
        assert entry.fresh_until - monotonic2.now == pytest.approx(
            original.fresh_until - monotonic.now)


def test_expired_entries_are_dropped_at_load_and_stale_ones_kept(tmp_path: Path) -> None:
    before, _monotonic, wall = caches()
    before.put(assessment("fresh.test"))
    before.put(assessment("none.test", "none"))  # fresh 60 s, usable 360 s
    before.put(assessment("unknown.test", "unknown"))  # kept 30 s, never stale
    state = StateFile(tmp_path / snapshot.FILE_NAME)
    assert state.save(before.export())

    after, _monotonic, wall2 = caches()
    wall2.now = wall.now + 100  # tlsmilter was down 100 s
    assert after.restore(state.load()) == 2
    assert after.get("fresh.test")[0] is State.HIT
    assert after.get("none.test")[0] is State.STALE
    assert after.get("unknown.test") == (State.MISS, None)

    later, _monotonic, wall3 = caches()
    wall3.now = wall.now + 1000  # down longer than anything may be served
    assert later.restore(state.load()) == 0
    assert len(later) == 0


def test_export_leaves_out_what_can_no_longer_be_served() -> None:
    cache, monotonic, _wall = caches()
    cache.put(assessment("unknown.test", "unknown"))
    cache.put(assessment("a.test"))
    monotonic.now += 31
    assert [r.domain for r in cache.export()] == ["a.test"]


def test_lifetimes_shortened_in_the_config_apply_to_loaded_entries() -> None:
    shorter = config.CacheSettings(max_entries=10, ttl=60.0, stale_max=30.0)
    cache, monotonic, _wall = caches(shorter)
    assert cache.restore([record("a.test")]) == 1  # saved with 600 s fresh, 900 s usable
    entry = cache.get("a.test")[1]
    assert entry is not None
    assert entry.fresh_until - monotonic.now == pytest.approx(60.0)
    assert entry.usable_until - monotonic.now == pytest.approx(90.0)


def test_a_clock_stepped_back_does_not_stretch_lifetimes() -> None:
    cache, monotonic, _wall = caches()
    assert cache.restore([record("a.test", stored_at=T0 + 3600)]) == 1  # saved "later"
    entry = cache.get("a.test")[1]
    assert entry is not None
    assert entry.fresh_until - monotonic.now == pytest.approx(600.0)


def test_restore_keeps_newer_entries_and_the_size_bound() -> None:
    cache, _monotonic, _wall = caches(config.CacheSettings(max_entries=2))
    cache.put(assessment("a.test", "dane"))
    restored = [record("a.test", "none"), record("b.test"), record("c.test")]
    cache.restore(restored)
    assert len(cache) == 2
    assert cache.get("a.test")[1] is None  # least recently used: went for the bound
    assert cache.get("c.test")[0] is State.HIT


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda data: data[:-7], "checksum mismatch"),
    (lambda data: data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1])
     + data[len(data) // 2 + 1:], "checksum mismatch"),
    (lambda data: b"", "not a tlsmilter snapshot"),
    (lambda data: b"\x80\x04\x95 a pickle, say", "not a tlsmilter snapshot"),
    (lambda data: data[:snapshot._HEADER.size - 1], "not a tlsmilter snapshot"),
])
def test_a_damaged_file_is_set_aside_with_one_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, reason: str) -> None:
    state = StateFile(tmp_path / snapshot.FILE_NAME)
    assert state.save([record("a.test"), record("b.test")])
    assert callable(damage)
    state.path.write_bytes(damage(state.path.read_bytes()))
    with caplog.at_level(logging.INFO, logger="tlsmilter"):
        assert state.load() == []
    (line,) = caplog.records
    assert line.levelno == logging.WARNING and not line.exc_info
    assert reason in line.getMessage() and "set aside as assessments.snapshot.corrupt" in \
        line.getMessage()
    assert not state.path.exists()
    assert (tmp_path / "assessments.snapshot.corrupt").exists()
    assert state.save([record("c.test")])  # the next save starts afresh
    assert [r.domain for r in state.load()] == ["c.test"]


def test_framing_that_disagrees_with_the_header_is_refused() -> None:
    good = snapshot.encode([record("a.test")])
    header = snapshot._HEADER.unpack_from(good)
    body = good[snapshot._HEADER.size:]
    miscounted = snapshot._HEADER.pack(*header[:3], 2, header[4]) + body
    with pytest.raises(SnapshotError, match="1 entries, the header says 2"):
        snapshot.decode(miscounted)
    # An entry whose length runs past the end, with a checksum that matches.
    first = snapshot._ENTRY.unpack_from(body)
    long_body = snapshot._ENTRY.pack(*first[:5], first[5] + 100) + body[snapshot._ENTRY.size:]
    overrun = snapshot._HEADER.pack(*header[:4], zlib.crc32(long_body)) + long_body
    with pytest.raises(SnapshotError, match="runs past the end"):
        snapshot.decode(overrun)


@pytest.mark.parametrize(("field", "value", "reason"), [
    (1, snapshot.VERSION + 1, f"format version {snapshot.VERSION + 1}, this release reads"),
    (2, b"\0" * 8, "packs assessments differently"),
])
def test_a_file_from_another_release_is_set_aside_as_incompatible(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, field: int, value: object,
        reason: str) -> None:
    state = StateFile(tmp_path / snapshot.FILE_NAME)
    data = snapshot.encode([record("a.test")])
    header = list(snapshot._HEADER.unpack_from(data))
    header[field] = value
    state.path.write_bytes(snapshot._HEADER.pack(*header) + data[snapshot._HEADER.size:])
    with caplog.at_level(logging.INFO, logger="tlsmilter"):
        assert state.load() == []
    (line,) = caplog.records
    assert reason in line.getMessage() and "assessments.snapshot.incompatible" in \
        line.getMessage()
    assert (tmp_path / "assessments.snapshot.incompatible").exists()


def test_an_unreadable_file_is_set_aside(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    state = StateFile(tmp_path / snapshot.FILE_NAME)
    state.path.mkdir()  # reading it fails even as root
    with caplog.at_level(logging.INFO, logger="tlsmilter"):
        assert state.load() == []
    assert len(caplog.records) == 1
    assert (tmp_path / "assessments.snapshot.corrupt").is_dir()


def test_no_file_yet_is_an_empty_cache_and_says_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="tlsmilter"):
        assert StateFile(tmp_path / snapshot.FILE_NAME).load() == []
    assert not caplog.records


def test_a_missing_state_dir_is_created(tmp_path: Path) -> None:
    state = StateFile.open(str(tmp_path / "var" / "lib" / "tlsmilter"))
    assert state is not None and state.path.parent.is_dir()
    assert state.save([record("a.test")])
    # Only the snapshot is left behind: no probe file, no temporary file.
    assert [p.name for p in state.path.parent.iterdir()] == [snapshot.FILE_NAME]


def test_a_state_dir_that_cannot_be_written_means_no_persistence(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a-file").write_text("")
    with caplog.at_level(logging.INFO, logger="tlsmilter"):
        assert StateFile.open(str(tmp_path / "a-file" / "tlsmilter")) is None
    (line,) = caplog.records
    assert "is not writable" in line.getMessage() and not line.exc_info


def test_a_failing_save_is_logged_once_until_it_works_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = StateFile(tmp_path / "gone" / snapshot.FILE_NAME)
    with caplog.at_level(logging.INFO, logger="tlsmilter"):
        assert not state.save([record("a.test")])
        assert not state.save([record("a.test")])
        (tmp_path / "gone").mkdir()
        assert state.save([record("a.test")])
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def test_the_embedded_backend_restarts_warm_without_probing_again(tmp_path: Path) -> None:
    settings = config.Config(cache=config.CacheSettings(snapshot_interval=3600.0))
    first = TableProber({"a.test": "dane", "b.test": "none"})
    engine = EmbeddedAssessments(settings, prober=first, state_dir=str(tmp_path))
    engine.start()
    try:
        for domain in ("a.test", "b.test"):
            future = engine.assess(domain)
            assert future is not None
            future.result(timeout=5)
    finally:
        engine.stop()  # saves: the interval is far off
    assert (tmp_path / snapshot.FILE_NAME).exists()

    second = TableProber()
    engine = EmbeddedAssessments(settings, prober=second, state_dir=str(tmp_path))
    engine.start()
    try:
        for domain, level in (("a.test", "dane"), ("b.test", "none")):
            state, entry = engine.lookup(domain)
            assert state is State.HIT and entry is not None and entry.level == level
    finally:
        engine.stop()
    assert second.calls == []


def test_the_embedded_backend_saves_periodically(tmp_path: Path) -> None:
    settings = config.Config(cache=config.CacheSettings(snapshot_interval=0.05))
    engine = EmbeddedAssessments(settings, prober=TableProber({"a.test": "dane"}),
                                 state_dir=str(tmp_path))
    engine.start()
    try:
        future = engine.assess("a.test")
        assert future is not None
        future.result(timeout=5)
        path = tmp_path / snapshot.FILE_NAME
        for _ in range(200):  # up to 10 s on a busy machine
            if path.exists():
                break
            time.sleep(0.05)
        # Read while running: the periodic save, not the one at stop.
        assert [r.domain for r in StateFile(path).load()] == ["a.test"]
    finally:
        engine.stop()
