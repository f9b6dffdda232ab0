"""End to end: the lab's real Postfix, tlsmilter's daemons as processes, mail sent with smtplib.

Every case runs twice: on the embedded default (``serve`` alone, policy server inside it), and
on the shared Redis cache (``serve``, a ``worker`` and a standalone ``policy-server``, three
processes and a lab redis-server). Postfix is configured from the files in contrib/postfix
(paths substituted), so these tests also prove that the shipped snippets work.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import sys
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
from tests.lab.model import Cert, Smtp, Tls
from tests.lab.postfix import MYHOSTNAME, LabPostfix
from tests.lab.redis_server import LabRedis

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib" / "postfix"


def contrib_main(header_checks: Path) -> dict[str, str]:
    """main.cf settings from contrib/postfix/main.cf.snippet, as shipped but for two paths."""
    settings: dict[str, str] = {}
    for line in (CONTRIB / "main.cf.snippet").read_text().splitlines():
        if not line.strip() or line[0].isspace() or line.startswith("#") or "=" not in line:
            continue
        name, _, value = (part.strip() for part in line.partition("="))
        settings[name] = value.replace("/etc/postfix/tlsmilter_header_checks",
                                       str(header_checks))
    # The lab relays with its own CA (LabPostfix sets it); the system bundle does not apply.
    settings.pop("smtp_tls_CAfile", None)
    settings.pop("smtp_tls_CApath", None)
    return settings


def contrib_master() -> list[str]:
    lines = (CONTRIB / "master.cf.snippet").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def contrib_postfix(lab: Lab, workdir: Path, listen: str) -> tuple[LabPostfix, Path]:
    """A lab Postfix in ``workdir`` set up with contrib's snippets, and the directory where
    tlsmilter's sockets go."""
    header_checks = workdir / "tlsmilter_header_checks"
    shutil.copy(CONTRIB / "tlsmilter_header_checks", header_checks)
    postfix = LabPostfix(workdir / "postfix", listen=listen,
                         resolver=lab.dns.resolver[0], ca_file=lab.ca.ca_file,
                         extra_main=contrib_main(header_checks),
                         extra_master=contrib_master())
    # The snippets name the sockets relative to Postfix's queue directory (chroot-safe), as
    # docs/postfix.md sets them up: tlsmilter listens in <queue_directory>/tlsmilter/.
    sockets = postfix.queue_dir / "tlsmilter"
    sockets.mkdir(parents=True, mode=0o755, exist_ok=True)
    return postfix, sockets


@dataclass
class Milter:
    """The tlsmilter side of the stack: ``serve``, plus on Redis a worker and a policy server."""

    serve: Daemon
    others: list[Daemon]

    def start(self) -> None:
        for daemon in (*self.others, self.serve):
            daemon.start()

    def stop(self) -> None:
        daemons.stop_all((self.serve, *self.others))

    def decisions(self) -> list[str]:
        return self.serve.decisions()


@pytest.fixture(scope="module", params=["memory", "redis"])
def stack(lab: Lab, request: pytest.FixtureRequest) -> Iterator[tuple[LabPostfix, Milter]]:
    workdir = world_searchable_dir("tlsmilter-e2e-")
    postfix, sockets = contrib_postfix(lab, workdir, f"{lab.base}.0.4")
    redis = LabRedis(workdir / "redis") if request.param == "redis" else None
    # Our own domain skipped, as docs/postfix.md recommends.
    config = daemons.write_config(workdir / "tlsmilter.toml", lab, sockets,
                                  redis_url=redis.url if redis else None,
                                  overrides={"milter": {"skip_domains": [MYHOSTNAME]},
                                             # a policy that requires DANE
                                             "policies.medical": {"require": "dane"},
                                             "sensitivity.values": {"medical": "medical"}})
    others = []
    if redis is not None:
        others = [daemons.worker(config, workdir / "worker.log"),
                  daemons.policy_server(config, workdir / "policy.log")]
    milter = Milter(daemons.serve(config, workdir / "tlsmilter.log"), others)
    try:
        if redis is not None:
            redis.start()
        milter.start()
        postfix.start()
        yield postfix, milter
    finally:
        try:
            daemons.stop_all([postfix, milter, *([redis] if redis else [])])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def message(to: str, subject: str, sensitivity: str | None = "private",
            extra: dict[str, str] | None = None) -> EmailMessage:
    """A test message, marked ``X-Sensitivity: <sensitivity>`` unless that is None."""
    marked = {"X-Sensitivity": sensitivity} if sensitivity else {}
    return mail.message(to, subject, {**marked, **(extra or {})})


