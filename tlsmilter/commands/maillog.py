"""Postfix's mail log, read for ``tlsmilter proof``: who sent what, where it went, over which TLS.

Pure: lines in, events out. The forms read, as Postfix 3.7 (Debian 12) and 3.10 (Debian 13)
log them (docs/proof.md lists them with examples)::

    <stamp> <host> postfix/cleanup[PID]: QID: message-id=<...>
    <stamp> <host> postfix/cleanup[PID]: QID: milter-header-filter: header X-TLSMilter-Route:
        verified from ...: tlsmilter-verified:
    <stamp> <host> postfix/cleanup[PID]: QID: milter-reject: END-OF-MESSAGE from ...; from=<..>
    <stamp> <host> postfix/qmgr[PID]: QID: from=<sender>, size=..., nrcpt=N (queue active)
    <stamp> <host> postfix/tlsmilter-verified/smtp[PID]: Verified TLS connection established
        to mx.example.net[192.0.2.1]:25: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)
        key-exchange X25519 ...
    <stamp> <host> postfix/tlsmilter-verified/smtp[PID]: QID: to=<rcpt>, relay=mx.example.net
        [192.0.2.1]:25, [conn_use=N, ]delay=..., dsn=2.0.0, status=sent (250 ...)

``<stamp>`` is syslog's ``Dec 02 06:10:24`` (Postfix's own ``maillog_file``, rsyslog's
traditional format) or ISO 8601 (``journalctl -o short-iso``, rsyslog's default on Debian 12
and later). What 3.10 logs differently (``removed (canceled)`` after a refusal, a lower-case
key exchange group) does not touch these forms: they are matched without regard to either.

The TLS line carries no queue ID. ``TlsJoin`` gives each delivery the TLS of its connection:
the last TLS line the same process (host and PID) logged, if it names the same relay and no
other message has used it. A TLS connection serves one message: Postfix caches only plaintext
connections for reuse unless ``smtp_tls_connection_reuse`` is on, and then it logs a
``TLS connection reused`` line for each reuse. So a second message delivered by the same
process to the same relay without a TLS line of its own went over a plaintext connection, and
is reported as such, never with the TLS of the message before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

MONTHS = {name: n for n, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
TRUST = ("Verified", "Trusted", "Untrusted", "Anonymous")  # Postfix's words, strongest first

_TLS = re.compile(r"(Verified|Trusted|Untrusted|Anonymous) TLS connection (established|reused) "
                  r"to (\S+?): (\S+) with cipher (\S+)")
_DELIVERY = re.compile(r"to=<([^>]*)>, (?:orig_to=<[^>]*>, )?relay=([^,]+), (?:conn_use=(\d+), )?"
                       r".*?status=(\w+)(?: \((.*)\))?$")
_RELAY = re.compile(r"^(.*)\[([^\]]*)\](?::(\d+))?$")


def parse_time(stamp: str, now: datetime | None = None) -> datetime | None:
    """``stamp`` as an aware datetime, or None. Syslog stamps have no year and no zone: the
    local zone, and the year that puts the time no more than a day in the future."""
    try:
        if stamp[:4].isdigit():
            if stamp[-5] in "+-" and stamp[-3] != ":":  # short-iso's +0000
                stamp = f"{stamp[:-2]}:{stamp[-2:]}"
            parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.astimezone()
        month, day, clock = stamp.split()
        now = now or datetime.now().astimezone()
        hour, minute, second = (int(part) for part in clock.split(":"))
        when = now.replace(month=MONTHS[month], day=int(day), hour=hour, minute=minute,
                           second=second, microsecond=0)
        if when > now + timedelta(days=1):
            when = when.replace(year=when.year - 1)
        return when
    except (ValueError, KeyError, IndexError):
        return None


def queue_id(text: str) -> tuple[str, str] | None:
    """``(QID, rest)`` for a line about one queued message, else None."""
    qid, sep, rest = text.partition(": ")
    if sep and 5 <= len(qid) <= 20 and qid.isalnum():
        return qid, rest
    return None


@dataclass(frozen=True)
class Tls:
    """What one TLS line says about a connection."""

    trust: str  # Verified, Trusted, Untrusted or Anonymous
    relay: str  # host[ip]:port
    protocol: str  # TLSv1.3
    cipher: str


def parse_tls(text: str) -> Tls | None:
    match = _TLS.match(text)
    if match is None:
        return None
    trust, _how, relay, protocol, cipher = match.groups()
    return Tls(trust, relay, protocol, cipher)


@dataclass(frozen=True)
class Delivery:
    """One ``to=<...>, relay=..., status=...`` line."""

    recipient: str
    relay: str  # host[ip]:port, or "none"
    conn_use: int  # 0 unless Postfix reused the connection
    status: str  # sent, deferred, bounced, expired, ...
    reply: str

    @property
    def relay_host(self) -> str:
        match = _RELAY.match(self.relay)
        return match.group(1) if match else self.relay

    @property
    def relay_ip(self) -> str:
        match = _RELAY.match(self.relay)
        return match.group(2) if match else ""


def parse_delivery(rest: str) -> Delivery | None:
    match = _DELIVERY.match(rest)
    if match is None:
        return None
    recipient, relay, conn_use, status, reply = match.groups()
    return Delivery(recipient, relay, int(conn_use or 0), status, reply or "")


def address(rest: str, field: str) -> str | None:
    """The ``<...>`` value of ``field=`` in ``rest`` (``from``, ``message-id``), or None."""
    start = rest.find(f"{field}=<")
    if start < 0:
        return None
    start += len(field) + 2
    end = rest.find(">", start)
    return rest[start:end] if end >= 0 else None


def process_key(text: str, end: int) -> str:
    """``host program[PID`` of a syslog line whose ``]: `` is at ``end``: one process."""
    program = text.rfind(" ", 0, end)
    return text[text.rfind(" ", 0, program) + 1:end]


def service(key: str) -> str:
    """The master.cf service of a ``process_key``: ``tlsmilter-dane`` for ``postfix/
    tlsmilter-dane/smtp`` (its syslog_name), else the program's own name (``smtp``)."""
    parts = key[key.find(" ") + 1:key.rfind("[")].split("/")
    return parts[-2] if len(parts) >= 3 else parts[-1]


