"""Benchmark: what tlsmilter costs Postfix, on cache hits.

1. Through real Postfix: ``smtp-source`` sends N messages over C concurrent sessions to the
   lab Postfix, which relays everything to ``smtp-sink``; four ways: no milter, a null
   pymilter milter, tlsmilter with normal mail, tlsmilter with sensitive mail. Every message
   has five recipients in one to five lab domains that tlsmilter has already assessed.
2. Straight at the milter socket: a milter-protocol client (bench.milterclient) on 1 and on
   8 connections; messages/s and p50/p99 latency, tlsmilter against the null milter.
3. Cost per message: milter CPU time from /proc/PID/stat, and the RSS of a fresh process
   holding 10k and 100k assessments in tlsmilter's MemoryCache.

Every run is counted: a run whose messages were not all accepted and delivered (or, for
sensitive mail, not all accepted by tlsmilter's decision) prints a warning and the exit
status is 1, so refusals can never pass for speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.milterclient import Message, load_worker
from bench.prober import positive
from tests.daemons.test_e2e import contrib_main
from tests.lab import mail
from tests.lab.lab import TLD, Lab
from tests.lab.model import MX, Dnssec, Domain, Smtp, Tlsa
from tests.lab.postfix import LabPostfix
from tlsmilter.daemons.netstring import NetstringDecoder, encode_netstring

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = ROOT / "contrib" / "postfix"
RECIPIENTS = 5  # per message, spread over 1 to 5 domains
SOURCE_DOMAIN = "bench.invalid"  # smtp-source's recipients; smtpd_command_filter maps them
SENSITIVITY = "Personal"
START_TIMEOUT = 20.0
DRAIN_TIMEOUT = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the lab: recipient domains tlsmilter rates dane or verified ------------------------------

POOL_KINDS = (  # name, MX hosts, TLSA on each, level tlsmilter must find
    ("dane", 1, True, "dane"),
    ("verified", 1, False, "verified"),
    ("dane2mx", 2, True, "dane"),
)


def pool(size: int) -> dict[str, str]:
    """Full domain name -> expected level, cycling through POOL_KINDS."""
    kinds = (POOL_KINDS[i % len(POOL_KINDS)] for i in range(size))
    return {Lab.domain(f"p{i:02d}-{kind[0]}"): kind[3] for i, kind in enumerate(kinds)}


def scenario(domain: str) -> Domain:
    name = domain.removesuffix(f".{TLD}")
    kind = next(k for k in POOL_KINDS if name.endswith(f"-{k[0]}"))
    tlsa = (Tlsa(3, 1, 1),) if kind[2] else ()
    mx = tuple(MX(f"mx{i + 1}", Smtp(), preference=10 * (i + 1), tlsa=tlsa)
               for i in range(kind[1]))
    return Domain(name, Dnssec.SIGNED, mx=mx)


def recipient_domains(domains: Sequence[str], number: int) -> str:
    """The domain of recipient ``number`` (1, 2, ...) of one sending session.

    Recipients go out in blocks of five, one block per message; block b spreads its five
    recipients over 1 + b % 5 domains, so messages cycle through 1, 2, 3, 4, 5 domains.
    Depends on ``number % 100`` only, so smtpd_command_filter can compute it.
    """
    i = (number - 1) % 100
    block, j = divmod(i, RECIPIENTS)
    spread = 1 + block % RECIPIENTS
    return domains[(block * RECIPIENTS + j % spread) % len(domains)]


def command_filter(domains: Sequence[str]) -> str:
    """A regexp table for smtpd_command_filter: RCPT TO:<n@bench.invalid> -> a pool domain.

    ``smtp-source -N`` numbers recipients 1, 2, 3, ... but can only give them one domain;
    this table, applied by smtpd before it parses the command (and so before any milter
    sees the address), gives each recipient the domain ``recipient_domains`` assigns.
    """
    escaped = re.escape(SOURCE_DOMAIN)
    rules = ["if /^RCPT TO:/"]
    for suffix in range(100):
        domain = recipient_domains(domains, suffix or 100)
        rules.append(rf"/^RCPT TO:<([0-9]*{suffix:02d})@{escaped}>(.*)$/ "
                     rf"RCPT TO:<r$1@{domain}>$2")
        if 0 < suffix < 10:
            rules.append(rf"/^RCPT TO:<({suffix})@{escaped}>(.*)$/ RCPT TO:<r$1@{domain}>$2")
    rules.append("endif")
    return "\n".join(rules) + "\n"


def direct_message(domains: Sequence[str], index: int, sensitive: bool) -> Message:
    """Message ``index`` (0, 1, ...) for the direct client: the same recipient pattern."""
    rcpts = tuple(f"r{n}@{recipient_domains(domains, n)}"
                  for n in range(index * RECIPIENTS + 1, (index + 1) * RECIPIENTS + 1))
    return Message(rcpts, headers(sensitive))


# --marking (issue 15): every message carries a folded Purview msip_labels header, as Outlook
# writes it; sensitive mail is marked by a label the config maps (to personal, like the header
# it replaces), normal mail by one it does not; the config also has many label, keyword and
# sender rules that never match, so the bench pays for matching them.
MARKING = {"on": False}
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
MAPPED_LABEL = "f42aa342-8706-4288-bd11-ebb85995028c"
GENERAL_LABEL = "1a19d03a-48bc-4359-8038-5b5f6d5847c3"


def msip_labels(guid: str, name: str) -> str:
    fields = ["Enabled=true", "SetDate=2024-03-01T09:12:44Z", "Method=Standard", f"Name={name}",
              f"SiteId={TENANT}", "ActionId=8e2bd3c1-27e8-4ad4-9b8e-5f0e4fe2f7a1",
              "ContentBits=0"]
    return ";\n ".join(f"MSIP_Label_{guid}_{field}" for field in fields)


def marking_config(domains: Sequence[str]) -> str:
    """TOML tables for --marking: 200 labels, 20 keywords, 100 sender rules, and overrides:
    ``require encrypted`` (what the policy needs anyway) on every recipient domain, so each
    message applies one per domain, and 100 ``deny`` on other domains."""
    labels = [f'"{MAPPED_LABEL}@{TENANT}" = "personal"'] + [
        f'"{i:08x}-0000-4000-8000-{i:012x}" = "confidential"' for i in range(199)]
    keywords = [f'"[kw{i}]" = "private"' for i in range(20)]
    senders = [f'"hr{i}.example.org" = "personal"' for i in range(100)]
    overrides = [f'[overrides.domains."{d}"]\nlevel = "encrypted"\nreason = "bench"'
                 for d in domains]
    overrides += [f'[overrides.domains."denied{i}.example"]\naction = "deny"\nreason = "bench"'
                  for i in range(100)]
    return "\n".join(["[sensitivity]", 'subject_match = "anywhere"',
                      "[sensitivity.labels]", *labels, "[sensitivity.subject_keywords]",
                      *keywords, "[sensitivity.senders]", *senders, *overrides, ""])


def headers(sensitive: bool) -> tuple[tuple[str, str], ...]:
    marked: tuple[tuple[str, str], ...] = (("X-Sensitivity", SENSITIVITY),) if sensitive else ()
    if MARKING["on"]:
        marked = (("msip_labels", msip_labels(MAPPED_LABEL, "Personal") if sensitive
                   else msip_labels(GENERAL_LABEL, "General")),)
    return (("From", f"<{mail.SENDER}>"), ("To", "<undisclosed-recipients:;>"),
            ("Subject", "tlsmilter benchmark"), *marked,
            ("Message-Id", "<bench@client.lab.invalid>"))


# --- processes ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads, so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class Daemon:
    """A process we start and stop by PID, its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, ready: Path | None) -> None:
        self.name, self.argv, self.log, self.ready = name, argv, log, ready
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while self.ready is not None and not self.ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: {self.name} did not start:\n{self.tail()}")
            time.sleep(0.05)
        time.sleep(0.2)  # serve fixes the socket's mode right after libmilter creates it

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def tlsmilter_config(path: Path, sockets: Path, lab: Lab) -> None:
    path.write_text(f"""
[milter]
socket = "unix:{sockets / 'milter.sock'}"
socket_mode = "0666"
# warm-up only: the first message to each domain waits for its assessment
eom_wait = 15.0
[policy_server]
socket = "unix:{sockets / 'policy.sock'}"
[metrics]
listen = "{lab.base}.0.7:9464"
[prober]
resolver = "{lab.resolver}"
ca_file = "{lab.ca.ca_file}"
ehlo_name = "prober.lab.invalid"
[cache]
# every run starts cold, as measured
state_dir = ""
[log]
level = "info"
""")


