"""Assessments survive a restart (issue 13), through the lab's real Postfix.

``serve`` on the memory backend with a state directory is killed with SIGKILL after it
assessed a domain and saved its cache; restarted, it vouches for that domain at once. "No new
probe" is read from the lab MX itself: tlsmilter's prober greets with its own EHLO name, so
its connections are told apart from Postfix's deliveries.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import world_searchable_dir
from tests.daemons.test_e2e import contrib_main, contrib_master, message, send, wait_log
from tests.lab import daemons
from tests.lab.daemons import PROBER_EHLO, Daemon
from tests.lab.lab import Lab
from tests.lab.postfix import MYHOSTNAME, LabPostfix
from tests.lab.smtpd import SmtpServer
from tlsmilter.core import decisionlog
from tlsmilter.store import snapshot

pytestmark = pytest.mark.lab

DOMAIN = "dnssec-ca.test"  # verified, one MX
SNAPSHOT_INTERVAL = 0.5
# Postfix's log of the transports that deliver accepted sensitive mail (contrib's master.cf).
SECURE_SMTP = r"postfix/tlsmilter-[\w-]+/smtp\[\d+\]: .*"


def secure_transports() -> str:
    """The names of those transports, for defer_transports."""
    return " ".join(match.group(1) for line in contrib_master()
                    if (match := re.match(r"(tlsmilter-\S+)\s+unix\s", line)))


@dataclass
class Stack:
    postfix: LabPostfix
    serve: Daemon
    state_dir: Path

    @property
    def state_file(self) -> Path:
        return self.state_dir / snapshot.FILE_NAME


@pytest.fixture(scope="module")
def stack(lab: Lab) -> Iterator[Stack]:
    workdir = world_searchable_dir("tlsmilter-restart-")
    header_checks = workdir / "tlsmilter_header_checks"
    shutil.copy(Path(__file__).resolve().parents[2] / "contrib" / "postfix" /
                "tlsmilter_header_checks", header_checks)
    postfix = LabPostfix(workdir / "postfix", listen=f"{lab.base}.0.61",
                         resolver=lab.dns.resolver[0], ca_file=lab.ca.ca_file,
                         extra_main=contrib_main(header_checks), extra_master=contrib_master())
    sockets = postfix.queue_dir / "tlsmilter"
    sockets.mkdir(parents=True, mode=0o755)
    state_dir = workdir / "state"  # missing: serve creates it
    config = daemons.write_config(
        workdir / "tlsmilter.toml", lab, sockets,
        overrides={"milter": {"skip_domains": [MYHOSTNAME]},
                   "cache": {"state_dir": str(state_dir),
                             "snapshot_interval": SNAPSHOT_INTERVAL}})
    serve = daemons.serve(config, workdir / "tlsmilter.log")
    try:
        serve.start()
        postfix.start()
        yield Stack(postfix, serve, state_dir)
    finally:
        try:
            daemons.stop_all([postfix, serve])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def probes(server: SmtpServer) -> int:
    """Connections tlsmilter's prober made to ``server`` (deliveries greet as Postfix)."""
    return sum(1 for session in server.sessions if session.helo == PROBER_EHLO)


def saved_domains(path: Path) -> set[str]:
    """The domains in the snapshot file now (read only: never sets a file aside)."""
    try:
        return {record.domain for record in snapshot.decode(path.read_bytes())}
    except FileNotFoundError:
        return set()


def accepted_after_retries(postfix: LabPostfix, to: str, subject: str) -> None:
    """Submit until accepted: the first try may be tempfailed while the domain is probed."""
    deadline = time.monotonic() + 30
    while True:
        try:
            send(postfix, message(to, subject, "private"))
            return
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 451, exc
            assert time.monotonic() < deadline, "still tempfailed after the probe budget"
            time.sleep(0.5)


def test_after_kill_9_a_restart_vouches_at_once_with_no_new_probe(
        lab: Lab, stack: Stack) -> None:
    postfix, serve = stack.postfix, stack.serve
    server = lab.server("dnssec-ca")
    delivered = len(server.messages)
    # A warm cache: the domain assessed (and mail delivered to it) before the crash.
    accepted_after_retries(postfix, f"alice@{DOMAIN}", "before the crash")
    server.wait_for_messages(delivered + 1, timeout=30)
    assert probes(server) >= 1
    deadline = time.monotonic() + 30
    while DOMAIN not in saved_domains(stack.state_file):  # the periodic save
        assert time.monotonic() < deadline, "the assessment never reached the snapshot"
        time.sleep(0.1)

    # Accepted, then held by Postfix (as a busy queue would) until serve is gone.
    postfix.postconf(defer_transports=secure_transports())
    try:
        send(postfix, message(f"gina@{DOMAIN}", "queued across the crash", "private"))
        serve.kill()
        postfix.postconf(defer_transports="")
        # With serve down, the enforcing transport's policy lookup fails: deferred.
        wait_log(postfix, rf"{SECURE_SMTP}to=<gina@{re.escape(DOMAIN)}>.*status=deferred",
                 poke=postfix.flush)
    finally:
        postfix.postconf(defer_transports="")
    probed = probes(server)

    serve.start()
    assert serve.said("assessments loaded from"), serve.text()[-3000:]
    # A new sensitive message: accepted on the first try, by the loaded assessment.
    decided = len(serve.decisions())
    send(postfix, message(f"hank@{DOMAIN}", "after the restart", "private"))
    (line,) = serve.decisions()[decided:]
    decision = decisionlog.parse(line)
    assert decision is not None and decision.verdict == "accept", line
    assert decision.levels == {DOMAIN: "verified"}, line
    # The queued message leaves on the next queue run: the policy server has the domain.
    wait_log(postfix, rf"{SECURE_SMTP}to=<gina@{re.escape(DOMAIN)}>.*status=sent",
             poke=postfix.flush)
    received = server.wait_for_messages(delivered + 3, timeout=30)[delivered:]
    assert {r.rcpt_tos for r in received} == {(f"alice@{DOMAIN}",), (f"gina@{DOMAIN}",),
                                              (f"hank@{DOMAIN}",)}
    assert all(r.tls_version == "TLSv1.3" for r in received)
    # Not one probe since the crash: both came from the snapshot.
    assert probes(server) == probed


def test_a_damaged_snapshot_is_set_aside_and_serve_starts_anyway(stack: Stack) -> None:
    serve = stack.serve
    serve.stop()
    stack.state_file.write_bytes(b"\x00 half a file, say after a disk error")
    serve.start()
    assert serve.said("set aside as assessments.snapshot.corrupt"), serve.text()[-3000:]
    assert "Traceback" not in serve.text()
    assert (stack.state_dir / "assessments.snapshot.corrupt").exists()
