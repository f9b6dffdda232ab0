"""Chaos run: faults injected into tlsmilter and its dependencies under a steady mail load.

A real Postfix, configured from contrib/postfix as tests/daemons/test_e2e.py does, takes a
steady load of normal mail (three recipients in three lab domains) and sensitive mail (one
recipient; required level encrypted, verified or dane) to lab domains of every level, while
faults are injected in turn:

  embedded stack (``serve`` alone, its cache persisted in a state directory of its own):
    kill9-serve     kill -9 of serve; restarted 2 s after it died (systemd Restart=always,
                    RestartSec=2s)
    term-serve      SIGTERM of serve; restarted the same way
    resolver-stall  the lab's Unbound stopped (SIGSTOP) for --stall seconds, then SIGCONT
  redis stack (``serve``, a ``worker`` and a standalone ``policy-server`` on a lab Redis):
    redis-hang      Redis stopped (SIGSTOP) for --hang seconds, then resumed
    redis-kill      Redis killed (SIGKILL), down --redis-down seconds, restarted empty
    worker-kill     the worker killed (SIGKILL) while it probes a slow, never-assessed domain
    policy-kill     the policy server killed (SIGKILL) while sensitive mail is queued for the
                    tlsmilter-* transports (held there with defer_transports), then the
                    queue flushed at once, so deliveries ask the dead server first

Every tlsmilter daemon is supervised as systemd would (restart 2 s after any exit).

Every message is accounted for from the submitting client's SMTP replies, the lab SMTP
servers' own records (recipients, TLS version, the message's headers), Postfix's maillog and
``postqueue -j``: delivered, refused at submission (with the reply), bounced, still queued
(with the reason), and **lost** (none of these). A sensitive message a lab MX received
without TLS, below TLS 1.2, through a transport other than that of the level it required,
with an assessment below that level, or (verified and dane) over a TLS connection Postfix did
not log as Verified, counts as **below level**. Per fault: normal mail's submission time
(connect to the reply to DATA) p50/p99 in the fault's window against the no-fault baseline of
the same stack, and whether Postfix's milter default_action applied.

Exit status 1 if anything was lost or any sensitive message went below its level.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import os
import re
import shutil
import signal
import smtplib
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from bench.milter import machine_busy, socketmap_query
from bench.prober import positive
from tests.conftest import world_searchable_dir
from tests.daemons.test_e2e import CONTRIB, contrib_main, contrib_master
from tests.lab import daemons, mail
from tests.lab.daemons import Daemon
from tests.lab.lab import Lab
from tests.lab.model import MX, Cert, Dnssec, Domain, MtaSts, Smtp, Tls, Tlsa
from tests.lab.postfix import MYHOSTNAME, LabPostfix
from tests.lab.redis_server import LabRedis

RESTART_SEC = 2.0  # systemd RestartSec= of the shipped units
LEVELS = ("none", "encrypted", "verified", "dane")
S, U = Dnssec.SIGNED, Dnssec.UNSIGNED

# name, scenario, the level tlsmilter must assess
DOMAINS: tuple[tuple[Domain, str], ...] = (
    (Domain("cx-plain", U, mx=(MX("mx1", Smtp(Tls.NONE)),)), "none"),
    (Domain("cx-selfsigned", U, mx=(MX("mx1", Smtp(cert=Cert.SELF_SIGNED)),)), "encrypted"),
    (Domain("cx-unsigned-ca", U, mx=(MX("mx1"),)), "encrypted"),
    (Domain("cx-dnssec-ca", S, mx=(MX("mx1"),)), "verified"),
    (Domain("cx-sts", U, mx=(MX("mx1"),), mta_sts=MtaSts("enforce")), "verified"),
    (Domain("cx-dane", S, mx=(MX("mx1", tlsa=(Tlsa(3, 1, 1),)),)), "dane"),
    (Domain("cx-dane2", S, mx=(MX("mx1", Smtp(cert=Cert.SELF_SIGNED), tlsa=(Tlsa(3, 1, 1),)),
                              MX("mx2", tlsa=(Tlsa(3, 1, 1),), preference=20))), "dane"),
)
# worker-kill's slow domain: its second MX accepts and never answers, so a probe takes the
# prober's smtp timeout; never assessed before the fault, one per stack run.
SLOW = Domain("cx-slow", S, mx=(MX("mx1"), MX("mx2", Smtp(Tls.HANG), preference=20)))
LEVEL_OF = {Lab.domain(d.name): level for d, level in DOMAINS}
SENSITIVITY = {"encrypted": "personal", "verified": "private", "dane": "top-secret"}
NORMAL_RCPTS = 3

EMBEDDED_FAULTS = ("kill9-serve", "term-serve", "resolver-stall")
REDIS_FAULTS = ("redis-hang", "redis-kill", "worker-kill", "policy-kill")
TLS_TRANSPORTS = ("tlsmilter-secure", "tlsmilter-verified", "tlsmilter-dane")
TRANSPORT_OF = {"encrypted": "tlsmilter-secure", "verified": "tlsmilter-verified",
                "dane": "tlsmilter-dane"}
DEFAULT_ACTION = re.compile(r"4\.7\.1 Service unavailable")
MILTER_WARNING = re.compile(r"warning: milter unix:tlsmilter/milter\.sock: .*")


def now() -> float:
    return time.time()


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Sent:
    """One submitted message, as the sending client saw it."""

    seq: int
    sensitive: str  # required level, "" for normal mail
    rcpts: tuple[str, ...]
    start: float = 0.0
    end: float = 0.0
    code: int = 0  # the reply to DATA (or the first refusal); 0: no reply
    reply: str = ""
    rcpt_refused: dict[str, str] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def accepted(self) -> bool:
        return self.code == 250


def plan(seq: int) -> tuple[str, tuple[str, ...]]:
    """Message ``seq``: its required level ("" normal) and recipients.

    Of every 4 messages one is sensitive. Its level cycles through encrypted, verified and
    dane; its domain cycles through all lab domains, so most meet the level and some do not
    (those are refused 550 at submission, as they must be). Normal mail goes to three
    domains, the plaintext one included.
    """
    domains = [Lab.domain(d.name) for d, _level in DOMAINS]
    if seq % 4 == 3:
        n = seq // 4
        level = ("encrypted", "verified", "dane")[n % 3]
        domain = domains[(n // 3) % len(domains)]
        return level, (f"c{seq}@{domain}",)
    rcpts = tuple(f"c{seq}r{j}@{domains[(seq + j * 2) % len(domains)]}"
                  for j in range(NORMAL_RCPTS))
    return "", rcpts


def build(seq: int, level: str, rcpts: Sequence[str]) -> EmailMessage:
    headers = {"Message-Id": f"<chaos-{seq}@client.lab.invalid>"}
    if level:
        headers["X-Sensitivity"] = SENSITIVITY[level]
    return mail.message(", ".join(rcpts), f"chaos {seq}", headers)


def submit(address: tuple[str, int], sent: Sent, msg: EmailMessage) -> None:
    """One SMTP transaction on its own connection, as a sending MTA would do it."""
    sent.start = time.perf_counter()
    wall = now()
    try:
        with smtplib.SMTP(*address, local_hostname="client.lab.invalid", timeout=120) as smtp:
            smtp.ehlo()
            code, text = smtp.mail(mail.SENDER)
            if code != 250:
                sent.code, sent.reply = code, text.decode(errors="replace")
                return
            for rcpt in sent.rcpts:
                code, text = smtp.rcpt(rcpt)
                if code not in (250, 251):
                    sent.rcpt_refused[rcpt] = f"{code} {text.decode(errors='replace')}"
            if len(sent.rcpt_refused) == len(sent.rcpts):
                sent.code, sent.reply = 554, "every recipient refused"
                smtp.rset()
                return
            code, text = smtp.data(msg.as_bytes())
            sent.code, sent.reply = code, text.decode(errors="replace")
    except smtplib.SMTPResponseException as exc:
        sent.code = exc.smtp_code
        error = exc.smtp_error
        sent.reply = error.decode(errors="replace") if isinstance(error, bytes) else error
    except (OSError, smtplib.SMTPException) as exc:
        sent.reply = f"no reply: {type(exc).__name__}: {exc}"
    finally:
        sent.end = time.perf_counter()
        sent.start, sent.end = wall, wall + (sent.end - sent.start)


class Load:
    """``senders`` threads sending ``rate`` messages a second on a fixed schedule."""

    def __init__(self, address: tuple[str, int], rate: float, senders: int,
                 first_seq: int) -> None:
        self.address, self.rate, self.senders = address, rate, senders
        self.sent: list[Sent] = []
        self._seq = itertools.count(first_seq)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0
        self._first = first_seq

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(self.senders)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    @property
    def next_seq(self) -> int:
        return next(self._seq)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                seq = next(self._seq)
            due = self._t0 + (seq - self._first) / self.rate
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            level, rcpts = plan(seq)
            sent = Sent(seq, level, rcpts)
            submit(self.address, sent, build(seq, level, rcpts))
            with self._lock:
                self.sent.append(sent)


# --- the stack --------------------------------------------------------------------------------


@dataclass
class Event:
    at: float
    what: str


class Supervisor:
    """Restarts tlsmilter daemons as systemd's Restart=always, RestartSec=2s would."""

    def __init__(self, units: dict[str, Daemon]) -> None:
        self.units = units
        self.events: list[Event] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._restarting: set[str] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def note(self, what: str) -> None:
        self.events.append(Event(now(), what))

    def up_since(self, name: str, after: float) -> float | None:
        """When ``name`` was up again after ``after`` (None: not yet)."""
        return next((e.at for e in self.events
                     if e.what == f"{name} up" and e.at > after), None)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, daemon in self.units.items():
                process = daemon.process
                if process is None or process.poll() is None:
                    continue
                self.note(f"{name} exited {process.returncode}")
                if self._stop.wait(RESTART_SEC):
                    return
                while not self._stop.is_set():
                    try:
                        daemon.start()
                        self.note(f"{name} up")
                        break
                    except RuntimeError as exc:
                        self.note(f"{name} failed to start: {str(exc)[-300:]}")
                        self._stop.wait(RESTART_SEC)


