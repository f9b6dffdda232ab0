"""Sender rules: addresses, domains, subdomains; hostile From: headers."""

from __future__ import annotations

import pytest

from tlsmilter.core.senders import (
    SenderRules,
    envelope_address,
    header_addresses,
    matches,
)

RULES = SenderRules.build({"hr.example.org": "personal", "CEO@Example.org": "confidential",
                           ".legal.example.org.": "private"})


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        (["anna@hr.example.org"], [("personal", "hr.example.org")]),
        (["Anna@HR.Example.Org."], [("personal", "hr.example.org")]),
        (["x@sub.hr.example.org"], []),  # a bare domain is that domain only
        (["ceo@example.org"], [("confidential", "ceo@example.org")]),
        (["cfo@example.org"], []),
        (["x@team.legal.example.org"], [("private", ".legal.example.org")]),
        (["x@legal.example.org"], []),
        (["", "@", "hr.example.org", "@hr.example.org", "x@"],
         [("personal", "hr.example.org")]),
        (["\udcff@hr.example.org"], [("personal", "hr.example.org")]),
    ],
)
def test_matching(addresses: list[str], expected: list[tuple[str, str]]) -> None:
    assert list(matches(addresses, RULES)) == expected


@pytest.mark.parametrize(
    ("mailfrom", "address"),
    [("<anna@hr.example.org>", "anna@hr.example.org"), ("<>", ""), (" x@y ", "x@y")],
)
def test_envelope_address(mailfrom: str, address: str) -> None:
    assert envelope_address(mailfrom) == address


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (['"HR, Payroll" <payroll@hr.example.org>'], ["payroll@hr.example.org"]),
        (["a@x.test, b@y.test"], ["a@x.test", "b@y.test"]),
        (["=?utf-8?q?Ren=C3=A9?= <rene@hr.example.org>"], ["rene@hr.example.org"]),
        (["<<<>>>", '"unterminated <a@b', "\x00\r\n", ""], None),
    ],
)
def test_header_addresses(values: list[str], expected: list[str] | None) -> None:
    found = header_addresses(values)
    if expected is not None:
        assert found == expected
    assert all(isinstance(a, str) for a in found)


def test_a_huge_from_header_is_bounded() -> None:
    found = header_addresses([", ".join(f"u{i}@x.test" for i in range(100_000))])
    assert 0 < len(found) <= 50
