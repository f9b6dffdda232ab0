"""daemons.socketmap: the policy server over its socket, with a raw client and with Postfix's
own socketmap client (postmap)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import VERIFY, mx, sts_only
from tlsmilter import metrics
from tlsmilter.core.delivery import PolicyAnswer
from tlsmilter.daemons.netstring import NetstringDecoder, encode_netstring
from tlsmilter.daemons.socketmap import MAX_REPLY, PolicyServer, PolicyServerError

TEST_TIMEOUT = 10.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT))


# --- the server -----------------------------------------------------------------------------


ASSESSMENTS: dict[str, dict[str, Any]] = {
    "dane.test": {"level": "dane", "dnssec": True},
    "enc.test": {"level": "encrypted", "dnssec": False},
    "sts.test": sts_only(mx("mx1.sts.test", "mta-sts"), mx("mx2.sts.test", "mta-sts")),
    "dnssec.test": {"level": "verified", "dnssec": True, "mx": [mx("mx.dnssec.test", "dnssec")]},
    "none.test": {"level": "none", "dnssec": False},
}


def table_lookup(domain: str) -> Mapping[str, Any] | None:
    return ASSESSMENTS.get(domain)


def request(key: str | bytes, name: bytes = b"tlspolicy") -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    return encode_netstring(name + b" " + raw)


class CountedAnswers:
    """The answers the server counted in tlsmilter_policy_lookups_total since creation."""

    def __init__(self) -> None:
        self._before = self._now()

    @staticmethod
    def _now() -> collections.Counter[str]:
        counts: collections.Counter[str] = collections.Counter()
        for answer in PolicyAnswer:
            value = metrics.REGISTRY.get_sample_value(
                "tlsmilter_policy_lookups_total", {"answer": answer.value})
            counts[answer.value] = int(value or 0)
        return counts

    def counts(self) -> collections.Counter[str]:
        return +(self._now() - self._before)


@contextlib.asynccontextmanager
async def serving(path: Path, lookup: Callable[[str], Any] = table_lookup,
                  **kwargs: Any) -> AsyncIterator[PolicyServer]:
    server = PolicyServer(lookup, str(path), **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = NetstringDecoder(MAX_REPLY)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def replies(self, count: int) -> list[bytes]:
        out: list[bytes] = []
        while True:
            while len(out) < count and (frame := self.decoder.next_frame()) is not None:
                out.append(frame)
            if len(out) == count:
                return out
            data = await self.reader.read(4096)
            assert data, f"connection closed after {out}"
            self.decoder.feed(data)

    async def ask(self, key: str | bytes) -> bytes:
        await self.send(request(key))
        return (await self.replies(1))[0]

    async def closed_by_server(self) -> bool:
        return await self.reader.read(4096) == b"" and not self.decoder.pending


@contextlib.asynccontextmanager
async def connect(path: Path) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        yield Client(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def test_pipelined_requests_on_one_connection(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"
    answers = CountedAnswers()

    async def scenario() -> None:
        async with serving(sock), connect(sock) as client:
            keys = ["dane.test", "enc.test", "STS.test.", "dnssec.test", "none.test",
                    "nowhere.test", "[dane.test]", "dane.test:25"]
            await client.send(b"".join(request(k) for k in keys))
            assert await client.replies(len(keys)) == [
                b"OK dane-only",
                b"OK encrypt",
                b"OK secure match=mx1.sts.test:mx2.sts.test servername=hostname",
                b"OK " + VERIFY.encode(),
                b"NOTFOUND ",
                b"NOTFOUND ",
                b"NOTFOUND ",
                b"OK dane-only",
            ]
            # the connection stays usable, and one request may arrive a byte at a time
            for byte in request("enc.test"):
                await client.send(bytes([byte]))
            assert await client.replies(1) == [b"OK encrypt"]

    run(scenario())
    assert answers.counts() == collections.Counter([
        "dane-only", "encrypt", "secure", "verify", "notfound", "notfound",
                       "notfound", "dane-only", "encrypt"])


def test_async_lookup(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"

    async def lookup(domain: str) -> Mapping[str, Any] | None:
        await asyncio.sleep(0)
        return ASSESSMENTS.get(domain)

    async def scenario() -> None:
        async with serving(sock, lookup), connect(sock) as client:
            assert await client.ask("dane.test") == b"OK dane-only"
            assert await client.ask("nowhere.test") == b"NOTFOUND "

    run(scenario())


@pytest.mark.parametrize("garbage", [
    pytest.param(b"x", id="non-digit"),
    pytest.param(b"99999999:", id="too-long"),
    pytest.param(b"4:abcde", id="no-comma"),
    pytest.param(b"\r\n", id="crlf"),
])
def test_malformed_closes_only_that_connection(tmp_path: Path, garbage: bytes) -> None:
    sock = tmp_path / "policy.sock"
    answers = CountedAnswers()

    async def scenario() -> None:
        async with serving(sock), \
                connect(sock) as bad, connect(sock) as good:
            assert await good.ask("dane.test") == b"OK dane-only"
            await bad.send(request("enc.test") + garbage)
            assert await bad.replies(2) == [b"OK encrypt", b"PERM malformed request"]
            assert await bad.closed_by_server()
            assert await good.ask("enc.test") == b"OK encrypt"
            async with connect(sock) as fresh:
                assert await fresh.ask("dane.test") == b"OK dane-only"

    run(scenario())
    assert answers.counts()["perm"] == 1


def test_client_gone_mid_request(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"

    async def scenario() -> None:
        async with serving(sock):
            async with connect(sock) as quitter:
                await quitter.send(b"30:tlspolicy dane")
                quitter.writer.write_eof()
                assert await quitter.closed_by_server()
            async with connect(sock) as client:
                assert await client.ask("dane.test") == b"OK dane-only"

    run(scenario())


def test_request_errors_keep_the_connection(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"
    answers = CountedAnswers()

    async def scenario() -> None:
        async with serving(sock), connect(sock) as client:
            await client.send(request("dane.test", name=b"other")
                              + encode_netstring(b"tlspolicy")
                              + encode_netstring(b"")
                              + request("dane.test", name=b"")
                              + request(b"\xffdane.test")
                              + request("")
                              + request("dane.test"))
            assert await client.replies(7) == [
                b"PERM unknown map other",
                b"PERM malformed request",
                b"PERM malformed request",
                b"PERM unknown map ",
                b"NOTFOUND ",
                b"NOTFOUND ",
                b"OK dane-only",
            ]

    run(scenario())
    assert answers.counts() == collections.Counter(["perm"] * 4 + ["notfound"] * 2 + ["dane-only"])


def test_custom_map_name(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"

    async def scenario() -> None:
        async with serving(sock, map_name="secure"), connect(sock) as client:
            await client.send(request("dane.test", name=b"secure") + request("dane.test"))
            assert await client.replies(2) == [b"OK dane-only", b"PERM unknown map tlspolicy"]

    run(scenario())


def test_strict_map_defers_what_the_plain_map_leaves_to_the_floor(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"
    answers = CountedAnswers()
    ASSESSMENTS["unknown.test"] = {"level": "unknown"}

    async def scenario() -> None:
        async with serving(sock), connect(sock) as client:
            strict = b"tlspolicy-strict"
            await client.send(b"".join(request(key, name=strict) for key in (
                "dane.test", "enc.test", "none.test", "unknown.test", "nowhere.test",
                "[dane.test]")) + request("none.test") + request("nowhere.test"))
            assert await client.replies(8) == [
                b"OK dane-only",
                b"OK encrypt",
                b"TEMP tlsmilter cannot vouch for none.test: assessed none",
                b"TEMP tlsmilter cannot vouch for unknown.test: assessed unknown",
                b"TEMP tlsmilter cannot vouch for nowhere.test: not assessed (again) yet",
                b"NOTFOUND ",  # a [host] next hop was never assessed: not a domain to defer
                b"NOTFOUND ",  # the plain map, as before
                b"NOTFOUND ",
            ]

    try:
        run(scenario())
    finally:
        del ASSESSMENTS["unknown.test"]
    assert answers.counts() == collections.Counter([
        "dane-only", "encrypt", "temp", "temp", "temp", "notfound", "notfound", "notfound"])


def test_each_required_level_has_a_map_that_defers_what_fell_below_it(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"
    answers = CountedAnswers()

    async def scenario() -> None:
        async with serving(sock, map_name="tp"), connect(sock) as client:
            keys = ("dane.test", "dnssec.test", "enc.test", "none.test")
            await client.send(b"".join(request(key, name=f"tp-{level}".encode())
                                       for level in ("encrypted", "verified", "dane")
                                       for key in keys) + request("enc.test", name=b"tp-x"))
            below = "TEMP tlsmilter: {} is assessed {} now, below the {} this message requires"
            vouch = b"TEMP tlsmilter cannot vouch for none.test: assessed none"
            assert await client.replies(13) == [
                b"OK dane-only", b"OK " + VERIFY.encode(), b"OK encrypt", vouch,  # encrypted
                b"OK dane-only", b"OK " + VERIFY.encode(),
                below.format("enc.test", "encrypted", "verified").encode(), vouch,  # verified
                b"OK dane-only", below.format("dnssec.test", "verified", "dane").encode(),
                below.format("enc.test", "encrypted", "dane").encode(), vouch,  # dane
                b"PERM unknown map tp-x",
            ]

    run(scenario())
    assert answers.counts() == collections.Counter(
        ["dane-only"] * 3 + ["verify"] * 2 + ["encrypt"] + ["temp"] * 6 + ["perm"])


def test_lookup_failure_is_temp_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sock = tmp_path / "policy.sock"
    answers = CountedAnswers()

    def broken(domain: str) -> Mapping[str, Any] | None:
        if domain == "dane.test":
            return table_lookup(domain)
        raise ConnectionError("redis down")

    async def scenario() -> None:
        async with serving(sock, broken), connect(sock) as client:
            for _ in range(3):
                assert await client.ask("enc.test") == b"TEMP cache unavailable"
            assert await client.ask("dane.test") == b"OK dane-only"

    with caplog.at_level(logging.DEBUG, logger="tlsmilter.daemons.socketmap"):
        run(scenario())
    assert answers.counts() == collections.Counter(["temp"] * 3 + ["dane-only"])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "redis down" in errors[0].getMessage()


def test_idle_connection_times_out(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"

    async def scenario() -> None:
        async with serving(sock, idle_timeout=0.2), connect(sock) as client:
            assert await client.ask("dane.test") == b"OK dane-only"
            assert await client.closed_by_server()

    run(scenario())


def test_a_busy_connection_outlives_the_idle_timeout(tmp_path: Path) -> None:
    # The one timer per connection is re-armed by every request, not only at the first.
    sock = tmp_path / "policy.sock"

    async def scenario() -> None:
        async with serving(sock, idle_timeout=1.0), connect(sock) as client:
            for _ in range(12):  # 2.4 s, over twice the timeout
                assert await client.ask("dane.test") == b"OK dane-only"
                await asyncio.sleep(0.2)
            assert await client.closed_by_server()

    run(scenario())


def test_a_client_reading_no_replies_is_cut_off(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"

    async def scenario() -> None:
        async with serving(sock, idle_timeout=0.5), connect(sock) as client:
            # Far more replies than the socket buffers hold: the server's drain blocks.
            flood = request("dane.test") * 200_000
            with pytest.raises(OSError):
                await client.send(flood)

    run(scenario())


def test_socket_mode_and_stop_removes_it(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"

    async def scenario() -> None:
        async with serving(sock, mode=0o660):
            st = sock.stat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
        assert not sock.exists()
        assert list(tmp_path.iterdir()) == []  # no temporary name left behind

    run(scenario())


def test_stop_closes_open_connections(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tmp_path / "policy.sock"
    monkeypatch.setattr("tlsmilter.daemons.socketmap.STOP_GRACE", 0.2)
    stuck = asyncio.Event()

    async def lookup(domain: str) -> Mapping[str, Any] | None:
        if domain == "stuck.test":
            stuck.set()
            await asyncio.sleep(3600)
        return ASSESSMENTS.get(domain)

    async def scenario() -> None:
        server = PolicyServer(lookup, str(sock))
        await server.start()
        async with connect(sock) as idle, connect(sock) as waiting:
            assert await idle.ask("dane.test") == b"OK dane-only"
            await waiting.send(request("stuck.test"))
            await stuck.wait()
            await server.stop()
            assert await idle.closed_by_server()
            assert await waiting.closed_by_server()
        assert not sock.exists()
        await server.stop()  # twice is harmless

    with caplog.at_level(logging.DEBUG):
        run(scenario())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(sock))  # a crashed server leaves the file, and nobody listens
    assert stat.S_ISSOCK(sock.lstat().st_mode)

    async def scenario() -> None:
        async with serving(sock), connect(sock) as client:
            assert await client.ask("dane.test") == b"OK dane-only"

    run(scenario())


def test_live_socket_is_not_stolen(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"

    async def scenario() -> None:
        async with serving(sock):
            with pytest.raises(PolicyServerError, match="another server is listening"):
                await PolicyServer(table_lookup, str(sock)).start()
            async with connect(sock) as client:
                assert await client.ask("dane.test") == b"OK dane-only"

    run(scenario())


def test_other_file_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    path.write_text("precious")

    async def scenario() -> None:
        with pytest.raises(PolicyServerError, match="not a socket"):
            await PolicyServer(table_lookup, str(path)).start()

    run(scenario())
    assert path.read_text() == "precious"


def test_stop_leaves_a_successors_socket(tmp_path: Path) -> None:
    sock = tmp_path / "policy.sock"

    async def scenario() -> None:
        server = PolicyServer(table_lookup, str(sock))
        await server.start()
        sock.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.bind(str(sock))
            await server.stop()
            assert sock.exists()

    run(scenario())


# --- Postfix itself as the client -----------------------------------------------------------


def _etc_postfix_snapshot() -> dict[str, tuple[int, int]]:
    root = Path("/etc/postfix")
    if not root.exists():
        return {}
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.mark.skipif(shutil.which("postmap") is None, reason="Postfix's postmap is not installed")
def test_postmap_queries_the_server(tmp_path: Path) -> None:
    """Postfix's own socketmap client, with a private config dir (never /etc/postfix)."""
    config_dir = tmp_path / "postfix"
    config_dir.mkdir()
    (config_dir / "main.cf").write_text("# private config for postmap -c\n")
    sock = tmp_path / "policy.sock"
    table = f"socketmap:unix:{sock}:tlspolicy"
    before = _etc_postfix_snapshot()

    def postmap(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postmap", "-c", str(config_dir), "-q", *args, table],
                              input=stdin, capture_output=True, text=True, check=False,
                              timeout=TEST_TIMEOUT)

    def lookup(domain: str) -> Mapping[str, Any] | None:
        if domain == "broken.test":
            raise ConnectionError("cache down")
        return table_lookup(domain)

    async def scenario() -> None:
        async with serving(sock, lookup):
            dane = await asyncio.to_thread(postmap, "dane.test")
            assert (dane.returncode, dane.stdout) == (0, "dane-only\n")
            sts = await asyncio.to_thread(postmap, "sts.test")
            assert sts.stdout == "secure match=mx1.sts.test:mx2.sts.test servername=hostname\n"
            missing = await asyncio.to_thread(postmap, "nowhere.test")
            assert (missing.returncode, missing.stdout) == (1, "")
            # TEMP: postmap exits 1 as for NOTFOUND, but reports a lookup error
            assert missing.stderr == ""
            temp = await asyncio.to_thread(postmap, "broken.test")
            assert temp.returncode == 1
            assert "query error" in temp.stderr
            # batch mode: many lookups over the one connection Postfix keeps open
            batch = await asyncio.to_thread(
                postmap, "-", stdin="dane.test\nnowhere.test\nenc.test\n[dane.test]\n")
            assert batch.stdout == "dane.test\tdane-only\nenc.test\tencrypt\n"
            # the strict map: a domain it cannot vouch for is a lookup error (Postfix defers)
            strict = await asyncio.to_thread(
                subprocess.run, ["postmap", "-c", str(config_dir), "-q", "none.test",
                                 f"{table}-strict"],
                capture_output=True, text=True, check=False, timeout=TEST_TIMEOUT)
            assert (strict.returncode, strict.stdout) == (1, "")
            assert "query error" in strict.stderr

    run(scenario())
    assert _etc_postfix_snapshot() == before
