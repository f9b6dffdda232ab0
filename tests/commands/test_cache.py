"""``tlsmilter cache``: get, list, flush and stats against a real redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import assessment
from tests.lab.redis_server import LabRedis
from tlsmilter import config
from tlsmilter.store.redis.cache import RedisCache

pytestmark = pytest.mark.lab


def run_cli(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlsmilter.cli", "--config", str(config_file),
                           *args], capture_output=True, text=True, timeout=30, check=False)


def test_cache_command(redis_server: LabRedis, tmp_path: Path) -> None:
    conf = tmp_path / "t.toml"
    conf.write_text(f'[cache]\nbackend = "redis"\n[redis]\nurl = "{redis_server.url}"\n'
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