def socketmap_query(path: Path, key: str) -> str:
    """Ask tlsmilter's policy server what Postfix would get for ``key``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(encode_netstring(f"tlspolicy {key}".encode()))
        decoder = NetstringDecoder()
        while (frame := decoder.next_frame()) is None:
            data = sock.recv(4096)
            if not data:
                return "<closed>"
            decoder.feed(data)
    return frame.decode()


# --- Postfix ---------------------------------------------------------------------------------

MILTER_OPTIONS = ("default_action=tempfail, connect_timeout=10s, command_timeout=30s, "
                  "content_timeout=60s")


@dataclass(frozen=True)
class Way:
    name: str
    listen: str  # smtpd address (port 25)
    sensitive: bool
    milter: str  # "", "null" or "tlsmilter"


def shipped_main(header_checks: Path) -> dict[str, str]:
    """contrib/postfix/main.cf.snippet as the e2e tests use it; milters are set per way."""
    settings = contrib_main(header_checks)
    for name in ("smtpd_milters", "non_smtpd_milters"):
        settings.pop(name, None)
    return settings


class Mta:
    """The lab Postfix with one smtpd per way, relaying everything to smtp-sink."""

    def __init__(self, workdir: Path, lab: Lab, domains: Sequence[str]) -> None:
        base = lab.base
        self.sink_address = f"{base}.0.9"
        self.ways = {
            "none": f"{base}.0.4", "null": f"{base}.0.5", "tlsmilter": f"{base}.0.6",
        }
        header_checks = workdir / "tlsmilter_header_checks"
        shutil.copy(CONTRIB / "tlsmilter_header_checks", header_checks)
        filter_table = workdir / "command_filter"
        filter_table.write_text(command_filter(domains))
        sink = f"[{self.sink_address}]:25"
        main = shipped_main(header_checks) | {
            "relayhost": sink,
            # FILTER tlsmilter-secure: (empty next hop) goes here too: to smtp-sink
            "default_filter_nexthop": sink,
            "smtpd_command_filter": f"regexp:{filter_table}",
            "smtpd_milters": "",
            "bench_null_milters": f"{{ unix:bench/null.sock, {MILTER_OPTIONS} }}",
            "bench_tlsmilter_milters": f"{{ unix:tlsmilter/milter.sock, {MILTER_OPTIONS} }}",
            "smtp_tls_security_level": "may",
        }
        master = [
            f"{self.ways['null']}:25 inet n - n - - smtpd",
            "  -o syslog_name=postfix/null",
            "  -o smtpd_milters=$bench_null_milters",
            f"{self.ways['tlsmilter']}:25 inet n - n - - smtpd",
            "  -o syslog_name=postfix/tlsmilter",
            "  -o smtpd_milters=$bench_tlsmilter_milters",
            # smtp-sink speaks no TLS: this transport is plain smtp, where the shipped one
            # enforces the assessed level. The FILTER routing itself is as shipped.
            "tlsmilter-secure unix - - n - - smtp",
            "  -o syslog_name=postfix/tlsmilter-secure",
        ]
        self.postfix = LabPostfix(workdir / "postfix", listen=self.ways["none"],
                                  resolver=lab.dns.resolver[0], ca_file=lab.ca.ca_file,
                                  extra_main=main, extra_master=master)
        self.tlsmilter_sockets = self.postfix.queue_dir / "tlsmilter"
        self.null_socket = self.postfix.queue_dir / "bench" / "null.sock"
        for directory in (self.tlsmilter_sockets, self.null_socket.parent):
            directory.mkdir(parents=True, mode=0o755, exist_ok=True)


# --- section 1: smtp-source through Postfix --------------------------------------------------


@dataclass
class PostfixRun:
    way: str
    messages: int
    seconds: float  # smtp-source wall time: every message accepted
    drained: float  # until every message was delivered to smtp-sink
    milter_cpu: float  # seconds of milter CPU (0 without a milter)
    machine_busy: float  # share of both CPUs busy during the run
    problems: list[str] = field(default_factory=list)
    spread: Counter[int] = field(default_factory=Counter)  # domains per message (sensitive)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def message_file(path: Path, sensitive: bool) -> Path:
    lines = [f"{name}: {value}" for name, value in headers(sensitive)]
    path.write_text("\n".join([*lines, "", "La de da de da 1.", "La de da de da 2.", ""]))
    return path


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def smtp_source(address: str, messages: int, sessions: int, file: Path) -> list[list[str]]:
    """One smtp-source per session, so each numbers its recipients 1, 2, ... in order."""
    binary = shutil.which("smtp-source", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if binary is None:
        raise SystemExit("bench: smtp-source not found (Debian package postfix)")
    return [[binary, "-s", "1", "-m", str(count), "-N", "-r", str(RECIPIENTS),
             "-f", mail.SENDER, "-t", f"@{SOURCE_DOMAIN}", "-F", str(file),
             "-M", "client.lab.invalid", f"{address}:25"]
            for count in split(messages, sessions) if count]


class Counters:
    """What the logs say happened, counted from a position on."""

    REMOVED = re.compile(r"postfix/qmgr\[\d+\]: \w+: removed")
    SENT = re.compile(r" status=sent ")
    SECURE = re.compile(r"postfix/tlsmilter-secure/smtp\[\d+\]: .* status=sent ")
    REFUSED = re.compile(r"milter-reject|: reject: ")
    DECISION = re.compile(r" decision .* verdict=(\w+)(?: would_be=\w+)? domains=(\S+)")

    def __init__(self, maillog: Path, milter_log: Path) -> None:
        self.maillog, self.milter_log = maillog, milter_log
        self.mark()

    def mark(self) -> None:
        self._maillog_at = self._size(self.maillog)
        self._milter_at = self._size(self.milter_log)

    @staticmethod
    def _size(path: Path) -> int:
        return path.stat().st_size if path.exists() else 0

    @staticmethod
    def _since(path: Path, offset: int) -> str:
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
        return ""

    def maillog_text(self) -> str:
        return self._since(self.maillog, self._maillog_at)

    def decisions(self) -> list[tuple[str, int]]:
        text = self._since(self.milter_log, self._milter_at)
        return [(m.group(1), len(m.group(2).split(",")))
                for m in self.DECISION.finditer(text)]


def run_postfix(mta: Mta, way: Way, messages: int, sessions: int, files: dict[bool, Path],
                counters: Counters, milter_pid: int | None) -> PostfixRun:
    counters.mark()
    argvs = smtp_source(way.listen, messages, sessions, files[way.sensitive])
    cpu_before = cpu_seconds(milter_pid) if milter_pid else 0.0
    busy_before = machine_busy()
    started = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for argv in argvs]
    errors = [p.communicate()[1].decode(errors="replace").strip() for p in procs]
    seconds = time.perf_counter() - started
    busy_after = machine_busy()
    cpu = (cpu_seconds(milter_pid) - cpu_before) if milter_pid else 0.0
    problems = [f"smtp-source exited {p.returncode}: {e}" for p, e in zip(procs, errors,
                                                                          strict=True)
                if p.returncode != 0]
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while len(Counters.REMOVED.findall(counters.maillog_text())) < messages:
        if problems or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    drained = time.perf_counter() - started
    log = counters.maillog_text()
    removed = len(Counters.REMOVED.findall(log))
    sent = len(Counters.SENT.findall(log))
    if removed != messages or sent != messages * RECIPIENTS:
        problems.append(f"{messages} messages sent, {removed} delivered "
                        f"({sent} of {messages * RECIPIENTS} recipients)")
    if refused := len(Counters.REFUSED.findall(log)):
        problems.append(f"{refused} refusals in the maillog")
    run = PostfixRun(way.name, messages, seconds, drained, cpu,
                     (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1]),
                     problems)
    if way.milter == "tlsmilter" and way.sensitive:
        decisions = counters.decisions()
        verdicts = Counter(v for v, _ in decisions)
        run.spread = Counter(n for _, n in decisions)
        if verdicts != Counter({"accept": messages}):
            problems.append(f"tlsmilter decisions {dict(verdicts)}, expected "
                            f"{messages} accept")
        secure = len(Counters.SECURE.findall(log))
        if secure != messages * RECIPIENTS:
            problems.append(f"{secure} of {messages * RECIPIENTS} recipients went through "
                            "the tlsmilter-secure FILTER route")
    elif way.milter == "tlsmilter" and counters.decisions():
        problems.append("tlsmilter logged decisions for normal mail")
    return run


# --- section 2: the milter protocol, straight at the socket -----------------------------------


@dataclass
class DirectRun:
    milter: str
    mail: str
    connections: int
    messages: int
    seconds: float
    latencies: list[float]
    milter_cpu: float
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run_direct(milter: str, path: Path, pid: int, domains: list[str], messages: int,
               connections: int, sensitive: bool) -> DirectRun:
    context = multiprocessing.get_context("spawn")  # the bench process has lab threads
    routed = milter == "tlsmilter" and sensitive
    counts = split(messages, connections)
    firsts = [sum(counts[:i]) for i in range(connections)]
    with context.Manager() as manager, context.Pool(connections) as workers:
        start = manager.Event()
        jobs = [workers.apply_async(load_worker, (str(path), [
            direct_message(domains, index, sensitive) for index in range(first, first + count)
        ], start)) for first, count in zip(firsts, counts, strict=True)]
        time.sleep(0.5 + 0.1 * connections)  # let every worker reach start.wait()
        cpu_before = cpu_seconds(pid)
        start.set()
        results = [job.get(timeout=600) for job in jobs]
        cpu = cpu_seconds(pid) - cpu_before
    began = min(r[0] for r in results)
    ended = max(r[1] for r in results)
    latencies = [latency for r in results for latency in r[2]]
    outcomes: Counter[str] = sum((r[3] for r in results), Counter())
    expected = Counter({"a+route" if routed else "a": messages})
    problems = [] if outcomes == expected else [
        f"milter answers {dict(outcomes)}, expected {dict(expected)}"]
    return DirectRun(milter, "sensitive" if sensitive else "normal", connections, messages,
                     ended - began, latencies, cpu, problems)


# --- section 3: memory ---------------------------------------------------------------------


def rss_child(entries: int, assessment_file: str) -> None:
    """In a fresh interpreter: RSS with serve's modules loaded, then with ``entries`` cached."""
    import gc

    import tlsmilter.daemons.serve  # noqa: F401  # what serve loads, before the cache fills
    from tlsmilter import config
    from tlsmilter.store.memory import MemoryCache

    text = Path(assessment_file).read_text()
    template = json.loads(text)
    gc.collect()
    base = rss_kib()
    cache = MemoryCache(config.CacheSettings(max_entries=max(entries, 1)))
    suffix = f".{template['domain']}"
    for i in range(entries):
        assessment = json.loads(text)  # a fresh object per domain, as the prober makes them
        domain = f"d{i:06d}{suffix}"
        assessment["domain"] = domain
        for mx in assessment.get("mx", []):
            mx["host"] = mx["host"].replace(template["domain"], domain)
        cache.put(assessment)
    gc.collect()
    print(json.dumps({"entries": len(cache), "base_kib": base, "filled_kib": rss_kib()}))