def wait_log(postfix: LabPostfix, pattern: str, timeout: float = 30,
             poke: Callable[[], object] | None = None) -> str:
    """The maillog once ``pattern`` appears in it; Postfix logs a delivery after it happens.

    ``poke`` is called every second while waiting (e.g. to flush the queue).
    """
    compiled = re.compile(pattern)
    deadline = time.monotonic() + timeout
    next_poke = 0.0
    while not compiled.search(log := postfix.maillog()):
        assert time.monotonic() < deadline, f"{pattern!r} not logged:\n{log[-3000:]}"
        if poke is not None and time.monotonic() >= next_poke:
            poke()
            next_poke = time.monotonic() + 1.0
        time.sleep(0.2)
    return log


def send(postfix: LabPostfix, msg: EmailMessage) -> None:
    mail.submit(postfix.submit, msg)


def test_sensitive_mail_to_a_secure_domain_is_delivered_over_tls(
        lab: Lab, stack: tuple[LabPostfix, Milter]) -> None:
    postfix, _milter = stack
    server = lab.server("dnssec-ca")
    before = len(server.messages)
    send(postfix, message("alice@dnssec-ca.test", "secure one", "private",
                          {"TLS-Required": "No", "X-TLSMilter-Route": "forged"}))
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.tls_version == "TLSv1.3"
    data = received.data.decode()
    assert "X-TLSMilter-Assessment: policy=private; require=verified; verdict=accept; " \
           "dnssec-ca.test=verified" in data
    assert "X-TLSMilter-Route: verified" in data and "forged" not in data
    assert "TLS-Required" not in data  # RFC 8689 must not relax the enforced TLS
    # Delivered by the transport of the level it required, with the policy server's level.
    log = wait_log(postfix, r"postfix/tlsmilter-verified/smtp\[\d+\]: .*"
                            r"to=<alice@dnssec-ca\.test>.*status=sent")
    assert re.search(r"Verified TLS connection established to mx1\.dnssec-ca\.test", log)


def test_sensitive_mail_to_a_weaker_domain_is_refused_at_smtp_time(
        stack: tuple[LabPostfix, Milter]) -> None:
    postfix, milter = stack
    queued = len(postfix.queue())
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(postfix, message("bob@plain.test", "not over plaintext", "personal"))
    assert refused.value.smtp_code == 550
    text = refused.value.smtp_error.decode()
    assert text.startswith("5.7.10 ")
    assert "plain.test: cannot receive mail securely enough: MX does not offer STARTTLS" in text
    assert len(postfix.queue()) == queued
    assert any("verdict=reject" in d and "failing=plain.test" in d for d in milter.decisions())


@pytest.mark.parametrize("rcpt", ["<@plain.test>", f"<u%plain.test@{MYHOSTNAME}>",
                                  f"<plain.test!u@{MYHOSTNAME}>"])
def test_an_address_that_hides_its_destination_is_checked_where_it_goes(
        lab: Lab, stack: tuple[LabPostfix, Milter], rcpt: str) -> None:
    # Written to our own (skipped) domain or to none; Postfix routes each to plain.test.
    postfix, _milter = stack
    server = lab.server("plain")
    before, queued = len(server.messages), len(postfix.queue())
    code, text = mail.submit_raw(postfix.submit, [rcpt],
                                 message("u@plain.test", "hidden destination"))
    assert code == 550
    assert "plain.test: cannot receive mail securely enough" in text
    assert len(postfix.queue()) == queued
    assert len(server.messages) == before


