"""Fixtures shared by the whole suite: the loopback lab, Postfix relaying into it, Redis."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.lab import Lab
from tests.lab.postfix import LabPostfix
from tests.lab.redis_server import LabRedis
from tests.lab.scenarios import SCENARIOS


def world_searchable_dir(prefix: str) -> Path:
    """A fresh directory Postfix's unprivileged daemons can traverse (pytest's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """Every standing scenario, up for the whole session (well under a second to start)."""
    if os.geteuid() != 0:
        pytest.fail("the lab needs root: SMTP servers bind port 25 and DNS port 53 on loopback")
    workdir = world_searchable_dir("tlsmilter-lab-")
    try:
        with Lab(workdir, SCENARIOS) as running:
            yield running
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postfix(lab: Lab) -> Iterator[LabPostfix]:
    """A private Postfix relaying to lab domains through the lab resolver, DNSSEC-aware."""
    workdir = world_searchable_dir("tlsmilter-postfix-")
    instance = LabPostfix(workdir, listen=lab.postfix_address, resolver=lab.dns.resolver[0],
                          ca_file=lab.ca.ca_file)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_workdir() -> Iterator[Path]:
    path = world_searchable_dir("tlsmilter-redis-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server(redis_workdir: Path) -> Iterator[LabRedis]:
    """A redis-server of the test module's own, on a free port and a unix socket."""
    instance = LabRedis(redis_workdir / "plain", unix_socket=True)
    instance.start()
    yield instance
    instance.stop()
