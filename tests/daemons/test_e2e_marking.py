"""End to end, each way of marking mail and per-domain overrides (issue 15): the lab's real
Postfix set up from contrib, ``tlsmilter serve`` as a process, mail sent over SMTP as Outlook
and people write it.

Each trigger is refused to a domain without STARTTLS (``plain.test``) and accepted and routed
by its required level to a domain with verified TLS (``dnssec-ca.test``). Overrides: `require`
refuses a verified domain and routes a DANE one to the DANE transport, `deny` refuses a DANE
domain, an expired one no longer applies. The embedded backend only: all of it is decided in
the milter, the same over either store (test_e2e runs both).
"""

from __future__ import annotations

import datetime
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import world_searchable_dir
from tests.daemons.test_e2e import contrib_postfix, wait_log
from tests.lab import daemons
from tests.lab.daemons import Daemon
from tests.lab.lab import Lab
from tests.lab.postfix import MYHOSTNAME, LabPostfix
from tlsmilter.core.decisionlog import parse
from tlsmilter.core.subject import decode

pytestmark = pytest.mark.lab

LABEL = "f42aa342-8706-4288-bd11-ebb85995028c"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
PUBLIC = "1a19d03a-48bc-4359-8038-5b5f6d5847c3"  # a label no rule names
HR = "hr.lab.invalid"

# Quoted TOML keys: write_config writes bare ones, which a GUID allows but "[secure]" does not.
MARKING = f'''
[sensitivity.labels]
"{LABEL}@{TENANT}" = "private"

[sensitivity.subject_keywords]
"[secure]" = "private"

[sensitivity.senders]
"{HR}" = "personal"

[overrides.domains."dnssec-tls12.test"]
level = "dane"
reason = "ministry requires DANE"

[overrides.domains."dane-ee.test"]
level = "dane"
reason = "ministry requires DANE"

[overrides.domains."dane-full.test"]
action = "deny"
reason = "contract ended, use the portal"

[overrides.domains."cname-mx.test"]
action = "deny"
reason = "was blocked until yesterday"
expires = "{(datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1))}"
'''


@pytest.fixture(scope="module")
def stack(lab: Lab) -> Iterator[tuple[LabPostfix, Daemon]]:
    workdir = world_searchable_dir("tlsmilter-e2e-marking-")
    postfix, sockets = contrib_postfix(lab, workdir, f"{lab.base}.0.7")
    config = daemons.write_config(
        workdir / "tlsmilter.toml", lab, sockets,
        overrides={"milter": {"skip_domains": [MYHOSTNAME]},
                   "sensitivity": {"strip_subject_keyword": True}})
    config.write_text(config.read_text() + MARKING)
    serve = daemons.serve(config, workdir / "tlsmilter.log")
    try:
        serve.start()
        postfix.start()
        yield postfix, serve
    finally:
        try:
            daemons.stop_all([postfix, serve])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def outlook_labels(guid: str, name: str) -> str:
    """An msip_labels header as Exchange Online writes it: folded, a field per line."""
    fields = ["Enabled=true", "SetDate=2024-03-01T09:12:44Z", "Method=Privileged",
              f"Name={name}", f"SiteId={TENANT}",
              "ActionId=8e2bd3c1-27e8-4ad4-9b8e-5f0e4fe2f7a1", "ContentBits=0"]
    return "msip_labels: " + ";\r\n ".join(f"MSIP_Label_{guid}_{f}" for f in fields) + "\r\n"


def raw_message(sender: str, to: str, subject: str, extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@client.lab.invalid>\r\n"
            f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "lab test body\r\n").encode()


def submit(postfix: LabPostfix, sender: str, to: str, subject: str, extra: str = "") -> None:
    with smtplib.SMTP(*postfix.submit, local_hostname="client.lab.invalid", timeout=30) as smtp:
        smtp.sendmail(sender, [to], raw_message(sender, to, subject, extra))


SENDER = "sender@postfix.lab.invalid"
CASES = {
    # trigger: (envelope sender, Subject, extra headers, decision value, routed level)
    "label": (SENDER, "quarterly figures",
              outlook_labels(PUBLIC, "Public") + outlook_labels(LABEL, "Confidential"),
              f"{LABEL}@{TENANT}", "verified"),
    "subject": (SENDER, "=?UTF-8?Q?RE=3A_=5BSecure=5D_loonstrook_m=C3=A4rz?=", "", "[secure]",
                "verified"),
    "sender": (f"payroll@{HR}", "unmarked payslips", "", HR, "encrypted"),
}
TRANSPORT = {"verified": "tlsmilter-verified", "encrypted": "tlsmilter-secure"}