def test_a_refusal_for_many_domains_still_names_them(stack: tuple[LabPostfix, Milter]) -> None:
    # More failing domains than a milter reply has lines (32): still a refusal naming them,
    # not the fail-safe "could not check" (pymilter raised on the 33rd line).
    postfix, _milter = stack
    code, text = mail.submit_raw(postfix.submit, [f"<u@nowhere{i}.test>" for i in range(40)],
                                 message("u@nowhere0.test", "forty domains"))
    lines = text.splitlines()
    assert code in (451, 550), lines
    assert "nowhere0.test: " in lines[1]
    assert lines[-1].endswith("more recipient domains fall short too")
    assert len(lines) == 32


def test_unknown_domain_is_tempfailed_then_accepted_on_retry(
        lab: Lab, stack: tuple[LabPostfix, Milter]) -> None:
    postfix, _milter = stack
    # mx2 hangs: the probe takes the SMTP timeout (3 s), longer than eom_wait (1 s).
    with pytest.raises(smtplib.SMTPDataError) as first:
        send(postfix, message("carol@hang-second.test", "first try"))
    assert first.value.smtp_code == 451
    assert first.value.smtp_error.decode().startswith("4.4.3 ")
    server = lab.server("hang-second")
    before = len(server.messages)
    deadline = time.monotonic() + 20
    while True:  # a sending MTA retries; so do we, until the prober has filled the cache
        try:
            send(postfix, message("carol@hang-second.test", "retry"))
            break
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 451
            assert time.monotonic() < deadline, "still tempfailed after the probe budget"
            time.sleep(1)
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.tls_version == "TLSv1.3"


def test_normal_mail_to_a_plaintext_domain_is_delivered_unchanged(
        lab: Lab, stack: tuple[LabPostfix, Milter]) -> None:
    postfix, _milter = stack
    server = lab.server("plain")
    before = len(server.messages)
    send(postfix, message("dave@plain.test", "ordinary mail", sensitivity=None))
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.tls_version is None
    assert b"X-TLSMilter" not in received.data
    assert b"Subject: ordinary mail" in received.data


def test_domain_that_degrades_after_acceptance_is_never_sent_in_clear(
        lab: Lab, stack: tuple[LabPostfix, Milter]) -> None:
    postfix, _milter = stack
    server = lab.server("degrades")
    before = len(server.messages)
    secure = server.behaviour
    postfix.postconf(defer_transports="tlsmilter-secure")  # hold delivery after acceptance
    try:
        send(postfix, message("erin@degrades.test", "then STARTTLS vanishes", "personal"))
        server.behaviour = Smtp(Tls.NONE)  # an attacker strips STARTTLS
        postfix.postconf(defer_transports="")
        # A flush that lands while the message is still with the "deferred transport" is a
        # no-op until the next queue run (minutes): flush until the real attempt is logged.
        wait_log(postfix, r"to=<erin@degrades\.test>.*status=deferred.*TLS is required",
                 poke=postfix.flush)
        assert len(server.messages) == before  # never delivered in clear
        assert any("erin@degrades.test" in str(entry) for entry in postfix.queue())
    finally:
        postfix.postconf(defer_transports="")
        server.behaviour = secure  # the other backend's run needs it as it was


def forget(milter: Milter, domain: str) -> None:
    """Lose tlsmilter's assessment of ``domain``: restart ``serve`` (the embedded cache lives
    in it), or flush the domain from the shared cache."""
    if milter.others:  # on Redis: the cache outlives serve
        flushed = subprocess.run([sys.executable, "-m", "tlsmilter.cli", "--config",
                                  str(milter.serve.config), "cache", "flush", domain],
                                 capture_output=True, text=True, timeout=30, check=False)
        assert flushed.returncode == 0, flushed.stderr
    else:
        milter.serve.stop()
        milter.serve.start()