def stamp(text: str, end: int) -> str:
    """The time stamp of a syslog line whose ``]: `` is at ``end``."""
    program = text.rfind(" ", 0, end)
    return text[:text.rfind(" ", 0, program)].rstrip()


def delivery_relay(tail: str) -> str:
    """The ``relay=`` value of a ``to=<...>, relay=..., ...`` text."""
    start = tail.find(", relay=")
    if start < 0:
        return ""
    start += len(", relay=")
    stop = tail.find(", ", start)
    return tail[start:stop] if stop >= 0 else tail[start:]


def tls_relay(text: str) -> str:
    """The ``host[ip]:port`` of a TLS line."""
    start = text.find(" to ")
    stop = text.find(": ", start)
    return text[start + 4:stop] if start >= 0 and stop >= 0 else ""


# Processes whose last TLS line is kept: an smtp process that stayed silent while this many
# others logged TLS lines has long exited (Postfix's max_idle is 100 s).
MAX_PROCESSES = 10_000


class TlsJoin:
    """Gives each delivery line the TLS line of its connection (see the module docstring)."""

    def __init__(self) -> None:
        # process_key -> [the process's last TLS line, its relay, the queue ID that used it]
        self._last: dict[str, list[str]] = {}

    def connected(self, key: str, text: str) -> None:
        self._last.pop(key, None)  # re-inserted: the dict stays in order of last use
        self._last[key] = [text, tls_relay(text), ""]
        if len(self._last) > MAX_PROCESSES:
            del self._last[next(iter(self._last))]

    def delivered(self, key: str, qid: str, relay: str) -> str:
        """The TLS line ``qid``'s delivery to ``relay`` by process ``key`` used, or ""."""
        last = self._last.get(key)
        if last is None or last[1] != relay or last[2] not in ("", qid):
            return ""
        last[2] = qid
        return last[0]