def measure_rss(entries: int, assessment_file: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-m", "bench.milter", "--rss-child", str(entries),
                          str(assessment_file)], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result: dict[str, int] = json.loads(out.stdout)
    return result


# --- reporting -------------------------------------------------------------------------------


def show_problems(label: str, problems: list[str]) -> bool:
    for problem in problems:
        print(f"WARNING: {label}: {problem}")
    return not problems


def report_postfix(runs: list[PostfixRun], ways: list[Way]) -> dict[str, float]:
    print("\n== 1. Through Postfix: smtp-source -> lab Postfix -> smtp-sink ==")
    medians: dict[str, float] = {}
    for way in ways:
        mine = [r for r in runs if r.way == way.name]
        rates = [r.rate for r in mine]
        medians[way.name] = statistics.median(rates)
        e2e = statistics.median(r.messages / r.drained for r in mine)
        busy = statistics.fmean(r.machine_busy for r in mine)
        print(f"{way.name:>24}: {medians[way.name]:7.1f} msg/s accepted (median of "
              f"{len(rates)}: {', '.join(f'{x:.1f}' for x in rates)}); "
              f"{e2e:6.1f} msg/s delivered; CPUs {busy:.0%} busy")
        spread = sum((r.spread for r in mine), Counter())
        if spread:
            total = sum(spread.values())
            print(f"{'':>24}  domains per message: " + ", ".join(
                f"{n}: {spread[n] / total:.0%}" for n in sorted(spread)))
    base_null, base_none = medians.get("null milter"), medians.get("no milter")
    for name in ("tlsmilter, normal mail", "tlsmilter, sensitive mail"):
        if name in medians and base_null and base_none:
            print(f"ratio {name}: {medians[name] / base_null:.2f} of null milter, "
                  f"{medians[name] / base_none:.2f} of no milter "
                  f"(target >= 0.90 of null milter)")
    # The machine's speed drifts between rounds more than the ways differ, so compare each
    # way with the null milter within a round (its four runs are back to back) as well.
    rounds = [{r.way: r.rate for r in runs[i:i + len(ways)]}
              for i in range(0, len(runs), len(ways))]
    for name in ("tlsmilter, normal mail", "tlsmilter, sensitive mail"):
        paired = [r[name] / r["null milter"] for r in rounds if name in r and "null milter" in r]
        if paired:
            print(f"ratio {name} to null milter within each round: median "
                  f"{statistics.median(paired):.2f} ({', '.join(f'{x:.2f}' for x in paired)})")
    return medians