class Stack:
    """Postfix from contrib/postfix and tlsmilter's daemons, embedded or on Redis."""

    def __init__(self, workdir: Path, lab: Lab, backend: str, address: str,
                 snapshot_interval: float, log_level: str = "info") -> None:
        self.workdir, self.lab, self.backend = workdir, lab, backend
        workdir.mkdir(parents=True, mode=0o755)
        header_checks = workdir / "tlsmilter_header_checks"
        shutil.copy(CONTRIB / "tlsmilter_header_checks", header_checks)
        main = contrib_main(header_checks) | {
            # Postfix's own reverse lookup of the (loopback) client would stall with the
            # resolver; this run is about what tlsmilter does to mail, not Postfix's lookups.
            "smtpd_peername_lookup": "no",
        }
        self.postfix = LabPostfix(workdir / "postfix", listen=address,
                                  resolver=lab.dns.resolver[0], ca_file=lab.ca.ca_file,
                                  extra_main=main, extra_master=contrib_master())
        self.sockets = self.postfix.queue_dir / "tlsmilter"
        self.sockets.mkdir(parents=True, mode=0o755)
        self.redis = LabRedis(workdir / "redis") if backend == "redis" else None
        state = workdir / "state"  # as a real install has /var/lib/tlsmilter
        state.mkdir(mode=0o700)
        overrides: dict[str, dict[str, object]] = {
            "milter": {"skip_domains": [MYHOSTNAME], "eom_wait": 5.0},
            "log": {"level": log_level},
            "sensitivity.values": {"top-secret": "top"},
            "policies.top": {"require": "dane"},
            "cache": {"state_dir": str(state), "snapshot_interval": snapshot_interval},
        }
        if self.redis is not None:
            overrides["cache"] = {"backend": "redis"}
        self.config = daemons.write_config(workdir / "tlsmilter.toml", lab, self.sockets,
                                           redis_url=self.redis.url if self.redis else None,
                                           overrides=overrides)
        self.units = {"serve": daemons.serve(self.config, workdir / "serve.log")}
        if self.redis is not None:
            self.units["worker"] = daemons.worker(self.config, workdir / "worker.log")
            self.units["policy-server"] = daemons.policy_server(self.config,
                                                                workdir / "policy.log")
        self.supervisor = Supervisor(self.units)

    @property
    def policy_socket(self) -> Path:
        return self.sockets / "policy.sock"

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start()
        for name in ("worker", "policy-server", "serve"):
            if name in self.units:
                self.units[name].start()
        self.postfix.start()
        self.supervisor.start()

    def stop(self) -> list[str]:
        """Stop everything; what did not stop cleanly."""
        self.supervisor.stop()
        problems = []
        for name, daemon in self.units.items():
            try:
                daemon.stop()
            except AssertionError as exc:
                problems.append(f"{name} did not stop cleanly: {str(exc)[-500:]}")
        with contextlib.suppress(Exception):
            self.postfix.stop()
        if self.redis is not None:
            self.redis.stop()
        return problems

    def tlsmilter_log(self) -> str:
        return "".join(d.text() for d in self.units.values())


