"""The MTA side of the milter protocol, for load: one message per milter connection.

Built on the PyPI ``miltertest`` package (its codec and buffered connection), plus what a
load test needs and it leaves out: like Postfix, it offers every protocol step, then skips
the steps the milter declined at negotiation and waits for no reply where the milter asked
for none. pymilter declines the callbacks a milter does not override, so tlsmilter and the
null milter get exactly the conversation Postfix would give them.

One message is one connection (option negotiation, CONNECT, HELO, MAIL, RCPT per recipient,
DATA, headers, EOH, BODY, EOM, QUIT), as Postfix does for an SMTP session that carries one
message; macros are the ones tlsmilter reads ({rcpt_mailer} at RCPT, i at EOM) and a few
Postfix always sends.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from miltertest import client as mt
from miltertest import constants as c

CONNECT_MACROS = {"j": "postfix.lab.invalid", "{daemon_name}": "smtpd", "v": "Postfix 3.7",
                  "_": "client.lab.invalid [127.0.0.1]", "{client_addr}": "127.0.0.1"}
# Every step pymilter might decline: (protocol bit that skips it, bit that drops its reply).
STEPS = {
    c.SMFIC_CONNECT: (c.SMFIP_NOCONNECT, c.SMFIP_NR_CONN),
    c.SMFIC_HELO: (c.SMFIP_NOHELO, c.SMFIP_NR_HELO),
    c.SMFIC_MAIL: (c.SMFIP_NOMAIL, c.SMFIP_NR_MAIL),
    c.SMFIC_RCPT: (c.SMFIP_NORCPT, c.SMFIP_NR_RCPT),
    c.SMFIC_DATA: (c.SMFIP_NODATA, c.SMFIP_NR_DATA),
    c.SMFIC_HEADER: (c.SMFIP_NOHDRS, c.SMFIP_NR_HDR),
    c.SMFIC_EOH: (c.SMFIP_NOEOH, c.SMFIP_NR_EOH),
    c.SMFIC_BODY: (c.SMFIP_NOBODY, c.SMFIP_NR_BODY),
}


@dataclass(frozen=True)
class Message:
    recipients: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes = b"La de da de da 1.\r\nLa de da de da 2.\r\n"
    sender: str = "sender@postfix.lab.invalid"


@dataclass
class Outcome:
    """What the milter answered at end-of-message."""

    reply: str  # the final SMFIR_* code: "a" accept, "c" continue, "r" reject, ...
    added: list[str] = field(default_factory=list)  # names of headers it added
    changed: int = 0  # header changes and deletions


class UnexpectedReply(Exception):
    pass


class Conversation:
    """One milter connection speaking for one SMTP session."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.conn = mt.MilterConnection(self.sock)
        # Postfix offers every step; the milter answers with the ones to skip.
        _actions, self.protocol = self.conn.optneg_mta(strict=False)

    def close(self) -> None:
        try:
            self.conn._send(c.SMFIC_QUIT)
        finally:
            self.sock.close()

    def _step(self, cmd: str, **args: object) -> None:
        skip, no_reply = STEPS[cmd]
        if self.protocol & skip:
            return
        if self.protocol & no_reply:
            self.conn._send(cmd, **args)
            return
        reply = self.conn.send_get(cmd, **args)
        if reply[0] != c.SMFIR_CONTINUE:
            raise UnexpectedReply(f"{cmd!r}: milter answered {reply!r}")

    def _macros(self, cmd: str, **values: str) -> None:
        skip, _no_reply = STEPS.get(cmd, (0, 0))
        if not self.protocol & skip:
            self.conn.send_macro(cmd, **values)

    def session(self, queue_id: str, message: Message) -> Outcome:
        self._macros(c.SMFIC_CONNECT, **CONNECT_MACROS)
        self._step(c.SMFIC_CONNECT, hostname="client.lab.invalid", family=c.SMFIA_INET,
                   port=40000, address="127.0.0.1")
        self._macros(c.SMFIC_HELO, **{"{tls_version}": ""})
        self._step(c.SMFIC_HELO, helo="client.lab.invalid")
        self._macros(c.SMFIC_MAIL, **{"{mail_addr}": message.sender})
        self._step(c.SMFIC_MAIL, args=[f"<{message.sender}>"])
        for rcpt in message.recipients:
            host = rcpt.rpartition("@")[2]
            self._macros(c.SMFIC_RCPT, **{"{rcpt_addr}": rcpt, "{rcpt_host}": host,
                                         "{rcpt_mailer}": "smtp"})
            self._step(c.SMFIC_RCPT, args=[f"<{rcpt}>"])
        self._macros(c.SMFIC_DATA, i=queue_id)
        self._step(c.SMFIC_DATA)
        for name, value in message.headers:
            self._step(c.SMFIC_HEADER, name=name, value=value)
        self._step(c.SMFIC_EOH)
        self._step(c.SMFIC_BODY, buf=message.body)
        self.conn.send_macro(c.SMFIC_BODYEOB, i=queue_id)
        outcome = Outcome("")
        for cmd, args in self.conn.send_eom():
            if cmd == c.SMFIR_ADDHEADER:
                outcome.added.append(args["name"])
            elif cmd == c.SMFIR_CHGHEADER:
                outcome.changed += 1
            elif cmd in mt.DISPOSITION_REPLIES:
                outcome.reply = cmd
        return outcome


def one_message(path: str, queue_id: str, message: Message) -> tuple[float, Outcome]:
    """Seconds from connect to the end-of-message reply, and the milter's answer."""
    started = time.perf_counter()
    conversation = Conversation(path)
    try:
        outcome = conversation.session(queue_id, message)
        seconds = time.perf_counter() - started
    finally:
        conversation.close()
    return seconds, outcome


def load_worker(path: str, messages: list[Message], start: Any,
                ) -> tuple[float, float, list[float], Counter[str]]:
    """One connection's share of a load run (in a process of its own): wait for ``start``,
    send ``messages`` one after another; return start and end times, latencies and answers.
    """
    start.wait()
    latencies: list[float] = []
    answers: Counter[str] = Counter()
    began = time.perf_counter()
    for index, message in enumerate(messages):
        seconds, outcome = one_message(path, f"B{os.getpid():X}{index:X}", message)
        latencies.append(seconds)
        routed = "X-TLSMilter-Route" in outcome.added
        answers[f"{outcome.reply}{'+route' if routed else ''}"] += 1
    return began, time.perf_counter(), latencies, answers
