"""``tlsmilter doctor``: is Postfix wired so that sensitive mail cannot leave below its level?

Reads the running configuration with ``postconf``, ``postconf -M`` and ``postconf -P``
(``commands.postconf``), then checks, as docs/postfix.md sets it up:

- the milter in ``smtpd_milters`` and ``non_smtpd_milters`` (and any service overriding
  them), reachable from each service's chroot, with ``default_action=tempfail``;
- ``milter_header_checks`` routing each required level to the transport of that level, which
  exists in master.cf;
- each transport's TLS floor, its policy map (the right socket and map), DNSSEC lookups,
  ``smtp_tls_loglevel`` >= 1 (proof reads it) and, on Postfix 3.10, ``tls_required_enable``;
- the resolver: ``trust-ad`` in resolv.conf, and the AD bit on an answer for a signed name;
- that ``serve`` answers on its milter and policy sockets.

Each finding is one line: what is wrong, why it matters, the exact fix. ``FAIL`` findings
can let sensitive mail leave below its level (exit 5); ``WARN`` ones stop or slow mail, or
blind ``tlsmilter proof``, but leak nothing (exit 6 when there is no FAIL).
"""

from __future__ import annotations

import argparse
import enum
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query

from tlsmilter import config
from tlsmilter.commands.postconf import PostfixView, Service, milter_entries, read_postfix
from tlsmilter.commands.postconf import socket_path as resolve_socket

EXIT_LEAK = 5
EXIT_WARN = 6
TIMEOUT = 3.0
# The level a message required -> its transport and the suffix of that transport's map.
TRANSPORTS = {"encrypted": ("tlsmilter-secure", "-strict"),
              "verified": ("tlsmilter-verified", "-verified"),
              "dane": ("tlsmilter-dane", "-dane")}
RANK = {"encrypted": 1, "verified": 2, "dane": 3}
FLOORS = {"encrypt", "dane", "dane-only", "fingerprint", "verify", "secure"}
MILTER_OPTS = "default_action=tempfail, connect_timeout=10s, command_timeout=30s, " \
              "content_timeout=60s"


@dataclass(frozen=True)
class Finding:
    """One line of the report; ``why`` and ``fix`` are empty for an ``ok`` line."""

    severity: Severity
    check: str
    what: str
    why: str = ""
    fix: str = ""

    def line(self) -> str:
        text = f"{self.severity.value:<4} {self.check}: {self.what}"
        if self.why:
            text += f" -- {self.why}"
        if self.fix:
            text += f" -- fix: {self.fix}"
        return text


class Severity(enum.Enum):
    OK = "ok"
    WARN = "WARN"  # mail stops or slows, or proof is blind; nothing leaks
    FAIL = "FAIL"  # sensitive mail can leave below its level


def _ok(check: str, what: str) -> Finding:
    return Finding(Severity.OK, check, what)


def check_milters(view: PostfixView, settings: config.Config) -> Iterator[Finding]:
    """The milter lists of main.cf and of services that override them."""
    want = settings.milter.socket
    smtpd = [s for s in view.services.values() if s.command == "smtpd"]
    cleanup = view.services.get("cleanup/unix")
    lists: list[tuple[str, Service | None, str]] = [
        ("smtpd_milters", s, "sensitive mail arriving by SMTP is never checked")
        for s in smtpd if "no_milters" not in view.param(s, "receive_override_options")]
    lists.append(("non_smtpd_milters", cleanup,
                  "sensitive mail submitted with sendmail(1) is never checked"))
    seen: set[tuple[str, str]] = set()
    for param, service, why in lists:
        value = view.param(service, param)
        where = f"{service.name} ({param} -o override)" if service and param in service.params \
            else f"main.cf {param}"
        if (where, value) in seen:
            continue
        seen.add((where, value))
        chrooted = service.chroot if service else False
        found = [(name, opts) for name, opts in milter_entries(value)
                 if resolve_socket(name, chrooted, view.queue_directory) == want]
        if not found:
            named = [n for n, _ in milter_entries(value) if "tlsmilter" in n]
            what = (f"{where} names {named[0]}, which {service.name if service else 'Postfix'}"
                    f"{' (chrooted)' if chrooted else ''} finds elsewhere than tlsmilter's "
                    f"{want}" if named else f"{where} does not name tlsmilter's milter ({want})")
            yield Finding(Severity.FAIL, "milter", what, why,
                          f"{param} = {{ {postfix_name(want, view)}, {MILTER_OPTS} }} "
                          "(docs/postfix.md step 6)")
            continue
        action = found[0][1].get("default_action") or view.main.get("milter_default_action",
                                                                    "tempfail")
        if action != "tempfail":
            yield Finding(Severity.FAIL, "milter", f"{where}: default_action={action}",
                          "while tlsmilter is unreachable, sensitive mail passes unchecked",
                          f"default_action=tempfail in the {{ ... }} entry of {param}")
        else:
            yield _ok("milter", f"{where} -> {want}, default_action=tempfail")


