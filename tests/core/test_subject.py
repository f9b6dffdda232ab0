"""Subject keywords: RFC 2047 decoding, where a keyword counts, stripping it."""

from __future__ import annotations

import pytest

from tlsmilter.core.subject import KeywordRules, Match, decode, matches, strip

KEYWORDS = {"[secure]": "private", "[Vertrouwelijk]": "confidential", "encrypt:": "personal"}
START = KeywordRules.build(KEYWORDS, Match.START)
ANYWHERE = KeywordRules.build(KEYWORDS, Match.ANYWHERE)


@pytest.mark.parametrize(
    ("raw", "start", "anywhere"),
    [
        ("[secure] payslips", ["[secure]"], ["[secure]"]),
        ("[SECURE] payslips", ["[secure]"], ["[secure]"]),
        ("  RE: AW: Fwd: [secure] payslips", ["[secure]"], ["[secure]"]),
        ("RE[2]: encrypt: contract", ["encrypt:"], ["encrypt:"]),
        ("payslips [secure]", [], ["[secure]"]),
        ("[secure]-ish? no: [secure ] payslips", ["[secure]"], ["[secure]"]),
        ("[secure ] payslips", [], []),
        # Encoded words: UTF-8 Q and B, Latin-1, split over two words, folded.
        ("=?UTF-8?Q?=5Bvertrouwelijk=5D_dossier_caf=C3=A9?=", ["[vertrouwelijk]"],
         ["[vertrouwelijk]"]),
        ("=?utf-8?B?W1NFQ1VSRV0gbG9vbmJyaWVm?=", ["[secure]"], ["[secure]"]),
        ("=?iso-8859-1?q?=5Bsecure=5D_r=E9sum=E9?=", ["[secure]"], ["[secure]"]),
        ("=?UTF-8?Q?=5Bsec?=\r\n =?UTF-8?Q?ure=5D_x?=", ["[secure]"], ["[secure]"]),
        ("dossier =?UTF-8?Q?=5Bsecure=5D?=", [], ["[secure]"]),
        # Bad encodings: unknown charset, broken base64, bytes that are not UTF-8.
        ("=?x-unknown?Q?=5Bsecure=5D?= a", ["[secure]"], ["[secure]"]),
        ("=?utf-8?B?!!!notbase64?= [secure]", [], ["[secure]"]),
        ("=?utf-8?Q?=FF=FE?= [secure]", [], ["[secure]"]),
        ("[secure] caf\udce9", ["[secure]"], ["[secure]"]),
        ("", [], []),
        ("=?", [], []),
    ],
)
def test_matching(raw: str, start: list[str], anywhere: list[str]) -> None:
    subject = decode(raw)
    assert [k for _p, k in matches(subject, START)] == start
    assert [k for _p, k in matches(subject, ANYWHERE)] == anywhere


def test_several_keywords_and_their_policies() -> None:
    found = list(matches(decode("[secure] encrypt: [vertrouwelijk]"), ANYWHERE))
    assert sorted(found) == [("confidential", "[vertrouwelijk]"), ("personal", "encrypt:"),
                             ("private", "[secure]")]


def test_a_huge_subject_is_decoded_only_so_far() -> None:
    huge = "=?UTF-8?Q?" + "x" * 2_000_000 + "?= [secure]"
    assert len(decode(huge)) <= 4096
    assert list(matches(decode("[secure] " + "y" * 2_000_000), START)) == [
        ("private", "[secure]")]


@pytest.mark.parametrize(
    ("subject", "keyword", "expected"),
    [
        ("[SECURE] payslips", "[secure]", "payslips"),
        ("RE: [secure] payslips", "[secure]", "RE: payslips"),
        ("payslips [secure]", "[secure]", "payslips"),
        ("[secure] café", "[secure]", "café"),  # written back as an encoded word
        ("nothing here", "[secure]", "nothing here"),
    ],
)
def test_strip(subject: str, keyword: str, expected: str) -> None:
    stripped = strip(subject, keyword)
    assert stripped.isascii() and stripped.isprintable()
    assert decode(stripped) == expected
    assert (stripped == expected) is expected.isascii()
