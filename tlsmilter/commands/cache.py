"""``tlsmilter cache get | list | flush | stats``: look into the shared Redis cache."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from tlsmilter import config
from tlsmilter.core.domains import InvalidDomain, normalize_domain
from tlsmilter.errors import TlsmilterError, UsageError
from tlsmilter.store.base import Entry, freshness
from tlsmilter.store.redis.cache import RedisCache


def run_cache_command(settings: config.Config, args: argparse.Namespace) -> int:
    if settings.cache.backend is not config.CacheBackend.REDIS:
        raise TlsmilterError('cache needs cache.backend = "redis": the embedded cache lives '
                             "inside the tlsmilter serve process (restart it to empty it)")
    cache = RedisCache(settings)
    try:
        return _COMMANDS[args.cache_command](cache, args)
    finally:
        cache.client.close()


def _domain(text: str) -> str:
    try:
        return normalize_domain(text)
    except InvalidDomain as exc:
        raise UsageError(f"{text!r}: {exc}") from None


def _line(domain: str, entry: Entry, now: float) -> str:
    state = freshness(entry, now).value
    age = _duration(now - entry.stored_at)
    expires = entry.fresh_until - now
    when = (f"fresh for {_duration(expires)}" if expires > 0
            else f"expired {_duration(-expires)} ago")
    score = entry.assessment.get("score", "-")
    return f"{domain}  {entry.level}  score {score}  {state}  assessed {age} ago, {when}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _get(cache: RedisCache, args: argparse.Namespace) -> int:
    domain = _domain(args.domain)
    _state, entry = cache.get(domain)
    if entry is None:
        print(f"{domain}: not cached")
        return 1
    if args.json:
        print(json.dumps(entry.assessment, sort_keys=True))
    else:
        print(_line(domain, entry, cache.now()))
        for reason in entry.assessment.get("reasons", []):
            print(f"  {reason.get('code')}: {reason.get('text')}")
    return 0


def _list(cache: RedisCache, args: argparse.Namespace) -> int:
    now = cache.now()
    for domain, entry in sorted(cache.items()):
        if args.json:
            print(json.dumps({"domain": domain, "level": entry.level,
                              "score": entry.assessment.get("score"),
                              "state": freshness(entry, now).value,
                              "stored_at": _iso(entry.stored_at),
                              "fresh_until": _iso(entry.fresh_until)}, sort_keys=True))
        else:
            print(_line(domain, entry, now))
    return 0


def _iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")


def _flush(cache: RedisCache, args: argparse.Namespace) -> int:
    if args.domain is None:
        print(f"flushed {cache.flush()} cached assessment(s)")
        return 0
    domain = _domain(args.domain)
    removed = cache.flush(domain)
    print(f"{domain}: {'flushed' if removed else 'was not cached'}")
    return 0


def _stats(cache: RedisCache, args: argparse.Namespace) -> int:
    stats = cache.stats()
    print(f"entries: {stats.entries}")
    for level in ("dane", "verified", "encrypted", "none", "unknown"):
        print(f"  {level}: {stats.levels.get(level, 0)}")
    print(f"probe queue: {stats.queue_length} (dropped when full: {stats.overflow})")
    print(f"probes running: {stats.probing}")
    print(f"workers known to the queue: {stats.workers}")
    return 0


_COMMANDS = {"get": _get, "list": _list, "flush": _flush, "stats": _stats}
