"""Sender-controlled text made safe for replies, headers and logs: table-driven."""

from __future__ import annotations

import pytest

from tlsmilter.core.safetext import MAX_REPLY_TEXT, cap, domain_name, escape, reply_line, safe


@pytest.mark.parametrize(("raw", "expected"), [
    ("plain text", "plain text"),
    ("a\r\nb", "a\\x0d\\x0ab"),
    ("\x1b[31m", "\\x1b[31m"),
    ("geheim\udcff\udcfe", "geheim\\xff\\xfe"),  # undecodable bytes, as pymilter passes them
    ("caf\u00e9", "caf\\xe9"),
    ("\u2603", "\\u2603"),
    ("\U0001f600", "\\U0001f600"),
])
def test_escape(raw: str, expected: str) -> None:
    assert escape(raw) == expected


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("short", 10, "short"),
    ("exactly10!", 10, "exactly10!"),
    ("much longer than ten", 10, "much lo..."),
])
def test_cap(text: str, limit: int, expected: str) -> None:
    assert cap(text, limit) == expected


def test_a_huge_value_is_cut_after_escaping() -> None:
    text = safe("\x00" * 70_000, 256)
    assert len(text) == 256 and text.endswith("...") and text.startswith("\\x00")


@pytest.mark.parametrize(("name", "shown"), [
    ("bücher.example", "xn--bcher-kva.example"),
    ("Example.ORG.", "example.org"),
    ("evil\r\n.example", "evil\\x0d\\x0a.example"),
    ("\udcff.example", "\\xff.example"),
    ("[192.0.2.1]", "[192.0.2.1]"),
])
def test_domain_names_are_a_labels_or_escaped(name: str, shown: str) -> None:
    assert domain_name(name) == shown


def test_a_long_invalid_name_is_capped() -> None:
    shown = domain_name("x" * 60_000)
    assert len(shown) == 100 and shown.endswith("...")


@pytest.mark.parametrize("text", [
    "a" * 70_000, "%" * 70_000, "a%" * 1000, "\r\n" * 1000, "\udcff" * 5000, "ok % fine",
])
def test_reply_lines_fit_the_smtp_line_limit(text: str) -> None:
    line = reply_line(text)
    assert line.isascii() and line.isprintable()
    assert len(line) + line.count("%") <= MAX_REPLY_TEXT  # '%' is doubled for libmilter
    if len(text) < 100 and text.isprintable():
        assert line == text
    else:
        assert line.endswith("...")