def postfix_name(socket_spec: str, view: PostfixView) -> str:
    """How main.cf should name tlsmilter's socket: relative to the queue directory if in it."""
    kind, _, path = socket_spec.partition(":")
    if kind == "unix" and Path(path).is_relative_to(view.queue_directory):
        return f"unix:{Path(path).relative_to(view.queue_directory)}"
    if kind == "inet":
        port, _, host = path.partition("@")
        return f"inet:{host}:{port}"
    return socket_spec


def check_routes(view: PostfixView, settings: config.Config) -> Iterator[Finding]:
    """milter_header_checks sends each level to its transport, which exists."""
    if not view.main.get("milter_header_checks"):
        yield Finding(Severity.FAIL, "header checks", "milter_header_checks is not set",
                      "accepted sensitive mail leaves through the normal transport at "
                      "smtp_tls_security_level (may: possibly in clear)",
                      "milter_header_checks = regexp:/etc/postfix/tlsmilter_header_checks and "
                      "copy contrib/postfix/tlsmilter_header_checks there")
        return
    if view.header_error:
        yield Finding(Severity.FAIL, "header checks", f"cannot query milter_header_checks "
                      f"({view.header_error})", "Postfix cannot read it either: sensitive mail "
                      "is not routed", "install the table as docs/postfix.md step 6 says")
        return
    for level, (transport, _suffix) in TRANSPORTS.items():
        header = f"X-TLSMilter-Route: {level}"
        action = view.header_filter.get(header, "")
        verb, _, target = action.partition(" ")
        routed = target.partition(":")[0].strip()
        if verb.upper() != "FILTER" or not routed:
            yield Finding(Severity.FAIL, "header checks", f"'{header}' is not FILTERed "
                          f"(table answers {action or 'nothing'})", f"mail requiring {level} "
                          "leaves through the normal transport", f"the rule for {level} in "
                          "contrib/postfix/tlsmilter_header_checks")
            continue
        if f"{routed}/unix" not in view.services:
            yield Finding(Severity.WARN, "header checks", f"'{header}' goes to {routed}, "
                          "which master.cf does not define", "that mail is deferred with "
                          "'mail transport unavailable'", f"append the {routed} entry of "
                          "contrib/postfix/master.cf.snippet")
            continue
        levels = {t: lvl for lvl, (t, _s) in TRANSPORTS.items()}
        if routed != transport:
            severity = Severity.FAIL if RANK.get(levels.get(routed, ""), 0) < RANK[level] \
                else Severity.WARN
            yield Finding(severity, "header checks", f"'{header}' goes to {routed}, not "
                          f"{transport}", f"{routed} does not hold {level} mail to {level}",
                          f"FILTER {transport}: for {level}, as in contrib/postfix/"
                          "tlsmilter_header_checks")
            continue
        yield _ok("header checks", f"{level} -> {transport}")


def check_transports(view: PostfixView, settings: config.Config) -> Iterator[Finding]:
    policy_socket = settings.policy_server.socket
    for level, (transport, suffix) in TRANSPORTS.items():
        service = view.services.get(f"{transport}/unix")
        if service is None:
            continue  # check_routes said so
        name = f"{transport} transport"
        floor = view.param(service, "smtp_tls_security_level")
        if floor not in FLOORS:
            yield Finding(Severity.FAIL, name, f"smtp_tls_security_level = {floor or 'none'}",
                          "a domain the policy map leaves to the floor gets it, maybe in clear",
                          f"-o smtp_tls_security_level=encrypt under {transport} in master.cf")
        wanted_map = f"{settings.policy_server.map_name}{suffix}"
        maps = view.param(service, "smtp_tls_policy_maps")
        ours = [m for m in maps.replace(",", " ").split() if m.startswith("socketmap:")]
        good = [m for m in ours if m.rpartition(":")[2] == wanted_map and resolve_socket(
            m.removeprefix("socketmap:").rpartition(":")[0], service.chroot,
            view.queue_directory) == policy_socket]
        if not good:
            fix_name = postfix_name(policy_socket, view)
            yield Finding(Severity.FAIL, name, f"smtp_tls_policy_maps = {maps or 'none'}, "
                          f"not tlsmilter's {wanted_map} at {policy_socket}",
                          f"{level} mail is not held to its level at delivery",
                          f"-o smtp_tls_policy_maps=socketmap:{fix_name}:{wanted_map}")
        if level != "encrypted" and view.param(service, "smtp_dns_support_level") != "dnssec":
            yield Finding(Severity.FAIL, name, "smtp_dns_support_level is not dnssec",
                          "verify and dane-only then trust MX and TLSA answers an attacker "
                          "can forge", f"-o smtp_dns_support_level=dnssec under {transport}")
        loglevel = view.param(service, "smtp_tls_loglevel")
        if not loglevel.isdigit() or int(loglevel) < 1:
            yield Finding(Severity.WARN, name, f"smtp_tls_loglevel = {loglevel or '0'}",
                          "no TLS line in the log: tlsmilter proof cannot show the TLS used",
                          f"-o smtp_tls_loglevel=1 under {transport}")
        if view.version >= (3, 10) and view.param(service, "tls_required_enable") != "no":
            yield Finding(Severity.FAIL, name, "tls_required_enable is not no",
                          "a sender's 'TLS-Required: no' skips the policy map (Postfix 3.10)",
                          f"-o tls_required_enable=no under {transport}")
        if floor in FLOORS and good:
            yield _ok(name, f"floor {floor}, map {wanted_map}")