def attack_after_acceptance(postfix: LabPostfix, milter: Milter, transport: str,
                            msg: EmailMessage, domain: str, attack: Callable[[], object]) -> None:
    """Have ``msg`` accepted while delivery through ``transport`` is held, then ``attack``
    (what an attacker on the path does after acceptance), have ``domain`` assessed again under
    the attack, and release delivery."""
    postfix.postconf(defer_transports=transport)
    try:
        send(postfix, msg)
        attack()
        forget(milter, domain)
    finally:
        postfix.postconf(defer_transports="")


def fell_below(postfix: LabPostfix, domain: str, level: str, required: str) -> str:
    """The maillog once the policy server deferred ``domain``, assessed ``level`` now, for a
    message that required ``required``."""
    return wait_log(postfix, rf"tlsmilter: {re.escape(domain)} is assessed {level} now, below "
                             rf"the {required} this message requires", poke=postfix.flush,
                    timeout=60)


def delivered_through(postfix: LabPostfix, transport: str, recipient: str, mx: str) -> None:
    """Wait until ``recipient`` was delivered through ``transport``, verified at ``mx``."""
    log = wait_log(postfix, rf"{transport}/smtp\[\d+\]: .*to=<{re.escape(recipient)}>.*"
                            r"status=sent", poke=postfix.flush, timeout=60)
    assert re.search(rf"Verified TLS connection established to {re.escape(mx)}", log)


def only_deferred(log: str, transport: str, recipient: str) -> None:
    """Every delivery attempt of ``recipient`` through ``transport`` so far was deferred."""
    tries = re.findall(rf"{transport}/smtp\[\d+\]: .*to=<{re.escape(recipient)}>.*", log)
    assert all("status=deferred" in line for line in tries), tries


def test_an_assessment_lost_before_delivery_defers_until_assessed_again(
        lab: Lab, stack: tuple[LabPostfix, Milter]) -> None:
    postfix, milter = stack
    server = lab.server("dnssec-ca")
    before = len(server.messages)
    # No attack: the assessment is merely lost (a restart of serve, a flush) after acceptance.
    attack_after_acceptance(postfix, milter, "tlsmilter-verified",
                            message("gina@dnssec-ca.test", "assessment lost", "private"),
                            "dnssec-ca.test", lambda: None)
    # Not delivered with the transport's floor: deferred, naming why ...
    log = wait_log(postfix, r"tlsmilter-verified/smtp\[\d+\]: .*to=<gina@dnssec-ca\.test>.*"
                            r"status=deferred", poke=postfix.flush)
    assert "cannot vouch for dnssec-ca.test" in log, log[-3000:]
    assert len(server.messages) == before
    # ... while that lookup had the domain assessed again: a later try delivers.
    wait_log(postfix, r"tlsmilter-verified/smtp\[\d+\]: .*to=<gina@dnssec-ca\.test>.*"
                      r"status=sent", poke=postfix.flush)
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.tls_version == "TLSv1.3"


def test_a_domain_that_falls_below_the_required_level_defers_and_never_leaves_weaker(
        lab: Lab, stack: tuple[LabPostfix, Milter]) -> None:
    # Accepted as "verified" (DNSSEC, a CA certificate); then an attacker on the path answers
    # with a certificate of its own. TLS still works, so the domain is assessed "encrypted":
    # delivery with "encrypt" would hand the attacker a message that required "verified".
    postfix, milter = stack
    server = lab.server("falls")
    before = len(server.messages)
    genuine = server.behaviour

    def replace_certificate() -> None:
        server.behaviour = Smtp(cert=Cert.SELF_SIGNED)

    try:
        attack_after_acceptance(postfix, milter, "tlsmilter-verified",
                                message("hal@falls.test", "then its certificate is replaced"),
                                "falls.test", replace_certificate)
        log = fell_below(postfix, "falls.test", "encrypted", "verified")
        only_deferred(log, "tlsmilter-verified", "hal@falls.test")
        assert len(server.messages) == before  # the attacker's server got nothing
        # Once the genuine server is back and assessed again, the message goes, verified.
        server.behaviour = genuine
        forget(milter, "falls.test")
        delivered_through(postfix, "tlsmilter-verified", "hal@falls.test", "mx1.falls.test")
    finally:
        server.behaviour = genuine  # the other backend's run needs it as it was
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.tls_version == "TLSv1.3"


