"""Assess one domain end to end, and many domains concurrently.

Every lookup goes through the configured resolver; every step has its own timeout and the whole
domain a budget, so a hanging server costs at most what the config allows. Probes to one IP
address are serialised: remote servers see at most one probe connection from us at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager

from cryptography import x509

from tlsmilter import config
from tlsmilter.assess import certs, mtasts, rating
from tlsmilter.assess.dns import Answer, Resolver, Status, system_nameserver
from tlsmilter.assess.events import ProbeObserver, ProbeStep, SilentObserver, smtp_result
from tlsmilter.assess.model import (
    AddressProbe,
    Assessment,
    Code,
    DaneStatus,
    MtaStsFacts,
    MxFacts,
    Reason,
)
from tlsmilter.assess.smtp import SMTP_PORT, probe_address
from tlsmilter.core.domains import normalize_domain
from tlsmilter.core.levels import UNKNOWN, Level

log = logging.getLogger(__name__)


IpGuard = Callable[[str], AbstractAsyncContextManager[object]]


def _no_guard(_address: str) -> AbstractAsyncContextManager[object]:
    return contextlib.nullcontext()


class Prober:
    """Assesses domains with one configuration; safe to share across tasks of one loop."""

    def __init__(self, settings: config.ProberSettings, *, smtp_port: int = SMTP_PORT,
                 https_port: int = 443, ip_guard: IpGuard | None = None,
                 observer: ProbeObserver | None = None,
                 sts_cache: mtasts.PolicyCache | None = None) -> None:
        """``ip_guard(address)`` is held around each probe of an address besides this
        prober's own per-address lock: workers use it to be polite fleet-wide. ``observer``
        hears of every step and assessment (the daemons count them as metrics).
        ``sts_cache`` keeps each domain's last valid MTA-STS policy (RFC 8461 3.3); by
        default one in this prober's memory, for as long as it lives."""
        self.settings = settings
        timeouts = settings.timeouts
        if settings.resolver:
            host, port = config.parse_host_port(settings.resolver, default_port=53)
        else:
            host, port = system_nameserver(), 53
        self.resolver = Resolver(host, port, timeout=timeouts.dns)
        self.ehlo_name = settings.ehlo_name or socket.getfqdn()
        self.smtp_port = smtp_port
        self.https_port = https_port
        # address -> (lock, probes holding or waiting for it); dropped when the count is 0
        self._ip_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._domain_slots = asyncio.Semaphore(settings.concurrency)
        self._ip_guard = ip_guard
        self._observer: ProbeObserver = observer or SilentObserver()
        # Not ``or``: an empty MemoryPolicyCache is falsy (it has a length).
        self.sts_cache: mtasts.PolicyCache = (mtasts.MemoryPolicyCache() if sts_cache is None
                                              else sts_cache)

    async def assess_many(self, domains: Iterable[str]) -> list[Assessment]:
        """Assess domains concurrently, at most ``concurrency`` at a time, in input order."""
        return list(await asyncio.gather(*(self.assess(d) for d in domains)))

    async def assess(self, domain: str) -> Assessment:
        """Assess one domain; never raises for anything the network or DNS does."""
        domain = normalize_domain(domain)
        async with self._domain_slots:
            started = time.monotonic()
            assessed_at = dt.datetime.now(dt.UTC)
            try:
                async with asyncio.timeout(self.settings.timeouts.domain):
                    result = await self._assess(domain, assessed_at)
            except TimeoutError:
                result = _unknown(domain, assessed_at, rating.reason(
                    Code.TIMEOUT, detail=f"{self.settings.timeouts.domain:g} s"))
            result.duration = time.monotonic() - started
            log.debug("assessed %s: %s in %.2fs", domain, result.level, result.duration)
            self._observer.assessed(result.level, result.duration)
            return result

    async def _assess(self, domain: str, assessed_at: dt.datetime) -> Assessment:
        started = time.monotonic()
        mx_answer = await self.resolver.query(domain, "MX")
        self._observer.step_seconds(ProbeStep.MX, time.monotonic() - started)
        self._observer.step(ProbeStep.MX, mx_answer.status.value)
        if mx_answer.status.temporary:
            return _unknown(domain, assessed_at, rating.reason(
                Code.DNS_TEMPFAIL, detail=f"MX: {mx_answer.detail}"))
        implicit = False
        hosts: list[tuple[int, str]] = []
        if mx_answer.status is Status.OK:
            hosts = sorted(_mx_pairs(mx_answer))
            if any(host == "." for _, host in hosts):
                return _final(domain, assessed_at, Level.NONE, [rating.reason(Code.NULL_MX)],
                              dnssec=mx_answer.secure, null_mx=True)
        elif mx_answer.status is Status.NODATA:
            implicit, hosts = True, [(0, domain)]
        else:  # NXDOMAIN
            return _final(domain, assessed_at, Level.NONE, [rating.reason(
                Code.NO_MAIL_HOST, detail="NXDOMAIN")], dnssec=mx_answer.secure)

        extra: list[Reason] = []
        if len(hosts) > self.settings.max_mx:
            extra.append(rating.reason(Code.MX_TRUNCATED, detail=f"{len(hosts)} MX hosts"))
            hosts = hosts[: self.settings.max_mx]
        if implicit:
            extra.append(rating.reason(Code.IMPLICIT_MX))

        sts_task = asyncio.create_task(self._mta_sts(domain))
        tlsrpt_task = asyncio.create_task(self.resolver.query(f"_smtp._tls.{domain}", "TXT"))
        try:
            mxs = list(await asyncio.gather(*(
                self._mx(pref, host, mx_secure=mx_answer.secure, implicit=implicit)
                for pref, host in hosts)))
            sts, tlsrpt_answer = await sts_task, await tlsrpt_task
            self._observer.step(ProbeStep.TLSRPT, tlsrpt_answer.status.value)
        finally:
            sts_task.cancel()
            tlsrpt_task.cancel()

        if implicit:
            if all(not m.addresses and not m.address_error for m in mxs):
                return _final(domain, assessed_at, Level.NONE, [
                    rating.reason(Code.NO_MAIL_HOST, detail="no MX and no A/AAAA")],
                    dnssec=False, implicit=True)
            dnssec = mxs[0].addresses_secure
        else:
            dnssec = mx_answer.secure
        extra.append(rating.reason(Code.MX_DNSSEC if dnssec else Code.MX_INSECURE))

        sts_facts, policy = _sts_facts(sts)
        extra.extend(_sts_reasons(sts, policy))
        for mx in mxs:
            if dnssec:
                mx.authenticated_by.append("dnssec")
            if policy is not None and policy.mode is mtasts.Mode.ENFORCE:
                if policy.covers(mx.host):
                    mx.authenticated_by.append("mta-sts")
                else:
                    extra.append(rating.reason(Code.MTA_STS_NOT_COVERED, mx.host))
            if mx.canonical and mx.canonical != mx.host:
                extra.append(rating.reason(Code.MX_CNAME, mx.host, f"-> {mx.canonical}"))
        tlsrpt = tlsrpt_answer.status is Status.OK and any(
            r.strip('"').startswith("v=TLSRPTv1") for r in tlsrpt_answer.records)
        extra.append(rating.reason(Code.TLSRPT if tlsrpt else Code.NO_TLSRPT))

        facts = rating.DomainFacts(
            mx=mxs, dnssec=dnssec, sts_mode=policy.mode.value if policy else None,
            tlsrpt=tlsrpt, min_tls_version=self.settings.min_tls_version.value,
            extra_reasons=extra,
        )
        result = rating.rate(facts)
        reasons = result.reasons + rating.domain_reasons(facts)
        return Assessment(
            domain=domain, level=result.level, score=result.score, reasons=reasons,
            dnssec=dnssec, mta_sts=sts_facts, tlsrpt=tlsrpt, mx=mxs, implicit_mx=implicit,
            null_mx=False, assessed_at=_iso(assessed_at), duration=0.0,
        )

    async def _mta_sts(self, domain: str) -> mtasts.StsResult:
        started = time.monotonic()
        result = await mtasts.fetch_cached(
            domain, self.resolver, self.sts_cache, ca_file=self.settings.ca_file or None,
            timeout=self.settings.timeouts.https, port=self.https_port)
        self._observer.step_seconds(ProbeStep.MTA_STS, time.monotonic() - started)
        self._observer.step(ProbeStep.MTA_STS, result.outcome.value)
        return result

    async def _mx(self, preference: int, host: str, *, mx_secure: bool,
                  implicit: bool) -> MxFacts:
        facts = MxFacts(host=host, preference=preference)
        a, aaaa = await asyncio.gather(self.resolver.query(host, "A"),
                                       self.resolver.query(host, "AAAA"))
        self._observer.step(ProbeStep.ADDRESS, a.status.value)
        self._observer.step(ProbeStep.ADDRESS, aaaa.status.value)
        answers = [x for x in (a, aaaa) if x.status is Status.OK]
        facts.addresses = [r for x in answers for r in x.records]
        facts.canonical = (answers[0].canonical.rstrip(".") if answers else host)
        facts.addresses_secure = bool(answers) and all(x.secure for x in answers)
        if not facts.addresses and (a.status.temporary or aaaa.status.temporary):
            facts.address_error = f"address lookup failed: {a.detail or aaaa.detail}"
            return facts
        tlsa: list[certs.Tlsa] = []
        # RFC 7672 2.2: TLSA only counts when the MX RRset and the address records validate.
        if (mx_secure or implicit) and facts.addresses_secure:
            tlsa = await self._tlsa(facts)
        names = [host] if facts.canonical == host else [host, facts.canonical]
        now = dt.datetime.now(dt.UTC)
        facts.probes = list(await asyncio.gather(*(
            self._probe(address, host, names, tlsa, facts.tlsa_secure, now)
            for address in facts.addresses)))
        return facts

    async def _tlsa(self, facts: MxFacts) -> list[certs.Tlsa]:
        # The TLSA base is the CNAME-expanded name when the expansion validated (RFC 7672 2.2.2).
        base = facts.canonical if facts.addresses_secure else facts.host
        answer = await self.resolver.query(f"_25._tcp.{base}", "TLSA")
        self._observer.step(ProbeStep.TLSA, answer.status.value)
        if answer.status.temporary:
            facts.tlsa_error = answer.detail
            return []
        facts.tlsa = list(answer.records)
        facts.tlsa_secure = answer.status is Status.OK and answer.secure
        if not facts.tlsa_secure:
            return []
        records = []
        for text in answer.records:
            try:
                records.append(certs.Tlsa.from_text(text))
            except ValueError:
                log.debug("ignoring malformed TLSA %r for %s", text, base)
        return records

    async def _probe(self, address: str, host: str, names: list[str], tlsa: list[certs.Tlsa],
                     tlsa_secure: bool, now: dt.datetime) -> AddressProbe:
        timeouts = self.settings.timeouts
        # Counted, not lock.locked(): a released lock reads unlocked before its woken waiter
        # runs, and dropping it then would let a newcomer probe the same address alongside.
        lock, users = self._ip_locks.get(address) or (asyncio.Lock(), 0)
        self._ip_locks[address] = (lock, users + 1)
        try:
            async with lock, (self._ip_guard or _no_guard)(address):
                probe, chain = await probe_address(
                    address, host, ehlo_name=self.ehlo_name, port=self.smtp_port,
                    connect_timeout=timeouts.connect, smtp_timeout=timeouts.smtp,
                    tls_timeout=timeouts.tls)
        finally:
            lock, users = self._ip_locks[address]
            if users == 1:
                del self._ip_locks[address]  # keep the table as small as the work in flight
            else:
                self._ip_locks[address] = (lock, users - 1)
        self._observer.step(ProbeStep.SMTP, smtp_result(probe.connected, probe.starttls,
                                                        probe.tls_version).value)
        self._observer.step_seconds(ProbeStep.SMTP, probe.duration)
        if probe.tls_version is not None:
            self._judge_chain(probe, chain, names, tlsa, tlsa_secure, now)
        return probe

    def _judge_chain(self, probe: AddressProbe, chain: list[x509.Certificate], names: list[str],
                     tlsa: list[certs.Tlsa], tlsa_secure: bool, now: dt.datetime) -> None:
        try:
            store = certs.load_store(self.settings.ca_file or None)
            pkix = certs.verify_pkix(chain, names, store, now)
        except (OSError, ValueError) as exc:
            probe.pkix_valid, probe.pkix_error = False, f"cert_untrusted: {exc}"
            self._observer.step(ProbeStep.PKIX, Code.CERT_UNTRUSTED.value)
        else:
            probe.pkix_valid = pkix.valid
            probe.pkix_error = None if pkix.valid else f"{pkix.code.value}: {pkix.detail}"
            self._observer.step(ProbeStep.PKIX, pkix.code.value)
        if tlsa_secure and tlsa:
            probe.dane, probe.dane_detail = certs.match_tlsa(tlsa, chain, names, now)
        elif tlsa_secure:
            probe.dane = DaneStatus.NONE
        if tlsa_secure:
            self._observer.step(ProbeStep.DANE, probe.dane.value)


