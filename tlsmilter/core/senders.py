"""Sender rules: mail from chosen addresses or domains needs at least a policy. Pure.

A rule's key is an address (``ceo@example.org``), a domain (``hr.example.org``, that domain
only) or ``.example.org`` (every subdomain of it). Addresses compare case-insensitively; the
envelope sender and, where configured, the ``From:`` header's addresses are checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import getaddresses

MAX_FROM = 4096  # a From: header longer than this is only read this far
MAX_FROM_ADDRESSES = 50


@dataclass(frozen=True)
class SenderRules:
    rules: Mapping[str, str]  # key, lower case, no trailing dot -> policy name

    @classmethod
    def build(cls, rules: Mapping[str, str]) -> SenderRules:
        return cls({k.strip().lower().rstrip("."): v for k, v in rules.items() if k.strip()})


def envelope_address(mailfrom: str) -> str:
    """The MAIL FROM argument as a bare address (``<>``: empty)."""
    return mailfrom.strip().strip("<>").strip()


def header_addresses(values: Iterable[str]) -> list[str]:
    """The addresses in ``From:`` header values (bounded)."""
    found = []
    for value in values:
        found += [address for _name, address in getaddresses([value[:MAX_FROM]]) if address]
    return found[:MAX_FROM_ADDRESSES]


def matches(addresses: Iterable[str], rules: SenderRules) -> Iterator[tuple[str, str]]:
    """``(policy name, rule key)`` for each address a rule covers."""
    if not rules.rules:
        return
    for address in addresses:
        address = address.strip().lower().rstrip(".")
        _local, at, domain = address.rpartition("@")
        if address in rules.rules and at:
            yield rules.rules[address], address
        if not at or not domain:
            continue
        if domain in rules.rules:
            yield rules.rules[domain], domain
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in rules.rules:
                yield rules.rules[parent], parent