def test_blocking_the_mta_sts_policy_host_never_downgrades_a_message(
        lab: Lab, stack: tuple[LabPostfix, Milter]) -> None:
    # MTA-STS alone made the domain "verified". An attacker then blocks mta-sts.<domain>, which
    # is exactly what RFC 8461's policy cache defeats: the fetched policy keeps applying.
    postfix, milter = stack
    server = lab.server("sts-blocked")
    policy_host = lab.https["sts-blocked.test"]
    before = len(server.messages)
    try:
        attack_after_acceptance(postfix, milter, "tlsmilter-verified",
                                message("ida@sts-blocked.test", "then its policy is blocked"),
                                "sts-blocked.test", policy_host.stop)
        if milter.others:
            # The workers keep the policy in Redis: still verified, delivered verified.
            delivered_through(postfix, "tlsmilter-verified", "ida@sts-blocked.test",
                              "mx1.sts-blocked.test")
            (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
            assert received.tls_version == "TLSv1.3"
        else:
            # forget() restarts serve, and in the lab (no state_dir) the restarted prober has
            # no policy cache: the domain reads "encrypted", and the message waits rather than
            # leave weaker.
            fell_below(postfix, "sts-blocked.test", "encrypted", "verified")
            assert len(server.messages) == before
    finally:
        policy_host.start()


def test_failing_tlsa_lookups_never_downgrade_a_message_that_required_dane(
        lab: Lab, stack: tuple[LabPostfix, Milter]) -> None:
    # Accepted as "dane"; then an attacker on the path makes the MX's TLSA lookups fail (the
    # resolver answers REFUSED). Without TLSA the self-signed certificate proves nothing.
    postfix, milter = stack
    server = lab.server("dane-falls")
    tlsa_name = "_25._tcp.mx1.dane-falls.test."
    before = len(server.messages)
    try:
        attack_after_acceptance(postfix, milter, "tlsmilter-dane",
                                message("ann@dane-falls.test", "then TLSA fails", "medical"),
                                "dane-falls.test", lambda: lab.dns.refuse(tlsa_name))
        log = wait_log(postfix, r"dane-falls\.test(: assessed \w+| is assessed \w+ now, below "
                                r"the dane this message requires)", poke=postfix.flush,
                       timeout=60)
        only_deferred(log, "tlsmilter-dane", "ann@dane-falls.test")
        assert len(server.messages) == before
        # The lookups answer again: assessed dane again, delivered with DANE.
        lab.dns.unrefuse(tlsa_name)
        forget(milter, "dane-falls.test")
        delivered_through(postfix, "tlsmilter-dane", "ann@dane-falls.test",
                          "mx1.dane-falls.test")
    finally:
        lab.dns.unrefuse(tlsa_name)
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.tls_version == "TLSv1.3"


def test_with_the_milter_stopped_postfix_tempfails_as_documented(
        stack: tuple[LabPostfix, Milter]) -> None:
    postfix, milter = stack
    documented = re.search(r"^smtpd_milters\s*=.*default_action=(\w+)",
                           (CONTRIB / "main.cf.snippet").read_text(), re.MULTILINE)
    assert documented and documented.group(1) == "tempfail"
    milter.serve.stop()
    try:
        with pytest.raises(smtplib.SMTPResponseException) as refused:
            send(postfix, message("frank@dnssec-ca.test", "milter down", sensitivity=None))
        assert refused.value.smtp_code == 451
    finally:
        milter.serve.start()
