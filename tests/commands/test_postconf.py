"""The pure parts of doctor: milter lists, socket names seen from a chroot, and checks on a
hand-made PostfixView for what the lab's Postfix 3.7 cannot show (3.10's parameter).
tests/commands/test_doctor.py runs doctor on real Postfix configurations."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlsmilter import config
from tlsmilter.commands.doctor import Severity, check_serve, check_transports
from tlsmilter.commands.postconf import PostfixView, Service, milter_entries, socket_path

QUEUE = Path("/var/spool/postfix")


def test_milter_lists_in_both_spellings() -> None:
    assert milter_entries("{ unix:tlsmilter/milter.sock, default_action=tempfail, "
                          "connect_timeout=10s }, inet:127.0.0.1:8891") == [
        ("unix:tlsmilter/milter.sock", {"default_action": "tempfail", "connect_timeout": "10s"}),
        ("inet:127.0.0.1:8891", {})]
    assert milter_entries("unix:/a.sock unix:/b.sock") == [("unix:/a.sock", {}),
                                                           ("unix:/b.sock", {})]
    assert milter_entries("") == []


@pytest.mark.parametrize(("name", "chrooted", "seen"), [
    ("unix:tlsmilter/milter.sock", True, "unix:/var/spool/postfix/tlsmilter/milter.sock"),
    ("unix:tlsmilter/milter.sock", False, "unix:/var/spool/postfix/tlsmilter/milter.sock"),
    ("unix:/run/tlsmilter/milter.sock", False, "unix:/run/tlsmilter/milter.sock"),
    # chrooted, an absolute name is inside the queue directory
    ("unix:/run/tlsmilter/milter.sock", True, "unix:/var/spool/postfix/run/tlsmilter/milter.sock"),
    ("inet:127.0.0.1:8891", True, "inet:8891@127.0.0.1"),
    ("tlsmilter/milter.sock", False, "unix:/var/spool/postfix/tlsmilter/milter.sock"),
])
def test_socket_names_as_a_service_sees_them(name: str, chrooted: bool, seen: str) -> None:
    assert socket_path(name, chrooted, QUEUE) == seen


def view(version: str, **overrides: str) -> PostfixView:
    params = {"syslog_name": "postfix/tlsmilter-dane", "smtp_tls_security_level": "encrypt",
              "smtp_tls_policy_maps": "socketmap:unix:tlsmilter/policy.sock:tlspolicy-dane",
              "smtp_dns_support_level": "dnssec", "smtp_tls_loglevel": "1", **overrides}
    service = Service("tlsmilter-dane", "unix", False, "smtp", params)
    return PostfixView({"mail_version": version, "queue_directory": str(QUEUE)},
                       {"tlsmilter-dane/unix": service}, {})


SETTINGS = config.Config(policy_server=config.PolicyServerSettings(
    socket=f"unix:{QUEUE}/tlsmilter/policy.sock"))


def test_postfix_3_10_needs_tls_required_enable_off() -> None:
    fails = [f.line() for f in check_transports(view("3.10.13"), SETTINGS)
             if f.severity is Severity.FAIL]
    assert fails == ["FAIL tlsmilter-dane transport: tls_required_enable is not no -- a "
                     "sender's 'TLS-Required: no' skips the policy map (Postfix 3.10) -- fix: "
                     "-o tls_required_enable=no under tlsmilter-dane"]
    assert not [f for f in check_transports(view("3.10.13", tls_required_enable="no"),
                                            SETTINGS) if f.severity is not Severity.OK]
    # 3.7 does not know the parameter: nothing to ask for there.
    assert not [f for f in check_transports(view("3.7.11"), SETTINGS)
                if f.severity is not Severity.OK]


def test_serve_not_running_is_a_warning(tmp_path: Path) -> None:
    settings = config.Config(
        milter=config.MilterSettings(socket=f"unix:{tmp_path}/milter.sock"),
        policy_server=config.PolicyServerSettings(socket=f"unix:{tmp_path}/policy.sock"))
    lines = [f.line() for f in check_serve(settings)]
    assert lines == [
        f"WARN serve: nothing answers on unix:{tmp_path}/milter.sock (No such file or "
        "directory) -- Postfix tempfails every message -- fix: systemctl start tlsmilter",
        f"WARN serve: nothing answers on unix:{tmp_path}/policy.sock (No such file or "
        "directory) -- sensitive mail is deferred at delivery -- fix: systemctl start tlsmilter"]
