"""Benchmark: ``tlsmilter proof`` over a large mail log, against ``grep -c`` on the same file.

Writes a journal-style log (``journalctl -u postfix@- -u tlsmilter -o short-iso``) of about
``--lines`` lines: messages of 9 Postfix lines each (smtpd connect and client, cleanup
Message-ID, qmgr from, the TLS line, the delivery, qmgr removed, smtpd disconnect), every
``--sensitive-every``-th one sensitive (its milter-header-filter line, tlsmilter's decision
line and a policy answer line added), delivered by 20 interleaved smtp processes; every
1000th sensitive message goes out misrouted through ``smtp``. Then, per round, times
``grep -c status=sent`` and ``tlsmilter proof --json`` (a new process, as an operator runs
it; output to /dev/null) on it, checks proof found every sensitive message and flagged
exactly the misrouted ones, and prints the ratio of the two times.

    python -m bench.proof [--lines N] [--sensitive-every K] [--rounds R] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

LINES_PER_MESSAGE = 9
PROCESSES = 20


def write_log(out: TextIO, lines: int, sensitive_every: int) -> tuple[int, int, int]:
    """Write the log; return (lines, sensitive messages, misrouted ones)."""
    start = datetime(2026, 12, 1, tzinfo=UTC)
    written = sensitive = misrouted = 0
    n = 0
    while written < lines:
        n += 1
        stamp = (start + timedelta(seconds=n // 10)).strftime("%Y-%m-%dT%H:%M:%S+0000")
        qid = f"{0x4A0000000 + n:X}"
        pid = 20000 + n % PROCESSES
        domain = f"d{n % 5000}.example"
        mx = f"mx1.{domain}[192.0.2.{n % 250 + 1}]:25"
        is_sensitive = n % sensitive_every == 0
        leak = is_sensitive and (n // sensitive_every) % 1000 == 0
        service = "smtp" if not is_sensitive or leak else "tlsmilter-verified"
        head = f"{stamp} mail postfix"
        block = [
            f"{head}/smtpd[{pid + 100}]: connect from client[198.51.100.7]",
            f"{head}/smtpd[{pid + 100}]: {qid}: client=client[198.51.100.7]",
            f"{head}/cleanup[{pid + 200}]: {qid}: message-id=<{qid}@example.org>",
            f"{head}/qmgr[999]: {qid}: from=<u{n % 300}@example.org>, size=2000, nrcpt=1 "
            "(queue active)",
            f"{head}/{service}/smtp[{pid}]: {'Verified' if service != 'smtp' else 'Trusted'} "
            f"TLS connection established to {mx}: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 "
            "(256/256 bits) key-exchange X25519 server-signature ECDSA (prime256v1) "
            "server-digest SHA256",
            f"{head}/{service}/smtp[{pid}]: {qid}: to=<r{n}@{domain}>, relay={mx}, delay=0.4, "
            "delays=0.1/0.01/0.2/0.09, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X)",
            f"{head}/qmgr[999]: {qid}: removed",
            f"{head}/smtpd[{pid + 100}]: disconnect from client[198.51.100.7] ehlo=1 mail=1 "
            "rcpt=1 data=1 quit=1 commands=5",
            f"{head}/anvil[998]: statistics: max connection rate 1/60s for (smtp:198.51.100.7)",
        ]
        if is_sensitive:
            sensitive += 1
            misrouted += leak
            block[3:3] = [
                f"{head}/cleanup[{pid + 200}]: {qid}: milter-header-filter: header "
                "X-TLSMilter-Route: verified from client[198.51.100.7]; from=<u@example.org> "
                f"to=<r{n}@{domain}> proto=ESMTP helo=<client>: "
                f"{'smtp' if leak else 'tlsmilter-verified'}:",
                f"{stamp} mail tlsmilter[700]: INFO tlsmilter.milter: decision queue_id={qid} "
                "sensitivity=private policy=private require=verified verdict=accept "
                f"domains={domain}:verified failing=- reasons=-",
                f"{stamp} mail tlsmilter[700]: INFO tlsmilter.daemons.socketmap: policy answer "
                f"map=tlspolicy-verified domain={domain} answer=verify"]
        out.write("\n".join(block) + "\n")
        written += len(block)
    return written, sensitive, misrouted


def timed(argv: list[str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall-clock and CPU seconds (user + system) of running ``argv``, and its result."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--sensitive-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlsmilter-bench-", dir=args.dir) as tmp:
        log = Path(tmp) / "mail.log"
        with log.open("w") as out:
            lines, sensitive, misrouted = write_log(out, args.lines, args.sensitive_every)
        size = log.stat().st_size
        print(f"log: {lines} lines, {size / 1e6:.0f} MB, {sensitive} sensitive messages, "
              f"{misrouted} misrouted")
        greps: list[tuple[float, float]] = []
        proofs: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            wall, cpu, done = timed(["grep", "-c", "status=sent", str(log)])
            greps.append((wall, cpu))
            wall, cpu, proof = timed([sys.executable, "-m", "tlsmilter.cli", "proof", "--json",
                                      str(log)])
            proofs.append((wall, cpu))
            records = [json.loads(line) for line in proof.stdout.splitlines()]
            flagged = sum(r["flagged"] for r in records)
            assert proof.returncode == (5 if misrouted else 0), proof.stderr
            assert (len(records), flagged) == (sensitive, misrouted), (len(records), flagged)
            print(f"  grep -c {greps[-1][0]:.2f} s (CPU {greps[-1][1]:.2f} s, "
                  f"{done.stdout.strip()} sent lines), proof {wall:.2f} s (CPU {cpu:.2f} s, "
                  f"{len(records)} records, {flagged} flagged)")
    for name, index in (("wall", 0), ("CPU", 1)):
        grep_s = statistics.median(t[index] for t in greps)
        proof_s = statistics.median(t[index] for t in proofs)
        print(f"median of {args.rounds}, {name}: grep -c {grep_s:.2f} s, proof {proof_s:.2f} s, "
              f"ratio {proof_s / grep_s:.1f}x, proof {lines / proof_s / 1e6:.2f} M lines/s")

if __name__ == "__main__":
    main()
