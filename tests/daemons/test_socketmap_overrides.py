"""The policy server under per-domain overrides (issue 15), over its real socket: the strict
maps (tlsmilter's transports) heed them, the plain map does not, an expired one and a new
configuration (a reload) take effect at the next lookup."""

from __future__ import annotations

import datetime
from pathlib import Path

from tests.daemons.test_socketmap import connect, request, run, serving
from tlsmilter import config
from tlsmilter.core.overrides import Override
from tlsmilter.daemons.policy_server import overrides_of

YESTERDAY = (datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)).isoformat()


def settings(domains: dict[str, dict[str, str]]) -> config.Config:
    return config.from_mapping({"overrides": {"domains": domains}})


def test_answers_under_overrides(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"
    current = [settings({
        "dnssec.test": {"level": "dane", "reason": "ministry wants DANE"},
        "DANE.test.": {"level": "dane", "reason": "met"},
        "enc.test": {"action": "deny", "reason": "contract ended"},
        "none.test": {"action": "deny", "reason": "old", "expires": YESTERDAY}})]

    async def ask(client: object, key: str, name: bytes) -> str:
        await client.send(request(key, name))  # type: ignore[attr-defined]
        return (await client.replies(1))[0].decode()  # type: ignore[attr-defined]

    async def scenario() -> None:
        async with serving(sock, overrides=overrides_of(lambda: current[0])), \
                connect(sock) as client:
            assert await ask(client, "dnssec.test", b"tlspolicy-verified") == (
                "TEMP tlsmilter: dnssec.test is assessed verified now, below the dane its "
                "override requires (ministry wants DANE)")
            assert (await ask(client, "dane.test", b"tlspolicy-verified")).startswith("OK dane")
            assert await ask(client, "enc.test", b"tlspolicy-strict") == (
                "TEMP tlsmilter: sensitive mail to enc.test is denied by override "
                "(contract ended)")
            # The plain map answers all mail: an override is about sensitive mail only.
            assert (await ask(client, "enc.test", b"tlspolicy")).startswith("OK encrypt")
            assert (await ask(client, "dnssec.test", b"tlspolicy")).startswith("OK ")
            # Expired: as without it (none.test has no policy: the strict map's own TEMP).
            assert await ask(client, "none.test", b"tlspolicy-strict") == (
                "TEMP tlsmilter cannot vouch for none.test: assessed none")
            current[0] = settings({})  # what serve's reload does
            assert (await ask(client, "enc.test", b"tlspolicy-strict")).startswith("OK encrypt")

    run(scenario())


def test_overrides_are_built_once_per_configuration() -> None:
    first = settings({"a.test": {"action": "deny", "reason": "r"}})
    current = [first]
    get = overrides_of(lambda: current[0])
    built = get()
    assert isinstance(built["a.test"], Override) and get() is built
    current[0] = settings({})
    assert get() == {}
