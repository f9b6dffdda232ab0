"""Tests of the lab's private Postfix and Redis instances themselves.

Each module run picks its own 127.N.0.0/24 corner of loopback. The resolver address most
tests hand to Postfix (127.N.0.9) has nothing listening, so every DNS lookup fails at once:
mail to any remote domain is accepted, relayed and then deferred. One test puts a recording
fake resolver on 127.N.0.10 instead, to see what Postfix's smtp client asks.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import redis

from tests.lab.postfix import LabPostfix, pid_alive, process_start
from tests.lab.redis_server import LabRedis
from tests.lab.service import LabError

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab runs Postfix and needs root"),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("postfix", "redis-server", "unshare", "script")),
        reason="needs postfix, redis-server, unshare and script",
    ),
]

NET = f"127.{random.randint(100, 250)}.0"
POSTFIX_ADDR = f"{NET}.3"
DEAD_RESOLVER = f"{NET}.9"
REDIS_ADDR = f"{NET}.20"
SENDER = "tester@postfix.lab.invalid"  # local to the lab Postfix: its DSNs are discarded


class FakeResolver:
    """A UDP DNS responder that records queries: ". NS" gets an answer with the AD bit set,
    anything else SERVFAIL. Enough to see what Postfix's smtp client asks, and of whom."""

    def __init__(self, address: str) -> None:
        self.queries: list[tuple[str, int, bool]] = []  # (name, type, DO bit)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((address, 53))
        self._sock.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                query, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = self._answer(query)
            if reply is not None:
                self._sock.sendto(reply, peer)

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        question = query.question[0]
        self.queries.append(
            (question.name.to_text(), question.rdtype, bool(query.ednsflags & dns.flags.DO))
        )
        reply = dns.message.make_response(query)
        if (question.name, question.rdtype) == (dns.name.root, dns.rdatatype.NS):
            reply.flags |= dns.flags.AD
            reply.answer.append(dns.rrset.from_text(".", 3600, "IN", "NS", "a.root.lab."))
        else:
            reply.set_rcode(dns.rcode.SERVFAIL)
        return reply.to_wire()


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Map every path under ``root`` to (mode, size, mtime) to notice any change."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def send(postfix: LabPostfix, recipient: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = recipient
    msg["Subject"] = subject
    msg.set_content("lab test message\n")
    with smtplib.SMTP(*postfix.submit, timeout=10) as client:
        client.send_message(msg)


@pytest.fixture(scope="module")
def lab_root() -> Iterator[Path]:
    """A work directory the postfix user can reach (pytest's tmp_path sits under 0700)."""
    root = Path(tempfile.mkdtemp(prefix="tlsmilter-lab-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


@dataclass
class Started:
    postfix: LabPostfix
    seconds: float
    host_resolv_conf: bytes
    host_postfix_dir: dict[str, tuple[int, int, int]]


@pytest.fixture(scope="module")
def started(lab_root: Path) -> Iterator[Started]:
    resolv_before = Path("/etc/resolv.conf").read_bytes()
    etc_postfix_before = snapshot(Path("/etc/postfix"))
    postfix = LabPostfix(lab_root / "postfix", POSTFIX_ADDR, resolver=DEAD_RESOLVER)
    began = time.monotonic()
    postfix.start()
    try:
        yield Started(postfix, time.monotonic() - began, resolv_before, etc_postfix_before)
    finally:
        postfix.stop()


def test_postfix_starts_fast_and_answers_ehlo(started: Started) -> None:
    postfix = started.postfix
    assert started.seconds < 10
    with smtplib.SMTP(*postfix.submit, timeout=10) as client:
        code, features = client.ehlo("client.lab.invalid")
    assert code == 250
    assert features.startswith(b"postfix.lab.invalid")
    status = subprocess.run(
        ["postfix", "-c", str(postfix.config_dir), "status"], capture_output=True, check=False
    )
    assert status.returncode == 0
    assert f"the Postfix mail system is running: PID: {postfix.master_pid()}" in postfix.maillog()


def test_host_configuration_untouched(started: Started) -> None:
    assert Path("/etc/resolv.conf").read_bytes() == started.host_resolv_conf
    assert snapshot(Path("/etc/postfix")) == started.host_postfix_dir
    assert not Path("/etc/postfix/main.cf").exists()


def test_master_runs_with_lab_resolv_conf(started: Started) -> None:
    master = started.postfix.master_pid()
    assert master is not None
    # /proc/<pid>/root resolves paths inside that process's mount namespace.
    seen = Path(f"/proc/{master}/root/etc/resolv.conf").read_text()
    assert f"nameserver {DEAD_RESOLVER}" in seen.splitlines()
    assert "trust-ad" in seen
    mountinfo = Path(f"/proc/{master}/mountinfo").read_text().splitlines()
    mount_points = [line.split()[4] for line in mountinfo]
    assert "/etc/resolv.conf" in mount_points
    assert DEAD_RESOLVER not in Path("/etc/resolv.conf").read_text()


def test_mail_for_a_remote_domain_is_relayed_and_deferred(started: Started) -> None:
    postfix = started.postfix
    send(postfix, "someone@unresolvable.invalid", "relay me")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        deferred = [
            msg
            for msg in postfix.queue()
            if msg["queue_name"] == "deferred"
            and any(r["address"] == "someone@unresolvable.invalid" for r in msg["recipients"])
        ]
        if deferred:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"message never deferred; queue {postfix.queue()}\n{postfix.maillog()}")
    assert "to=<someone@unresolvable.invalid>, relay=none" in postfix.maillog()
    postfix.flush()
    with pytest.raises(LabError, match="queue not empty"):
        postfix.wait_queue_empty(timeout=0.5)


def test_postconf_reloads_running_instance(started: Started) -> None:
    postfix = started.postfix
    postfix.postconf(smtpd_banner="$myhostname ESMTP reloaded")
    deadline = time.monotonic() + 10
    # smtpd processes that were idle at the reload exit when they notice it, so an early
    # connection may still get the old banner.
    while time.monotonic() < deadline:
        with smtplib.SMTP(timeout=10) as client:
            code, greeting = client.connect(*postfix.submit)
        if code == 220 and greeting.endswith(b"ESMTP reloaded"):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"banner never changed: {code} {greeting!r}")


