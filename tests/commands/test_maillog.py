"""The log join of ``tlsmilter proof``, line by line: pure, no Postfix (tests/commands/
test_proof.py runs it on a real Postfix's log). The Postfix lines are copied from the lab's
Postfix 3.7.11 maillog; the 3.10 ones follow docs/postfix.md's table of differences."""

from __future__ import annotations

import argparse
import gzip
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tlsmilter.commands import maillog, proof

HOST = "mail"
TLS = ("{trust} TLS connection {how} to {relay}: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 "
       "(256/256 bits) key-exchange X25519 server-signature ECDSA (prime256v1) server-digest "
       "SHA256")


def pf(program: str, pid: int, text: str, stamp: str = "Dec 02 06:10:24") -> str:
    return f"{stamp} {HOST} postfix/{program}[{pid}]: {text}\n"


def tls(program: str, pid: int, relay: str, trust: str = "Verified",
        how: str = "established") -> str:
    return pf(program, pid, TLS.format(trust=trust, how=how, relay=relay))


def to(program: str, pid: int, qid: str, rcpt: str, relay: str, status: str = "sent",
       conn_use: int = 0, stamp: str = "Dec 02 06:10:24") -> str:
    reuse = f"conn_use={conn_use}, " if conn_use else ""
    return pf(program, pid, f"{qid}: to=<{rcpt}>, relay={relay}, {reuse}delay=0.09, "
                            f"delays=0.04/0.02/0.03/0, dsn=2.0.0, status={status} (250 2.0.0 Ok)",
              stamp)


def decision(qid: str, require: str = "verified", domains: str = "b.example:verified",
             extra: str = "") -> str:
    return (f"INFO tlsmilter.milter: decision queue_id={qid} sensitivity=private "
            f"policy=private require={require} verdict=accept{extra} domains={domains} "
            f"failing=- reasons=-\n")


def answer(domain: str, value: str, map_name: str = "tlspolicy-verified") -> str:
    return f"INFO tlsmilter.daemons.socketmap: policy answer map={map_name} domain={domain} " \
           f"answer={value}\n"


def judged(lines: list[str]) -> dict[str, proof.Message]:
    evidence = proof.Evidence()
    evidence.feed(lines)
    return {m.queue_id: m for m in proof.records(evidence, proof.Selection())}


MX_B = "mx.b.example[192.0.2.2]:25"
MX_C = "mx.c.example[192.0.2.3]:25"
V = "tlsmilter-verified/smtp"


def test_a_second_message_over_a_reused_plaintext_connection_is_not_given_the_first_ones_tls(
) -> None:
    found = judged([
        decision("AAAAA1"), decision("BBBBB2"),
        tls(V, 10, MX_B), to(V, 10, "AAAAA1", "u@b.example", MX_B),
        # The same process, the same relay, the next message: no TLS line of its own.
        to(V, 10, "BBBBB2", "v@b.example", MX_B, conn_use=2),
    ])
    (first,) = found["AAAAA1"].recipients.values()
    (second,) = found["BBBBB2"].recipients.values()
    assert (first.tls, first.delivered_level, first.problems) == ("Verified", "verified", [])
    assert (second.tls, second.problems) == ("none", ["sent in clear"])
    assert proof.flagged(found["BBBBB2"]) and not proof.flagged(found["AAAAA1"])


def test_a_reused_tls_connection_logs_its_own_line_and_keeps_its_tls() -> None:
    found = judged([decision("AAAAA1"), decision("BBBBB2"),
                    tls(V, 10, MX_B), to(V, 10, "AAAAA1", "u@b.example", MX_B),
                    tls(V, 10, MX_B, how="reused"),
                    to(V, 10, "BBBBB2", "v@b.example", MX_B, conn_use=2)])
    assert [r.tls for m in found.values() for r in m.recipients.values()] == ["Verified"] * 2


def test_interleaved_processes_each_get_their_own_tls_line() -> None:
    found = judged([
        decision("AAAAA1"), decision("BBBBB2", domains="c.example:verified"),
        tls(V, 10, MX_B), tls(V, 11, MX_C, trust="Untrusted"),
        to(V, 11, "BBBBB2", "w@c.example", MX_C), to(V, 10, "AAAAA1", "u@b.example", MX_B),
        to(V, 10, "AAAAA1", "u2@b.example", MX_B),  # same transaction, same connection
    ])
    assert [r.tls for r in found["AAAAA1"].recipients.values()] == ["Verified", "Verified"]
    (other,) = found["BBBBB2"].recipients.values()
    assert (other.tls, other.problems) == (
        "Untrusted", ["sent encrypted, below the required verified"])