# --- warm-up ----------------------------------------------------------------------------------


def warm_up(stack: Stack, timeout: float) -> list[str]:
    """One sensitive message per domain until tlsmilter decided (250 or 5xx), then an empty
    queue: every lab domain is assessed before the baseline."""
    problems = []
    deadline = time.monotonic() + timeout
    for domain in LEVEL_OF:
        while True:
            sent = Sent(-1, "encrypted", (f"warm@{domain}",))
            submit(stack.postfix.submit, sent,
                   mail.message(f"warm@{domain}", "warm-up", {"X-Sensitivity": "personal"}))
            if sent.code == 250 or 500 <= sent.code < 600:
                break
            if time.monotonic() > deadline:
                problems.append(f"warm-up {domain}: {sent.code} {sent.reply}")
                break
            time.sleep(1.0)
    for domain, level in LEVEL_OF.items():
        answer = socketmap_query(stack.policy_socket, domain)
        wanted = {"none": "NOTFOUND", "encrypted": "OK encrypt", "verified": "OK ",
                  "dane": "OK dane-only"}[level]
        if not answer.startswith(wanted) or (level == "verified" and "dane" in answer):
            problems.append(f"{domain}: policy server says {answer!r}, expected {wanted!r}")
    drain(stack, 60)
    return problems


