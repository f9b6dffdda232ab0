"""Hostile and broken milter conversations against a real ``tlsmilter serve`` (issue 12).

A raw milter-protocol client (tests/lab/milterproto.py) sends each case: hostile addresses,
headers and macros, malformed packets, huge sizes, aborts, commands out of order. After every
case a canary proves the milter still answers correctly (a sensitive message to an insecure
lab domain is refused with 550 5.7.10, an ordinary one accepted). At the end: the process
never stopped, its log has no traceback, and no log line grew with the input.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator

import pytest

from tests.lab import daemons
from tests.lab.lab import Lab
from tests.lab.milterproto import (
    ABORT,
    ACCEPT,
    BODY,
    CONNECT,
    CONTINUE,
    DATA,
    EOH,
    EOM,
    HEADER,
    MAIL,
    OPTNEG,
    QUIT,
    RCPT,
    REPLYCODE,
    Answer,
    Closed,
    Mail,
    MilterClient,
    one_mail,
    rcpt_macros,
    send_mail,
    strings,
)

pytestmark = pytest.mark.lab

TIMEOUT = 2  # milter.timeout for this run: a stalled conversation is dropped after it
PRIVATE = [("Subject", "Patient file"), ("X-Sensitivity", "private")]
ORDINARY = [("Subject", "Lunch")]


@pytest.fixture(scope="module")
def milter(lab: Lab, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[daemons.Daemon, str]]:
    workdir = tmp_path_factory.mktemp("fuzz")
    config = daemons.write_config(workdir / "tlsmilter.toml", lab, workdir, overrides={
        "milter": {"eom_wait": 8.0, "timeout": TIMEOUT}, "log": {"level": "info"}})
    serve = daemons.serve(config, workdir / "tlsmilter.log")
    serve.start()
    try:
        yield serve, str(workdir / "milter.sock")
    finally:
        serve.stop()  # SIGTERM: exits 0, or the test fails


def codes(answer: Answer) -> str:
    return answer.text[:10].replace("-", " ", 1)


def refused(answer: Answer, code: str = "550 5.7.10") -> list[str]:
    """The reply's lines, after checking its code and that every line is safe to send."""
    assert answer.code == REPLYCODE and codes(answer) == code, answer
    lines = answer.text.split("\r\n")
    for line in lines:
        assert line.isascii() and line.isprintable() and len(line) <= 510, line
    return lines


def weak(lab: Lab) -> str:
    return f"u@{lab.domain('plain')}"


def canary(sock: str, lab: Lab) -> None:
    refused(one_mail(sock, Mail([weak(lab)], PRIVATE)))
    assert one_mail(sock, Mail([weak(lab)], ORDINARY)).code == ACCEPT


def session(sock: str) -> MilterClient:
    client = MilterClient(sock)
    client.negotiate()
    client.connect()
    return client


# -- the cases: each sends something hostile and checks the answer it must get --------------


def control_bytes_in_the_address(sock: str, lab: Lab) -> None:
    lines = refused(one_mail(sock, Mail(["u@evil\r\n550 ok.test"], PRIVATE)))
    assert any("evil\\x0d\\x0a550 ok.test: cannot receive" in line for line in lines), lines


def a_60_kb_address(sock: str, lab: Lab) -> None:
    lines = refused(one_mail(sock, Mail(["u@" + "a" * 60_000 + ".test"], PRIVATE)))
    assert any("too long" in line for line in lines), lines


def undecodable_rcpt_addr_macro(sock: str, lab: Lab) -> None:
    mail = Mail(["u@x.test"], PRIVATE, rcpt_addr=[b"u@\xff\xfe.test"])
    lines = refused(one_mail(sock, mail))
    assert any("\\xff\\xfe.test: cannot receive" in line and "UTF-8" in line
               for line in lines), lines
    assert one_mail(sock, Mail(["u@x.test"], ORDINARY, rcpt_addr=[b"u@\xff.test"])).code \
        == ACCEPT


def undecodable_recipient_argument(sock: str, lab: Lab) -> None:
    # The RCPT argument is only read when Postfix sends no {rcpt_addr}: an empty one here.
    refused(one_mail(sock, Mail([b"u@\xc3(.test"], PRIVATE, rcpt_addr=[""])))


def exception_text_never_reaches_the_reply(sock: str, lab: Lab) -> None:
    lines = refused(one_mail(sock, Mail(["u@a\u200d\u0600b.test"], PRIVATE)))
    assert not any("codec" in line or "encoding with" in line for line in lines), lines


def address_literal_and_empty_domain(sock: str, lab: Lab) -> None:
    refused(one_mail(sock, Mail(["u@[192.0.2.1]", "u@", "@"], PRIVATE)))