def _mx_pairs(answer: Answer) -> list[tuple[int, str]]:
    pairs = []
    for record in answer.records:
        preference, _, target = record.partition(" ")
        target = target.strip().lower()
        pairs.append((int(preference), target if target == "." else target.rstrip(".")))
    return pairs


def _sts_facts(sts: mtasts.StsResult) -> tuple[MtaStsFacts | None, mtasts.Policy | None]:
    if sts.outcome is mtasts.Outcome.NO_RECORD:
        return None, None
    policy = sts.usable
    facts = MtaStsFacts(
        mode=policy.mode.value if policy else None, record_id=sts.record_id,
        outcome=sts.outcome.value, detail=sts.detail,
        mx=list(policy.mx) if policy else [],
    )
    return facts, policy


def _sts_reasons(sts: mtasts.StsResult, policy: mtasts.Policy | None) -> list[Reason]:
    if sts.outcome is mtasts.Outcome.NO_RECORD:
        return [rating.reason(Code.NO_MTA_STS)]
    if policy is None:
        return [rating.reason(Code.MTA_STS_FAILED, detail=f"{sts.outcome.value}: {sts.detail}")]
    code = {mtasts.Mode.ENFORCE: Code.MTA_STS_ENFORCE, mtasts.Mode.TESTING: Code.MTA_STS_TESTING,
            mtasts.Mode.NONE: Code.MTA_STS_NONE}[policy.mode]
    return [rating.reason(code)]


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _unknown(domain: str, assessed_at: dt.datetime, why: Reason) -> Assessment:
    return Assessment(domain=domain, level=UNKNOWN, score=None, reasons=[why], dnssec=False,
                      mta_sts=None, tlsrpt=False, mx=[], implicit_mx=False, null_mx=False,
                      assessed_at=_iso(assessed_at), duration=0.0)


def _final(domain: str, assessed_at: dt.datetime, level: Level, reasons: list[Reason], *,
           dnssec: bool, null_mx: bool = False, implicit: bool = False) -> Assessment:
    return Assessment(domain=domain, level=level.value, score=0, reasons=reasons, dnssec=dnssec,
                      mta_sts=None, tlsrpt=False, mx=[], implicit_mx=implicit, null_mx=null_mx,
                      assessed_at=_iso(assessed_at), duration=0.0)
