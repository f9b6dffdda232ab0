"""Fixtures shared by the whole suite: the loopback lab and prober settings for it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.lab.lab import Lab
from tests.lab.scenarios import SCENARIOS


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Every standing scenario, up for the whole session (about a second to start)."""
    if os.geteuid() != 0:
        pytest.fail("the lab needs root: SMTP servers bind port 25 and DNS port 53 on loopback")
    with Lab(tmp_path_factory.mktemp("lab"), SCENARIOS) as running:
        yield running
