"""``tlsmilter proof`` through the lab's real Postfix: every sensitive recipient shows up with
the relay and the TLS that the lab's SMTP server really saw, and a misrouted message is flagged.

The stack is tests/daemons/test_e2e.py's (contrib's Postfix snippets, ``serve`` as a process),
on the embedded backend only: the log lines proof reads are the same on both.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import world_searchable_dir
from tests.daemons.test_e2e import Milter, contrib_postfix, message, send
from tests.daemons.test_e2e import wait_log as wait_maillog
from tests.lab import daemons
from tests.lab.lab import Lab
from tests.lab.mail import SENDER
from tests.lab.postfix import MYHOSTNAME, LabPostfix
from tests.lab.smtpd import Received

pytestmark = pytest.mark.lab

# Sensitivity -> the level its policy requires, and the transport that level goes through.
SECRET, PRIVATE, PERSONAL = "secret", "private", "personal"
REQUIRED = {SECRET: "dane", PRIVATE: "verified", PERSONAL: "encrypted"}
TRANSPORT = {"dane": "tlsmilter-dane", "verified": "tlsmilter-verified",
             "encrypted": "tlsmilter-secure"}

# One sensitive message per level, each to several lab domains of (at least) that level.
SENSITIVE = {
    SECRET: ["u1@dane-full.test", "u2@dane-ee.test", "u3@dane-ta.test"],
    PRIVATE: ["u4@dnssec-ca.test", "u5@sts-enforce.test", "u6@dane-full.test"],
    PERSONAL: ["u7@ca-unauth.test", "u8@ca-unauth.test", "u9@self-signed.test"],
}
NORMAL = ["n1@plain.test", "n2@dnssec-ca.test"]


@pytest.fixture(scope="module")
def stack(lab: Lab) -> Iterator[tuple[LabPostfix, Milter]]:
    workdir = world_searchable_dir("tlsmilter-proof-")
    postfix, sockets = contrib_postfix(lab, workdir, f"{lab.base}.0.5")
    config = daemons.write_config(workdir / "tlsmilter.toml", lab, sockets, overrides={
        "milter": {"skip_domains": [MYHOSTNAME]},
        "sensitivity.values": {SECRET: SECRET, PRIVATE: PRIVATE, PERSONAL: PERSONAL},
        "policies.secret": {"require": "dane", "on_insecure": "reject",
                            "on_unknown": "tempfail"},
    })
    milter = Milter(daemons.serve(config, workdir / "tlsmilter.log"), [])
    try:
        milter.start()
        postfix.start()
        yield postfix, milter
    finally:
        try:
            daemons.stop_all([postfix, milter])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def proof(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlsmilter.cli", "proof", *args],
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


def logs(postfix: LabPostfix, milter: Milter) -> list[str]:
    return [str(postfix.maillog_file), str(milter.serve.log)]


def records(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def wait_sent(postfix: LabPostfix, rcpts: list[str]) -> str:
    log = ""
    for rcpt in rcpts:
        log = wait_maillog(postfix, rf"to=<{re.escape(rcpt)}>.*status=sent", timeout=60)
    return log


@pytest.fixture(scope="module")
def delivered(lab: Lab, stack: tuple[LabPostfix, Milter]) -> dict[str, list[Received]]:
    """Every message of SENSITIVE and NORMAL sent and delivered; what each server received."""
    postfix, _milter = stack
    before = {name: len(server.messages) for name, server in lab.smtp.items()}
    for sensitivity, rcpts in SENSITIVE.items():
        send(postfix, message(", ".join(rcpts), f"{sensitivity} mail", sensitivity))
    for rcpt in NORMAL:
        send(postfix, message(rcpt, "normal mail", sensitivity=None))
    wait_sent(postfix, [r for rcpts in SENSITIVE.values() for r in rcpts] + NORMAL)
    return {name: list(server.messages[before[name]:]) for name, server in lab.smtp.items()}


def test_proof_reports_every_sensitive_recipient_as_the_servers_saw_it(
        lab: Lab, stack: tuple[LabPostfix, Milter], delivered: dict[str, list[Received]]) -> None:
    postfix, milter = stack
    done = proof("--json", *logs(postfix, milter))
    assert done.returncode == 0, done.stdout + done.stderr
    found = {r["sensitivity"]: r for r in records(done.stdout)}
    assert set(found) == set(SENSITIVE)  # one record per sensitive message, no normal mail
    for sensitivity, rcpts in SENSITIVE.items():
        record = found[sensitivity]
        required = REQUIRED[sensitivity]
        assert (record["verdict"], record["require"], record["flagged"]) == (
            "accept", required, False)
        assert record["route"] == TRANSPORT[required]
        assert record["sender"] == SENDER and record["message_id"]
        by_rcpt = {r["recipient"]: r for r in record["recipients"]}
        assert sorted(by_rcpt) == sorted(rcpts)
        for rcpt, shown in by_rcpt.items():
            domain = rcpt.partition("@")[2]
            # What the lab's server behind the domain's MX received, for this recipient.
            server = lab.server(domain.removesuffix(".test"))
            (seen,) = [m for m in delivered[server.host] if rcpt in m.rcpt_tos]
            assert shown["status"] == "sent" and shown["transport"] == TRANSPORT[required]
            assert (shown["relay"], shown["relay_ip"]) == (server.host, server.address)
            assert shown["tls_version"] == seen.tls_version == "TLSv1.3"
            assert shown["cipher"] == seen.cipher
            assert shown["problems"] == [] and shown["warnings"] == []
            level_rank = ["none", "encrypted", "verified", "dane"].index
            assert level_rank(shown["delivered_level"]) >= level_rank(required)
            assert shown["assessed"] == shown["delivered_level"] or required == "verified"
    # Postfix's own words for each kind of server: a DANE or CA-verified name, a CA chain
    # for an unverifiable name, a self-signed certificate.
    tls = {r["domain"]: (r["tls"], r["policy"]) for record in found.values()
           for r in record["recipients"]}
    assert tls["dane-ee.test"] == tls["dane-ta.test"] == ("Verified", "dane-only")
    assert tls["dnssec-ca.test"] == ("Verified", "verify")
    assert tls["sts-enforce.test"] == ("Verified", "secure")
    assert tls["ca-unauth.test"] == ("Trusted", "encrypt")
    assert tls["self-signed.test"] == ("Untrusted", "encrypt")


def test_proof_selects_by_queue_id_and_sender_and_prints_csv(
        stack: tuple[LabPostfix, Milter], delivered: dict[str, list[Received]]) -> None:
    postfix, milter = stack
    every = records(proof("--json", *logs(postfix, milter)).stdout)
    one = every[0]
    done = proof("--json", "--queue-id", str(one["queue_id"]), *logs(postfix, milter))
    assert [r["queue_id"] for r in records(done.stdout)] == [one["queue_id"]]
    done = proof("--json", "--sender", "nobody@example.org", *logs(postfix, milter))
    assert (done.returncode, done.stdout) == (0, "")
    # The same evidence on standard input, as journalctl would pipe it, as CSV.
    both = "".join(Path(p).read_text() for p in logs(postfix, milter))
    done = proof("--csv", stdin=both)
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert len(rows) == sum(len(rcpts) for rcpts in SENSITIVE.values())
    assert {row["tls"] for row in rows} == {"Verified", "Trusted", "Untrusted"}


def test_a_deferral_and_the_retry_that_delivers_are_one_record(
        lab: Lab, stack: tuple[LabPostfix, Milter], delivered: dict[str, list[Received]]) -> None:
    # tlsmilter restarts between acceptance and delivery: the policy server cannot vouch for
    # the domain (TEMP), Postfix defers; the lookup had it assessed again, the retry delivers.
    postfix, milter = stack
    postfix.postconf(defer_transports=TRANSPORT["verified"])
    try:
        send(postfix, message("retry@dnssec-ca.test", "deferred once", PRIVATE))
        milter.serve.stop()
        milter.serve.start()
        postfix.postconf(defer_transports="")
        wait_maillog(postfix, r"to=<retry@dnssec-ca\.test>.*status=deferred", poke=postfix.flush)
        log = wait_maillog(postfix, r"to=<retry@dnssec-ca\.test>.*status=sent",
                           poke=postfix.flush)
    finally:
        postfix.postconf(defer_transports="")
    (qid,) = re.findall(r" (\w+): to=<retry@dnssec-ca\.test>.*status=sent", log)
    done = proof("--json", "--queue-id", qid, *logs(postfix, milter))
    assert done.returncode == 0, done.stdout + done.stderr
    ((rcpt,),) = [r["recipients"] for r in records(done.stdout)]
    assert (rcpt["status"], rcpt["tls"], rcpt["policy"]) == ("sent", "Verified", "verify")
    assert rcpt["attempts"] >= 2
    # What the deferral looked like, as docs/postfix.md and docs/proof.md quote it.
    assert re.search(r"tlsmilter-verified/smtp\[\d+\]: warning: socketmap:unix:tlsmilter/"
                     r"policy\.sock:tlspolicy-verified socketmap server temporary error: "
                     r"tlsmilter cannot vouch for dnssec-ca\.test: not assessed \(again\) yet",
                     log), log[-3000:]
    assert re.search(r"warning: TLS policy lookup for dnssec-ca\.test/mx1\.dnssec-ca\.test: "
                     r"client TLS configuration problem", log)
    assert re.search(rf"{qid}: to=<retry@dnssec-ca\.test>, .*status=deferred \(client TLS "
                     r"configuration problem\)", log)
    assert "policy answer map=tlspolicy-verified domain=dnssec-ca.test answer=temp " \
           "reason=tlsmilter cannot vouch for dnssec-ca.test: not assessed (again) yet" \
           in milter.serve.text()
    Path("/tmp/proof-maillog.txt").write_text(log)
    Path("/tmp/proof-tlsmilter.txt").write_text(milter.serve.text())


def test_a_reused_tls_connection_is_reported_with_its_tls(
        lab: Lab, stack: tuple[LabPostfix, Milter], delivered: dict[str, list[Received]]) -> None:
    # tlsmilter-secure keeps its TLS connections for reuse (through tlsproxy), one delivery
    # at a time per destination: the later messages to ca-unauth.test go over the first
    # one's connection, logged "TLS connection reused" and conn_use=2, 3.
    postfix, milter = stack
    one_at_a_time = "tlsmilter-secure_destination_concurrency_limit"
    master = ["-c", str(postfix.config_dir)]
    subprocess.run(["postconf", *master, "-M",
                    "tlsproxy/unix=tlsproxy unix - - n - 0 tlsproxy"], check=True)
    subprocess.run(["postconf", *master, "-P",
                    "tlsmilter-secure/unix/smtp_tls_connection_reuse=yes"], check=True)
    postfix.postconf(smtp_connection_cache_destinations="ca-unauth.test",
                     defer_transports=TRANSPORT["encrypted"], **{one_at_a_time: "1"})
    try:
        for n in (1, 2, 3):
            send(postfix, message(f"reuse{n}@ca-unauth.test", f"reuse {n}", PERSONAL))
        postfix.postconf(defer_transports="")
        log = wait_sent(postfix, ["reuse1@ca-unauth.test", "reuse2@ca-unauth.test",
                                  "reuse3@ca-unauth.test"])
    finally:
        postfix.postconf(defer_transports="", smtp_connection_cache_destinations="",
                         **{one_at_a_time: "$default_destination_concurrency_limit"})
        subprocess.run(["postconf", *master, "-PX",
                        "tlsmilter-secure/unix/smtp_tls_connection_reuse"], check=True)
    assert re.search(r"tlsmilter-secure/smtp\[\d+\]: Trusted TLS connection reused to "
                     r"mx1\.ca-unauth\.test", log), log[-3000:]
    assert re.search(r"to=<reuse\d@ca-unauth\.test>, relay=\S+, conn_use=2, ", log)
    done = proof("--json", *logs(postfix, milter))
    found = [(r["tls"], r["tls_version"], r["problems"]) for record in records(done.stdout)
             for r in record["recipients"] if r["recipient"].startswith("reuse")]
    assert found == [("Trusted", "TLSv1.3", [])] * 3


def test_a_misrouted_sensitive_message_is_flagged_and_fails_the_proof(
        lab: Lab, stack: tuple[LabPostfix, Milter], delivered: dict[str, list[Received]]) -> None:
    # The postmaster forgot milter_header_checks: accepted sensitive mail leaves through the
    # normal smtp transport at "may". tlsmilter accepted it; only the proof can tell.
    postfix, milter = stack
    server = lab.server("dnssec-ca")
    before = len(server.messages)
    postfix.postconf(milter_header_checks="")
    try:
        send(postfix, message("leak@dnssec-ca.test", "misrouted", PRIVATE))
        wait_sent(postfix, ["leak@dnssec-ca.test"])
    finally:
        table = postfix.workdir.parent / "tlsmilter_header_checks"
        postfix.postconf(milter_header_checks=f"regexp:{table}")
    (seen,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    done = proof("--json", *logs(postfix, milter))
    assert done.returncode == 5, done.stdout + done.stderr
    (leak,) = [r for r in records(done.stdout)
               if any(x["recipient"] == "leak@dnssec-ca.test" for x in r["recipients"])]
    assert leak["flagged"] is True and leak["route"] is None
    (rcpt,) = leak["recipients"]
    assert (rcpt["transport"], rcpt["tls"], rcpt["tls_version"]) == (
        "smtp", "Trusted", seen.tls_version)
    assert rcpt["problems"] == ["sent encrypted, below the required verified",
                                "sent through smtp, not tlsmilter-verified"]
    # Only that record is flagged; the table says so loudly.
    assert sum(r["flagged"] for r in records(done.stdout)) == 1
    table = proof(*logs(postfix, milter))
    assert table.returncode == 5
    assert "!!! VIOLATION" in table.stdout and "VIOLATIONS FOUND" in table.stdout
