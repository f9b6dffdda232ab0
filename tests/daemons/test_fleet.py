"""Several milters and workers on one Redis, as processes, with real Postfix in front.

This module has its own small lab (its own 127.N/16), so the probe counts at its SMTP servers
are not disturbed by other tests. Probes are told from deliveries by the absence of MAIL.
"""

from __future__ import annotations

import shutil
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import world_searchable_dir
from tests.lab import daemons, mail
from tests.lab.daemons import Daemon
from tests.lab.lab import Lab
from tests.lab.model import MX, Domain, Smtp, Tls
from tests.lab.postfix import LabPostfix
from tests.lab.redis_server import LabRedis
from tests.lab.scenarios import S
from tests.lab.smtpd import SmtpServer
from tlsmilter import config
from tlsmilter.store.base import State
from tlsmilter.store.redis.cache import RedisCache
from tlsmilter.store.redis.queue import ProbeRequests

pytestmark = pytest.mark.lab

SCENARIOS = [
    Domain("once", S, mx=(MX("mx1"),)),
    Domain("crash", S, mx=(MX("mx1", Smtp(Tls.HANG)),)),
    Domain("steady", S, mx=(MX("mx1"),)),
    Domain("after", S, mx=(MX("mx1"),)),
]


@dataclass
class Fleet:
    lab: Lab
    workdir: Path
    redis: LabRedis
    started: list[Daemon | LabPostfix]

    def config(self, name: str, overrides: dict[str, dict[str, object]] | None = None) -> Path:
        sockets = self.workdir / name / "spool" / "tlsmilter"
        sockets.mkdir(parents=True, exist_ok=True, mode=0o755)
        return daemons.write_config(self.workdir / f"{name}.toml", self.lab, sockets,
                                    redis_url=self.redis.url, overrides=overrides)

    def start(self, thing: Daemon | LabPostfix) -> Daemon | LabPostfix:
        thing.start()
        self.started.append(thing)
        return thing

    def worker(self, name: str, overrides: dict[str, dict[str, object]] | None = None) -> Daemon:
        daemon = daemons.worker(self.config(name, overrides), self.workdir / f"{name}.log")
        self.start(daemon)
        return daemon

    def mta(self, name: str, address: str) -> tuple[LabPostfix, Daemon]:
        """A Postfix with its own ``tlsmilter serve`` (sockets under its queue directory)."""
        milter = daemons.serve(self.config(name, {"milter": {"eom_wait": 8.0}}),
                               self.workdir / f"{name}.log")
        self.start(milter)
        postfix = LabPostfix(self.workdir / name, listen=address,
                             resolver=self.lab.dns.resolver[0], ca_file=self.lab.ca.ca_file,
                             extra_main={"smtpd_milters": "unix:tlsmilter/milter.sock",
                                         "milter_default_action": "tempfail"})
        self.start(postfix)
        return postfix, milter


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    workdir = world_searchable_dir("tlsmilter-fleet-")
    with Lab(workdir / "lab", SCENARIOS) as lab:
        redis = LabRedis(workdir / "redis")
        redis.start()
        running = Fleet(lab, workdir, redis, [])
        try:
            yield running
        finally:
            daemons.stop_all([*reversed(running.started), redis])
    shutil.rmtree(workdir, ignore_errors=True)


def sensitive(to: str) -> EmailMessage:
    return mail.message(to, "for your eyes", {"X-Sensitivity": "Personal"})


def probes(server: SmtpServer) -> int:
    return sum("MAIL" not in s.commands for s in server.sessions)


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_two_milters_and_two_workers_probe_a_domain_once(fleet: Fleet) -> None:
    fleet.worker("worker-a")
    fleet.worker("worker-b")
    mta_a, milter_a = fleet.mta("mta-a", f"{fleet.lab.base}.0.5")
    mta_b, milter_b = fleet.mta("mta-b", f"{fleet.lab.base}.0.6")
    errors: list[BaseException] = []

    def send(mta: LabPostfix) -> None:
        try:
            mail.submit(mta.submit, sensitive("ann@once.test"))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    senders = [threading.Thread(target=send, args=(mta,)) for mta in (mta_a, mta_b)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(60)
    assert not errors, errors  # both accepted: each milter waited for the one probe
    server = fleet.lab.server("once")
    server.wait_for_messages(2, timeout=30)
    assert probes(server) == 1
    for milter in (milter_a, milter_b):
        assert any("verdict=accept" in d for d in milter.decisions())


def test_a_worker_killed_mid_probe_is_taken_over(fleet: Fleet) -> None:
    quick = {"prober.timeouts": {"connect": 1.0, "smtp": 1.5, "tls": 1.5, "https": 1.5,
                                 "domain": 2.0},
             "worker": {"claim_after": 3.0}}
    victim = fleet.worker("worker-a", quick)
    settings = config.load(fleet.workdir / "worker-a.toml")
    cache = RedisCache(settings)
    try:
        ProbeRequests(settings, cache.client, cache.health).request("crash.test")
        server = fleet.lab.server("crash")
        server.wait_for_connections(1, timeout=10)  # the probe hangs on the greeting now
        victim.kill()
        server.behaviour = Smtp()  # the MX answers properly from now on
        survivor = fleet.worker("worker-b", quick)

        def assessed() -> bool:
            state, entry = cache.get("crash.test")
            return state is State.HIT and entry is not None and entry.level == "verified"

        eventually(assessed, 20, "the dead worker's probe was never taken over")
        assert "took over 1 probe(s)" in survivor.text()
    finally:
        cache.client.close()


def test_redis_outage_normal_mail_flows_sensitive_mail_waits(fleet: Fleet) -> None:
    fleet.worker("worker")
    mta, milter = fleet.mta("mta", f"{fleet.lab.base}.0.5")
    server = fleet.lab.server("steady")
    mail.submit(mta.submit, sensitive("bea@steady.test"))
    fleet.redis.stop()
    try:
        mail.submit(mta.submit, mail.message("bea@steady.test", "ordinary", {}))
        with pytest.raises(smtplib.SMTPDataError) as refused:
            mail.submit(mta.submit, sensitive("bea@steady.test"))
        assert refused.value.smtp_code == 451
        assert refused.value.smtp_error.decode().startswith("4.3.0 ")
    finally:
        fleet.redis.start()  # empty: this Redis keeps nothing on disk
    # The first sensitive message after the outage finds nothing cached; the worker probes
    # it while the milter waits (eom_wait), so it is accepted, or at worst tempfailed once.
    deadline = time.monotonic() + 30
    while True:
        try:
            mail.submit(mta.submit, sensitive("bea@after.test"))
            break
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 451 and time.monotonic() < deadline, exc
            time.sleep(1)
    fleet.lab.server("after").wait_for_messages(1, timeout=30)
    server.wait_for_messages(2, timeout=30)  # the first sensitive one and the ordinary one
    log = milter.text()
    assert log.count("unavailable") >= 1
    assert sum("failing safe until it is back" in line for line in log.splitlines()) == 1
    assert "is back after" in log
