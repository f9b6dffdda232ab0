"""Benchmark: Postfix TLS policy lookups (socketmap), tlsmilter against postfix-mta-sts-resolver.

Builds N lab domains with an enforced MTA-STS policy (unsigned DNS, one MX host each, the lab
CA's certificates), then runs, each on a unix socket of its own:

- ``serve``: tlsmilter's embedded backend with its policy server (``policy_server.socket``);
- ``policy-server``: tlsmilter's policy server on a private Redis, filled by a ``worker``;
- ``peer``: postfix-mta-sts-resolver (``--peer-version``, from PyPI) installed with pip into
  a virtual environment of its own under the work directory, run inside
  ``unshare --mount`` where ``/etc/resolv.conf`` is a bind mount naming the lab resolver (its
  config has no resolver option) and ``SSL_CERT_FILE`` names the lab CA; its in-memory cache,
  ``cache_grace`` raised so that every lookup is a cache hit.

Each server is warmed by asking for every domain until it answers ``OK`` (tlsmilter assesses
the domains for real, the peer fetches their policies for real). Then a socketmap client like
Postfix's keeps one connection open per process and sends one lookup at a time: 1 process,
then 8, all cache hits, the servers interleaved over several rounds. It prints lookups/s,
p50/p99 latency and the server's CPU time per 10k lookups (``policy-server``: Redis's CPU on
its own), medians over the rounds, and each server's ratio to the peer. Every reply must be
the ``OK secure match=...`` the domain's policy calls for, or the run fails.

``--baseline REV`` adds tlsmilter's two servers from commit REV (``git archive`` into the
work directory, run with it first on ``PYTHONPATH``), so a change is measured against its
predecessor under the same load.

    python -m bench.policy [--domains N] [--lookups K] [--rounds R] [--baseline REV]

Needs root (the lab binds ports 25, 53 and 443; the namespace needs CAP_SYS_ADMIN) and PyPI.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from tests.lab import daemons
from tests.lab.lab import TLD, Lab
from tests.lab.model import MX, Dnssec, Domain, MtaSts
from tests.lab.redis_server import LabRedis
from tests.lab.service import stop_process

PEER = "postfix-mta-sts-resolver"
PEER_VERSION = "1.5.1"
CONNECTIONS = (1, 8)
WARM_TIMEOUT = 60.0
START_TIMEOUT = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the client ---------------------------------------------------------------------------------


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def ask(sock: socket.socket, request: bytes, buffer: bytearray) -> bytes:
    """Send one socketmap request, read its one reply (a netstring)."""
    sock.sendall(netstring(request))
    while True:
        colon = buffer.find(b":")
        if colon > 0:
            size = int(buffer[:colon])
            end = colon + 1 + size
            if len(buffer) > end:
                reply = bytes(buffer[colon + 1:end])
                del buffer[:end + 1]
                return reply
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buffer += chunk


def client(path: str, requests: list[bytes], expected: dict[bytes, bytes],
           start: multiprocessing.synchronize.Event, results: Connection) -> None:
    """One Postfix-like client process: one connection, one lookup at a time."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    buffer = bytearray()
    latencies = []
    wrong = []
    clock = time.perf_counter
    start.wait()
    began = clock()
    for request in requests:
        sent = clock()
        reply = ask(sock, request, buffer)
        latencies.append(clock() - sent)
        if reply != expected[request] and len(wrong) < 3:
            wrong.append(f"{request!r} -> {reply!r}, expected {expected[request]!r}")
    ended = clock()
    sock.close()
    results.send((began, ended, latencies, wrong))
    results.close()


@dataclass
class Sample:
    rate: float
    p50: float
    p99: float
    cpu: float  # server CPU seconds per 10k lookups
    redis_cpu: float | None = None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Server:
    name: str
    socket: str
    map_name: str
    pid: int
    redis_pid: int | None = None
    samples: dict[int, list[Sample]] = field(default_factory=dict)


