"""Benchmark: cache lookups as the milter sees them, memory and Redis backends.

Fills both backends with the same N realistic assessments, then times single lookups of
random cached domains (one at a time, as a milter callback thread does them):

- ``memory``: ``MemoryCache.get`` (lock, LRU bookkeeping, metrics);
- ``redis``: ``RedisCache.get`` (one GET round trip, JSON decode, lifetimes, metrics);
- ``raw GET``: redis-py's ``GET`` of the same keys, the floor any Redis backend stands on.

Redis is a private ``redis-server`` this bench starts on a free loopback port (never the
machine's own). The three are interleaved over several rounds, so a noisy neighbour hits
all of them alike; the ratios against raw GET are the figures to read.

    python -m bench.cache [--domains N] [--lookups K] [--rounds R]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.lab.redis_server import LabRedis
from tlsmilter import config
from tlsmilter.store.base import State
from tlsmilter.store.memory import MemoryCache
from tlsmilter.store.redis.cache import RedisCache


def assessment(domain: str) -> dict[str, Any]:
    """An assessment shaped like a real two-MX ``verified`` one (about 1.5 kB of JSON)."""
    mx = [{"host": f"mx{i}.{domain}", "preference": 10 * i, "addresses": [f"192.0.2.{i}"],
           "starttls": True, "tls_version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
           "pkix_valid": True, "dane": "none", "level": "verified",
           "reasons": [{"code": "cert_valid", "text": "certificate is valid for the MX host "
                                                      "name"}]} for i in (1, 2)]
    return {"domain": domain, "level": "verified", "score": 62, "dnssec": True,
            "mta_sts": None, "tlsrpt": False, "mx": mx, "assessed_at": "2026-11-22T08:00:00Z",
            "duration": 0.4, "reasons": [{"code": "dnssec_mx", "text": "MX records are "
                                          "DNSSEC-signed and validated"}]}


def time_lookups(get: Callable[[str], object], domains: list[str]) -> list[float]:
    samples = []
    clock = time.perf_counter
    for domain in domains:
        started = clock()
        get(domain)
        samples.append(clock() - started)
    return samples


def summary(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return len(samples) / sum(samples), statistics.median(ordered), p99


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=20_000, help="per backend and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="tlsmilter-bench-cache-"))
    server = LabRedis(workdir)
    server.start()
    try:
        settings = config.from_mapping({"cache": {"backend": "redis"},
                                        "redis": {"url": server.url, "prefix": "bench:"}})
        memory = MemoryCache(settings.cache)
        shared = RedisCache(settings)
        raw = redis.Redis.from_url(server.url)
        names = [f"d{i}.bench.test" for i in range(args.domains)]
        for name in names:
            memory.put(assessment(name))
            shared.put(assessment(name))
        assert shared.get(names[0])[0] is State.HIT and memory.get(names[0])[0] is State.HIT
        keys = {name: shared.keys.assessment(name) for name in names}
        runs: dict[str, Callable[[str], object]] = {
            "memory": memory.get,
            "redis": shared.get,
            "raw GET": lambda name: raw.get(keys[name]),
        }
        samples: dict[str, list[float]] = {name: [] for name in runs}
        rng = random.Random(7)
        for _round in range(args.rounds):
            lookups = [rng.choice(names) for _ in range(args.lookups)]
            for name, get in runs.items():
                samples[name] += time_lookups(get, lookups)
        raw.close()
        shared.client.close()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"cache lookups, {args.domains} domains cached, {args.lookups} lookups x "
          f"{args.rounds} rounds per backend, one at a time, interleaved")
    print(f"{'backend':<10} {'lookups/s':>12} {'p50 µs':>9} {'p99 µs':>9}")
    results = {name: summary(values) for name, values in samples.items()}
    for name, (rate, p50, p99) in results.items():
        print(f"{name:<10} {rate:>12,.0f} {p50 * 1e6:>9.1f} {p99 * 1e6:>9.1f}")
    raw_rate, _raw_p50, raw_p99 = results["raw GET"]
    redis_rate, _redis_p50, redis_p99 = results["redis"]
    print(f"redis backend / raw GET: throughput {redis_rate / raw_rate:.2f}x, "
          f"p99 {redis_p99 / raw_p99:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