def drain(stack: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while stack.postfix.queue() and time.monotonic() < deadline:
        stack.postfix.flush()
        time.sleep(1.0)


# --- faults -----------------------------------------------------------------------------------


@dataclass
class Window:
    """One fault (or the baseline): when it began, when things were back, notes."""

    name: str
    stack: str
    began: float
    restored: float = 0.0
    ended: float = 0.0  # the next window begins here
    notes: list[str] = field(default_factory=list)
    cpu_at_start: tuple[int, int] = field(default_factory=machine_busy)
    cpu_busy: float = 0.0  # share of the machine's CPUs busy, by anyone, in the window

    def close(self) -> None:
        self.ended = now()
        busy, total = machine_busy()
        self.cpu_busy = (busy - self.cpu_at_start[0]) / max(1, total - self.cpu_at_start[1])


def wait_up(stack: Stack, name: str, after: float, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while (at := stack.supervisor.up_since(name, after)) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"chaos: {name} not back within {timeout} s")
        time.sleep(0.05)
    return at


def kill_daemon(stack: Stack, name: str, sig: signal.Signals, window: Window) -> None:
    pid = stack.units[name].pid
    os.kill(pid, sig)
    up = wait_up(stack, name, window.began)
    window.restored = up
    died = next((e for e in stack.supervisor.events
                 if e.what.startswith(f"{name} exited") and e.at > window.began), None)
    if died is not None:
        window.notes.append(f"{name} (PID {pid}) {sig.name}: {died.what} after "
                            f"{died.at - window.began:.2f} s, up again after "
                            f"{up - window.began:.2f} s")


def fault_kill9_serve(stack: Stack, window: Window, args: argparse.Namespace) -> None:
    kill_daemon(stack, "serve", signal.SIGKILL, window)


def fault_term_serve(stack: Stack, window: Window, args: argparse.Namespace) -> None:
    kill_daemon(stack, "serve", signal.SIGTERM, window)


def unbound_pid(lab: Lab) -> int:
    for pid in lab.dns.pids:
        if Path(f"/proc/{pid}/comm").read_text().strip() == "unbound":
            return pid
    raise SystemExit("chaos: the lab's Unbound is not running")


def fault_resolver_stall(stack: Stack, window: Window, args: argparse.Namespace) -> None:
    pid = unbound_pid(stack.lab)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(args.stall)
    finally:
        os.kill(pid, signal.SIGCONT)
    window.restored = now()
    window.notes.append(f"Unbound (PID {pid}) stopped {args.stall:.0f} s")


def fault_redis_hang(stack: Stack, window: Window, args: argparse.Namespace) -> None:
    assert stack.redis is not None
    with stack.redis.paused():
        time.sleep(args.hang)
    window.restored = now()
    window.notes.append(f"Redis (PID {stack.redis.pid}) stopped {args.hang:.0f} s")


def fault_redis_kill(stack: Stack, window: Window, args: argparse.Namespace) -> None:
    assert stack.redis is not None
    pid = stack.redis.pid
    os.kill(pid, signal.SIGKILL)
    time.sleep(args.redis_down)
    stack.redis.stop()  # reaps it
    stack.redis.start()  # empty: no persistence
    window.restored = now()
    window.notes.append(f"Redis (PID {pid}) SIGKILL, down {args.redis_down:.0f} s, "
                        f"restarted empty as PID {stack.redis.pid}")


def fault_worker_kill(stack: Stack, window: Window, args: argparse.Namespace) -> None:
    slow = Lab.domain(SLOW.name)
    worker = stack.units["worker"]
    # A sensitive message to the never-assessed slow domain makes serve ask for a probe.
    trigger = Sent(-2, "verified", (f"slow@{slow}",))
    sender = threading.Thread(target=submit, args=(
        stack.postfix.submit, trigger,
        mail.message(f"slow@{slow}", "slow", {"X-Sensitivity": "private"})))
    sender.start()
    time.sleep(1.0)  # the probe is under way: its second MX hangs for the smtp timeout
    busy = "assessed cx-slow" not in worker.text()
    killed = now()
    kill_daemon(stack, "worker", signal.SIGKILL, window)
    sender.join()
    window.notes.append(f"worker killed {'mid-probe' if busy else 'AFTER the probe ended'} of "
                        f"{slow}; the trigger got {trigger.code} {trigger.reply[:80]!r}")
    # A probe left unfinished is taken over after worker.claim_after (default 120 s). The
    # policy server's answer says when it is assessed (the worker logs that at debug only).
    deadline = time.monotonic() + args.worker_wait
    while not (answer := socketmap_query(stack.policy_socket, slow)).startswith("OK"):
        if time.monotonic() > deadline:
            window.notes.append(f"{slow} still not assessed {args.worker_wait:.0f} s after "
                                f"the kill: the policy server says {answer!r}")
            return
        time.sleep(0.5)
    took_over = [line for line in worker.text().splitlines() if "took over" in line]
    window.notes.append(f"{slow} assessed {now() - killed:.1f} s after the kill "
                        f"({answer}); {took_over[-1] if took_over else 'no take-over logged'}")


def fault_policy_kill(stack: Stack, window: Window, args: argparse.Namespace) -> None:
    hold = ", ".join(TLS_TRANSPORTS)
    stack.postfix.postconf(defer_transports=hold)
    time.sleep(args.hold)
    queued = [m for m in stack.postfix.queue()
              if any("deferred transport" in (r.get("delay_reason") or "")
                     for r in m.get("recipients", []))]
    window.notes.append(f"{len(queued)} sensitive message(s) held for {hold} when the policy "
                        "server was killed")
    pid = stack.units["policy-server"].pid
    killed = now()
    os.kill(pid, signal.SIGKILL)
    stack.postfix.postconf(defer_transports="")
    stack.postfix.flush()
    up = wait_up(stack, "policy-server", window.began)
    window.restored = up
    window.notes.append(f"policy server (PID {pid}) SIGKILL, up again after "
                        f"{up - killed:.2f} s")


FAULTS: dict[str, Callable[[Stack, Window, argparse.Namespace], None]] = {
    "kill9-serve": fault_kill9_serve,
    "term-serve": fault_term_serve,
    "resolver-stall": fault_resolver_stall,
    "redis-hang": fault_redis_hang,
    "redis-kill": fault_redis_kill,
    "worker-kill": fault_worker_kill,
    "policy-kill": fault_policy_kill,
}


# --- accounting -------------------------------------------------------------------------------

STATUS = re.compile(r"postfix/(?:(?P<svc>[\w-]+)/)?smtp\[(?P<pid>\d+)\]: (?P<qid>\w+): "
                    r"to=<(?P<rcpt>[^>]+)>.* status=(?P<status>\w+) \((?P<why>.*)\)$")
TLS_LINE = re.compile(r"postfix/(?:[\w-]+/)?smtp\[(?P<pid>\d+)\]: (?P<kind>\w+) TLS "
                      r"connection established to (?P<host>\S+): (?P<proto>TLSv[\d.]+)")
TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d:?\d\d|Z)?)"
                       r"|^(\w{3} [ \d]\d \d\d:\d\d:\d\d)")


