"""Text a sender controls, made safe for an SMTP reply, a header or a log line.

Addresses, header values and macros may hold any bytes (pymilter hands undecodable ones on as
lone surrogates, U+DC80-U+DCFF), any length, CR/LF and other control characters. What leaves
tlsmilter is printable ASCII of bounded length: control and non-ASCII characters become
visible escapes (``\\x1b``, ``\\u00e9``; an undecodable byte ``\\xff``), and long text is cut
with an ``...`` marker, so an operator still sees what was sent.
"""

from __future__ import annotations

from tlsmilter.core.domains import InvalidDomain, normalize_domain

ELLIPSIS = "..."
MAX_LOG_VALUE = 256  # one sender-controlled value in a log line
MAX_NAME = 100  # a recipient name that is not a valid domain, in a reply or header
MAX_QUOTED = 64  # the sensitivity header's value, quoted in a reply

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its code and CRLF. The longest
# prefix is "550-5.7.10 " (11) and CRLF is 2: this leaves the text 499; a little to spare.
MAX_REPLY_TEXT = 490


def escape(text: str) -> str:
    """``text`` as printable ASCII: every other character as a backslash escape."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(_escape_char(c) for c in text)


def _escape_char(char: str) -> str:
    if char.isascii() and char.isprintable():
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape keeps it
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def cap(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, marked with ``...`` when cut."""
    if len(text) <= limit:
        return text
    return text[:max(limit - len(ELLIPSIS), 0)] + ELLIPSIS


def safe(text: str, limit: int) -> str:
    """Escaped, then capped: at most ``limit`` printable ASCII characters."""
    # Escaping at most quadruples a character (\\U needs ten, but then only 10 per char):
    # cut the raw text first so a megabyte value costs no megabyte of work.
    return cap(escape(text[:limit + 1]), limit)


def domain_name(name: str) -> str:
    """A recipient domain as people should read it: the A-label, or the escaped raw name."""
    try:
        return normalize_domain(name)
    except InvalidDomain:
        return safe(name, MAX_NAME)


def reply_line(text: str, limit: int = MAX_REPLY_TEXT) -> str:
    """One SMTP reply line: printable ASCII within the line limit.

    A ``%`` counts twice: libmilter needs it doubled (``daemons.milter`` does that).
    """
    line = escape(text[:limit + 1])
    if len(line) + line.count("%") <= limit:
        return line
    while len(line) + line.count("%") > limit - len(ELLIPSIS):
        line = line[:-max((len(line) + line.count("%")) - (limit - len(ELLIPSIS)), 1)]
    return line + ELLIPSIS
