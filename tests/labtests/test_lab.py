"""The composed lab: Postfix relays into lab domains, and tear-down leaves nothing behind."""

from __future__ import annotations

import shutil
import socket

import pytest

from tests.conftest import world_searchable_dir
from tests.lab.lab import Lab
from tests.lab.mail import message, submit
from tests.lab.model import MX, Domain, Smtp, Tls
from tests.lab.postfix import LabPostfix, pid_alive, process_start

pytestmark = pytest.mark.lab


def test_postfix_relays_to_a_lab_domain_over_tls(lab: Lab, postfix: LabPostfix) -> None:
    server = lab.server("dnssec-ca")
    before = len(server.messages)
    submit(postfix.submit, message("alice@dnssec-ca.test", "relay over TLS"))
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.rcpt_tos == ("alice@dnssec-ca.test",)
    assert received.tls_version == "TLSv1.3"
    assert b"Subject: relay over TLS" in received.data
    # Postfix found the MX through the lab's validating resolver with DNSSEC on.
    assert "mx1.dnssec-ca.test" in postfix.maillog()


def test_postfix_relays_in_clear_to_a_plaintext_domain(lab: Lab, postfix: LabPostfix) -> None:
    server = lab.server("plain")
    before = len(server.messages)
    submit(postfix.submit, message("bob@plain.test", "relay in clear"))
    (received,) = server.wait_for_messages(before + 1, timeout=30)[before:]
    assert received.tls_version is None


def test_teardown_leaves_no_lab_process_or_listener() -> None:
    workdir = world_searchable_dir("tlsmilter-teardown-")
    scenarios = [Domain("only", mx=(MX("mx1", Smtp(Tls.TLS12)),))]
    try:
        with Lab(workdir, scenarios) as small:
            instance = LabPostfix(workdir / "postfix", listen=small.postfix_address,
                                  resolver=small.dns.resolver[0], ca_file=small.ca.ca_file)
            instance.start()
            pids = {pid: process_start(pid) for pid in small.pids() + instance.pids()}
            listeners = [(s.address, s.port) for s in small.smtp.values()]
            instance.stop()
        assert pids and not [pid for pid, start in pids.items() if start and pid_alive(pid, start)]
        for address in listeners:
            with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
                probe.settimeout(2)
                probe.connect(address)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