def test_smtp_client_asks_lab_resolver_for_dnssec(lab_root: Path) -> None:
    resolver = FakeResolver(f"{NET}.10")
    postfix = LabPostfix(lab_root / "dns", f"{NET}.7", resolver=f"{NET}.10")
    try:
        postfix.start()
        send(postfix, "someone@probe.invalid", "look me up")
        deadline = time.monotonic() + 10
        while "to=<someone@probe.invalid>" not in postfix.maillog():
            assert time.monotonic() < deadline, postfix.maillog()
            time.sleep(0.1)
    finally:
        postfix.stop()
        resolver.close()
    # The smtp process, not just the master, resolves through the namespace's resolv.conf,
    # with the DO bit set, and Postfix's DNSSEC probe (". NS") sees the AD bit come through.
    assert ("probe.invalid.", dns.rdatatype.MX, True) in resolver.queries
    assert (".", dns.rdatatype.NS, True) in resolver.queries
    assert "DNSSEC validation may be unavailable" not in postfix.maillog()


def test_stop_leaves_no_process(lab_root: Path) -> None:
    postfix = LabPostfix(lab_root / "stop", f"{NET}.4", resolver=DEAD_RESOLVER)
    postfix.start()
    try:
        # Local mail is discarded, so the queue drains; delivering it spawns more daemons.
        send(postfix, "sink@postfix.lab.invalid", "discard me")
        postfix.wait_queue_empty(timeout=10)
        assert "status=sent (lab-local-sink)" in postfix.maillog()
        pids = postfix.pids()
        assert postfix.master_pid() in pids
        assert len(pids) > 1
        started = {pid: process_start(pid) for pid in pids}
    finally:
        postfix.stop()
    assert not [pid for pid, start in started.items() if start and pid_alive(pid, start)]
    assert not postfix.running()
    assert postfix.pids() == []
    postfix.stop()


def test_stop_cleans_up_after_a_killed_master(lab_root: Path) -> None:
    postfix = LabPostfix(lab_root / "killed", f"{NET}.8", resolver=DEAD_RESOLVER)
    postfix.start()
    try:
        master = postfix.master_pid()
        assert master is not None
        os.kill(master, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(master):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The pid file outlives the master; it must not pass for a running one.
        assert not postfix.running()
    finally:
        postfix.stop()
    assert postfix.pids() == []


def test_unreachable_workdir_is_refused(lab_root: Path) -> None:
    private = lab_root / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(LabError, match="not searchable"):
        LabPostfix(private / "postfix", f"{NET}.5")


def test_misspelt_parameter_is_refused(lab_root: Path) -> None:
    postfix = LabPostfix(
        lab_root / "typo", f"{NET}.6", extra_main={"smtp_tls_securty_level": "encrypt"}
    )
    with pytest.raises(LabError, match="unused parameter: smtp_tls_securty_level"):
        postfix.start()
    assert not postfix.running()


def test_redis_ping_restart_stop(lab_root: Path) -> None:
    with LabRedis(lab_root / "redis", host=REDIS_ADDR) as server:
        assert server.url == f"redis://{REDIS_ADDR}:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        first_pid, port = server.pid, server.port
        server.restart()
        assert server.port == port
        assert server.pid != first_pid
        assert not pid_alive(first_pid)
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        second_pid = server.pid
        server.stop()
        assert not pid_alive(second_pid)
        server.stop()
