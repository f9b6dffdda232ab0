"""Declarative description of lab scenarios.

A scenario is one mail domain: its DNS (signed, unsigned or bogus), its MX hosts and the
behaviour of the SMTP server behind each, its TLSA records, and its MTA-STS policy. The lab
turns a list of these into zone files for Knot, certificates from the test CA, SMTP and HTTPS
servers on loopback addresses, and a trust anchor for Unbound.

Names are relative: ``Domain("dane-ee")`` becomes ``dane-ee.<lab tld>.`` and its MX host
``MX("mx1")`` becomes ``mx1.dane-ee.<lab tld>``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Tls(enum.Enum):
    """What an SMTP server does about STARTTLS."""

    NONE = "none"  # EHLO does not advertise STARTTLS
    TLS13 = "tls1.3"  # STARTTLS, negotiates up to TLS 1.3
    TLS12 = "tls1.2"  # STARTTLS, TLS 1.2 at most
    TLS10 = "tls1.0"  # STARTTLS, only TLS 1.0 (needs @SECLEVEL=0 on the server)
    HANG = "hang"  # accepts TCP, never sends a byte
    BREAK = "break"  # advertises STARTTLS, answers 220, then sends garbage instead of a handshake


class Cert(enum.Enum):
    """Which certificate a TLS server presents."""

    CA = "ca"  # issued by the lab CA for the server's host name
    SELF_SIGNED = "self-signed"  # right name, signed by itself
    EXPIRED = "expired"  # lab CA, right name, notAfter in the past
    WRONG_NAME = "wrong-name"  # lab CA, valid, for an unrelated name


class Dnssec(enum.Enum):
    UNSIGNED = "unsigned"  # no DS in the parent: answers are insecure (no AD)
    SIGNED = "signed"  # Knot signs the zone, DS in the parent: answers are secure (AD)
    BOGUS = "bogus"  # DS in the parent that matches no key: Unbound answers SERVFAIL


class TlsaTarget(enum.Enum):
    EE = "ee"  # the server's own certificate (usage 3 normally)
    TA = "ta"  # the lab CA certificate (usage 2 normally)
    WRONG = "wrong"  # a certificate the server does not present


@dataclass(frozen=True)
class Tlsa:
    usage: int = 3
    selector: int = 1
    mtype: int = 1
    target: TlsaTarget = TlsaTarget.EE


@dataclass(frozen=True)
class Smtp:
    """One SMTP server's declared behaviour."""

    tls: Tls = Tls.TLS13
    cert: Cert = Cert.CA


@dataclass(frozen=True)
class MX:
    name: str  # label inside the domain: "mx1" becomes mx1.<domain>
    server: Smtp = field(default_factory=Smtp)
    preference: int = 10
    tlsa: tuple[Tlsa, ...] = ()
    via_cname: bool = False  # the MX target is a CNAME to the real host name


@dataclass(frozen=True)
class MtaSts:
    mode: str = "enforce"  # enforce | testing | none
    mx: tuple[str, ...] | None = None  # patterns; None: the domain's MX host names
    max_age: int = 86400
    cert: Cert = Cert.CA
    record_id: str = "20261122T000000"


@dataclass(frozen=True)
class Domain:
    name: str
    dnssec: Dnssec = Dnssec.SIGNED
    mx: tuple[MX, ...] = ()
    null_mx: bool = False  # "MX 0 ." (RFC 7505)
    implicit: Smtp | None = None  # no MX; the domain's own A record points at this server
    mta_sts: MtaSts | None = None
    tlsrpt: bool = False

    def __post_init__(self) -> None:
        shapes = sum((bool(self.mx), self.null_mx, self.implicit is not None))
        if shapes > 1:
            raise ValueError(f"{self.name}: give at most one of mx, null_mx, implicit")
