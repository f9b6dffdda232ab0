"""PKIX classification and TLSA matching, over certificates from the lab CA (no network)."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pytest
from cryptography import x509

from tests.lab.model import Cert
from tests.lab.pki import LabCA, tlsa_data_for
from tlsmilter.assess.certs import Tlsa, load_store, match_tlsa, verify_pkix
from tlsmilter.assess.model import Code, DaneStatus

HOST = "mx1.example.test"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA(tmp_path_factory.mktemp("pki"))


def chain(ca: LabCA, kind: Cert) -> list[x509.Certificate]:
    issued = ca.issue(HOST, kind)
    return x509.load_pem_x509_certificates(Path(issued.cert_file).read_bytes())


def record(usage: int, selector: int, mtype: int, cert: x509.Certificate) -> Tlsa:
    return Tlsa.from_text(f"{usage} {selector} {mtype} {tlsa_data_for(cert, selector, mtype)}")


@pytest.mark.parametrize(("selector", "mtype"), list(itertools.product((0, 1), (0, 1, 2))))
def test_dane_ee_matches_every_selector_and_matching_type(ca: LabCA, selector: int,
                                                         mtype: int) -> None:
    presented = chain(ca, Cert.EXPIRED)  # DANE-EE ignores expiry and names
    status, _ = match_tlsa([record(3, selector, mtype, presented[0])], presented, [HOST], NOW)
    assert status is DaneStatus.MATCH


@pytest.mark.parametrize(("selector", "mtype"), list(itertools.product((0, 1), (0, 1, 2))))
def test_dane_ta_matches_every_selector_and_matching_type(ca: LabCA, selector: int,
                                                         mtype: int) -> None:
    presented = chain(ca, Cert.CA)
    status, _ = match_tlsa([record(2, selector, mtype, ca.ca_cert)], presented, [HOST], NOW)
    assert status is DaneStatus.MATCH


def test_dane_ta_checks_the_name(ca: LabCA) -> None:
    presented = chain(ca, Cert.WRONG_NAME)
    status, detail = match_tlsa([record(2, 1, 1, ca.ca_cert)], presented, [HOST], NOW)
    assert status is DaneStatus.MISMATCH and "does not validate" in detail


def test_unusable_records_are_ignored(ca: LabCA) -> None:
    presented = chain(ca, Cert.CA)
    pkix_ee = record(1, 1, 1, presented[0])  # PKIX-EE: not used for SMTP (RFC 7672)
    assert match_tlsa([pkix_ee], presented, [HOST], NOW)[0] is DaneStatus.NONE


def test_mismatch(ca: LabCA) -> None:
    presented = chain(ca, Cert.CA)
    other = chain(ca, Cert.SELF_SIGNED)[0]
    assert match_tlsa([record(3, 1, 1, other)], presented, [HOST], NOW)[0] \
        is DaneStatus.MISMATCH


@pytest.mark.parametrize(
    ("kind", "valid", "code"),
    [(Cert.CA, True, Code.CERT_VALID), (Cert.SELF_SIGNED, False, Code.CERT_UNTRUSTED),
     (Cert.EXPIRED, False, Code.CERT_EXPIRED), (Cert.WRONG_NAME, False, Code.CERT_NAME_MISMATCH)],
)
def test_pkix_classification(ca: LabCA, kind: Cert, valid: bool, code: Code) -> None:
    result = verify_pkix(chain(ca, kind), [HOST], load_store(str(ca.ca_file)), NOW)
    assert (result.valid, result.code) == (valid, code)


def test_pkix_against_the_system_store_rejects_the_lab_ca(ca: LabCA) -> None:
    result = verify_pkix(chain(ca, Cert.CA), [HOST], load_store(None), NOW)
    assert not result.valid and result.code is Code.CERT_UNTRUSTED
