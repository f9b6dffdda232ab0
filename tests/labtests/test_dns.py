"""The DNS lab: Knot signs and delegates, Unbound validates from the lab TLD down."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from tests.lab.dns import DnsLab, Zone
from tests.lab.model import Dnssec
from tests.lab.service import LabError

pytestmark = pytest.mark.lab

TLD = "test."
MAIL_RECORDS = ["@ 300 IN MX 10 mx1", "mx1 300 IN A 127.0.1.1"]


@pytest.fixture(scope="module")
def net() -> str:
    """A random 127.N.0. prefix so that concurrent runs do not collide."""
    return f"127.{random.randint(100, 250)}.0."


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, net: str) -> Iterator[DnsLab]:
    zones = [
        Zone("signed.test.", Dnssec.SIGNED, MAIL_RECORDS),
        Zone("unsigned.test.", Dnssec.UNSIGNED, MAIL_RECORDS),
        Zone("bogus.test.", Dnssec.BOGUS, MAIL_RECORDS),
        Zone("mutable.test.", Dnssec.SIGNED, ["www 300 IN A 127.0.2.1"]),
    ]
    workdir = tmp_path_factory.mktemp("dns")
    with DnsLab(workdir, TLD, zones, f"{net}1", f"{net}2") as running:
        yield running


def ask(server: tuple[str, int], name: str, rdtype: str) -> dns.message.Message:
    request = dns.message.make_query(name, rdtype, want_dnssec=True)
    request.flags |= dns.flags.AD
    return dns.query.udp(request, server[0], port=server[1], timeout=3)


def answer(response: dns.message.Message, name: str, rdtype: str) -> list[str]:
    rrset = response.get_rrset(
        response.answer,
        dns.name.from_text(name),
        dns.rdataclass.IN,
        dns.rdatatype.from_text(rdtype),
    )
    return sorted(rdata.to_text() for rdata in rrset or [])


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("signed.test.", "MX", ["10 mx1.signed.test."]),
        ("mx1.signed.test.", "A", ["127.0.1.1"]),
        (TLD, "NS", ["ns.test."]),
    ],
)
def test_signed_zone_is_secure(lab: DnsLab, name: str, rdtype: str, expected: list[str]) -> None:
    response = ask(lab.resolver, name, rdtype)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AD
    assert answer(response, name, rdtype) == expected


def test_unsigned_zone_is_insecure(lab: DnsLab) -> None:
    response = ask(lab.resolver, "mx1.unsigned.test.", "A")
    assert response.rcode() == dns.rcode.NOERROR
    assert not response.flags & dns.flags.AD
    assert answer(response, "mx1.unsigned.test.", "A") == ["127.0.1.1"]


@pytest.mark.parametrize(("name", "rdtype"), [("bogus.test.", "MX"), ("mx1.bogus.test.", "A")])
def test_bogus_zone_fails(lab: DnsLab, name: str, rdtype: str) -> None:
    assert ask(lab.resolver, name, rdtype).rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("zone", ["signed.test.", "unsigned.test.", "bogus.test."])
def test_knot_is_authoritative(lab: DnsLab, zone: str) -> None:
    response = ask(lab.authoritative, f"mx1.{zone}", "A")
    assert response.flags & dns.flags.AA
    assert answer(response, f"mx1.{zone}", "A") == ["127.0.1.1"]


@pytest.mark.parametrize(
    ("zone", "delegation"),
    [("signed.test.", "matching"), ("bogus.test.", "mismatching"), ("unsigned.test.", "none")],
)
def test_tld_ds_records(lab: DnsLab, zone: str, delegation: str) -> None:
    ds_records = answer(ask(lab.authoritative, zone, "DS"), zone, "DS")
    if delegation == "none":
        assert ds_records == []
        return
    keys = ask(lab.authoritative, zone, "DNSKEY").find_rrset(
        dns.message.ANSWER,
        dns.name.from_text(zone),
        dns.rdataclass.IN,
        dns.rdatatype.DNSKEY,
    )
    real = sorted(dns.dnssec.make_ds(zone, key, "SHA256").to_text() for key in keys)
    assert ds_records
    assert (ds_records == real) == (delegation == "matching")


def test_set_records_reaches_resolver(lab: DnsLab) -> None:
    # Prime Unbound's cache with the old answer and with an NXDOMAIN for the new name.
    assert answer(ask(lab.resolver, "www.mutable.test.", "A"), "www.mutable.test.", "A") == [
        "127.0.2.1"
    ]
    assert ask(lab.resolver, "new.mutable.test.", "A").rcode() == dns.rcode.NXDOMAIN
    lab.set_records("mutable.test.", ["www 300 IN A 127.0.2.2", "new 300 IN A 127.0.2.3"])
    for name, address in [("www.mutable.test.", "127.0.2.2"), ("new.mutable.test.", "127.0.2.3")]:
        response = ask(lab.resolver, name, "A")
        assert response.flags & dns.flags.AD
        assert answer(response, name, "A") == [address]


def test_refuse_blocks_a_name_and_below_until_unrefused(lab: DnsLab) -> None:
    assert answer(ask(lab.resolver, "www.mutable.test.", "A"), "www.mutable.test.", "A")
    lab.refuse("mutable.test.")
    try:
        assert ask(lab.resolver, "www.mutable.test.", "A").rcode() == dns.rcode.REFUSED
    finally:
        lab.unrefuse("mutable.test.")
    response = ask(lab.resolver, "www.mutable.test.", "A")
    assert response.rcode() == dns.rcode.NOERROR and response.flags & dns.flags.AD


@pytest.mark.parametrize("taken", ["authoritative", "resolver"])
def test_address_clash_is_reported(lab: DnsLab, tmp_path: Path, net: str, taken: str) -> None:
    # The running lab's server answers the newcomer's readiness queries: the clash is only
    # caught because the lab checks who answers and sees its own server exit.
    knot_addr = lab.authoritative[0] if taken == "authoritative" else f"{net}5"
    unbound_addr = lab.resolver[0] if taken == "resolver" else f"{net}5"
    clash = DnsLab(tmp_path, TLD, [], knot_addr, unbound_addr)
    with pytest.raises(LabError, match="already in use"):
        clash.start()
    assert_gone(clash.pids)


def test_stop_leaves_nothing_running(tmp_path: Path, net: str) -> None:
    with DnsLab(tmp_path, TLD, [Zone("a.test.")], f"{net}3", f"{net}4") as short_lived:
        pids = short_lived.pids
        assert len(pids) == 2
    assert_gone(pids)
    short_lived.stop()


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
