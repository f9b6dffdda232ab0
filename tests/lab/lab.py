"""The whole lab: scenarios in, running DNS, CA, SMTP and HTTPS servers out.

Each lab takes a /16 of its own inside 127.0.0.0/8 so that concurrent labs (a developer's run
and CI, or two pytest sessions) never collide:

    127.N.0.1      Knot (authoritative, port 53)
    127.N.0.2      Unbound (validating resolver, port 53)
    127.N.0.3      Postfix smtpd (port 25), when a test asks for Postfix
    127.N.10-99.x  SMTP servers, one per MX host (port 25)
    127.N.100-199.x HTTPS servers for MTA-STS (port 443)
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.lab.dns import DnsLab, Zone
from tests.lab.https import HttpsServer, PolicyResponse
from tests.lab.model import Domain
from tests.lab.pki import LabCA
from tests.lab.smtpd import SmtpServer

TLD = "test"


class _Allocator:
    def __init__(self, base: str, first: int, last: int) -> None:
        self._addresses = (f"{base}.{third}.{fourth}" for third in range(first, last + 1)
                           for fourth in range(1, 255))

    def next(self) -> str:
        try:
            return next(self._addresses)
        except StopIteration:
            raise RuntimeError("lab address range exhausted") from None


def pick_base() -> str:
    """A free ``127.N`` prefix: nothing listens on its DNS address yet."""
    for _ in range(50):
        base = f"127.{random.randint(20, 250)}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((f"{base}.0.1", 53))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
        return base
    raise RuntimeError("no free 127.N.0.0/16 for the lab")


class Lab:
    """Brings up every scenario; ``stop`` tears down only what it started."""

    def __init__(self, workdir: Path, scenarios: Iterable[Domain], base: str | None = None):
        self.workdir = workdir
        self.base = base or pick_base()
        self.scenarios = {d.name: d for d in scenarios}
        self.ca = LabCA(workdir / "pki")
        self.smtp: dict[str, SmtpServer] = {}  # MX host name -> server
        self.https: dict[str, HttpsServer] = {}  # domain -> MTA-STS policy server
        self._smtp_addresses = _Allocator(self.base, 10, 99)
        self._https_addresses = _Allocator(self.base, 100, 199)
        zones = [self._zone(d) for d in self.scenarios.values()]
        self.dns = DnsLab(workdir / "dns", TLD, zones, knot_addr=f"{self.base}.0.1",
                          unbound_addr=f"{self.base}.0.2")
        self.started_in = 0.0

    @property
    def resolver(self) -> str:
        """``HOST:PORT`` of the validating resolver, as tlsmilter's config wants it."""
        host, port = self.dns.resolver
        return f"{host}:{port}"

    @property
    def postfix_address(self) -> str:
        return f"{self.base}.0.3"

    @staticmethod
    def domain(name: str) -> str:
        return f"{name}.{TLD}"

    def server(self, scenario: str, mx: str = "mx1") -> SmtpServer:
        """The SMTP server behind MX ``mx`` of a scenario (or its implicit-MX server)."""
        domain = self.domain(scenario)
        return self.smtp[domain if self.scenarios[scenario].implicit else f"{mx}.{domain}"]

    def start(self) -> Lab:
        started = time.monotonic()
        try:
            self.dns.start()
            for server in [*self.smtp.values(), *self.https.values()]:
                server.start()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - started
        return self

    def stop(self) -> None:
        for server in [*self.https.values(), *self.smtp.values()]:
            with contextlib.suppress(Exception):
                server.stop()
        self.dns.stop()

    def pids(self) -> list[int]:
        return list(self.dns.pids)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _zone(self, d: Domain) -> Zone:
        domain = self.domain(d.name)
        records = list(self._mail_records(d, domain))
        if d.mta_sts:
            address = self._https_addresses.next()
            host = f"mta-sts.{domain}"
            patterns = d.mta_sts.mx if d.mta_sts.mx is not None else tuple(
                f"{mx.name}.{domain}" for mx in d.mx)
            body = "".join([f"version: STSv1\r\nmode: {d.mta_sts.mode}\r\n",
                            *(f"mx: {p}\r\n" for p in patterns),
                            f"max_age: {d.mta_sts.max_age}\r\n"])
            self.https[domain] = HttpsServer(host, address, self.ca,
                                             PolicyResponse(body=body), cert=d.mta_sts.cert)
            records += [f'_mta-sts IN TXT "v=STSv1; id={d.mta_sts.record_id}"',
                        f"mta-sts IN A {address}"]
        if d.tlsrpt:
            records.append(f'_smtp._tls IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{domain}"')
        return Zone(f"{domain}.", d.dnssec, records)

    def _mail_records(self, d: Domain, domain: str) -> Iterator[str]:
        if d.null_mx:
            yield "@ IN MX 0 ."
            return
        if d.implicit is not None:
            address = self._smtp_addresses.next()
            self.smtp[domain] = SmtpServer(domain, address, d.implicit, self.ca)
            yield f"@ IN A {address}"
            return
        for mx in d.mx:
            host = f"{mx.name}.{domain}"
            address = self._smtp_addresses.next()
            server = SmtpServer(host, address, mx.server, self.ca)
            self.smtp[host] = server
            yield f"@ IN MX {mx.preference} {host}."
            owner = mx.name
            if mx.via_cname:
                owner = f"real-{mx.name}"
                yield f"{mx.name} IN CNAME {owner}"
            yield f"{owner} IN A {address}"
            issued = self.ca.issue(host, mx.server.cert)
            for tlsa in mx.tlsa:
                data = self.ca.tlsa_for(issued, tlsa)
                yield f"_25._tcp.{owner} IN TLSA {tlsa.usage} {tlsa.selector} {tlsa.mtype} {data}"
