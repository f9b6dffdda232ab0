"""A Redis that hangs (SIGSTOP) under a real Postfix, ``tlsmilter serve`` and a worker.

Normal mail never waits on Redis: forty recipients in forty domains pass in well under a
second. A sensitive message is tempfailed (451 4.3.0) at once. The outage costs one
``redis.timeout``, logs one line when it starts and one when it ends, and never lets
Postfix's ``milter_default_action`` apply.
"""

from __future__ import annotations

import shutil
import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage

import pytest

from tests.conftest import world_searchable_dir
from tests.lab import daemons, mail
from tests.lab.daemons import Daemon
from tests.lab.lab import Lab
from tests.lab.model import MX, Domain
from tests.lab.postfix import LabPostfix
from tests.lab.redis_server import LabRedis
from tests.lab.scenarios import S

pytestmark = pytest.mark.lab

SCENARIOS = [Domain("steady", S, mx=(MX("mx1"),))]
RECIPIENTS = [f"user{n}@d{n}.hang.test" for n in range(40)]  # forty domains nobody cached
REDIS_TIMEOUT = 1.0  # the default redis.timeout


@dataclass
class Stack:
    lab: Lab
    redis: LabRedis
    postfix: LabPostfix
    milter: Daemon
    worker: Daemon


@pytest.fixture
def stack() -> Iterator[Stack]:
    workdir = world_searchable_dir("tlsmilter-hang-")
    started: list[Daemon | LabPostfix] = []
    with Lab(workdir / "lab", SCENARIOS) as lab:
        redis = LabRedis(workdir / "redis")
        redis.start()
        try:
            sockets = workdir / "mta" / "spool" / "tlsmilter"
            sockets.mkdir(parents=True, exist_ok=True, mode=0o755)
            settings = daemons.write_config(
                workdir / "tlsmilter.toml", lab, sockets, redis_url=redis.url,
                overrides={"milter": {"eom_wait": 8.0},
                           "redis": {"url": redis.url, "timeout": REDIS_TIMEOUT}})
            milter = daemons.serve(settings, workdir / "serve.log")
            worker = daemons.worker(settings, workdir / "worker.log")
            for thing in (worker, milter):
                thing.start()
                started.append(thing)
            postfix = LabPostfix(workdir / "mta", listen=f"{lab.base}.0.5",
                                 resolver=lab.dns.resolver[0], ca_file=lab.ca.ca_file,
                                 extra_main={"smtpd_milters": "unix:tlsmilter/milter.sock",
                                             "milter_default_action": "tempfail"})
            postfix.start()
            started.append(postfix)
            yield Stack(lab, redis, postfix, milter, worker)
        finally:
            daemons.stop_all([*reversed(started), redis])  # redis is resumed before it stops
    shutil.rmtree(workdir, ignore_errors=True)


def sensitive(to: str) -> EmailMessage:
    return mail.message(to, "for your eyes", {"X-Sensitivity": "Personal"})


def timed(send: Callable[[], object]) -> float:
    started = time.monotonic()
    send()
    return time.monotonic() - started


def submit_to_many(address: tuple[str, int], recipients: list[str]) -> None:
    msg = mail.message(", ".join(recipients[:2]), "ordinary, to many")
    with smtplib.SMTP(*address, local_hostname="client.lab.invalid", timeout=30) as smtp:
        refused = smtp.send_message(msg, to_addrs=recipients)
    assert refused == {}


def tempfailed(address: tuple[str, int], msg: EmailMessage) -> str:
    """Submit ``msg``, which must be refused with 451; the reply's text."""
    with pytest.raises(smtplib.SMTPDataError) as refused:
        mail.submit(address, msg)
    assert refused.value.smtp_code == 451, refused.value
    text: str = refused.value.smtp_error.decode()
    return text


def test_normal_mail_to_forty_domains_passes_at_once_while_redis_hangs(stack: Stack) -> None:
    submit = stack.postfix.submit
    mail.submit(submit, sensitive("ann@steady.test"))  # probed, cached, accepted: Redis works
    stack.lab.server("steady").wait_for_messages(1, timeout=30)
    stack.redis.pause()
    try:
        forty = timed(lambda: submit_to_many(submit, RECIPIENTS))
        replies: list[str] = []
        first = timed(lambda: replies.append(tempfailed(submit, sensitive("bo@steady.test"))))
        second = timed(lambda: replies.append(tempfailed(submit, sensitive("cy@steady.test"))))
        again = timed(lambda: submit_to_many(submit, RECIPIENTS))
    finally:
        stack.redis.resume()
    print(f"seconds: forty recipients {forty:.3f}, again {again:.3f}; "  # shown with -rP
          f"sensitive: first {first:.3f}, second {second:.3f}")
    assert forty < 1.0, forty  # the bound: was 40 s, then Postfix's 4.7.1
    assert again < 1.0, again
    for reply in replies:
        assert reply.startswith("4.3.0 tlsmilter could not check this sensitive message"), reply
    # The first sensitive message may find a lookup still timing out (one redis.timeout);
    # after that the breaker is open and the answer comes at once.
    assert first < REDIS_TIMEOUT + 1.0, first
    assert second < REDIS_TIMEOUT, second

    deadline = time.monotonic() + 10
    while not stack.milter.said("is back after"):
        assert time.monotonic() < deadline, "the milter never saw Redis come back"
        time.sleep(0.1)
    mail.submit(submit, sensitive("di@steady.test"))  # cached before the hang: accepted
    stack.lab.server("steady").wait_for_messages(2, timeout=30)

    log = stack.milter.text()
    assert sum("failing safe until it is back" in line for line in log.splitlines()) == 1
    assert sum("is back after" in line for line in log.splitlines()) == 1
    assert "Traceback" not in log
    # The worker keeps its own pace (a read, then a second's pause), and may not even have
    # read during so short a hang; if it noticed, one line each way.
    if stack.worker.said("failing safe until it is back"):
        deadline = time.monotonic() + 10
        while not stack.worker.said("is back after"):
            assert time.monotonic() < deadline, stack.worker.text()[-3000:]
            time.sleep(0.1)
    worker_log = stack.worker.text().splitlines()
    down = sum("failing safe until it is back" in line for line in worker_log)
    assert down <= 1 and sum("is back after" in line for line in worker_log) == down
    assert not any("Traceback" in line for line in worker_log)
    maillog = stack.postfix.maillog()
    refusals = [line for line in maillog.splitlines() if "milter-reject" in line]
    assert len(refusals) == 2 and all(" 4.3.0 " in line for line in refusals), refusals
    # Postfix never gave up on the milter: no timeout, no milter_default_action.
    assert "4.7.1" not in maillog
    assert "milter" not in "\n".join(line for line in maillog.splitlines()
                                     if "warning:" in line), maillog[-3000:]