def report_direct(runs: list[DirectRun]) -> None:
    print("\n== 2. Milter protocol straight at the unix socket (one connection per message) ==")
    for run in runs:
        print(f"{run.milter:>9} {run.mail:>9}, {run.connections} conn: {run.rate:7.1f} msg/s; "
              f"latency p50 {run.percentile(50) * 1000:6.2f} ms, "
              f"p99 {run.percentile(99) * 1000:6.2f} ms; "
              f"milter CPU {run.milter_cpu / run.messages * 1e6:6.0f} us/msg")
    for connections in sorted({r.connections for r in runs}):
        null = next((r for r in runs if r.milter == "null" and r.connections == connections),
                    None)
        for run in runs:
            if run.milter == "tlsmilter" and run.connections == connections and null:
                print(f"tlsmilter {run.mail}, {connections} conn: p99 "
                      f"{run.percentile(99) * 1000:.2f} ms, "
                      f"{(run.percentile(99) - null.percentile(99)) * 1000:+.2f} ms over the "
                      f"null milter; p50 {(run.percentile(50) - null.percentile(50)) * 1000:+.2f}"
                      f" ms (target: p99 added <= 2 ms)")


def report_cpu(runs: list[PostfixRun], ways: list[Way]) -> None:
    print("\n== 3a. Milter CPU per message, through Postfix (all milter threads, /proc/PID/stat)"
          " ==")
    for way in ways:
        mine = [r for r in runs if r.way == way.name]
        if way.milter:
            cpu = sum(r.milter_cpu for r in mine) / sum(r.messages for r in mine)
            print(f"{way.name:>24}: {cpu * 1e6:6.0f} us/msg")