def measure(server: Server, requests: list[bytes], expected: dict[bytes, bytes],
            connections: int) -> Sample:
    """``requests`` over ``connections`` client processes at once."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    share = len(requests) // connections
    pipes, processes = [], []
    for i in range(connections):
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=client, args=(
            server.socket, requests[i * share:(i + 1) * share], expected, start, send))
        process.start()
        send.close()
        pipes.append(receive)
        processes.append(process)
    time.sleep(0.3)  # every client connected and waiting
    cpu_before = cpu_seconds(server.pid)
    redis_before = cpu_seconds(server.redis_pid) if server.redis_pid else 0.0
    start.set()
    outcomes = [pipe.recv() for pipe in pipes]
    cpu = cpu_seconds(server.pid) - cpu_before
    redis_cpu = cpu_seconds(server.redis_pid) - redis_before if server.redis_pid else None
    for process in processes:
        process.join()
    wrong = [w for outcome in outcomes for w in outcome[3]]
    if wrong:
        raise SystemExit(f"{server.name}: wrong replies: {'; '.join(wrong[:3])}")
    latencies = sorted(x for outcome in outcomes for x in outcome[2])
    wall = max(o[1] for o in outcomes) - min(o[0] for o in outcomes)
    per10k = 10_000 / len(latencies)
    return Sample(len(latencies) / wall, statistics.median(latencies),
                  latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
                  cpu * per10k, None if redis_cpu is None else redis_cpu * per10k)


def warm(server: Server, domains: list[str], expected: dict[bytes, bytes]) -> None:
    """Ask for every domain until the server answers what its policy calls for."""
    deadline = time.monotonic() + WARM_TIMEOUT
    missing = list(domains)
    while missing:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server.socket)
            buffer = bytearray()
            for domain in list(missing):
                request = f"{server.map_name} {domain}".encode()
                if ask(sock, request, buffer) == expected[request]:
                    missing.remove(domain)
        if missing:
            if time.monotonic() > deadline:
                raise SystemExit(f"{server.name}: no policy for {missing[:3]} after "
                                 f"{WARM_TIMEOUT:.0f} s")
            time.sleep(0.5)


# --- the servers ----------------------------------------------------------------------------------


def domains_for(count: int) -> list[Domain]:
    return [Domain(f"sts{i}", Dnssec.UNSIGNED, mx=(MX("mx1"),), mta_sts=MtaSts("enforce"))
            for i in range(count)]


def tlsmilter_servers(stack: contextlib.ExitStack, lab: Lab, workdir: Path, tag: str,
                      source: Path | None) -> Iterator[Server]:
    """``serve`` and ``policy-server`` (with a worker on a private Redis), from ``source``."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = f"{source}:{env.get('PYTHONPATH', '')}"
        env["TLSMILTER_SOURCE"] = str(source)
    overrides = {"log": {"level": "info"}}
    base = workdir / f"tlsmilter{tag}"
    (base / "serve").mkdir(parents=True)
    config = daemons.write_config(base / "serve.toml", lab, base / "serve", overrides=overrides)
    yield start_daemon(stack, daemons.serve(config, base / "serve.log"), env,
                       f"serve{tag}", base / "serve" / "policy.sock")
    redis_server = LabRedis(base / "redis")
    redis_server.start()
    stack.callback(redis_server.stop)
    (base / "shared").mkdir()
    config = daemons.write_config(base / "shared.toml", lab, base / "shared",
                                  redis_url=redis_server.url, overrides=overrides)
    start_daemon(stack, daemons.worker(config, base / "worker.log"), env, f"worker{tag}", None)
    server = start_daemon(stack, daemons.policy_server(config, base / "policy-server.log"), env,
                          f"policy-server{tag}", base / "shared" / "policy.sock")
    server.redis_pid = redis_server.pid
    yield server


def start_daemon(stack: contextlib.ExitStack, daemon: daemons.Daemon, env: dict[str, str],
                 name: str, sock: Path | None) -> Server:
    saved, cwd = dict(os.environ), Path.cwd()
    os.environ.clear()
    os.environ.update(env)  # Daemon.start passes the bench's environment on
    # ``python -m`` puts the working directory first on sys.path, before PYTHONPATH.
    os.chdir(env.get("TLSMILTER_SOURCE", cwd))
    try:
        daemon.start()
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
    stack.callback(daemon.stop)
    return Server(name, str(sock), "tlspolicy", daemon.pid)


def install_peer(venv: Path, version: str) -> Path:
    """postfix-mta-sts-resolver in a virtual environment of its own; its daemon's path."""
    daemon = venv / "bin" / "mta-sts-daemon"
    if not daemon.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                              f"{PEER}=={version}"], capture_output=True, text=True)
        if pip.returncode:
            raise SystemExit(f"pip install {PEER}=={version} failed:\n{pip.stderr[-2000:]}")
    return daemon