def test_tls_to_one_mx_does_not_cover_a_delivery_to_another() -> None:
    found = judged([decision("AAAAA1"), tls(V, 10, MX_C), to(V, 10, "AAAAA1", "u@b.example",
                                                              MX_B)])
    assert [r.tls for r in found["AAAAA1"].recipients.values()] == ["none"]


def test_normal_transport_flags_a_misrouted_message_and_skips_normal_mail() -> None:
    found = judged([decision("AAAAA1"), tls("smtp", 12, MX_B, trust="Trusted"),
                    to("smtp", 12, "AAAAA1", "u@b.example", MX_B),
                    tls("smtp", 12, MX_C), to("smtp", 12, "NORMAL1", "x@c.example", MX_C)])
    assert list(found) == ["AAAAA1"]  # no decision line: not a sensitive message
    (rcpt,) = found["AAAAA1"].recipients.values()
    assert rcpt.problems == ["sent encrypted, below the required verified",
                             "sent through smtp, not tlsmilter-verified"]


def test_dane_needs_the_dane_only_policy_or_the_dane_transport() -> None:
    d = "tlsmilter-dane/smtp"
    found = judged([
        decision("AAAAA1", require="dane", domains="b.example:dane"),
        answer("b.example", "dane-only", "tlspolicy-dane"),
        tls(d, 10, MX_B), to(d, 10, "AAAAA1", "u@b.example", MX_B),
        # verified, through the verified transport with a verify policy: not dane
        decision("BBBBB2", require="dane", domains="c.example:dane"),
        answer("c.example", "verify"),
        tls(V, 11, MX_C), to(V, 11, "BBBBB2", "w@c.example", MX_C),
    ])
    (good,) = found["AAAAA1"].recipients.values()
    assert (good.policy, good.delivered_level, good.problems) == ("dane-only", "dane", [])
    (bad,) = found["BBBBB2"].recipients.values()
    assert bad.problems == ["sent verified, below the required dane",
                            "sent through tlsmilter-verified, not tlsmilter-dane"]


def test_below_assessed_but_meeting_the_requirement_is_a_warning_only() -> None:
    found = judged([decision("AAAAA1", domains="b.example:dane"), answer("b.example", "verify"),
                    tls(V, 10, MX_B), to(V, 10, "AAAAA1", "u@b.example", MX_B)])
    (rcpt,) = found["AAAAA1"].recipients.values()
    assert rcpt.problems == [] and rcpt.warnings == [
        "sent verified, below the dane assessed at acceptance"]
    assert not proof.flagged(found["AAAAA1"])


def test_monitor_mode_and_deferrals_are_reported_not_flagged() -> None:
    found = judged([
        decision("AAAAA1", extra=" would_be=reject"),
        to("smtp", 12, "AAAAA1", "u@b.example", MX_B),  # monitor mode: by choice, in clear
        decision("BBBBB2", domains="c.example:verified"),
        pf(V, 11, "BBBBB2: to=<w@c.example>, relay=none, delay=1, delays=1/0/0/0, dsn=4.7.5, "
                  "status=deferred (client TLS configuration problem)"),
    ])
    assert not any(proof.flagged(m) for m in found.values())
    (deferred,) = found["BBBBB2"].recipients.values()
    assert (deferred.status, deferred.reply) == ("deferred", "client TLS configuration problem")


def test_the_policy_answer_is_the_last_one_before_the_delivery() -> None:
    iso = "2026-12-02T06:10:{:02d}+0000"
    found = judged([
        decision("AAAAA1"),
        f"{iso.format(1)} mail tlsmilter[5]: INFO x: " + answer("b.example", "temp").split(": ")[1],
        pf(V, 10, "AAAAA1: to=<u@b.example>, relay=none, delay=1, delays=1/0/0/0, dsn=4.7.5, "
                  "status=deferred (client TLS configuration problem)", iso.format(2)),
        f"{iso.format(3)} mail tlsmilter[5]: INFO x: " + answer("b.example", "verify")
        .split(": ")[1],
        tls(V, 10, MX_B), to(V, 10, "AAAAA1", "u@b.example", MX_B, stamp=iso.format(4)),
        f"{iso.format(5)} mail tlsmilter[5]: INFO x: " + answer("b.example", "temp").split(": ")[1],
    ])
    (rcpt,) = found["AAAAA1"].recipients.values()
    assert (rcpt.policy, rcpt.status, rcpt.attempts) == ("verify", "sent", 2)
    assert rcpt.time == datetime(2026, 12, 2, 6, 10, 4, tzinfo=UTC)


