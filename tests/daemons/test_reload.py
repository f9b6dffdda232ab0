"""SIGHUP reloads ``tlsmilter serve``'s configuration: a real process, spoken to over its socket.

The new policy applies from the next message on, on connections opened before the reload
too; an invalid file is refused in one log line and the running configuration stays.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import daemons
from tests.lab.lab import Lab
from tests.lab.milterproto import QUIT, REPLYCODE, Answer, Mail, MilterClient, one_mail, send_mail

pytestmark = pytest.mark.lab

PRIVATE = [("Subject", "Patient file"), ("X-Sensitivity", "private")]


def write(path: Path, lab: Lab, sockets: Path, **overrides: dict[str, Any]) -> Path:
    base = {"milter": {"eom_wait": 8.0}}
    return daemons.write_config(path, lab, sockets, overrides={**base, **overrides})


@pytest.fixture
def milter(lab: Lab, tmp_path: Path) -> Iterator[tuple[daemons.Daemon, Path, str]]:
    config = write(tmp_path / "tlsmilter.toml", lab, tmp_path)
    serve = daemons.serve(config, tmp_path / "tlsmilter.log")
    serve.start()
    try:
        yield serve, config, str(tmp_path / "milter.sock")
    finally:
        serve.stop()  # SIGTERM: must still exit 0 after the reloads


def codes(answer: Answer) -> str:
    """``550 5.7.10``: the reply's codes (a multi-line reply has ``550-`` on each line)."""
    return answer.text[:10].replace("-", " ", 1)


def hup_and_wait(serve: daemons.Daemon, words: str, count: int) -> None:
    serve.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while serve.text().count(words) < count:
        assert serve.process.poll() is None, serve.text()[-3000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, serve.text()[-3000:]
        time.sleep(0.05)


def test_sighup_applies_the_new_policy_to_the_next_message(
        milter: tuple[daemons.Daemon, Path, str], lab: Lab, tmp_path: Path) -> None:
    serve, config, sock = milter
    weak = Mail([f"u@{lab.domain('plain')}"], PRIVATE)
    first = one_mail(sock, weak)
    assert (first.code, codes(first)) == (REPLYCODE, "550 5.7.10"), first

    # A connection opened before the reload, as Postfix keeps one per SMTP session.
    with MilterClient(sock) as early:
        early.negotiate()
        early.connect()
        write(config, lab, tmp_path, **{"policies.private": {"on_insecure": "tempfail"},
                                        "log": {"level": "info"}})
        hup_and_wait(serve, "configuration reloaded", 1)
        on_new = one_mail(sock, weak)
        on_early = send_mail(early, weak)
        early.send(QUIT)
    assert codes(on_new) == codes(on_early) == "450 4.7.10", (on_new, on_early)

    # An invalid file: one line says why, and the running configuration stays.
    write(config, lab, tmp_path, milter={"eom_wait": -1.0})
    hup_and_wait(serve, "configuration not reloaded", 1)
    still = one_mail(sock, weak)
    assert codes(still) == "450 4.7.10", still
    refused = [line for line in serve.text().splitlines() if "not reloaded" in line]
    assert len(refused) == 1, refused
    assert "Traceback" not in serve.text()


def test_repeated_sighups_never_stop_the_milter(milter: tuple[daemons.Daemon, Path, str],
                                                lab: Lab) -> None:
    serve, _config, sock = milter
    for count in range(1, 6):
        hup_and_wait(serve, "configuration reloaded", count)
    for _ in range(20):  # a burst: the reload thread must take each one, not libmilter
        serve.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    time.sleep(1)
    assert serve.process.poll() is None, serve.text()[-3000:]  # type: ignore[union-attr]
    answer = one_mail(sock, Mail([f"u@{lab.domain('plain')}"], PRIVATE))
    assert codes(answer) == "550 5.7.10", answer
