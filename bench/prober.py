"""Benchmark: tlsmilter's prober against Postfix's posttls-finger on N lab domains.

Builds N domains in one loopback lab (a fixed mix of DANE, DNSSEC, unsigned, self-signed,
TLS 1.2 and plaintext MX hosts, one SMTP server each) and checks every domain three times:
with ``Prober.assess_many`` at the configured concurrency, with the prober one domain at a
time, and with ``posttls-finger`` one domain at a time inside a private mount namespace whose
``/etc/resolv.conf`` names the lab resolver. Each pass starts with Unbound's cache flushed.
Every pass must rate the mix as built, or the run fails: a bench that measures failures
measures nothing.

    python -m bench.prober [--domains N] [--concurrency C] [--no-finger]

Needs root (the lab binds ports 25 and 53; the namespace needs CAP_SYS_ADMIN).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType

from tests.lab.lab import TLD, Lab
from tests.lab.model import MX, Cert, Dnssec, Domain, Smtp, Tls, Tlsa
from tlsmilter import config
from tlsmilter.assess.model import Assessment
from tlsmilter.assess.prober import Prober

EHLO_NAME = "bench.lab.invalid"
SEPARATOR = "### tlsmilter-bench "
MISMATCHES_SHOWN = 3
LAB_STOP_TIMEOUT = 30.0
FLUSH, STOP = "flush", "stop"


@dataclass(frozen=True)
class Kind:
    """One sort of domain in the mix, and what each tool must make of it."""

    name: str
    dnssec: Dnssec
    server: Smtp
    tlsa: tuple[Tlsa, ...]
    level: str  # tlsmilter's level
    finger: str  # posttls-finger's outcome, see finger_outcome()


S, U = Dnssec.SIGNED, Dnssec.UNSIGNED
DNSSEC_CA = Kind("dnssec-ca", S, Smtp(Tls.TLS13), (), "verified", "verified")
DANE_EE = Kind("dane-ee", S, Smtp(Tls.TLS13), (Tlsa(3, 1, 1),), "dane", "dane")
DNSSEC_TLS12 = Kind("dnssec-tls12", S, Smtp(Tls.TLS12), (), "verified", "verified")
UNSIGNED_CA = Kind("unsigned-ca", U, Smtp(Tls.TLS13), (), "encrypted", "verified")
SELF_SIGNED = Kind("self-signed", U, Smtp(Tls.TLS13, Cert.SELF_SIGNED), (), "encrypted",
                   "untrusted")
PLAINTEXT = Kind("plaintext", U, Smtp(Tls.NONE), (), "none", "no-starttls")

# One cycle of 20 domains; domain i is CYCLE[i % 20], so every N gets about these shares.
MIX = ((DNSSEC_CA, 8), (DANE_EE, 4), (DNSSEC_TLS12, 2), (UNSIGNED_CA, 4), (SELF_SIGNED, 1),
       (PLAINTEXT, 1))
CYCLE = tuple(kind for kind, count in MIX for _ in range(count))


def build_mix(n: int) -> dict[str, Kind]:
    """Full domain name -> its kind, for the first ``n`` domains of the cycle."""
    kinds = (CYCLE[i % len(CYCLE)] for i in range(n))
    return {Lab.domain(f"d{i:04d}-{kind.name}"): kind for i, kind in enumerate(kinds)}


def scenario(domain: str, kind: Kind) -> Domain:
    name = domain.removesuffix(f".{TLD}")
    return Domain(name, kind.dnssec, mx=(MX("mx1", kind.server, tlsa=kind.tlsa),))


@dataclass(frozen=True)
class LabInfo:
    """What the lab process reports once everything listens."""

    resolver: str  # HOST:PORT
    ca_file: str
    smtp_servers: int
    built_in: float
    started_in: float
    pids: tuple[int, ...]  # Knot and Unbound


def serve_lab(workdir: Path, scenarios: list[Domain], conn: Connection) -> None:
    """Lab process: run the lab, flush Unbound's cache on request, stop when told or orphaned."""
    built = time.perf_counter()
    lab = Lab(workdir, scenarios)
    built_in = time.perf_counter() - built
    with lab:
        conn.send(LabInfo(lab.resolver, str(lab.ca.ca_file), len(lab.smtp), built_in,
                          lab.started_in, tuple(lab.pids())))
        with contextlib.suppress(EOFError):  # the bench went away: stop all the same
            while conn.recv() == FLUSH:
                lab.dns.flush(f"{TLD}.")
                conn.send(FLUSH)