@pytest.mark.parametrize(("stamp", "expected"), [
    ("2026-12-02T06:10:24+0000", datetime(2026, 12, 2, 6, 10, 24, tzinfo=UTC)),
    ("2026-12-02T07:10:24.123456+01:00",
     datetime(2026, 12, 2, 6, 10, 24, 123456, tzinfo=UTC)),
    ("Dec 02 06:10:24", datetime(2026, 12, 2, 6, 10, 24, tzinfo=UTC)),
    ("Dec  2 06:10:24", datetime(2026, 12, 2, 6, 10, 24, tzinfo=UTC)),
    ("Dec 31 23:59:59", datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)),  # last year
    ("yesterday", None),
])
def test_time_stamps(stamp: str, expected: datetime | None) -> None:
    now = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
    assert maillog.parse_time(stamp, now) == expected


def test_lines_of_postfix_3_10() -> None:
    # OpenSSL 3.5 names the group in lower case; a refusal adds "removed (canceled)".
    text = TLS.format(trust="Verified", how="established", relay=MX_B).replace("X25519",
                                                                                "x25519")
    assert maillog.parse_tls(text) == maillog.Tls("Verified", MX_B, "TLSv1.3",
                                                  "TLS_AES_256_GCM_SHA384")
    assert maillog.tls_relay(text) == MX_B
    found = judged([decision("AAAAA1", extra=""), pf("cleanup", 3, "AAAAA1: removed (canceled)")])
    assert found["AAAAA1"].recipients == {}


def test_journal_lines_and_the_syslog_service_name() -> None:
    text = ("2026-12-02T06:10:24+0000 mail postfix/tlsmilter-dane/smtp[3883]: "
            "3ADD52301EB: to=<u2@dane-ee.test>, relay=mx1.dane-ee.test[127.238.10.15]:25, "
            "delay=0.18, delays=0.07/0.03/0.06/0.03, dsn=2.0.0, status=sent (250 2.0.0 Ok)")
    end = text.find("]: ")
    key = maillog.process_key(text, end)
    assert (key, maillog.service(key), maillog.stamp(text, end)) == (
        "mail postfix/tlsmilter-dane/smtp[3883", "tlsmilter-dane", "2026-12-02T06:10:24+0000")
    assert maillog.service("mail postfix/smtp[1") == "smtp"
    qid, rest = maillog.queue_id(text[end + 3:]) or ("", "")
    delivery = maillog.parse_delivery(rest)
    assert qid == "3ADD52301EB" and delivery is not None
    assert (delivery.relay_host, delivery.relay_ip, delivery.status) == (
        "mx1.dane-ee.test", "127.238.10.15", "sent")
    assert maillog.delivery_relay(rest) == "mx1.dane-ee.test[127.238.10.15]:25"


def test_rotated_logs_are_read_oldest_first_gz_included(tmp_path: Path) -> None:
    assert proof.oldest_first(["mail.log", "mail.log.1", "mail.log.3.gz", "mail.log.2.gz"]) == [
        "mail.log.3.gz", "mail.log.2.gz", "mail.log.1", "mail.log"]
    # The TLS line rotated out with the older file; the delivery is in the newer one.
    with gzip.open(tmp_path / "mail.log.1.gz", "wt") as old:
        old.write(decision("AAAAA1") + tls(V, 10, MX_B))
    (tmp_path / "mail.log").write_text(to(V, 10, "AAAAA1", "u@b.example", MX_B))
    args = argparse.Namespace(json=False, csv=True)
    evidence = proof.Evidence()
    evidence.feed(proof.read([str(tmp_path / "mail.log"), str(tmp_path / "mail.log.1.gz")],
                             io.StringIO()))
    out = io.StringIO()
    assert proof.write(proof.records(evidence, proof.Selection()), args, out) == 0
    assert "Verified" in out.getvalue().splitlines()[1]


def test_since_and_until_select_by_time() -> None:
    lines = [decision("AAAAA1"), pf("qmgr", 2, "AAAAA1: from=<a@x.example>, size=1, nrcpt=1 "
                                               "(queue active)", "2026-12-02T06:00:00+0000")]
    evidence = proof.Evidence()
    evidence.feed(lines)
    at = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)
    for since, until, count in [(at, None, 1), (at + timedelta(seconds=1), None, 0),
                                (None, at, 0), (None, at + timedelta(seconds=1), 1)]:
        chosen = list(proof.records(evidence, proof.Selection(since=since, until=until)))
        assert len(chosen) == count, (since, until)
    assert [m.sender for m in proof.records(evidence, proof.Selection(
        senders=frozenset({"a@x.example"})))] == ["a@x.example"]
