"""``tlsmilter proof --follow``: the proof, live, as it happens, and as Prometheus metrics.

Reads a growing log on standard input, e.g.::

    journalctl -f -n 0 -u postfix@- -u tlsmilter -o short-iso | tlsmilter proof --follow

and, for each delivery of a sensitive message that Postfix logs as sent, judges it at once
(``commands.proof``), prints it (one line, or one JSON object with ``--json``) and counts it
in ``tlsmilter_proof_deliveries_total{level, result}``. A ``violation`` there is what the
``TlsmilterSensitiveMailBelowItsLevel`` alert fires on. The decision line must come before
the delivery, as it does in one journal stream. Memory stays bounded: a message is dropped
when Postfix logs it ``removed``, and at most ``proof.MAX_FOLLOWED`` are kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TextIO

from tlsmilter import metrics
from tlsmilter.commands import maillog, proof
from tlsmilter.daemons import instrument

log = logging.getLogger(__name__)


class Follower:
    """Judges each sensitive delivery as its line arrives; prints and counts it."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.evidence = proof.Evidence(on_delivery=self.delivered)

    def delivered(self, message: proof.Message) -> None:
        self.evidence.resolve(message)
        proof.judge(message, self.evidence)
        service, _stamp, tail, _tls = message.deliveries[-1]
        parsed = maillog.parse_delivery(tail)
        rcpt = message.recipients.get(parsed.recipient) if parsed else None
        if rcpt is None or rcpt.status != "sent":
            return
        found = proof.result(message, rcpt)
        metrics.PROOF_DELIVERIES.labels(level=rcpt.delivered_level, result=found.value).inc()
        if self.as_json:
            record = proof.to_json(message)
            record["recipients"] = [r for r in record["recipients"]
                                    if r["recipient"] == rcpt.recipient]
            self.out.write(json.dumps(record, sort_keys=True) + "\n")
        else:
            mark = "!!! " if found is proof.ProofResult.VIOLATION else ""
            when = rcpt.time.isoformat() if rcpt.time else "-"
            require = message.decision.require if message.decision else "-"
            notes = "".join(f"; {note}" for note in [*rcpt.problems, *rcpt.warnings])
            self.out.write(f"{mark}{when} {message.queue_id} {rcpt.recipient} "
                           f"require={require} via={service} tls={rcpt.tls} "
                           f"{rcpt.tls_version} level={rcpt.delivered_level} "
                           f"{found.value}{notes}\n")
        self.out.flush()


def run_follow(args: argparse.Namespace, lines: TextIO | None = None) -> int:
    """Follow ``lines`` (standard input) until it ends; serve metrics meanwhile."""
    instrument.init_labels()
    stop = instrument.start_metrics_server(args.metrics_listen or "")
    follower = Follower(sys.stdout, args.json)
    try:
        follower.evidence.feed(lines if lines is not None else sys.stdin)
    except KeyboardInterrupt:
        pass
    finally:
        if stop is not None:
            stop()
    return 0
