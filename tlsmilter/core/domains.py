"""Normalising mail domains: case, trailing dot, IDNA to A-label."""

from __future__ import annotations

import ipaddress
import re

from tlsmilter.errors import UsageError

MAX_DOMAIN = 253

# What nearly every recipient domain is: ASCII labels of letters, digits, hyphens and
# underscores, the last one not all digits (so it is no IPv4 address). Such a name needs
# neither the address check nor the IDNA codec, which cost most of the milter's RCPT time.
_PLAIN = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*(?=[a-z0-9_-]*[a-z_-])[a-z0-9_-]{1,63}")


class InvalidDomain(UsageError):
    def __init__(self, domain: str, why: str) -> None:
        self.domain = domain
        self.why = why
        super().__init__(f"{domain!r} is not a mail domain: {why}")


def normalize_domain(domain: str) -> str:
    """Lower-case A-label form without the trailing dot; raise ``InvalidDomain`` otherwise."""
    text = domain.strip().rstrip(".")
    if text.isascii():
        lower = text.lower()
        if len(lower) <= MAX_DOMAIN and _PLAIN.fullmatch(lower):
            return lower
    if not text:
        raise InvalidDomain(domain, "empty")
    if text.startswith("[") or _is_ip(text):
        raise InvalidDomain(domain, "an address literal has no MX to assess")
    try:
        ascii_name = text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        # The codec's message would reach an SMTP reply: say what is wrong in our words.
        raise InvalidDomain(domain, _idna_problem(text)) from None
    labels = ascii_name.split(".")
    if len(ascii_name) > MAX_DOMAIN or any(not 0 < len(label) < 64 for label in labels):
        raise InvalidDomain(domain, "label or name too long, or an empty label")
    if any(not all(c.isalnum() or c in "-_" for c in label) for label in labels):
        raise InvalidDomain(domain, "characters outside letters, digits and hyphens")
    return ascii_name


def _idna_problem(text: str) -> str:
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in text):
        return "not valid UTF-8, so no IDNA name"
    if any(not label for label in text.split(".")):
        return "an empty label"
    if len(text) > MAX_DOMAIN or any(len(label) > 63 for label in text.split(".")):
        return "label or name too long"
    if any(not c.isprintable() for c in text):
        return "control characters in the name"
    return "not a valid internationalised name (IDNA)"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
