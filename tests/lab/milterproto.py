"""The MTA side of the milter protocol, byte by byte: any packet, well-formed or not.

Not pymilter's TestCtx (which calls the Python callbacks directly) and not the ``miltertest``
package (which only builds valid packets): this writes exactly the bytes a test asks for to
a real libmilter, so hostile and broken conversations can be tried as an attacker would.
A packet is a 4-byte big-endian length, a command byte, then the command's data.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

VERSION = 6
ALL_ACTIONS = 0x1FF
# Offer no protocol options: the milter can skip no step and must answer every command.
# (libmilter takes packets up to 64 KB; a longer one makes it hang up.)
NO_OPTIONS = 0

# Commands (MTA to milter) and replies (milter to MTA), from libmilter's mfdef.h.
OPTNEG, MACRO, CONNECT, HELO, MAIL, RCPT, DATA = b"O", b"D", b"C", b"H", b"M", b"R", b"T"
HEADER, EOH, BODY, EOM, ABORT, QUIT, UNKNOWN = b"L", b"N", b"B", b"E", b"A", b"Q", b"U"
CONTINUE, ACCEPT, REJECT, TEMPFAIL, REPLYCODE = b"c", b"a", b"r", b"t", b"y"
ADDHEADER, CHGHEADER, QUARANTINE, PROGRESS, DISCARD = b"h", b"m", b"q", b"p", b"d"
FINAL = {ACCEPT, REJECT, TEMPFAIL, REPLYCODE, DISCARD, CONTINUE}


class Closed(Exception):
    """The milter closed the connection."""


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(command) + len(data)) + command + data


def strings(*values: str | bytes) -> bytes:
    """NUL-terminated strings, as the protocol carries names, values and arguments."""
    return b"".join((v if isinstance(v, bytes) else v.encode()) + b"\0" for v in values)


@dataclass
class Answer:
    """What the milter sent back for one command."""

    code: bytes  # the last reply's command byte
    text: str = ""  # SMFIR_REPLYCODE's text, e.g. "550 5.7.10 ..."
    added: list[tuple[str, str]] = field(default_factory=list)  # headers added
    quarantined: str | None = None


class MilterClient:
    """One connection to a milter's unix socket."""

    def __init__(self, path: str, timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, command: bytes, data: bytes = b"") -> None:
        self.send_raw(packet(command, data))

    def read(self) -> tuple[bytes, bytes]:
        """One reply: its command byte and data."""
        (length,) = struct.unpack("!I", self._exactly(4))
        body = self._exactly(length)
        return body[:1], body[1:]

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise Closed
            data += chunk
        return data

    def ask(self, command: bytes, data: bytes = b"") -> Answer:
        """Send a command and read replies up to its final one (EOM sends several)."""
        self.send(command, data)
        answer = Answer(b"")
        while True:
            code, body = self.read()
            if code == ADDHEADER:
                name, value, _ = body.split(b"\0", 2)
                answer.added.append((name.decode(), value.decode()))
            elif code == QUARANTINE:
                answer.quarantined = body.rstrip(b"\0").decode()
            elif code == REPLYCODE:
                answer.code, answer.text = code, body.rstrip(b"\0").decode()
                return answer
            elif code in FINAL:
                answer.code = code
                return answer
            # PROGRESS, CHGHEADER and the like: keep reading

    def negotiate(self, protocol: int = NO_OPTIONS) -> tuple[int, int]:
        self.send(OPTNEG, struct.pack("!III", VERSION, ALL_ACTIONS, protocol))
        code, body = self.read()
        assert code == OPTNEG, (code, body)
        _version, actions, proto = struct.unpack("!III", body[:12])
        return actions, proto

    def macros(self, stage: bytes, **values: str | bytes) -> None:
        self.send(MACRO, stage + strings(*(x for kv in values.items() for x in kv)))

    def connect(self) -> Answer:
        self.macros(CONNECT, j="mta.lab.invalid", **{"{daemon_name}": "smtpd"})
        return self.ask(CONNECT, strings("client.lab.invalid") + b"4"
                        + struct.pack("!H", 40000) + strings("127.0.0.1"))


def rcpt_macros(address: str | bytes, mailer: str = "smtp") -> dict[str, str | bytes]:
    return {"{rcpt_addr}": address, "{rcpt_mailer}": mailer}


@dataclass
class Mail:
    """One message as an MTA would send it; any field may hold hostile bytes."""

    recipients: list[str | bytes]
    headers: list[tuple[str | bytes, str | bytes]]
    queue_id: str | bytes = "4FUZZ1"
    sender: str | bytes = "sender@lab.invalid"
    body: bytes = b"Hello.\r\n"
    rcpt_addr: list[str | bytes] | None = None  # {rcpt_addr} per recipient; None: the same


def send_mail(client: MilterClient, mail: Mail) -> Answer:
    """MAIL to EOM on an open, negotiated, connected session; the end-of-message answer."""
    client.ask(MAIL, strings(b"<" + _b(mail.sender) + b">"))
    addrs = mail.rcpt_addr or mail.recipients
    for rcpt, addr in zip(mail.recipients, addrs, strict=True):
        client.macros(RCPT, **rcpt_macros(addr))
        client.ask(RCPT, strings(b"<" + _b(rcpt) + b">"))
    client.macros(DATA, i=mail.queue_id)
    client.ask(DATA)
    for name, value in mail.headers:
        client.ask(HEADER, strings(name, value))
    client.ask(EOH)
    client.ask(BODY, mail.body)
    client.macros(EOM, i=mail.queue_id)
    return client.ask(EOM)


def one_mail(path: str, mail: Mail) -> Answer:
    with MilterClient(path) as client:
        client.negotiate()
        client.connect()
        answer = send_mail(client, mail)
        client.send(QUIT)
    return answer


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
