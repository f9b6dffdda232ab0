"""``tlsmilter proof --follow``: each sensitive delivery judged as its line arrives, printed
and counted in ``tlsmilter_proof_deliveries_total``; memory stays bounded."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import urllib.request

from tests.commands.test_maillog import MX_B, MX_C, V, decision, pf, tls, to
from tlsmilter.commands import proof
from tlsmilter.daemons.proof_follow import Follower

# A verified delivery, then one misrouted through smtp at "may" (Trusted), then normal mail.
LINES = [
    decision("AAAAA1"), tls(V, 10, MX_B), to(V, 10, "AAAAA1", "u@b.example", MX_B),
    pf("qmgr", 2, "AAAAA1: removed"),
    decision("BBBBB2", domains="c.example:verified"), tls("smtp", 12, MX_C, trust="Trusted"),
    to("smtp", 12, "BBBBB2", "w@c.example", MX_C),
    tls("smtp", 12, MX_B), to("smtp", 12, "NORMAL1", "x@b.example", MX_B),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(url: str, deadline: float) -> str:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  # http
                text: str = response.read().decode()
                return text
        except OSError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.1)


def test_follow_prints_and_counts_each_sensitive_delivery_as_it_arrives() -> None:
    listen = f"127.0.0.1:{free_port()}"
    with subprocess.Popen(
            [sys.executable, "-m", "tlsmilter.cli", "proof", "--follow", "--metrics-listen",
             listen], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as follower:
        try:
            assert follower.stdin is not None and follower.stdout is not None
            follower.stdin.writelines(LINES)
            follower.stdin.flush()
            # Printed as each delivery line arrives, while the input is still open.
            first, second = follower.stdout.readline(), follower.stdout.readline()
            assert " AAAAA1 u@b.example require=verified via=tlsmilter-verified tls=Verified " \
                   "TLSv1.3 level=verified ok" in first
            assert second.startswith("!!! ") and " BBBBB2 w@c.example " in second
            assert second.rstrip().endswith("violation; sent encrypted, below the required "
                                            "verified; sent through smtp, not tlsmilter-verified")
            metrics = scrape(f"http://{listen}/metrics", time.monotonic() + 15)
            assert 'tlsmilter_proof_deliveries_total{level="verified",result="ok"} 1.0' \
                in metrics
            assert ('tlsmilter_proof_deliveries_total{level="encrypted",result="violation"} '
                    '1.0' in metrics)
            assert 'tlsmilter_proof_deliveries_total{level="none",result="violation"} 0.0' \
                in metrics
            follower.stdin.close()  # the input ends: so does the follower, cleanly
            assert follower.wait(timeout=15) == 0
            assert follower.stdout.read() == ""  # normal mail is never shown
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()

def test_followed_messages_are_forgotten_once_removed_and_stay_bounded() -> None:
    follower = Follower(io.StringIO(), as_json=True)
    follower.evidence.feed(LINES)
    # AAAAA1 was logged "removed"; the others (no such line here) remain.
    assert sorted(follower.evidence.messages) == ["BBBBB2", "NORMAL1"]
    for n in range(proof.MAX_FOLLOWED + 10):
        follower.evidence.add(pf("qmgr", 2, f"Q{n:09d}: from=<a@x.example>, size=1, nrcpt=1"))
    assert len(follower.evidence.messages) == proof.MAX_FOLLOWED
    assert "BBBBB2" not in follower.evidence.messages  # the oldest went first