@pytest.mark.parametrize("trigger", list(CASES))
def test_each_trigger_is_refused_to_a_weak_domain(
        stack: tuple[LabPostfix, Daemon], trigger: str) -> None:
    postfix, serve = stack
    sender, subject, extra, value, _level = CASES[trigger]
    rcpt = f"weak-{trigger}@plain.test"
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(postfix, sender, rcpt, subject, extra)
    assert refused.value.smtp_code == 550
    assert "plain.test: cannot receive mail securely enough" in refused.value.smtp_error.decode()
    assert not any(rcpt in str(entry) for entry in postfix.queue())  # not queued either
    decided = [d for d in map(parse, serve.decisions()) if d and d.failing == ("plain.test",)]
    assert any(d.verdict == "reject" and d.trigger == trigger and d.sensitivity == value
               for d in decided), serve.decisions()[-5:]


@pytest.mark.parametrize("trigger", list(CASES))
def test_each_trigger_is_accepted_and_routed_to_a_strong_domain(
        lab: Lab, stack: tuple[LabPostfix, Daemon], trigger: str) -> None:
    postfix, serve = stack
    sender, subject, extra, value, level = CASES[trigger]
    server = lab.server("dnssec-ca")
    before = len(server.messages)
    rcpt = f"strong-{trigger}@dnssec-ca.test"
    submit(postfix, sender, rcpt, subject, extra)
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.tls_version == "TLSv1.3"
    data = received.data.decode()
    assert f"X-TLSMilter-Route: {level}" in data
    assessment = re.search(r"^X-TLSMilter-Assessment: (.*(?:\r?\n[ \t].*)*)", data, re.M)
    assert assessment and " ".join(assessment.group(1).split()).endswith(
        f"dnssec-ca.test=verified; trigger={trigger}"), data
    log = wait_log(postfix, rf"postfix/{TRANSPORT[level]}/smtp\[\d+\]: .*"
                            rf"to=<{re.escape(rcpt)}>.*status=sent")
    assert re.search(r"Verified TLS connection established to mx1\.dnssec-ca\.test", log)
    assert any(d and d.verdict == "accept" and d.trigger == trigger and d.sensitivity == value
               for d in map(parse, serve.decisions()))
    if trigger == "subject":  # stripped, as configured; the rest of the Subject kept
        subject_line = re.search(r"^Subject: (.*(?:\r?\n[ \t].*)*)", data, re.M)
        assert subject_line
        assert decode(subject_line.group(1)) == "RE: loonstrook märz"


def test_unmarked_mail_and_an_unconfigured_label_pass_to_a_weak_domain(
        lab: Lab, stack: tuple[LabPostfix, Daemon]) -> None:
    postfix, _serve = stack
    server = lab.server("plain")
    before = len(server.messages)
    submit(postfix, SENDER, "ordinary@plain.test", "payslips [secure] later",
           outlook_labels(PUBLIC, "Public"))
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.tls_version is None
    assert b"X-TLSMilter" not in received.data
    assert b"Subject: payslips [secure] later" in received.data


@pytest.mark.parametrize(
    ("domain", "label", "why"),
    [("dnssec-tls12.test", "require-dane", "dnssec-tls12.test: cannot receive mail securely "
      "enough: assessed verified; this domain requires dane (ministry requires DANE)"),
     ("dane-full.test", "deny", "dane-full.test: cannot receive mail securely enough: "
      "sensitive mail may not go there (contract ended, use the portal)")],
)
def test_require_and_deny_overrides_refuse_what_the_policy_allows(
        stack: tuple[LabPostfix, Daemon], domain: str, label: str, why: str) -> None:
    # Both domains are good enough for "private" (verified) without the override.
    postfix, serve = stack
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(postfix, SENDER, f"u@{domain}", "overridden", "X-Sensitivity: private\r\n")
    assert refused.value.smtp_code == 550
    assert why in " ".join(refused.value.smtp_error.decode().split())
    decided = [d for d in map(parse, serve.decisions()) if d and d.failing == (domain,)]
    assert decided, serve.decisions()[-3:]
    assert decided[-1].overrides == {domain: label}
    assert decided[-1].reasons == {domain: f"override_{label.split('-')[0]}"}


