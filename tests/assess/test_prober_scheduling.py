"""Per-IP serialisation in the prober, with the network probe replaced (scheduling logic only)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from tlsmilter import config
from tlsmilter.assess import prober as prober_module
from tlsmilter.assess.model import AddressProbe
from tlsmilter.assess.prober import Prober


def test_a_probe_arriving_as_another_is_woken_still_waits(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    active = 0
    most = 0

    async def stand_in(address: str, *_a: Any, **_k: Any) -> tuple[AddressProbe, list[Any]]:
        nonlocal active, most
        active += 1
        most = max(most, active)
        await asyncio.sleep(0.01)
        active -= 1
        return AddressProbe(address), []

    monkeypatch.setattr(prober_module, "probe_address", stand_in)
    settings = config.from_mapping({"prober": {"resolver": "127.0.0.1"}}).prober

    async def run() -> None:
        prober = Prober(settings)

        def probe() -> Any:
            return prober._probe("192.0.2.1", "mx.example", ["mx.example"], [], False,
                                 dt.datetime.now(dt.UTC))

        async def first_then_another() -> None:
            await probe()
            # Starts in the same tick in which the first probe released the lock and woke
            # the waiter below, before that waiter has run.
            await probe()

        await asyncio.gather(first_then_another(), probe())
        assert not prober._ip_locks  # the table empties once the work is done

    asyncio.run(run())
    assert most == 1
