"""``tlsmilter doctor`` against lab Postfix configurations: contrib's set-up passes, and each
one missing a piece of the wiring gets a finding naming that piece.

Each test writes a fresh configuration with contrib's snippets (tests/daemons/test_e2e.py's
``contrib_postfix``) into the same directory, then breaks one thing with postconf itself.
Postfix is not started: doctor reads configuration with postconf. ``serve`` runs, on the
sockets the configuration names, and the lab's validating resolver answers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import world_searchable_dir
from tests.daemons.test_e2e import CONTRIB, contrib_postfix
from tests.lab import daemons
from tests.lab.lab import Lab
from tests.lab.postfix import LabPostfix

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def serving(lab: Lab) -> Iterator[tuple[Path, Path]]:
    """A work directory and the config of a ``serve`` listening where contrib's names point."""
    workdir = world_searchable_dir("tlsmilter-doctor-")
    _postfix, sockets = contrib_postfix(lab, workdir, f"{lab.base}.0.6")
    config = daemons.write_config(workdir / "tlsmilter.toml", lab, sockets)
    serve = daemons.serve(config, workdir / "tlsmilter.log")
    try:
        serve.start()
        yield workdir, config
    finally:
        try:
            serve.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def postfix(lab: Lab, serving: tuple[Path, Path]) -> LabPostfix:
    workdir, _config = serving
    postfix, _sockets = contrib_postfix(lab, workdir, f"{lab.base}.0.6")
    return postfix


def doctor(postfix: LabPostfix, config: Path,
           resolv_conf: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tlsmilter.cli", "--config", str(config), "doctor",
         "-c", str(postfix.config_dir), "--resolv-conf", str(resolv_conf or postfix.resolv_conf),
         "--signed-name", "dnssec-ca.test"],
        capture_output=True, text=True, timeout=60, check=False)


def postconf(postfix: LabPostfix, *args: str) -> None:
    subprocess.run(["postconf", "-c", str(postfix.config_dir), *args], check=True,
                   capture_output=True, timeout=30)


def test_contribs_set_up_passes(postfix: LabPostfix, serving: tuple[Path, Path]) -> None:
    done = doctor(postfix, serving[1])
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(line.startswith("ok ") for line in lines[:-1]), done.stdout
    assert lines[-1] == "0 FAIL, 0 WARN"
    assert len(lines) == 12  # 2 milter lists, 3 routes, 3 transports, resolver, 2 sockets


def _smtpd(postfix: LabPostfix) -> str:
    return f"{postfix.listen}:{postfix.port}/inet"


def _table_without_dane(postfix: LabPostfix) -> None:
    table = postfix.workdir.parent / "tlsmilter_header_checks"
    table.write_text("".join(line for line in (CONTRIB / "tlsmilter_header_checks")
                             .read_text().splitlines(keepends=True) if "dane" not in line))


BROKEN: dict[str, tuple[Callable[[LabPostfix], None], int, str]] = {
    "no smtpd_milters": (lambda p: p.postconf(smtpd_milters=""), 5,
                         "FAIL milter: main.cf smtpd_milters does not name tlsmilter's milter"),
    "no non_smtpd_milters": (lambda p: p.postconf(non_smtpd_milters=""), 5,
                             "FAIL milter: main.cf non_smtpd_milters does not name"),
    "milter fails open": (
        lambda p: p.postconf(smtpd_milters="{ unix:tlsmilter/milter.sock, "
                                           "default_action=accept }"),
        5, "FAIL milter: main.cf smtpd_milters: default_action=accept"),
    "absolute socket name in a chroot": (
        lambda p: (p.postconf(smtpd_milters=f"unix:{p.queue_dir}/tlsmilter/milter.sock"),
                   postconf(p, "-F", f"{_smtpd(p)}/chroot=y")),
        5, "(chrooted) finds elsewhere than tlsmilter's"),
    "submission overrides the milters": (
        lambda p: postconf(p, "-M", f"{p.listen}:587/inet={p.listen}:587 inet n - n - - smtpd "
                                    "-o smtpd_milters="),
        5, "(smtpd_milters -o override) does not name tlsmilter's milter"),
    "no milter_header_checks": (lambda p: p.postconf(milter_header_checks=""), 5,
                                "FAIL header checks: milter_header_checks is not set"),
    "no dane rule": (_table_without_dane, 5, "FAIL header checks: 'X-TLSMilter-Route: dane' "
                                             "goes to tlsmilter-secure, not tlsmilter-dane"),
    "no verified transport": (lambda p: postconf(p, "-MX", "tlsmilter-verified/unix"), 6,
                              "WARN header checks: 'X-TLSMilter-Route: verified' goes to "
                              "tlsmilter-verified, which master.cf does not define"),
    "floor may": (lambda p: postconf(p, "-P", "tlsmilter-dane/unix/smtp_tls_security_level=may"),
                  5, "FAIL tlsmilter-dane transport: smtp_tls_security_level = may"),
    "strict map on the verified transport": (
        lambda p: postconf(p, "-P", "tlsmilter-verified/unix/smtp_tls_policy_maps="
                                    "socketmap:unix:tlsmilter/policy.sock:tlspolicy-strict"),
        5, "FAIL tlsmilter-verified transport: smtp_tls_policy_maps = socketmap:unix:tlsmilter/"
           "policy.sock:tlspolicy-strict, not tlsmilter's tlspolicy-verified"),
    "no DNSSEC lookups": (
        lambda p: (postconf(p, "-PX", "tlsmilter-dane/unix/smtp_dns_support_level"),
                   p.postconf(smtp_dns_support_level="")),
        5, "FAIL tlsmilter-dane transport: smtp_dns_support_level is not dnssec"),
    "no TLS log": (lambda p: postconf(p, "-P", "tlsmilter-secure/unix/smtp_tls_loglevel=0"), 6,
                   "WARN tlsmilter-secure transport: smtp_tls_loglevel = 0"),
}


@pytest.mark.parametrize("piece", BROKEN)
def test_each_missing_piece_is_named(postfix: LabPostfix, serving: tuple[Path, Path],
                                     piece: str) -> None:
    breaks, code, finding = BROKEN[piece]
    breaks(postfix)
    done = doctor(postfix, serving[1])
    assert done.returncode == code, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if finding in line]
    assert " -- fix: " in line  # what is wrong, why, and the fix, on one line
    bad = [line for line in done.stdout.splitlines()[:-1] if not line.startswith("ok ")]
    assert bad == [line], done.stdout  # that piece, and nothing else


def test_a_resolver_configuration_without_trust_ad_is_named(
        postfix: LabPostfix, serving: tuple[Path, Path], tmp_path: Path) -> None:
    plain = tmp_path / "resolv.conf"
    plain.write_text(postfix.resolv_conf.read_text().replace("trust-ad ", ""))
    done = doctor(postfix, serving[1], plain)
    assert done.returncode == 6, done.stdout
    assert f"WARN resolver: no 'options trust-ad' in {plain}" in done.stdout