# --- the run -------------------------------------------------------------------------------


@contextlib.contextmanager
def profiling(directory: Path | None, name: str, pid: int | None) -> Iterator[None]:
    """py-spy record of ``pid`` while the block runs (nothing without a directory or pid)."""
    if directory is None or pid is None:
        yield
        return
    binary = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:"
                          f"{os.environ.get('PATH', '')}")
    if binary is None:
        raise SystemExit("bench: --profile needs py-spy (pip install py-spy)")
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / f"{re.sub(r'[^a-z0-9]+', '-', name.lower())}.txt"
    spy = subprocess.Popen([binary, "record", "--pid", str(pid), "--format", "raw",
                            "--rate", "250", "--nonblocking", "--threads", "--output",
                            str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
        print(f"profile: {output}")


@contextlib.contextmanager
def stopping(*daemons: Daemon) -> Iterator[None]:
    try:
        yield
    finally:
        for daemon in daemons:
            daemon.stop()


def warm_up(mta: Mta, domains: dict[str, str], counters: Counters, policy: Path) -> list[str]:
    """Send one sensitive message per domain through tlsmilter; check every domain's rating."""
    problems = []
    for domain in domains:
        msg = mail.message(f"warm@{domain}", "warm-up", {"X-Sensitivity": SENSITIVITY})
        mail.submit((mta.ways["tlsmilter"], 25), msg)
    for domain, level in domains.items():
        answer = socketmap_query(policy, domain)
        wanted = {"dane": "OK dane-only", "verified": "OK verify"}[level]
        if not answer.startswith(wanted):
            problems.append(f"{domain}: policy server says {answer!r}, expected {wanted!r}")
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while mta.postfix.queue() and time.monotonic() < deadline:
        time.sleep(0.1)
    return problems


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.milter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=positive, default=2000, metavar="N",
                        help="messages per Postfix run (default: 2000)")
    parser.add_argument("--sessions", type=positive, default=8, metavar="C",
                        help="concurrent SMTP sessions (default: 8)")
    parser.add_argument("--rounds", type=positive, default=3,
                        help="Postfix runs per way, interleaved (default: 3)")
    parser.add_argument("--domains", type=positive, default=20,
                        help="recipient domains in the cache (default: 20)")
    parser.add_argument("--direct-messages", type=positive, default=3000, metavar="M",
                        help="messages per direct milter run (default: 3000)")
    parser.add_argument("--connections", type=positive, nargs="+", default=[1, 8],
                        help="direct milter connections (default: 1 8)")
    parser.add_argument("--cache-sizes", type=int, nargs="*", default=[10_000, 100_000],
                        help="domains in the cache for the RSS figures (default: 10000 100000)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record py-spy profiles (collapsed stacks) of the milters in "
                        "round 1 and the 8-connection direct runs into DIR")
    parser.add_argument("--marking", action="store_true",
                        help="mark sensitive mail with a Purview label instead of the header, "
                        "and configure 200 labels, 20 Subject keywords, 100 sender rules and "
                        "an override for every recipient domain and 100 more")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1])
        return 0
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (the lab binds ports 25 and 53 on loopback)")
    domains = pool(args.domains)
    names = list(domains)
    ok = True
    with tempfile.TemporaryDirectory(prefix="tlsmilter-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # Postfix's unprivileged daemons reach sockets below it
        with Lab(workdir / "lab", [scenario(d) for d in names]) as lab:
            mta = Mta(workdir, lab, names)
            config_file = workdir / "tlsmilter.toml"
            tlsmilter_config(config_file, mta.tlsmilter_sockets, lab)
            if args.marking:
                MARKING["on"] = True
                config_file.write_text(config_file.read_text() + marking_config(names))
            tls = Daemon("tlsmilter serve", [sys.executable, "-m", "tlsmilter.cli", "--config",
                                             str(config_file), "serve"],
                         workdir / "tlsmilter.log", mta.tlsmilter_sockets / "policy.sock")
            null = Daemon("null milter", [sys.executable, "-m", "bench.nullmilter",
                                          f"unix:{mta.null_socket}"],
                          workdir / "nullmilter.log", mta.null_socket)
            sink = Daemon("smtp-sink", [shutil.which("smtp-sink", path="/usr/sbin:/usr/bin")
                                        or "smtp-sink", "-u", "nobody",
                                        f"{mta.sink_address}:25", "256"],
                          workdir / "smtp-sink.log", None)
            with stopping(sink, null, tls, mta.postfix):
                sink.start()
                null.start()
                tls.start()
                mta.postfix.start()
                ok = run_all(args, workdir, mta, names, domains, tls, null) and ok
            leftovers = [d.name for d in (sink, null, tls) if d.alive()]
            if mta.postfix.pids():
                leftovers.append(f"postfix {mta.postfix.pids()}")
        if leftovers:
            print(f"WARNING: still running: {leftovers}")
            ok = False
    return 0 if ok else 1


def run_all(args: argparse.Namespace, workdir: Path, mta: Mta, names: list[str],
            domains: dict[str, str], tls: Daemon, null: Daemon) -> bool:
    counters = Counters(mta.postfix.maillog_file, tls.log)
    started = time.perf_counter()
    problems = warm_up(mta, domains, counters, mta.tlsmilter_sockets / "policy.sock")
    levels = Counter(domains.values())
    print(f"cache: {len(domains)} lab domains assessed in {time.perf_counter() - started:.1f} s "
          f"through tlsmilter ({', '.join(f'{k} {v}' for k, v in sorted(levels.items()))}); "
          "the policy server confirms each")
    ok = show_problems("warm-up", problems)
    files = {s: message_file(workdir / f"message-{s}.txt", s) for s in (False, True)}
    ways = [Way("no milter", mta.ways["none"], True, ""),
            Way("null milter", mta.ways["null"], True, "null"),
            Way("tlsmilter, normal mail", mta.ways["tlsmilter"], False, "tlsmilter"),
            Way("tlsmilter, sensitive mail", mta.ways["tlsmilter"], True, "tlsmilter")]
    pids = {"": None, "null": null.pid, "tlsmilter": tls.pid}
    print(f"Postfix: {args.messages} messages per run, {args.sessions} sessions, "
          f"{RECIPIENTS} recipients each in 1-5 domains; {args.rounds} rounds, order rotated")
    # Untimed: starts smtpd, cleanup and smtp processes and milter threads for every way.
    for way in ways:
        run = run_postfix(mta, way, min(args.messages, 200), args.sessions, files, counters,
                          pids[way.milter])
        ok = show_problems(f"warm-up {way.name}", run.problems) and ok
    runs: list[PostfixRun] = []
    for round_ in range(args.rounds):
        for way in ways[round_ % len(ways):] + ways[:round_ % len(ways)]:
            with profiling(args.profile if round_ == 0 else None, f"postfix {way.name}",
                           pids[way.milter]):
                run = run_postfix(mta, way, args.messages, args.sessions, files, counters,
                                  pids[way.milter])
            ok = show_problems(f"round {round_ + 1} {way.name}", run.problems) and ok
            runs.append(run)
    report_postfix(runs, ways)
    direct: list[DirectRun] = []
    for connections in args.connections:
        for milter, path, pid, sensitive in (
                ("null", mta.null_socket, null.pid, True),
                ("tlsmilter", mta.tlsmilter_sockets / "milter.sock", tls.pid, False),
                ("tlsmilter", mta.tlsmilter_sockets / "milter.sock", tls.pid, True)):
            with profiling(args.profile if connections == max(args.connections) else None,
                           f"direct {milter} {sensitive=} {connections}", pid):
                run_ = run_direct(milter, path, pid, names, args.direct_messages, connections,
                                  sensitive)
            ok = show_problems(f"direct {milter} {run_.mail} {connections}", run_.problems) \
                and ok
            direct.append(run_)
    report_direct(direct)
    report_cpu(runs, ways)
    print(f"tlsmilter serve RSS after the runs ({len(domains)} domains cached): "
          f"{rss_kib(tls.pid) / 1024:.1f} MiB; null milter {rss_kib(null.pid) / 1024:.1f} MiB")
    ok = report_rss(args, workdir, mta, names) and ok
    return ok


def report_rss(args: argparse.Namespace, workdir: Path, mta: Mta, names: list[str]) -> bool:
    richest = next(d for d in names if d.endswith("-dane2mx.test")) \
        if any(d.endswith("-dane2mx.test") for d in names) else names[0]
    assessment = workdir / "assessment.json"
    answer = socketmap_query(mta.tlsmilter_sockets / "policy.sock", richest)
    check = subprocess.run([sys.executable, "-m", "tlsmilter.cli", "--config",
                            str(workdir / "tlsmilter.toml"), "check", "--json", richest],
                           capture_output=True, text=True, check=False)
    assessment.write_text(check.stdout.strip().splitlines()[0] if check.stdout else "{}")
    if not check.stdout:
        print(f"WARNING: tlsmilter check {richest} printed nothing: {check.stderr}")
        return False
    size = len(assessment.read_bytes())
    print(f"\n== 3b. RSS of a fresh process with tlsmilter.daemons.serve imported and N "
          f"assessments "
          f"in MemoryCache ({richest}: {json.loads(assessment.read_text())['level']}, "
          f"{size} bytes of JSON, copied per domain; policy server: {answer}) ==")
    for entries in args.cache_sizes:
        result = measure_rss(entries, assessment)
        filled, base = result["filled_kib"], result["base_kib"]
        per = (filled - base) * 1024 / entries if entries else 0
        print(f"{entries:>7} domains: RSS {filled / 1024:6.1f} MiB (modules {base / 1024:.1f}"
              f" MiB, {per / 1024:.2f} KiB per domain) (target <= 150 MB at 100k)")
    return True


if __name__ == "__main__":
    sys.exit(main())