def line_time(line: str) -> float | None:
    m = TIMESTAMP.match(line)
    if m is None:
        return None
    if m.group(1):
        return dt.datetime.fromisoformat(m.group(1)).timestamp()
    year = dt.datetime.now().year
    return dt.datetime.strptime(f"{year} {m.group(2)}", "%Y %b %d %H:%M:%S").timestamp()


@dataclass
class Delivery:
    service: str  # "smtp" or the tlsmilter-* transport
    tls_kind: str  # Postfix's "Verified", "Trusted", "Untrusted", "Anonymous" or ""
    protocol: str


@dataclass
class Maillog:
    last: dict[str, tuple[str, str]]  # rcpt -> (status, reason) of its last status line
    sent: dict[str, Delivery]
    default_action: list[tuple[float | None, str]]


def read_maillog(text: str) -> Maillog:
    last: dict[str, tuple[str, str]] = {}
    sent: dict[str, Delivery] = {}
    tls: dict[str, tuple[str, str]] = {}  # smtp pid -> its last TLS connection
    flagged = []
    for line in text.splitlines():
        if DEFAULT_ACTION.search(line) or MILTER_WARNING.search(line):
            flagged.append((line_time(line), line))
        if (t := TLS_LINE.search(line)) is not None:
            tls[t["pid"]] = (t["kind"], t["proto"])
            continue
        if (s := STATUS.search(line)) is None:
            continue
        rcpt = s["rcpt"].lower()
        last[rcpt] = (s["status"], s["why"])
        if s["status"] == "sent":
            kind, proto = tls.pop(s["pid"], ("", ""))
            sent[rcpt] = Delivery(s["svc"] or "smtp", kind, proto)
    return Maillog(last, sent, flagged)


@dataclass
class Received:
    tls_version: str | None
    route: str
    require: str
    assessed: str  # the recipient domain's level in X-TLSMilter-Assessment


def header(data: str, name: str) -> str:
    m = re.search(rf"^{name}:[ \t]*(.*(?:\r?\n[ \t].*)*)", data, re.MULTILINE | re.IGNORECASE)
    return re.sub(r"\s+", " ", m.group(1)).strip() if m else ""