class LabProcess:
    """The lab in a child process of its own.

    The lab's SMTP servers are Python threads; in the bench process they would share the
    prober's GIL, a handicap posttls-finger (a process of its own) does not have.
    """

    def __init__(self, workdir: Path, scenarios: list[Domain]) -> None:
        # fork: the bench has no threads yet, and the child needs no re-import
        context = multiprocessing.get_context("fork")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=serve_lab, args=(workdir, scenarios, child_conn),
                                         name="tlsmilter-bench-lab")
        self.info: LabInfo | None = None

    def __enter__(self) -> LabInfo:
        self._process.start()
        try:
            self.info = self._conn.recv()
        except EOFError:
            self._process.join()
            raise SystemExit("bench: the lab did not start (its error is above)") from None
        return self.info

    def flush(self) -> None:
        """Empty Unbound's cache of every lab name, so each pass starts cold."""
        self._conn.send(FLUSH)
        self._conn.recv()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(STOP)
        self._conn.close()
        self._process.join(LAB_STOP_TIMEOUT)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()

    def leftovers(self) -> list[int]:
        """PIDs of the lab process and its servers that still run."""
        pids = [self._process.pid or 0, *(self.info.pids if self.info else ())]
        return [pid for pid in pids if pid and Path(f"/proc/{pid}").exists()]


@dataclass(frozen=True)
class Run:
    """One pass over every domain."""

    tool: str
    how: str  # concurrency, as printed
    seconds: float  # wall clock for the whole pass
    mean_domain: float  # mean seconds from starting a domain to its result
    outcomes: dict[str, str]  # domain -> level or outcome
    expected: dict[str, str]
    evidence: dict[str, str]  # domain -> why, shown for domains that did not come out as built

    @property
    def rate(self) -> float:
        return len(self.outcomes) / self.seconds

    def mismatches(self) -> list[str]:
        return [d for d, got in self.outcomes.items() if got != self.expected[d]]


def prober_settings(info: LabInfo, concurrency: int) -> config.ProberSettings:
    return config.from_mapping({"prober": {
        "resolver": info.resolver, "ca_file": info.ca_file, "concurrency": concurrency,
        "ehlo_name": EHLO_NAME,
    }}).prober


def run_tlsmilter(mix: dict[str, Kind], settings: config.ProberSettings) -> Run:
    async def assess_all() -> tuple[float, list[Assessment]]:
        prober = Prober(settings)  # inside the loop: its semaphore binds to this loop
        started = time.perf_counter()
        results = await prober.assess_many(mix)
        return time.perf_counter() - started, results

    seconds, results = asyncio.run(assess_all())
    concurrency = settings.concurrency
    return Run(
        tool="tlsmilter", how=f"concurrency {concurrency}" if concurrency > 1 else "sequential",
        seconds=seconds, mean_domain=statistics.fmean(a.duration for a in results),
        outcomes={a.domain: a.level for a in results},
        expected={domain: kind.level for domain, kind in mix.items()},
        evidence={a.domain: "; ".join(r.text for r in a.reasons) for a in results},
    )