def test_a_require_override_routes_to_its_level(
        lab: Lab, stack: tuple[LabPostfix, Daemon]) -> None:
    # Personal mail needs only encrypted; the override sends it by the DANE transport, where
    # the policy server's dane map enforces DANE at delivery.
    postfix, serve = stack
    server = lab.server("dane-ee")
    before = len(server.messages)
    submit(postfix, SENDER, "u@dane-ee.test", "needs dane", "X-Sensitivity: personal\r\n")
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    data = received.data.decode()
    assert "X-TLSMilter-Route: dane" in data
    assert "overrides=dane-ee.test:require-dane" in data
    log = wait_log(postfix, r"postfix/tlsmilter-dane/smtp\[\d+\]: .*to=<u@dane-ee\.test>.*"
                            r"status=sent")
    assert re.search(r"Verified TLS connection established to mx1\.dane-ee\.test", log)
    assert any(d and d.overrides == {"dane-ee.test": "require-dane"} and d.verdict == "accept"
               for d in map(parse, serve.decisions()))


def test_an_expired_override_no_longer_applies(stack: tuple[LabPostfix, Daemon]) -> None:
    postfix, serve = stack
    submit(postfix, SENDER, "u@cname-mx.test", "deny expired", "X-Sensitivity: private\r\n")
    wait_log(postfix, r"postfix/tlsmilter-verified/smtp\[\d+\]: .*to=<u@cname-mx\.test>.*"
                      r"status=sent")
    last = [d for d in map(parse, serve.decisions()) if d and "cname-mx.test" in d.levels][-1]
    assert (last.verdict, last.overrides) == ("accept", {})
    assert serve.text().count("override for cname-mx.test (deny) expired on") == 1


def test_check_shows_the_assessed_level_then_the_override(
        lab: Lab, stack: tuple[LabPostfix, Daemon]) -> None:
    _postfix, serve = stack
    done = subprocess.run(
        [sys.executable, "-m", "tlsmilter.cli", "--config", str(serve.config), "check",
         "dnssec-tls12.test", "dane-full.test", "cname-mx.test", "dnssec-ca.test"],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    blocks = re.split(r"\n(?=\S)", done.stdout.strip())
    by_domain = {block.split(":", 1)[0]: block for block in blocks}
    assert by_domain["dnssec-tls12.test"].startswith("dnssec-tls12.test: VERIFIED")
    assert by_domain["dnssec-tls12.test"].endswith(
        "\n  override: require dane (ministry requires DANE)")
    assert by_domain["dane-full.test"].startswith("dane-full.test: DANE")
    assert by_domain["dane-full.test"].endswith(
        "\n  override: deny sensitive mail (contract ended, use the portal)")
    assert re.search(r"\n  override: deny sensitive mail \(was blocked until yesterday; expired "
                     r"on \d{4}-\d\d-\d\d, no longer applied\)$", by_domain["cname-mx.test"])
    assert "override" not in by_domain["dnssec-ca.test"]


def hup(serve: Daemon) -> None:
    """SIGHUP serve and wait until it logged the reload."""
    before = serve.text().count("SIGHUP: configuration reloaded")
    serve.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while serve.text().count("SIGHUP: configuration reloaded") == before:
        assert time.monotonic() < deadline, serve.text()[-3000:]
        time.sleep(0.05)


def test_an_override_added_after_acceptance_holds_delivery_through_the_policy_server(
        lab: Lab, stack: tuple[LabPostfix, Daemon]) -> None:
    # Accepted to a verified domain; before delivery the postmaster denies the domain (a
    # reload): the policy server defers the message at delivery, naming the override. Lifted
    # again, it goes.
    postfix, serve = stack
    server = lab.server("dnssec-ca")
    before = len(server.messages)
    original = serve.config.read_text()
    postfix.postconf(defer_transports="tlsmilter-verified")  # hold delivery after acceptance
    try:
        submit(postfix, SENDER, "late@dnssec-ca.test", "denied later",
               "X-Sensitivity: private\r\n")
        serve.config.write_text(original + '\n[overrides.domains."dnssec-ca.test"]\n'
                                'action = "deny"\nreason = "incident 4711"\n')
        hup(serve)
        postfix.postconf(defer_transports="")
        log = wait_log(postfix, r"tlsmilter-verified/smtp\[\d+\]: .*to=<late@dnssec-ca\.test>.*"
                                r"status=deferred", poke=postfix.flush)
        assert "sensitive mail to dnssec-ca.test is denied by override (incident 4711)" in log
        assert len(server.messages) == before
        serve.config.write_text(original)
        hup(serve)
        wait_log(postfix, r"tlsmilter-verified/smtp\[\d+\]: .*to=<late@dnssec-ca\.test>.*"
                          r"status=sent", poke=postfix.flush)
    finally:
        postfix.postconf(defer_transports="")
        if serve.config.read_text() != original:
            serve.config.write_text(original)
            hup(serve)
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.tls_version == "TLSv1.3"