def received(lab: Lab) -> dict[str, Received]:
    """Every recipient a lab MX received, with what the message said about its route."""
    found = {}
    for server in lab.smtp.values():
        for message in server.messages:
            data = message.data.decode(errors="replace")
            assessment = header(data, "X-TLSMilter-Assessment")
            route = header(data, "X-TLSMilter-Route")
            require = m.group(1) if (m := re.search(r"require=(\w+)", assessment)) else ""
            for rcpt in message.rcpt_tos:
                domain = rcpt.rpartition("@")[2].lower()
                level = re.search(rf"{re.escape(domain)}=(\w+)", assessment)
                found[rcpt.lower()] = Received(message.tls_version, route, require,
                                               level.group(1) if level else "")
    return found


def queued(postfix: LabPostfix) -> dict[str, str]:
    """Recipient -> delay reason of everything still in Postfix's queue."""
    left = {}
    for message in postfix.queue():
        for r in message.get("recipients", []):
            left[r["address"].lower()] = (f"{message.get('queue_name')}: "
                                          f"{r.get('delay_reason') or 'not tried yet'}")
    return left


def rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else -1


def below_level(sent: Sent, rcpt: str, got: Received, delivery: Delivery | None) -> str:
    """Why a sensitive message went below its level ("" when it did not)."""
    need = sent.sensitive
    problems = []
    if got.tls_version is None:
        problems.append("received WITHOUT TLS")
    elif got.tls_version not in ("TLSv1.2", "TLSv1.3"):
        problems.append(f"received over {got.tls_version}")
    if got.require != need:
        problems.append(f"assessment header says require={got.require or '-'}")
    if got.route != need:
        problems.append(f"route header {got.route or '-'}")
    if rank(got.assessed) < rank(need):
        problems.append(f"assessed {got.assessed or '-'} below {need}")
    true_level = LEVEL_OF.get(rcpt.rpartition("@")[2])
    if true_level is not None and rank(true_level) < rank(need):
        problems.append(f"the domain is really {true_level}")
    if delivery is None:
        problems.append("no status=sent line in the maillog")
    else:
        if delivery.service != TRANSPORT_OF[need]:
            problems.append(f"delivered by {delivery.service}")
        if need in ("verified", "dane") and delivery.tls_kind != "Verified":
            problems.append(f"Postfix logged a {delivery.tls_kind or 'no'} TLS connection")
    return "; ".join(problems)


@dataclass
class Tally:
    messages: int = 0
    recipients: int = 0
    delivered: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # reason -> recipients
    bounced: Counter[str] = field(default_factory=Counter)
    queued: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    below: list[str] = field(default_factory=list)
    sensitive_delivered: int = 0
    default_action_replies: int = 0


def short(reason: str) -> str:
    reason = re.sub(r"\bc\d+(r\d)?@", "*@", reason)
    reason = re.sub(r"\[[\d.]+\]", "", reason)
    reason = re.sub(r"queued as \w+", "queued as *", reason)
    reason = re.sub(r"^\w+: ", "", reason)
    return reason.replace("\n", " ")[:150]


def account(sent: Sequence[Sent], log: Maillog, got: dict[str, Received],
            left: dict[str, str]) -> Tally:
    tally = Tally()
    for s in sent:
        tally.messages += 1
        if DEFAULT_ACTION.search(s.reply):
            tally.default_action_replies += 1
        for rcpt in s.rcpts:
            key = rcpt.lower()
            tally.recipients += 1
            if key in got:
                tally.delivered += 1
                if s.sensitive:
                    tally.sensitive_delivered += 1
                    why = below_level(s, key, got[key], log.sent.get(key))
                    if why:
                        tally.below.append(f"{rcpt} (required {s.sensitive}): {why}")
            elif key in left:
                tally.queued[short(left[key])] += 1
            elif log.last.get(key, ("", ""))[0] == "bounced":
                tally.bounced[short(log.last[key][1])] += 1
            elif rcpt in s.rcpt_refused:
                tally.refused[short(s.rcpt_refused[rcpt])] += 1
            elif not s.accepted:
                tally.refused[short(f"{s.code} {s.reply}")] += 1
            else:
                status = log.last.get(key)
                tally.lost.append(f"{rcpt}: client got {s.code}; last maillog status "
                                  f"{status}")
    return tally


# --- the run ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class StackResult:
    name: str
    windows: list[Window]
    sent: list[Sent]
    log: Maillog
    left: dict[str, str]
    problems: list[str]
    tlsmilter_log: str


