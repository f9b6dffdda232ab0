"""Benchmark: saving and loading the embedded cache's snapshot (``store.snapshot``).

Fills a memory cache with N realistic assessments (``bench.cache.assessment``), then, over
several rounds, times what ``serve`` does:

- ``save``: ``MemoryCache.export`` (under the cache's lock: what callbacks may wait on),
  encoding, and the atomic write (temporary file, fsync, rename, directory fsync);
- ``load``: reading and checking the file, and ``MemoryCache.restore`` into an empty cache.

The file goes to a temporary directory in ``--dir`` (default: the system's temporary
directory); give one on the disk /var/lib/tlsmilter is on if /tmp is a tmpfs.

    python -m bench.snapshot [--domains N] [--rounds R] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.cache import assessment
from tlsmilter import config
from tlsmilter.store import snapshot
from tlsmilter.store.memory import MemoryCache
from tlsmilter.store.snapshot import StateFile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    settings = config.CacheSettings(max_entries=args.domains)
    cache = MemoryCache(settings)
    started = time.perf_counter()
    for i in range(args.domains):
        cache.put(assessment(f"d{i}.example"))
    print(f"filled {len(cache)} domains in {time.perf_counter() - started:.1f} s")

    # Wall-clock and CPU seconds: on a busy machine the CPU time is the steadier figure.
    timings: dict[str, list[tuple[float, float]]] = {
        "save (export+write)": [], "  of which export": [], "load (read+restore)": [],
        "  of which restore": []}
    clock, cpu = time.perf_counter, time.process_time
    with tempfile.TemporaryDirectory(prefix="tlsmilter-bench-", dir=args.dir) as tmp:
        state = StateFile(Path(tmp) / snapshot.FILE_NAME)
        for _ in range(args.rounds):
            t0, c0 = clock(), cpu()
            records = cache.export()
            t1, c1 = clock(), cpu()
            assert state.save(records)
            t2, c2 = clock(), cpu()
            loaded = state.load()
            t3, c3 = clock(), cpu()
            added = MemoryCache(settings).restore(loaded)
            t4, c4 = clock(), cpu()
            assert added == args.domains, added
            timings["save (export+write)"].append((t2 - t0, c2 - c0))
            timings["  of which export"].append((t1 - t0, c1 - c0))
            timings["load (read+restore)"].append((t4 - t2, c4 - c2))
            timings["  of which restore"].append((t4 - t3, c4 - c3))
        size = state.path.stat().st_size
    print(f"file: {size / 1e6:.1f} MB, {size / args.domains:.0f} bytes per domain")
    for name, samples in timings.items():
        wall = [w for w, _c in samples]
        print(f"{name:20} wall median {statistics.median(wall):.3f} s (min {min(wall):.3f}, "
              f"max {max(wall):.3f}), CPU median {statistics.median(c for _w, c in samples):.3f}"
              f" s, {args.rounds} rounds")

if __name__ == "__main__":
    main()