def finger_binary() -> str:
    found = shutil.which("posttls-finger", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if found is None:
        raise SystemExit("bench: posttls-finger not found (Debian package postfix)")
    return found


def finger_command(binary: str, settings: config.ProberSettings) -> list[str]:
    """posttls-finger with tlsmilter's timeouts, CA file and EHLO name, at level dane.

    Level dane looks TLSA up when the MX host's records validate and falls back to secure
    (certificate chain and name checked against the CA file) otherwise, as tlsmilter does.
    An empty ``dnssec_probe`` skips Postfix's look-up of the root NS, which the lab refuses.
    """
    timeouts = settings.timeouts
    return [
        binary, "-t", str(math.ceil(timeouts.connect)), "-T", str(math.ceil(timeouts.smtp)),
        "-l", "dane", "-F", settings.ca_file,
        "-o", f"smtp_starttls_timeout={math.ceil(timeouts.tls)}s",
        "-o", "dnssec_probe=", "-o", f"myhostname={EHLO_NAME}",
    ]


def finger_outcome(mx_host: str, output: str) -> str:
    """What posttls-finger found: dane, verified, untrusted, no-starttls or failed."""
    if f"Connected to {mx_host}[" not in output:
        return "failed"  # no MX, no address or no connection: not the lab resolver's answers
    if "Verified TLS connection established" in output:
        return "dane" if "Matched DANE" in output else "verified"
    if "Untrusted TLS connection established" in output:
        return "untrusted"
    if "> STARTTLS" not in output:
        return "no-starttls"
    return "failed"


def split_finger_output(text: str) -> dict[str, str]:
    """The loop's output, cut at the separator lines into domain -> posttls-finger output."""
    outputs: dict[str, str] = {}
    domain = ""
    for line in text.splitlines(keepends=True):
        if line.startswith(SEPARATOR):
            domain = line[len(SEPARATOR):].strip()
            outputs[domain] = ""
        elif domain:
            outputs[domain] += line
    return outputs


def finger_loop(workdir: Path, resolver: str, command: list[str], domains: Sequence[str],
                budget: float) -> tuple[float, str]:
    """Run ``command DOMAIN`` for each domain in turn, in one private mount namespace.

    The namespace sees ``resolv.conf`` from ``workdir`` as ``/etc/resolv.conf``; nothing
    outside it changes. ``MAIL_CONFIG`` points posttls-finger at an empty private main.cf.
    """
    host, _, _ = resolver.rpartition(":")
    resolv_conf = workdir / "resolv.conf"
    resolv_conf.write_text(f"nameserver {host}\noptions trust-ad\n")
    config_dir = workdir / "postfix"
    config_dir.mkdir()
    main_cf = config_dir / "main.cf"
    main_cf.write_text("# empty: posttls-finger gets its settings from -o options\n")
    # Postfix rereads a main.cf younger than a couple of seconds until it settles (~2.5 s).
    settled = time.time() - 60
    os.utime(main_cf, (settled, settled))
    script = (f"mount --bind {shlex.quote(str(resolv_conf))} /etc/resolv.conf || exit 1\n"
              f'for domain do\n  printf "{SEPARATOR}%s\\n" "$domain"\n'
              f'  {shlex.join(command)} "$domain" 2>&1\ndone\n')
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            *domains]
    env = {**os.environ, "MAIL_CONFIG": str(config_dir)}
    started = time.perf_counter()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          text=True, start_new_session=True) as loop:
        try:
            output, _ = loop.communicate(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(loop.pid, signal.SIGKILL)  # the shell and its posttls-finger child
            loop.communicate()
            raise SystemExit(f"bench: posttls-finger loop exceeded {budget:.0f} s") from None
    seconds = time.perf_counter() - started
    if loop.returncode != 0:
        raise SystemExit(f"bench: posttls-finger loop failed ({loop.returncode}):\n{output}")
    return seconds, output


def run_finger(workdir: Path, info: LabInfo, mix: dict[str, Kind],
               settings: config.ProberSettings) -> Run:
    command = finger_command(finger_binary(), settings)
    print(f"posttls-finger command: MAIL_CONFIG=<empty main.cf> {shlex.join(command)} DOMAIN")
    seconds, text = finger_loop(workdir, info.resolver, command, list(mix),
                                budget=settings.timeouts.domain * len(mix))
    outputs = split_finger_output(text)
    return Run(
        tool="posttls-finger", how="sequential, one process per domain", seconds=seconds,
        mean_domain=seconds / len(mix),
        outcomes={d: finger_outcome(f"mx1.{d}", outputs.get(d, "")) for d in mix},
        expected={domain: kind.finger for domain, kind in mix.items()},
        evidence=outputs,
    )


def report(run: Run) -> bool:
    """Print one pass's figures; return whether every domain came out as built."""
    n = len(run.outcomes)
    counts = Counter(run.outcomes.values())
    print(f"{run.tool:>14}: {n} domains in {run.seconds:.2f} s = {run.rate:.1f} domains/s "
          f"({run.how}); mean {run.mean_domain * 1000:.1f} ms per domain")
    print(f"{'':>14}  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    wrong = run.mismatches()
    for domain in wrong[:MISMATCHES_SHOWN]:
        print(f"WARNING: {run.tool}: {domain} came out {run.outcomes[domain]}, "
              f"built as {run.expected[domain]}:\n{run.evidence.get(domain, '').rstrip()}")
    if wrong:
        print(f"WARNING: {run.tool}: {len(wrong)} of {n} domains not as built; "
              "the figures above measure failures")
    return not wrong


def compare(runs: list[Run], baseline: Run) -> None:
    for run in runs:
        print(f"ratio {run.tool} ({run.how}) / posttls-finger (sequential): "
              f"{run.rate / baseline.rate:.2f}x domains/s")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.prober", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=positive, default=200, metavar="N",
                        help="lab domains to build and assess (default: 200)")
    parser.add_argument("--concurrency", type=positive, default=config.ProberSettings().concurrency,
                        metavar="C", help="prober.concurrency (default: the config default)")
    parser.add_argument("--no-finger", action="store_true",
                        help="skip the posttls-finger baseline")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mix = build_mix(args.domains)
    concurrencies = sorted({args.concurrency, 1}, reverse=True)
    with tempfile.TemporaryDirectory(prefix="tlsmilter-bench-") as tmp:
        workdir = Path(tmp)
        lab = LabProcess(workdir / "lab", [scenario(d, kind) for d, kind in mix.items()])
        with lab as info:
            print(f"lab: {len(mix)} domains, {info.smtp_servers} SMTP servers; built in "
                  f"{info.built_in:.2f} s, started in {info.started_in:.2f} s")
            runs = []
            for concurrency in concurrencies:
                lab.flush()
                runs.append(run_tlsmilter(mix, prober_settings(info, concurrency)))
            ok = all([report(run) for run in runs])
            if not args.no_finger:
                lab.flush()
                baseline = run_finger(workdir, info, mix, prober_settings(info, 1))
                ok = report(baseline) and ok
                compare(runs, baseline)
        leftovers = lab.leftovers()
    if leftovers:
        print(f"WARNING: lab processes still running: {leftovers}")
    return 0 if ok and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
