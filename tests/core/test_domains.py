"""Recipient domain normalisation: case, trailing dot, IDNA, and what is not a mail domain."""

from __future__ import annotations

import pytest

from tlsmilter.core.domains import InvalidDomain, normalize_domain

LONGEST = ".".join(["a" * 61, "b" * 63, "c" * 63, "d" * 63])  # 253 characters


@pytest.mark.parametrize(("raw", "expected"), [
    ("example.org", "example.org"),
    ("Example.ORG", "example.org"),
    ("example.org.", "example.org"),
    (" example.org ", "example.org"),
    ("mail_relay.example-1.org", "mail_relay.example-1.org"),
    ("localhost", "localhost"),
    ("1.2.3.example", "1.2.3.example"),
    ("example.123abc", "example.123abc"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example.", "xn--bcher-kva.example"),
    ("\u212aelvin.example", "kelvin.example"),  # KELVIN SIGN: nameprep maps it to "k"
    (LONGEST, LONGEST),
    (LONGEST.upper() + ".", LONGEST),
])
def test_normalised(raw: str, expected: str) -> None:
    assert normalize_domain(raw) == expected


@pytest.mark.parametrize(("raw", "why"), [
    ("", "empty"),
    (".", "empty"),
    ("1.2.3.4", "address literal"),
    ("[192.0.2.1]", "address literal"),
    ("[IPv6:2001:db8::1]", "address literal"),
    ("2001:db8::1", "address literal"),
    ("a..example", "empty"),
    (".example", "empty"),
    ("a" * 64 + ".example", "too long"),
    ("a" + LONGEST, "too long"),
    ("exa mple.org", "characters outside"),
    ("example.org/x", "characters outside"),
    ("user@example.org", "characters outside"),
    ("\udcff.example", "IDNA"),  # an undecodable byte, as pymilter passes it
])
def test_invalid(raw: str, why: str) -> None:
    with pytest.raises(InvalidDomain, match=why) as caught:
        normalize_domain(raw)
    assert caught.value.domain == raw
