"""SIGHUP under load, through the lab's real Postfix (issue 12).

Mail keeps flowing through Postfix and ``tlsmilter serve`` while the configuration is
reloaded: every message of the load is accepted and delivered, none refused or lost, and the
new policy applies to the next message.
"""

from __future__ import annotations

import shutil
import signal
import smtplib
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import world_searchable_dir
from tests.daemons.test_e2e import CONTRIB, contrib_main, contrib_master
from tests.lab import daemons, mail
from tests.lab.lab import Lab
from tests.lab.postfix import MYHOSTNAME, LabPostfix

pytestmark = pytest.mark.lab

LOAD = 60


@pytest.fixture
def stack(lab: Lab) -> Iterator[tuple[LabPostfix, daemons.Daemon, object]]:
    workdir = world_searchable_dir("tlsmilter-hup-")
    header_checks = workdir / "tlsmilter_header_checks"
    shutil.copy(CONTRIB / "tlsmilter_header_checks", header_checks)
    postfix = LabPostfix(workdir / "postfix", listen=f"{lab.base}.0.4",
                         resolver=lab.dns.resolver[0], ca_file=lab.ca.ca_file,
                         extra_main=contrib_main(header_checks), extra_master=contrib_master())
    sockets = postfix.queue_dir / "tlsmilter"
    sockets.mkdir(parents=True, mode=0o755)

    def write(on_insecure: str) -> None:
        daemons.write_config(workdir / "tlsmilter.toml", lab, sockets, overrides={
            "milter": {"skip_domains": [MYHOSTNAME]},
            "policies.private": {"on_insecure": on_insecure}})

    write("reject")
    serve = daemons.serve(workdir / "tlsmilter.toml", workdir / "tlsmilter.log")
    try:
        serve.start()
        postfix.start()
        yield postfix, serve, write
    finally:
        try:
            daemons.stop_all([postfix, serve])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def test_sighup_under_load_loses_nothing_and_applies_the_new_policy(
        lab: Lab, stack: tuple[LabPostfix, daemons.Daemon, object]) -> None:
    postfix, serve, write = stack
    weak = mail.message(f"u@{lab.domain('plain')}", "weak one", {"X-Sensitivity": "private"})
    with pytest.raises(smtplib.SMTPDataError) as refused:
        mail.submit(postfix.submit, weak)
    assert refused.value.smtp_code == 550

    secure = lab.server("dane-full")
    before = len(secure.messages)
    failures: list[BaseException] = []

    def load() -> None:
        for i in range(LOAD):
            try:
                mail.submit(postfix.submit, mail.message(
                    f"u{i}@{lab.domain('dane-full')}", f"load {i}", {"X-Sensitivity": "private"}))
            except BaseException as exc:  # every failure is reported below
                failures.append(exc)

    sender = threading.Thread(target=load)
    sender.start()
    while len(secure.messages) < before + 5 and sender.is_alive():
        time.sleep(0.05)
    write("tag")  # type: ignore[operator]
    assert serve.process is not None
    serve.process.send_signal(signal.SIGHUP)
    assert sender.is_alive()  # under load: messages before, during and after the reload
    deadline = time.monotonic() + 15
    while not serve.said("configuration reloaded"):
        assert time.monotonic() < deadline, serve.text()[-3000:]
        time.sleep(0.05)
    mail.submit(postfix.submit, weak)  # the next message: tagged and delivered, not refused
    sender.join(120)
    assert not failures, failures
    received = secure.wait_for_messages(before + LOAD, timeout=60)[before:]
    assert sorted(m.data.decode().split("Subject: ", 1)[1].split("\n", 1)[0].strip()
                  for m in received) == sorted(f"load {i}" for i in range(LOAD))
    tagged = lab.server("plain").wait_for_messages(1, timeout=30)[-1].data.decode()
    assert "X-TLSMilter-Tag: insecure: plain.test" in tagged
    assert serve.process.poll() is None and "Traceback" not in serve.text()
