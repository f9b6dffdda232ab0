"""Knot DNS (authoritative, signing) and Unbound (validating resolver) on loopback.

The lab TLD and every child zone are served by one ``knotd``. Knot generates the keys and
signs the TLD and the SIGNED/BOGUS children itself; once it serves their DNSKEYs, the TLD
zone is rewritten with the children's DS records (a corrupted digest for BOGUS children)
and reloaded. Unbound gets a stub zone for the TLD pointing at Knot and the TLD's key as
its only trust anchor, so validation is an island of trust rooted at the lab TLD.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tests.lab.model import Dnssec
from tests.lab.service import LabError, Service, stop_process

# Short TTLs so that tests which change zones at runtime do not fight stale caches.
TTL = 30
NEGATIVE_TTL = 5
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
# Until a server listens its port is silent (no ICMP on unconnected UDP sockets), so
# readiness polls must time out quickly.
POLL_QUERY_TIMEOUT = 0.05
LOG_TAIL_LINES = 40
# DNSKEY flags of a key signing key (ZONE | SEP); Knot's CSK carries them too.
KSK_FLAGS = 257




@dataclass
class Zone:
    """A child zone of the lab TLD.

    ``records`` are zone-file lines relative to the zone origin, e.g. ``"@ 300 IN MX 10
    mx1"``. The lab adds the SOA and the NS record (``ns.<tld>``) itself.
    """

    name: str
    dnssec: Dnssec = Dnssec.SIGNED
    records: list[str] = field(default_factory=list)


@dataclass
class _Daemon:
    """A foreground server process whose logs explain its failures."""

    name: str
    argv: list[str]
    output: Path  # the process's stdout and stderr: early config errors land there
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise self.error(f"exited with status {self.proc.returncode}")

    def error(self, problem: str) -> LabError:
        return LabError(f"{self.name} {problem}\n{self.tail()}")

    def tail(self) -> str:
        parts = []
        for path in (self.output, self.log):
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            parts.append(f"--- {path} (last {LOG_TAIL_LINES} lines) ---")
            parts.extend(lines[-LOG_TAIL_LINES:])
        return "\n".join(parts)

    def stop(self) -> None:
        stop_process(self.proc, STOP_TIMEOUT)


class DnsLab(Service):
    """Knot + Unbound for one lab TLD and its child zones, all files under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        tld: str,
        zones: list[Zone],
        knot_addr: str,
        unbound_addr: str,
        port: int = 53,
    ) -> None:
        self.workdir = workdir
        self.tld = dns.name.from_text(tld)
        for address in (knot_addr, unbound_addr):
            if not ipaddress.IPv4Address(address).is_loopback:
                raise ValueError(f"{address}: the DNS lab listens on 127.0.0.0/8 only")
        self.authoritative = (knot_addr, port)
        self.resolver = (unbound_addr, port)
        self._zones = {self._child_name(zone.name): dataclasses.replace(zone) for zone in zones}
        self._serials = {name: 0 for name in [self.tld, *self._zones]}
        self._ds: dict[dns.name.Name, list[str]] = {}
        # Both servers report this as their identity: an answer from a server left over
        # on the same address by another run must not pass for ours.
        self._identity = f"dns-lab-{secrets.token_hex(8)}"
        self._knot_conf = workdir / "knot" / "knot.conf"
        self._unbound_conf = workdir / "unbound" / "unbound.conf"
        self._knot = _Daemon(
            "knotd",
            ["knotd", "-c", str(self._knot_conf)],
            workdir / "knot" / "knotd.out",
            workdir / "knot" / "knot.log",
        )
        self._unbound = _Daemon(
            "unbound",
            ["unbound", "-d", "-c", str(self._unbound_conf)],
            workdir / "unbound" / "unbound.out",
            workdir / "unbound" / "unbound.log",
        )

    @property
    def pids(self) -> list[int]:
        """PIDs of the servers started so far (still listed after :meth:`stop`)."""
        return [d.proc.pid for d in (self._knot, self._unbound) if d.proc is not None]


    def start(self) -> None:
        """Start both servers; return once Unbound validates the TLD SOA (AD set)."""
        try:
            self._start_knot()
            self._publish_ds()
            self._start_unbound()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop both servers (SIGTERM, then SIGKILL after a bound). Idempotent."""
        self._unbound.stop()
        self._knot.stop()

    def set_records(self, zone_name: str, records: list[str]) -> None:
        """Replace a child zone's records, reload it in Knot and flush it from Unbound.

        Its DNSSEC state is kept: Knot re-signs a signed zone with the same keys.
        """
        name = dns.name.from_text(zone_name)
        if name not in self._zones:
            raise ValueError(f"{zone_name}: not a zone of this lab")
        self._zones[name].records = list(records)
        self._write_child_zone(self._zones[name])
        self._reload_zone(name)
        self.flush(zone_name)

    def refuse(self, name: str) -> None:
        """Make Unbound answer REFUSED for ``name`` and every name below it, as an attacker
        on the path dropping those queries would make a resolver fail, until ``unrefuse``."""
        self._run(["unbound-control", "-c", str(self._unbound_conf), "local_zone", name,
                   "always_refuse"], self._unbound)

    def unrefuse(self, name: str) -> None:
        """Undo ``refuse``: ``name`` resolves again (and nothing stale of it is cached)."""
        self._run(["unbound-control", "-c", str(self._unbound_conf), "local_zone_remove",
                   name], self._unbound)
        self.flush(name)

    def flush(self, name: str) -> None:
        """Drop everything at or below ``name`` from Unbound's caches."""
        self._run(
            ["unbound-control", "-c", str(self._unbound_conf), "flush_zone", name],
            self._unbound,
        )

    # --- Knot ---------------------------------------------------------------------------

    def _child_name(self, zone_name: str) -> dns.name.Name:
        name = dns.name.from_text(zone_name)
        if name == self.tld or not name.is_subdomain(self.tld):
            raise ValueError(f"{zone_name}: a lab zone must lie below {self.tld}")
        return name

    def _start_knot(self) -> None:
        for sub in ("knot/zones", "knot/db", "knot/run"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._knot_conf.write_text(self._knot_config())
        self._write_tld_zone()
        for zone in self._zones.values():
            self._write_child_zone(zone)
        self._knot.start()
        names = [self.tld, *self._zones]
        self._wait(
            self._knot,
            "did not serve all zones",
            lambda: self._is_ours(self.authoritative) and all(map(self._knot_serves, names)),
        )

    def _knot_config(self) -> str:
        knot = self.workdir / "knot"
        run, db = knot / "run", knot / "db"
        addr, port = self.authoritative
        user = f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"
        signing = "    dnssec-signing: on\n    dnssec-policy: lab\n"
        zone_entries = "".join(
            f'  - domain: {name}\n    file: "{self._zone_file(name)}"\n'
            + (signing if self._signed(name) else "")
            for name in [self.tld, *self._zones]
        )
        # Zone files are the source of truth: no journal, never written back by Knot. Knot
        # runs as the current user so that it can always read and write the workdir.
        return f"""\
server:
    rundir: "{run}"
    pidfile: "{run}/knot.pid"
    listen: {addr}@{port}
    identity: {self._identity}
    user: {user}
database:
    storage: "{db}"
log:
  - target: "{self._knot.log}"
    any: info
policy:
  - id: lab
    algorithm: ecdsap256sha256
    single-type-signing: on
    dnskey-ttl: {TTL}
    cds-cdnskey-publish: none
template:
  - id: default
    zonefile-load: whole
    zonefile-sync: -1
    journal-content: none
zone:
{zone_entries}"""

    def _zone_file(self, name: dns.name.Name) -> Path:
        return self.workdir / "knot" / "zones" / f"{name.to_text(omit_final_dot=True)}.zone"

    def _write_zone(self, name: dns.name.Name, lines: list[str]) -> None:
        self._serials[name] += 1
        header = [
            f"$ORIGIN {name}",
            f"$TTL {TTL}",
            f"@ SOA ns.{self.tld} hostmaster.{self.tld} {self._serials[name]} "
            f"{TTL} {NEGATIVE_TTL} 3600 {NEGATIVE_TTL}",
            f"@ NS ns.{self.tld}",
        ]
        self._zone_file(name).write_text("\n".join(header + lines) + "\n")

    def _write_tld_zone(self) -> None:
        lines = [f"ns A {self.authoritative[0]}"]
        for name in self._zones:
            label = name.relativize(self.tld)
            lines.append(f"{label} NS ns.{self.tld}")
            lines.extend(f"{label} DS {ds}" for ds in self._ds.get(name, []))
        self._write_zone(self.tld, lines)

    def _write_child_zone(self, zone: Zone) -> None:
        self._write_zone(dns.name.from_text(zone.name), zone.records)

    def _signed(self, name: dns.name.Name) -> bool:
        return name == self.tld or self._zones[name].dnssec is not Dnssec.UNSIGNED

    def _knot_serves(self, name: dns.name.Name) -> bool:
        # A signed zone is only published once Knot has signed it, DNSKEYs included.
        rdtype = dns.rdatatype.DNSKEY if self._signed(name) else dns.rdatatype.SOA
        return self._authoritative_rrset(name, rdtype, POLL_QUERY_TIMEOUT) is not None

    def _authoritative_rrset(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, timeout: float = 2.0
    ) -> dns.rrset.RRset | None:
        response = _query(self.authoritative, name, rdtype, timeout)
        if response is None or response.rcode() != dns.rcode.NOERROR:
            return None
        return response.get_rrset(response.answer, name, dns.rdataclass.IN, rdtype)

    def _ksks(self, name: dns.name.Name) -> dns.rrset.RRset:
        dnskeys = self._authoritative_rrset(name, dns.rdatatype.DNSKEY)
        if dnskeys is None:
            raise self._knot.error(f"serves no DNSKEY for {name}")
        ksks = dns.rrset.RRset(name, dnskeys.rdclass, dnskeys.rdtype)
        ksks.update_ttl(dnskeys.ttl)
        for key in dnskeys:
            if key.flags == KSK_FLAGS:
                ksks.add(key)
        return ksks

    def _publish_ds(self) -> None:
        """Put the children's DS records into the TLD zone now that Knot made their keys."""
        for name, zone in self._zones.items():
            if self._signed(name):
                self._ds[name] = [_ds_text(name, key, zone.dnssec) for key in self._ksks(name)]
        self._write_tld_zone()
        self._reload_zone(self.tld)

    def _reload_zone(self, name: dns.name.Name) -> None:
        self._run(["knotc", "-c", str(self._knot_conf), "-b", "zone-reload", str(name)], self._knot)

    # --- Unbound ------------------------------------------------------------------------

    def _start_unbound(self) -> None:
        unbound = self.workdir / "unbound"
        unbound.mkdir(parents=True, exist_ok=True)
        anchor = unbound / "tld.anchor"
        anchor.write_text(self._ksks(self.tld).to_text() + "\n")
        self._unbound_conf.write_text(self._unbound_config(anchor))
        self._unbound.start()
        self._wait(
            self._unbound,
            "gave no secure answer for the TLD SOA",
            lambda: self._is_ours(self.resolver) and self._tld_secure(),
        )

    def _unbound_config(self, anchor: Path) -> str:
        unbound = self.workdir / "unbound"
        addr, port = self.resolver
        knot_addr, knot_port = self.authoritative
        # Refusing "." makes names outside the lab fail at once instead of timing out on
        # the real root servers; the TLD's own local-zone overrides Unbound's built-in
        # RFC 6761 zones (test., invalid., ...), which would otherwise answer NXDOMAIN.
        return f"""\
server:
    interface: {addr}
    port: {port}
    identity: "{self._identity}"
    hide-identity: no
    do-ip6: no
    num-threads: 1
    so-reuseport: no
    access-control: 127.0.0.0/8 allow
    access-control: ::1 allow
    username: ""
    chroot: ""
    directory: "{unbound}"
    pidfile: "{unbound}/unbound.pid"
    use-syslog: no
    logfile: "{self._unbound.log}"
    verbosity: 1
    val-log-level: 2
    log-servfail: yes
    do-not-query-localhost: no
    module-config: "validator iterator"
    trust-anchor-file: "{anchor}"
    harden-dnssec-stripped: yes
    aggressive-nsec: no
    serve-expired: no
    prefetch: no
    cache-max-ttl: {TTL}
    cache-max-negative-ttl: {NEGATIVE_TTL}
    val-bogus-ttl: {NEGATIVE_TTL}
    infra-host-ttl: {TTL}
    local-zone: "." refuse
    local-zone: "{self.tld}" transparent
stub-zone:
    name: "{self.tld}"
    stub-addr: {knot_addr}@{knot_port}
remote-control:
    control-enable: yes
    control-interface: "{unbound}/unbound.ctl"
    control-use-cert: no
"""

    def _tld_secure(self) -> bool:
        response = _query(self.resolver, self.tld, dns.rdatatype.SOA, POLL_QUERY_TIMEOUT)
        return (
            response is not None
            and response.rcode() == dns.rcode.NOERROR
            and bool(response.flags & dns.flags.AD)
        )

    # --- helpers ------------------------------------------------------------------------

    def _is_ours(self, server: tuple[str, int]) -> bool:
        response = _query(
            server, "id.server.", dns.rdatatype.TXT, POLL_QUERY_TIMEOUT, dns.rdataclass.CH
        )
        return response is not None and any(
            rdata.to_text() == f'"{self._identity}"' for rrset in response.answer for rdata in rrset
        )

    def _wait(self, daemon: _Daemon, problem: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            daemon.check_alive()
            if time.monotonic() > deadline:
                raise daemon.error(f"{problem} within {START_TIMEOUT:.0f} s")
            time.sleep(POLL_INTERVAL)

    def _run(self, argv: list[str], daemon: _Daemon) -> None:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
        if result.returncode != 0:
            raise daemon.error(f"control command {argv} failed: {result.stdout}{result.stderr}")


def _query(
    server: tuple[str, int],
    name: dns.name.Name | str,
    rdtype: dns.rdatatype.RdataType,
    timeout: float = 2.0,
    rdclass: dns.rdataclass.RdataClass = dns.rdataclass.IN,
) -> dns.message.Message | None:
    """One UDP query with DO and AD set; ``None`` when the server does not answer."""
    request = dns.message.make_query(name, rdtype, rdclass, want_dnssec=True)
    request.flags |= dns.flags.AD
    try:
        return dns.query.udp(request, server[0], port=server[1], timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return None


def _ds_text(name: dns.name.Name, key: dns.rdata.Rdata, state: Dnssec) -> str:
    """The DS for ``key``; for a BOGUS zone one whose digest matches no key."""
    ds = dns.dnssec.make_ds(name, key, "SHA256")
    if state is not Dnssec.BOGUS:
        return ds.to_text()
    # Keep key tag and algorithm so the validator tries this key and fails on it.
    return ds.replace(digest=bytes(b ^ 0xFF for b in ds.digest)).to_text()