def check_resolver(resolv_conf: Path, signed_name: str) -> Iterator[Finding]:
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError as exc:
        yield Finding(Severity.WARN, "resolver", f"cannot read {resolv_conf}: {exc.strerror}")
        return
    words = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    servers = [w[1] for w in words if w[0] == "nameserver" and len(w) > 1]
    if not any(w[0] == "options" and "trust-ad" in w[1:] for w in words):
        yield Finding(Severity.WARN, "resolver", f"no 'options trust-ad' in {resolv_conf}",
                      "glibc drops the AD bit: DANE and verify deliveries defer",
                      f"add 'options trust-ad' to {resolv_conf}")
    if not servers:
        yield Finding(Severity.WARN, "resolver", f"no nameserver in {resolv_conf}")
        return
    query = dns.message.make_query(signed_name, "A", want_dnssec=True)
    query.flags |= dns.flags.AD
    try:
        reply = dns.query.udp(query, servers[0], timeout=TIMEOUT)
    except (dns.exception.DNSException, OSError) as exc:
        yield Finding(Severity.WARN, "resolver", f"{servers[0]} did not answer for "
                      f"{signed_name} ({exc})", "DNSSEC-dependent delivery defers",
                      "run a validating resolver (Unbound) there")
        return
    if not reply.flags & dns.flags.AD:
        yield Finding(Severity.WARN, "resolver", f"{servers[0]} answers {signed_name} without "
                      "the AD bit", "it does not validate DNSSEC: DANE and verify deliveries "
                      "defer", "run a validating resolver (Unbound) on this host")
        return
    yield _ok("resolver", f"{servers[0]} validates ({signed_name} has AD), trust-ad set")


def check_serve(settings: config.Config) -> Iterator[Finding]:
    milter = settings.milter.socket
    try:
        _connect(milter).close()
        yield _ok("serve", f"milter answers on {milter}")
    except OSError as exc:
        yield Finding(Severity.WARN, "serve", f"nothing answers on {milter} ({exc.strerror})",
                      "Postfix tempfails every message", "systemctl start tlsmilter")
    policy = settings.policy_server.socket
    request = f"{settings.policy_server.map_name}-strict [127.0.0.1]".encode()
    try:
        with _connect(policy) as conn:
            conn.sendall(b"%d:%s," % (len(request), request))  # one socketmap netstring
            reply = conn.recv(256)
    except OSError as exc:
        yield Finding(Severity.WARN, "serve", f"nothing answers on {policy} ({exc.strerror})",
                      "sensitive mail is deferred at delivery", "systemctl start tlsmilter")
        return
    if b"NOTFOUND" not in reply:
        yield Finding(Severity.WARN, "serve", f"{policy} answered {reply[:60]!r}, not a "
                      "socketmap NOTFOUND", "Postfix's lookups there fail")
    else:
        yield _ok("serve", f"policy server answers on {policy}")


def _connect(spec: str) -> socket.socket:
    kind, _, rest = spec.partition(":")
    if kind == "inet":
        port, _, host = rest.partition("@")
        return socket.create_connection((host or "127.0.0.1", int(port)), timeout=TIMEOUT)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(TIMEOUT)
    try:
        conn.connect(rest)
    except OSError:
        conn.close()
        raise
    return conn


def run_doctor(settings: config.Config, args: argparse.Namespace) -> int:
    """The ``doctor`` command: print one line per finding; exit 5 on FAIL, 6 on WARN."""
    view = read_postfix(args.postfix_config, list(TRANSPORTS))
    findings = [*check_milters(view, settings), *check_routes(view, settings),
                *check_transports(view, settings),
                *check_resolver(Path(args.resolv_conf), args.signed_name),
                *check_serve(settings)]
    for finding in findings:
        print(finding.line())
    severities = {f.severity for f in findings}
    fails = sum(f.severity is Severity.FAIL for f in findings)
    warns = sum(f.severity is Severity.WARN for f in findings)
    print(f"{fails} FAIL, {warns} WARN"
          + (": sensitive mail can leave below its level" if fails else ""))
    if Severity.FAIL in severities:
        return EXIT_LEAK
    return EXIT_WARN if Severity.WARN in severities else 0