def five_hundred_bad_recipients(sock: str, lab: Lab) -> None:
    mail = Mail([f"u@bad{i}..test" for i in range(500)], PRIVATE)
    lines = refused(one_mail(sock, mail))
    assert len(lines) <= 32 and "470 more recipient domains" in lines[-1], lines[-2:]


def a_60_kb_sensitivity_value(sock: str, lab: Lab) -> None:
    # An unknown value gets the fail-safe policy (confidential): still refused, with 550.
    # (60 KB: libmilter hangs up on a packet over 64 KB.)
    mail = Mail([weak(lab)], [("X-Sensitivity", "x" * 60_000)], queue_id="4FUZZHUGE")
    lines = refused(one_mail(sock, mail))
    assert "marked 'xxxx" in lines[0] and "...'" in lines[0], lines[0]


def undecodable_header_value(sock: str, lab: Lab) -> None:
    lines = refused(one_mail(sock, Mail([weak(lab)], [("X-Sensitivity", b"private\xff\xfe")])))
    assert "marked 'private\\xff\\xfe'" in lines[0], lines[0]


def crlf_and_percent_in_the_sensitivity_value(sock: str, lab: Lab) -> None:
    lines = refused(one_mail(sock, Mail([weak(lab)], [("X-Sensitivity", "%s%n\r\n.\r\n%")])))
    assert "%%s%%n" in lines[0], lines[0]  # libmilter sends a '%' doubled; Postfix undoes it


def a_thousand_sensitivity_headers(sock: str, lab: Lab) -> None:
    refused(one_mail(sock, Mail([weak(lab)], [("X-Sensitivity", "private")] * 1000)))


def forged_internal_headers(sock: str, lab: Lab) -> None:
    mail = Mail([weak(lab)], [*ORDINARY, ("X-TLSMilter-Route", "dane"),
                              ("X-TLSMilter-Tag", "\x00\xff")])
    assert one_mail(sock, mail).code == ACCEPT


def hostile_queue_id_and_mailer(sock: str, lab: Lab) -> None:
    mail = Mail([weak(lab)], PRIVATE, queue_id=b"4Q ID\r\nverdict=accept \xff")
    refused(one_mail(sock, mail))
    with session(sock) as client:
        client.ask(MAIL, strings("<s@lab.invalid>"))
        client.macros(RCPT, **rcpt_macros(weak(lab), mailer=b"sm\xfftp"))
        client.ask(RCPT, strings(f"<{weak(lab)}>"))
        client.ask(DATA)
        for name, value in PRIVATE:
            client.ask(HEADER, strings(name, value))
        client.ask(EOH)
        refused(client.ask(EOM))


# What libmilter does with a conversation that breaks the protocol is its business: it may
# ignore a command (no answer), or hang up. The milter must not crash, log a traceback, or
# answer the next, well-behaved conversation wrongly (the canary checks that).
BROKEN = (Closed, ConnectionResetError, BrokenPipeError, TimeoutError)


def refused_unless_dropped(client: MilterClient, lab: Lab,
                           before: Callable[[], object] = lambda: None) -> None:
    """After ``before`` broke the protocol: a sensitive message is refused, or libmilter
    ignores or hangs up (no answer within 3 timeouts), never accepted or tempfailed."""
    client.sock.settimeout(3 * TIMEOUT)
    try:
        before()
        answer = send_mail(client, Mail([weak(lab)], PRIVATE))
    except BROKEN:
        return
    refused(answer)


def malformed_macro_packets(sock: str, lab: Lab) -> None:
    for raw in (b"", b"R{rcpt_addr}", b"R\0\0\0", b"R{rcpt_addr}\0\xff\xfe\0{x}\0"):
        with session(sock) as client:
            refused_unless_dropped(client, lab, lambda: client.send(b"D", raw))  # noqa: B023


def truncated_packets_are_dropped_after_the_timeout(sock: str, lab: Lab) -> None:
    for partial in (struct.pack("!I", 100) + b"M<a@b", struct.pack("!I", 0)[:2], b"Z"):
        with session(sock) as client:
            client.send_raw(partial)
            started = time.monotonic()
            with pytest.raises((Closed, ConnectionResetError)):
                client.read()  # libmilter hangs up once milter.timeout passed
            assert time.monotonic() - started < 5 * TIMEOUT


def zero_length_and_huge_packets(sock: str, lab: Lab) -> None:
    for raw in (struct.pack("!I", 0), struct.pack("!I", 0xFFFFFFFF) + b"M",
                struct.pack("!I", 2_000_000) + b"B" + b"x" * 1000):
        with session(sock) as client:
            client.send_raw(raw)
            with pytest.raises((Closed, ConnectionResetError)):
                for _ in range(10):
                    client.read()


