"""DNS lookups through the configured validating resolver.

Every lookup the prober makes goes through ``Resolver`` so that DNSSEC status comes from the
one resolver the operator trusts (its AD bit) and the lab can point everything at Unbound.
Outcomes are values, not exceptions: a temporary failure (SERVFAIL, which is also how a
validator reports bogus data, or a timeout) must be told apart from "no such data".
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

RESOLV_CONF = Path("/etc/resolv.conf")


class Status(enum.Enum):
    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    SERVFAIL = "servfail"  # includes DNSSEC-bogus answers from a validating resolver
    TIMEOUT = "timeout"
    ERROR = "error"  # REFUSED, FORMERR, malformed reply

    @property
    def temporary(self) -> bool:
        return self in (Status.SERVFAIL, Status.TIMEOUT, Status.ERROR)


@dataclass(frozen=True)
class Answer:
    """The outcome of one lookup: status, DNSSEC status, records, and any CNAME hops."""

    name: str
    rdtype: str
    status: Status
    secure: bool = False  # the validating resolver set AD
    records: tuple[str, ...] = ()  # rdata in presentation format
    rdatas: tuple[object, ...] = field(default=(), compare=False, repr=False)
    canonical: str = ""  # last CNAME target, or the name itself
    detail: str = ""


def system_nameserver() -> str:
    """First ``nameserver`` of /etc/resolv.conf; the default when no resolver is configured."""
    try:
        for line in RESOLV_CONF.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    except OSError:
        pass
    return "127.0.0.1"


class Resolver:
    """Asks one validating resolver, with EDNS DO so it reports DNSSEC status via AD."""

    def __init__(self, address: str, port: int = 53, timeout: float = 5.0) -> None:
        self.address = address
        self.port = port
        self.timeout = timeout

    async def query(self, name: str, rdtype: str) -> Answer:
        qname = dns.name.from_text(name)
        request = dns.message.make_query(qname, rdtype, want_dnssec=True, use_edns=0, payload=1232)
        # AD in the query asks for the AD bit even from resolvers that only set it on request.
        request.flags |= dns.flags.AD
        deadline = time.monotonic() + self.timeout
        response: dns.message.Message | None = None
        last_error = ""
        # One retry over UDP inside the budget: a single lost datagram is not a failure.
        for _ in range(2):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                response, _tcp = await dns.asyncquery.udp_with_fallback(
                    request, self.address, timeout=min(remaining, self.timeout / 2),
                    port=self.port,
                )
                break
            except dns.exception.Timeout:
                last_error = "timed out"
            except (OSError, dns.exception.DNSException) as exc:
                return Answer(name, rdtype, Status.ERROR, detail=f"{type(exc).__name__}: {exc}")
        if response is None:
            return Answer(name, rdtype, Status.TIMEOUT, detail=last_error or "timed out")
        return _interpret(name, rdtype, qname, response)


def _interpret(name: str, rdtype: str, qname: dns.name.Name,
               response: dns.message.Message) -> Answer:
    rcode = response.rcode()
    secure = bool(response.flags & dns.flags.AD)
    if rcode == dns.rcode.SERVFAIL:
        return Answer(name, rdtype, Status.SERVFAIL, detail="SERVFAIL (unreachable or bogus)")
    if rcode == dns.rcode.NXDOMAIN:
        return Answer(name, rdtype, Status.NXDOMAIN, secure=secure, canonical=name)
    if rcode != dns.rcode.NOERROR:
        return Answer(name, rdtype, Status.ERROR, detail=dns.rcode.to_text(rcode))
    wanted = dns.rdatatype.from_text(rdtype)
    current = qname
    # Follow the CNAME chain inside the answer section; resolvers include it for us.
    for _ in range(16):
        cname = response.get_rrset(response.answer, current, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None or wanted == dns.rdatatype.CNAME:
            break
        current = cname[0].target
    rrset = response.get_rrset(response.answer, current, dns.rdataclass.IN, wanted)
    canonical = current.to_text()
    if rrset is None:
        return Answer(name, rdtype, Status.NODATA, secure=secure, canonical=canonical)
    records = tuple(sorted(r.to_text() for r in rrset))
    return Answer(name, rdtype, Status.OK, secure=secure, records=records,
                  rdatas=tuple(rrset), canonical=canonical)