def peer_server(stack: contextlib.ExitStack, lab: Lab, workdir: Path, venv: Path,
                version: str) -> Server:
    daemon = install_peer(venv, version)
    base = workdir / "peer"
    base.mkdir()
    sock = base / "policy.sock"
    resolv = base / "resolv.conf"
    resolv.write_text(f"nameserver {lab.resolver.rpartition(':')[0]}\n")
    resolv.chmod(0o644)
    config = base / "mta-sts-daemon.yml"
    # cache_grace: seconds a cached policy is used before its TXT record is checked again;
    # raised so that every measured lookup is a cache hit, as tlsmilter's are.
    config.write_text(f"path: {sock}\nmode: 438\ncache_grace: 86400\n"
                      "cache:\n  type: internal\n  options:\n    cache_size: 10000\n"
                      "default_zone:\n  strict_testing: false\n  timeout: 4\n")
    log = (base / "daemon.log").open("ab")
    env = {**os.environ, "SSL_CERT_FILE": str(lab.ca.ca_file)}
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$1" /etc/resolv.conf && exec "$2" -v warn -c "$3"',
         "sh", str(resolv), str(daemon), str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    stack.callback(log.close)
    stack.callback(stop_process, process, 15.0)
    deadline = time.monotonic() + START_TIMEOUT
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{PEER} did not start:\n"
                             f"{(base / 'daemon.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return Server(f"{PEER} {version}", str(sock), "tlspolicy", process.pid)


# --- the run --------------------------------------------------------------------------------------


def median_sample(samples: list[Sample]) -> Sample:
    redis = [s.redis_cpu for s in samples if s.redis_cpu is not None]
    return Sample(statistics.median(s.rate for s in samples),
                  statistics.median(s.p50 for s in samples),
                  statistics.median(s.p99 for s in samples),
                  statistics.median(s.cpu for s in samples),
                  statistics.median(redis) if redis else None)


def report(servers: list[Server], args: argparse.Namespace) -> None:
    print(f"policy lookups, {args.domains} domains (MTA-STS enforce), {args.lookups} lookups "
          f"per server, connection count and round, all cache hits, {args.rounds} interleaved "
          f"rounds, medians; load before: {args.load}; after: {load()}")
    print(f"{'server':<32} {'conns':>5} {'lookups/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'CPU s/10k':>10} {'/peer':>6}")
    peer = servers[-1] if servers[-1].name.startswith(PEER) else None
    for connections in CONNECTIONS:
        for server in servers:
            s = median_sample(server.samples[connections])
            ratio = ""
            if peer is not None:
                ratio = f"{s.rate / median_sample(peer.samples[connections]).rate:.2f}x"
            redis = f" (+ Redis {s.redis_cpu:.2f})" if s.redis_cpu is not None else ""
            print(f"{server.name:<32} {connections:>5} {s.rate:>10,.0f} {s.p50 * 1e3:>7.3f} "
                  f"{s.p99 * 1e3:>7.3f} {s.cpu:>10.2f} {ratio:>6}{redis}")
    print("rates per round:")
    for server in servers:
        for connections in CONNECTIONS:
            rates = ", ".join(f"{s.rate:,.0f}" for s in server.samples[connections])
            print(f"  {server.name} x{connections}: {rates}")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=20)
    parser.add_argument("--lookups", type=int, default=20_000,
                        help="per server, connection count and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure tlsmilter's servers as of this git commit")
    parser.add_argument("--peer-version", default=PEER_VERSION)
    parser.add_argument("--peer-venv", type=Path,
                        help="reuse this virtual environment for the peer (default: a new one "
                             "in the work directory)")
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args(argv)
    args.load = load()

    workdir = Path(tempfile.mkdtemp(prefix="tlsmilter-bench-policy-"))
    workdir.chmod(0o755)
    scenarios = domains_for(args.domains)
    names = [f"{d.name}.{TLD}" for d in scenarios]
    try:
        with contextlib.ExitStack() as stack, Lab(workdir / "lab", scenarios) as lab:
            servers = list(tlsmilter_servers(stack, lab, workdir, "", None))
            if args.baseline:
                source = workdir / "baseline"
                source.mkdir()
                archive = subprocess.run(["git", "archive", args.baseline, "tlsmilter"],
                                         check=True, capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
                servers += tlsmilter_servers(stack, lab, workdir, f"@{args.baseline}", source)
            if not args.no_peer:
                servers.append(peer_server(stack, lab, workdir,
                                           args.peer_venv or workdir / "peer-venv",
                                           args.peer_version))
            expected = {}
            for server in servers:
                for name in names:
                    expected[f"{server.map_name} {name}".encode()] = (
                        f"OK secure match=mx1.{name} servername=hostname".encode())
            for server in servers:
                warm(server, names, expected)
            for _round in range(args.rounds):
                requests = [f"tlspolicy {names[i % len(names)]}".encode()
                            for i in range(args.lookups)]
                for connections in CONNECTIONS:
                    for server in servers:
                        server.samples.setdefault(connections, []).append(
                            measure(server, requests, expected, connections))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(servers, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