def run_stack(name: str, faults: Sequence[str], lab: Lab, workdir: Path,
              args: argparse.Namespace, first_seq: int, address: str) -> StackResult:
    stack = Stack(workdir / name, lab, "redis" if name == "redis" else "memory", address,
                  args.snapshot_interval, args.log_level)
    problems: list[str] = []
    windows: list[Window] = []
    load = Load(stack.postfix.submit, args.rate, args.senders, first_seq)
    try:
        stack.start()
        started = time.monotonic()
        problems += warm_up(stack, 120)
        print(f"[{name}] warm-up: {len(LEVEL_OF)} domains assessed in "
              f"{time.monotonic() - started:.1f} s{'; ' if problems else ''}"
              f"{'; '.join(problems)}", flush=True)
        load.start()
        baseline = Window("baseline", name, now())
        windows.append(baseline)
        time.sleep(args.baseline)
        baseline.restored = now()
        for fault in faults:
            windows[-1].close()
            window = Window(fault, name, now())
            windows.append(window)
            print(f"[{name}] {time.strftime('%H:%M:%S')} {fault}", flush=True)
            FAULTS[fault](stack, window, args)
            for note in window.notes:
                print(f"[{name}]   {note}", flush=True)
            time.sleep(args.settle)
        windows[-1].close()
        load.stop()
        print(f"[{name}] load stopped: {len(load.sent)} messages; draining the queue "
              f"(up to {args.drain:.0f} s)", flush=True)
        drain(stack, args.drain)
        time.sleep(2.0)  # the lab servers record a message after Postfix logs it sent
        left = queued(stack.postfix)
        log = read_maillog(stack.postfix.maillog())
    finally:
        load.stop()
        problems += stack.stop()
    with (workdir / f"{name}-messages.csv").open("w") as out:
        out.write("seq,level,start,seconds,code,window\n")
        for s in sorted(load.sent, key=lambda s: s.start):
            where = next((w.name for w in windows if in_window(s, w)), "-")
            out.write(f"{s.seq},{s.sensitive or 'normal'},{s.start:.6f},{s.seconds:.6f},"
                      f"{s.code},{where}\n")
    return StackResult(name, windows, load.sent, log, left, problems, stack.tlsmilter_log())


def in_window(s: Sent, w: Window) -> bool:
    """A message belongs to the window in which its submission ended (its reply came)."""
    return w.began <= s.end < w.ended


def line_in_window(t: float | None, w: Window) -> bool:
    """Maillog lines carry whole seconds: the second a window began in counts as its own."""
    return t is not None and int(w.began) <= t < int(w.ended)