def unknown_commands(sock: str, lab: Lab) -> None:
    for command in (b"Z", b"U", b"\0", b"\xff"):
        with session(sock) as client:
            client.send(command, strings("XYZZY"))
            if command == b"U":  # an unknown SMTP command, for the milter to judge
                assert client.read()[0] == CONTINUE
            refused_unless_dropped(client, lab)


def commands_before_negotiation(sock: str, lab: Lab) -> None:
    with MilterClient(sock) as client:  # no OPTNEG, no CONNECT: answered all the same
        refused(send_mail(client, Mail([weak(lab)], PRIVATE)))


def mail_without_connect(sock: str, lab: Lab) -> None:
    with MilterClient(sock) as client:
        client.negotiate()
        refused(send_mail(client, Mail([weak(lab)], PRIVATE)))


def eom_without_a_message(sock: str, lab: Lab) -> None:
    with session(sock) as client:
        client.sock.settimeout(3 * TIMEOUT)
        try:
            answer = client.ask(EOM)
        except BROKEN:
            return
        assert answer.code in (ACCEPT, b"c"), answer  # nothing sensitive: nothing refused


def a_one_megabyte_body(sock: str, lab: Lab) -> None:
    with session(sock) as client:
        client.ask(MAIL, strings("<s@lab.invalid>"))
        client.macros(RCPT, **rcpt_macros(weak(lab)))
        client.ask(RCPT, strings(f"<{weak(lab)}>"))
        client.ask(DATA)
        for name, value in PRIVATE:
            client.ask(HEADER, strings(name, value))
        client.ask(EOH)
        for _ in range(16):
            client.ask(BODY, b"x" * 65_535)
        refused(client.ask(EOM))


def abort_then_another_message(sock: str, lab: Lab) -> None:
    with session(sock) as client:
        client.ask(MAIL, strings("<s@lab.invalid>"))
        client.macros(RCPT, **rcpt_macros("u@[192.0.2.1]"))
        client.ask(RCPT, strings("<u@[192.0.2.1]>"))
        client.send(ABORT)
        # The aborted message's recipient must not leak into the next message.
        assert send_mail(client, Mail([weak(lab)], ORDINARY)).code == ACCEPT
        client.send(ABORT)
        refused(send_mail(client, Mail([weak(lab)], PRIVATE)))


def hang_up_mid_message(sock: str, lab: Lab) -> None:
    client = session(sock)
    client.ask(MAIL, strings("<s@lab.invalid>"))
    client.macros(RCPT, **rcpt_macros(weak(lab)))
    client.send(RCPT, strings(f"<{weak(lab)}>"))
    client.close()
    client = session(sock)
    client.send(QUIT)
    client.close()


def a_second_negotiation_and_connect(sock: str, lab: Lab) -> None:
    with session(sock) as client:
        client.send(OPTNEG, struct.pack("!III", 6, 0x1FF, 0))
        client.send(CONNECT, strings("x") + b"4" + struct.pack("!H", 1) + strings("127.0.0.1"))
        refused_unless_dropped(client, lab)


CASES: list[Callable[[str, Lab], None]] = [
    control_bytes_in_the_address, a_60_kb_address, undecodable_rcpt_addr_macro,
    undecodable_recipient_argument, exception_text_never_reaches_the_reply,
    address_literal_and_empty_domain, five_hundred_bad_recipients, a_60_kb_sensitivity_value,
    undecodable_header_value, crlf_and_percent_in_the_sensitivity_value,
    a_thousand_sensitivity_headers, forged_internal_headers, hostile_queue_id_and_mailer,
    malformed_macro_packets, truncated_packets_are_dropped_after_the_timeout,
    zero_length_and_huge_packets, unknown_commands, commands_before_negotiation,
    mail_without_connect, eom_without_a_message, a_one_megabyte_body,
    abort_then_another_message, hang_up_mid_message, a_second_negotiation_and_connect,
]


def test_warm_up(milter: tuple[daemons.Daemon, str], lab: Lab) -> None:
    canary(milter[1], lab)  # the first canary probes plain.test; the rest find it cached


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_case_then_canary(milter: tuple[daemons.Daemon, str], lab: Lab,
                          case: Callable[[str, Lab], None]) -> None:
    serve, sock = milter
    case(sock, lab)
    canary(sock, lab)
    assert serve.process is not None and serve.process.poll() is None, serve.text()[-3000:]


def test_no_traceback_and_no_flood(milter: tuple[daemons.Daemon, str]) -> None:
    serve, _sock = milter
    text = serve.text()
    assert "Traceback" not in text and "Error" not in text.replace("ERROR", ""), text[-5000:]
    assert max(len(line) for line in text.splitlines()) < 4000  # 500 recipients: omitted=
    huge = [line for line in text.splitlines() if "queue_id=4FUZZHUGE" in line]
    assert huge and all(len(line) < 1000 for line in huge), huge
