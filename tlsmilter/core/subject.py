"""Subject keywords such as ``[secure]`` that mark a message sensitive. Pure.

The Subject is decoded first (RFC 2047 encoded words, in any charset Python knows; what cannot
be decoded is replaced, never raised), then each configured keyword is looked for
case-insensitively: at the start, after any reply or forward prefixes (``RE:``, ``AW:``,
``Fwd:``...), or anywhere.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import Header, decode_header

# Longer than any Subject a person types; decoding a megabyte would only cost time.
MAX_SUBJECT = 4096
# "RE: ", "Fwd: ", "AW: ", "WG: ", "SV: ", "Antw: ", "RE[2]: " ... before the keyword.
_REPLY_PREFIXES = re.compile(r"(?:\s*(?:re|fwd?|aw|wg|sv|vs|antw|tr|rif|doorst)\s*(?:\[\d{1,4}\])?"
                             r"\s*:)*\s*", re.IGNORECASE)


class Match(enum.Enum):
    """Where in the Subject a keyword counts."""

    START = "start"
    ANYWHERE = "anywhere"


@dataclass(frozen=True)
class KeywordRules:
    keywords: Mapping[str, str]  # keyword, lower case and unfolded -> policy name
    match: Match

    @classmethod
    def build(cls, keywords: Mapping[str, str], match: Match) -> KeywordRules:
        return cls({" ".join(k.split()).lower(): v for k, v in keywords.items() if k.strip()},
                   match)


def decode(raw: str) -> str:
    """The Subject as text: unfolded, encoded words decoded, unknown charsets replaced."""
    raw = " ".join(raw[:MAX_SUBJECT].split())
    if "=?" not in raw:
        return raw
    try:
        parts = decode_header(raw)
    except (HeaderParseError, ValueError, LookupError):
        return raw
    text = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            text.append(chunk)
            continue
        try:
            text.append(chunk.decode(charset or "ascii", "replace"))
        except LookupError:  # a charset Python does not know
            text.append(chunk.decode("latin-1"))
    return " ".join("".join(text).split())


def matches(subject: str, rules: KeywordRules) -> Iterator[tuple[str, str]]:
    """``(policy name, keyword)`` for each keyword in the decoded ``subject``."""
    text = subject.lower()
    if rules.match is Match.START:
        text = text[_REPLY_PREFIXES.match(text).end():]  # type: ignore[union-attr]
    for keyword, policy in rules.keywords.items():
        if text.startswith(keyword) if rules.match is Match.START else keyword in text:
            yield policy, keyword


def strip(subject: str, keyword: str) -> str:
    """The decoded ``subject`` without its first occurrence of ``keyword``, as a header
    value: plain if it is printable ASCII, else one RFC 2047 UTF-8 encoded word sequence."""
    at = subject.lower().find(keyword)
    if at < 0:
        return subject
    kept = " ".join((subject[:at] + " " + subject[at + len(keyword):]).split())
    if kept.isascii() and kept.isprintable():
        return kept
    return Header(kept.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                  "utf-8").encode()