def report(results: Sequence[StackResult], lab: Lab, args: argparse.Namespace) -> bool:
    got = received(lab)
    ok = True
    rows = []
    for result in results:
        base = result.windows[0]
        quiet = [s.seconds for s in result.sent if not s.sensitive and s.accepted
                 and not any(w.began <= s.end < (w.restored or w.ended) + 5.0
                             for w in result.windows[1:])]
        first = [s.seconds for s in result.sent
                 if in_window(s, base) and not s.sensitive and s.accepted]
        b50, b99 = percentile(first, 50), percentile(first, 99)
        print(f"\n== {result.name} stack: baseline (no fault yet) normal mail p50 "
              f"{b50 * 1000:.1f} ms, p99 {b99 * 1000:.1f} ms ({len(first)} messages); for "
              f"the machine's drift, every no-fault period (the baseline and each window "
              f"from 5 s after the repair on): p50 {percentile(quiet, 50) * 1000:.1f} ms, "
              f"p99 {percentile(quiet, 99) * 1000:.1f} ms ({len(quiet)}) ==")
        for problem in result.problems:
            print(f"WARNING: {problem}")
            ok = False
        for w in result.windows:
            mine = [s for s in result.sent if in_window(s, w)]
            tally = account(mine, result.log, got, result.left)
            # latency: from the fault's start until 5 s after it was repaired
            until = (w.restored or w.ended) + 5.0
            normal = sorted((s for s in mine if not s.sensitive and s.accepted
                             and s.end < until), key=lambda s: s.start)
            normal_refused = sum(1 for s in mine if not s.sensitive and not s.accepted)
            times = [s.seconds for s in normal]
            after_first = [s.seconds for s in normal[1:]]
            actions = [(t, line) for t, line in result.log.default_action
                       if line_in_window(t, w)]
            p50, p99 = percentile(times, 50), percentile(times, 99)
            print(f"\n-- {w.name}: {w.ended - w.began:.0f} s, the machine's CPUs "
                  f"{w.cpu_busy:.0%} busy; {tally.messages} messages, "
                  f"{tally.recipients} recipients "
                  f"(normal mail accepted within 5 s of the repair: {len(times)}, normal mail "
                  f"not accepted: {normal_refused}) --")
            for note in w.notes:
                print(f"   note: {note}")
            print(f"   delivered {tally.delivered}; refused {sum(tally.refused.values())}; "
                  f"bounced {sum(tally.bounced.values())}; still queued "
                  f"{sum(tally.queued.values())}; LOST {len(tally.lost)}")
            for what, counter in (("refused", tally.refused), ("bounced", tally.bounced),
                                  ("queued", tally.queued)):
                for reason, count in counter.most_common(6):
                    print(f"     {what} {count}: {reason}")
            for line in tally.lost[:10]:
                print(f"     LOST: {line}")
            print(f"   sensitive delivered {tally.sensitive_delivered}, below level "
                  f"{len(tally.below)}")
            for line in tally.below[:10]:
                print(f"     BELOW LEVEL: {line}")
            if w is not base:
                print(f"   normal mail submission: p50 {p50 * 1000:.1f} ms "
                      f"({(p50 - b50) * 1000:+.1f}), p99 {p99 * 1000:.1f} ms "
                      f"({(p99 - b99) * 1000:+.1f}); without the first message "
                      f"p99 {(percentile(after_first, 99) - b99) * 1000:+.1f} ms; max "
                      f"{max(times, default=0) * 1000:.0f} ms; the first one "
                      f"{times[0] * 1000 if times else float('nan'):.0f} ms")
            print(f"   milter default_action: {tally.default_action_replies} client replies "
                  f"'4.7.1 Service unavailable', {len(actions)} maillog lines")
            for _t, line in actions[:4]:
                print(f"     {line[:220]}")
            if tally.lost or tally.below:
                ok = False
            rows.append((result.name, w.name, len(tally.lost), len(tally.below),
                         (p50 - b50) * 1000, (p99 - b99) * 1000,
                         tally.default_action_replies + len(actions)))
        tracebacks = result.tlsmilter_log.count("Traceback")
        print(f"\n   tlsmilter logs of the {result.name} stack: {tracebacks} tracebacks")
        for line in result.tlsmilter_log.splitlines():
            if re.search(r"redis at .* (unavailable|is back)|circuit|breaker|snapshot|"
                         r"assessments loaded|policy server on|took over", line):
                print(f"     {line[:200]}")
    print("\n== summary ==")
    print(f"{'stack':8} {'fault':15} {'lost':>5} {'below':>6} {'p50 +ms':>8} {'p99 +ms':>8} "
          f"{'default_action':>15}")
    for stack, name, lost, below, d50, d99, action in rows:
        print(f"{stack:8} {name:15} {lost:5d} {below:6d} {d50:8.1f} {d99:8.1f} "
              f"{'yes (' + str(action) + ')' if action else 'no':>15}")
    return ok


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", nargs="+", choices=[*EMBEDDED_FAULTS, *REDIS_FAULTS],
                        default=[*EMBEDDED_FAULTS, *REDIS_FAULTS],
                        help="faults to inject, in this order within each stack "
                        "(default: all)")
    parser.add_argument("--rate", type=positive, default=6, metavar="N",
                        help="messages a second, 1 in 4 sensitive (default: 6)")
    parser.add_argument("--senders", type=positive, default=4,
                        help="concurrent SMTP clients (default: 4)")
    for option, default, text in (
            ("--baseline", 40.0, "of load without a fault first"),
            ("--settle", 15.0, "of load after each fault was repaired"),
            ("--hang", 30.0, "Redis stays stopped"),
            ("--stall", 20.0, "the resolver stays stopped"),
            ("--redis-down", 5.0, "Redis stays dead before its restart"),
            ("--hold", 8.0, "sensitive mail is held for the tlsmilter transports before the "
             "policy server is killed"),
            ("--snapshot-interval", 30.0, "between serve's cache snapshots "
             "(cache.snapshot_interval; the baseline outlasts it, so kill -9 finds one)"),
            ("--worker-wait", 200.0, "to wait at most, after worker-kill, for the slow domain's "
             "probe to be taken over and finished (worker.claim_after is 120)"),
            ("--drain", 90.0, "to wait at most for the queue to empty at the end")):
        parser.add_argument(option, type=float, default=default, metavar="S",
                            help=f"seconds {text} (default: {default:.0f})")
    parser.add_argument("--log-level", default="info", choices=["debug", "info"],
                        help="tlsmilter daemons' log level (default: info)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (logs, maillog) and print its path")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("chaos: run as root (the lab binds ports 25 and 53 on loopback)")
    stacks = [(name, [f for f in args.faults if f in group])
              for name, group in (("embedded", EMBEDDED_FAULTS), ("redis", REDIS_FAULTS))]
    stacks = [(name, faults) for name, faults in stacks if faults]
    workdir = world_searchable_dir("tlsmilter-chaos-")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"chaos: {args.rate} msg/s ({args.senders} clients; 3 in 4 normal with "
          f"{NORMAL_RCPTS} recipients, 1 in 4 sensitive); faults: {' '.join(args.faults)}; "
          f"work directory {workdir}", flush=True)
    results = []
    try:
        with Lab(workdir / "lab", [*(d for d, _l in DOMAINS), SLOW]) as lab:
            for i, (name, faults) in enumerate(stacks):
                results.append(run_stack(name, faults, lab, workdir, args, 1_000_000 * i,
                                         f"{lab.base}.0.{4 + i}"))
            ok = report(results, lab, args)
    finally:
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
