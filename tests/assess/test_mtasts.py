"""Tests for tlsmilter.assess.mtasts: pure parsers by table, ``fetch`` against loopback servers.

The fetch tests bring their own tiny DNS responder and HTTPS server (not the lab) so they stay
fast and self-contained; every policy host lives under ``example.test``, which no system
resolver can answer, and ``socket.getaddrinfo`` is guarded so only IP literals get through.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsmilter.assess.dns import Resolver
from tlsmilter.assess.mtasts import (
    POLICY_PATH,
    CachedPolicy,
    MemoryPolicyCache,
    Mode,
    Outcome,
    Policy,
    PolicyError,
    StsResult,
    fetch,
    fetch_cached,
    mx_matches,
    parse_policy,
    parse_record,
)

# --- parse_record -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("txt", "expected"),
    [
        ([], None),
        (["v=spf1 -all"], None),
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=STSv1 ; id=abc"], "abc"),  # whitespace before ";" (erratum 6285)
        (["v=STSv1; id=abc; ext_1=some-value"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=abc", "hello"], "abc"),
        (["V=STSv1; id=abc"], None),  # the version tag is case-sensitive
        (["v=STSv10; id=abc"], None),  # another version, not STSv1
        (["  v=STSv1; id=abc"], None),  # does not *begin* with v=STSv1
    ],
)
def test_parse_record(txt: list[str], expected: str | None) -> None:
    assert parse_record(txt) == expected


@pytest.mark.parametrize(
    ("txt", "message"),
    [
        (["v=STSv1"], "no id"),
        (["v=STSv1;"], "no id"),
        (["v=STSv1; id="], "1-32 letters"),
        (["v=STSv1; id=" + "a" * 33], "1-32 letters"),
        (["v=STSv1; id=ab-c"], "1-32 letters"),
        (["v=STSv1; id=a; id=b"], "more than one id"),
        (["v=STSv1; id=a;; "], "malformed field"),
        (["v=STSv1; junk"], "malformed field"),
        (["v=STSv1; id=a; ext=a b"], "malformed value"),
        (["v=STSv1; id=a", "v=STSv1; id=b"], "2 STSv1 TXT records"),
    ],
)
def test_parse_record_rejects(txt: list[str], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_record(txt)


# --- parse_policy -------------------------------------------------------------------------

ENFORCE = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 86400\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ENFORCE, Policy(Mode.ENFORCE, 86400, ("mail.example.com", "*.example.net"))),
        (ENFORCE.replace("\n", "\r\n"),
         Policy(Mode.ENFORCE, 86400, ("mail.example.com", "*.example.net"))),
        (ENFORCE.rstrip("\n"), Policy(Mode.ENFORCE, 86400, ("mail.example.com", "*.example.net"))),
        ("version:STSv1  \nmode:\ttesting\nmx:   MAIL.Example.com.  \nmax_age: 0\n",
         Policy(Mode.TESTING, 0, ("mail.example.com",))),
        ("version: STSv1\nmode: none\nmax_age: 31557600\n", Policy(Mode.NONE, 31557600, ())),
        ("version: STSv1\nfoo: bar\nmode: testing\nx-ext.1: any value at all\nmx: a.example\n"
         "max_age: 0086400\n", Policy(Mode.TESTING, 86400, ("a.example",))),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmx: A.example.\nmax_age: 60\n",
         Policy(Mode.ENFORCE, 60, ("a.example",))),
    ],
    ids=["lf", "crlf", "no-final-newline", "whitespace", "none-without-mx", "unknown-keys",
         "duplicate-mx"],
)
def test_parse_policy(text: str, expected: Policy) -> None:
    assert parse_policy(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mode: enforce\nmx: a.example\nmax_age: 60\n", "required field.*version"),
        ("version: STSv1\nmx: a.example\n", "required field.*mode, max_age"),
        ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 60\n", "not STSv1"),
        ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 60\n", "mode 'strict'"),
        ("version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 60\n", "mode 'Enforce'"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1d\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age:\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 60\n", "mode enforce lists no mx"),
        ("version: STSv1\nmode: testing\nmax_age: 60\n", "mode testing lists no mx"),
        ("version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 60\n",
         "line 3: mode given more than once"),
        ("version: STSv1\nmode enforce\nmx: a.example\nmax_age: 60\n", "line 2: expected"),
        ("<html>\n<body>hello</body>\n", "line 1: expected"),
        ("version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 60\n", "invalid mx"),
        ("version: STSv1\nmode: enforce\nmx: *\nmax_age: 60\n", "invalid mx"),
        ("version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 60\n", "invalid mx"),
        ("version: STSv1\nmode: enforce\nmx:\nmax_age: 60\n", "invalid mx"),
        ("", "required field"),
    ],
)
def test_parse_policy_rejects(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


# --- mx_matches ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.COM", True),
        ("Mail.Example.com", "mail.example.com", True),
        ("mail.example.com", "mail.example.com.", True),
        ("mail.example.com.", "mail.example.com", True),
        ("mail.example.com", "mail2.example.com", False),
        ("mail.example.com", "example.com", False),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "MX1.EXAMPLE.COM.", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "mx1.example.org", False),
        ("*", "example.com", False),
        ("*", "*", False),
        ("*.", "a.", False),
        ("a.*.example.com", "a.b.example.com", False),
        ("*.example.com", "*.example.com", False),
        ("", "", False),
    ],
)
def test_mx_matches(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def test_policy_covers() -> None:
    policy = parse_policy(ENFORCE)
    assert policy.covers("mail.example.com.")
    assert policy.covers("mx.example.net")
    assert not policy.covers("example.net")
    assert not Policy(Mode.NONE, 0, ()).covers("mail.example.com")


# --- loopback servers for fetch -----------------------------------------------------------

DOMAIN = "example.test"
GOOD_POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\nmx: *.example.test\r\n" \
    "max_age: 604800\r\n"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class StubDNS:
    """A UDP responder for a fixed zone: NXDOMAIN for unknown names, NODATA for other types."""

    def __init__(self, zone: dict[tuple[str, str], list[str]], servfail: set[str]) -> None:
        self.zone = zone
        self.servfail = servfail
        self.names = {name for name, _ in zone}
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)  # so the loop notices the stop flag promptly
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stub-dns")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text().lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            if name in self.servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif name not in self.names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif (name, rdtype) in self.zone:
                response.answer.append(
                    dns.rrset.from_text(name, 60, "IN", rdtype, *self.zone[(name, rdtype)])
                )
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@dataclass(frozen=True)
class Reply:
    status: int = 200
    content_type: str | None = "text/plain"
    body: bytes = GOOD_POLICY.encode()
    chunked: bool = False
    location: str | None = None


class PolicyHandler(BaseHTTPRequestHandler):
    server: PolicyServer

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        self.server.requests.append((host, self.path))
        reply = self.server.replies.get(host) if self.path == POLICY_PATH else None
        reply = reply or Reply(404, body=b"not found")
        if reply.chunked:
            self.protocol_version = "HTTP/1.1"
        self.send_response(reply.status)
        if reply.content_type is not None:
            self.send_header("Content-Type", reply.content_type)
        if reply.location is not None:
            self.send_header("Location", reply.location)
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(reply.body), 7):
                part = reply.body[start:start + 7]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class PolicyServer(ThreadingHTTPServer):
    """HTTPS on 127.0.0.1 answering by Host header; TLS is set up per connection thread."""

    daemon_threads = False
    block_on_close = True  # server_close() joins every connection thread

    def __init__(self, certfile: Path, keyfile: Path, replies: dict[str, Reply]) -> None:
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(certfile, keyfile)
        self.replies = replies
        self.requests: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), PolicyHandler)
        self._thread = threading.Thread(target=self.serve_forever, name="policy-https")
        self._thread.start()

    def server_bind(self) -> None:
        # HTTPServer.server_bind would reverse-resolve the address through the system.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.tls.wrap_socket(request, server_side=True)
        except OSError:
            return  # the client refused our certificate: expected in CERT_INVALID tests
        try:
            PolicyHandler(tls, client_address, self)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client aborting mid-request is part of what these tests provoke

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()


@dataclass(frozen=True)
class Lab:
    dns: StubDNS
    https: PolicyServer
    ca_file: str
    other_ca_file: str

    def resolver(self) -> Resolver:
        return Resolver("127.0.0.1", self.dns.port, timeout=2.0)


def _fqdn(name: str) -> str:
    return f"{name}.{DOMAIN}." if name else f"{DOMAIN}."


# domain label -> (TXT records at _mta-sts, reply of the policy server or None for no address)
SCENARIOS: dict[str, tuple[list[str], Reply | None]] = {
    "": (['"v=STSv1; id=20240101T000000Z;"'], Reply()),
    "split": (['"v=STSv1; " "id=split1"', '"v=spf1 -all"'], Reply()),
    "chunked": (['"v=STSv1; id=c1"'], Reply(chunked=True)),
    "redirect": (['"v=STSv1; id=r1"'],
                 Reply(301, location="https://mta-sts.example.test/.well-known/mta-sts.txt")),
    "missing": (['"v=STSv1; id=m1"'], Reply(404, body=b"not found")),
    "html": (['"v=STSv1; id=h1"'], Reply(content_type="text/html; charset=utf-8")),
    "notype": (['"v=STSv1; id=n1"'], Reply(content_type=None)),
    "charset": (['"v=STSv1; id=cs1"'], Reply(content_type="Text/Plain; charset=utf-8")),
    "big": (['"v=STSv1; id=b1"'], Reply(body=GOOD_POLICY.encode() + b"x: " + b"y" * 70_000)),
    "garbage": (['"v=STSv1; id=g1"'], Reply(body=b"version: STSv1\nmode: strict\n")),
    "binary": (['"v=STSv1; id=bin1"'], Reply(body=b"\xff\xfe\x00")),
    "wrongname": (['"v=STSv1; id=w1"'], Reply()),
    "spf": (['"v=spf1 -all"'], None),
    "two": (['"v=STSv1; id=a"', '"v=STSv1; id=b"'], None),
    "badid": (['"v=STSv1; id=not-valid!"'], None),
    "noaddr": (['"v=STSv1; id=na1"'], None),
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("mtasts")
    ca, ca_key = _make_ca("mtasts test CA")
    other_ca, _ = _make_ca("mtasts untrusted CA")
    hosts = [f"mta-sts.{_fqdn(label)}".rstrip(".") for label in SCENARIOS if label != "wrongname"]
    leaf, leaf_key = _issue(ca, ca_key, hosts)
    (workdir / "ca.pem").write_bytes(_pem(ca))
    (workdir / "other-ca.pem").write_bytes(_pem(other_ca))
    (workdir / "leaf.pem").write_bytes(_pem(leaf))
    (workdir / "leaf.key").write_bytes(_key_pem(leaf_key))

    zone: dict[tuple[str, str], list[str]] = {}
    replies: dict[str, Reply] = {}
    for label, (txt, reply) in SCENARIOS.items():
        zone[(f"_mta-sts.{_fqdn(label)}", "TXT")] = txt
        host = f"mta-sts.{_fqdn(label)}"
        if reply is not None:
            zone[(host, "A")] = ["127.0.0.1"]
            replies[host.rstrip(".")] = reply
        else:
            zone[(host, "TXT")] = ['"the name exists, but has no address"']
    stub = StubDNS(zone, servfail={f"_mta-sts.{_fqdn('servfail')}"})
    try:
        server = PolicyServer(workdir / "leaf.pem", workdir / "leaf.key", replies)
    except BaseException:
        stub.close()
        raise
    try:
        yield Lab(stub, server, str(workdir / "ca.pem"), str(workdir / "other-ca.pem"))
    finally:
        server.close()
        stub.close()


@pytest.fixture
def no_system_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail any getaddrinfo call for a host name; IP literals pass (create_connection uses it)."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            asked.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, "system resolver used in test") from None
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    return asked


def _fetch(lab: Lab, label: str, *, ca_file: str | None = None, timeout: float = 5.0,
           port: int | None = None) -> StsResult:
    domain = _fqdn(label).rstrip(".")
    return asyncio.run(fetch(domain, lab.resolver(), ca_file=ca_file or lab.ca_file,
                             timeout=timeout, port=port or lab.https.server_address[1]))


# --- fetch --------------------------------------------------------------------------------


def test_fetch_ok_uses_only_our_resolver(lab: Lab, no_system_dns: list[str]) -> None:
    result = _fetch(lab, "")
    assert result == StsResult(
        Outcome.OK, "20240101T000000Z",
        Policy(Mode.ENFORCE, 604800, ("mail.example.test", "*.example.test")),
        "mode enforce, max_age 604800",
    )
    assert no_system_dns == []
    assert ("mta-sts.example.test.", "A") in lab.dns.queries
    assert ("mta-sts.example.test", POLICY_PATH) in lab.https.requests


@pytest.mark.parametrize(
    ("label", "outcome", "detail"),
    [
        ("split", Outcome.OK, "mode enforce"),
        ("chunked", Outcome.OK, "mode enforce"),
        ("charset", Outcome.OK, "mode enforce"),
        ("redirect", Outcome.REDIRECT, "HTTP 301 redirect"),
        ("missing", Outcome.HTTP_STATUS, "HTTP 404"),
        ("html", Outcome.CONTENT_TYPE, "text/html"),
        ("notype", Outcome.CONTENT_TYPE, "None"),
        ("big", Outcome.TOO_LARGE, "larger than 65536 bytes"),
        ("garbage", Outcome.BAD_POLICY, "lacks required field(s): max_age"),
        ("binary", Outcome.BAD_POLICY, "not UTF-8"),
        ("wrongname", Outcome.CERT_INVALID, "Hostname mismatch"),
        ("nosuchdomain", Outcome.NO_RECORD, "nxdomain"),
        ("spf", Outcome.NO_RECORD, "no v=STSv1"),
        ("two", Outcome.BAD_RECORD, "2 STSv1 TXT records"),
        ("badid", Outcome.BAD_RECORD, "1-32 letters"),
        ("servfail", Outcome.DNS_TEMPFAIL, "servfail"),
        ("noaddr", Outcome.CONNECT_FAILED, "no A or AAAA"),
    ],
)
def test_fetch_outcomes(
    lab: Lab, no_system_dns: list[str], label: str, outcome: Outcome, detail: str
) -> None:
    result = _fetch(lab, label)
    assert (result.outcome, no_system_dns) == (outcome, [])
    assert detail in result.detail
    assert (result.policy is not None) == (outcome is Outcome.OK)


def test_fetch_untrusted_ca(lab: Lab, no_system_dns: list[str]) -> None:
    result = _fetch(lab, "", ca_file=lab.other_ca_file)
    assert result.outcome is Outcome.CERT_INVALID
    assert result.record_id == "20240101T000000Z"
    assert "unable to get local issuer certificate" in result.detail


def test_fetch_connection_refused(lab: Lab, no_system_dns: list[str]) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _fetch(lab, "", port=port)
    assert result.outcome is Outcome.CONNECT_FAILED
    assert "refused" in result.detail.lower()


def test_fetch_timeout_on_silent_server(lab: Lab, no_system_dns: list[str]) -> None:
    # The kernel completes the TCP handshake from the backlog; nobody ever answers TLS.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        started = time.monotonic()
        result = _fetch(lab, "", timeout=1.0, port=silent.getsockname()[1])
        elapsed = time.monotonic() - started
    assert result.outcome is Outcome.TIMEOUT
    assert "within 1s" in result.detail
    assert elapsed < 2.0


# --- the policy cache (RFC 8461 3.3, 5.1) ---------------------------------------------------------

NOW = 1_800_000_000.0
ENFORCED = Policy(Mode.ENFORCE, 604800, ("mail.example.test", "*.example.test"))
GOOD_ID = "20240101T000000Z"  # the id the lab publishes for the bare domain


def _refused_port() -> int:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _cached_fetch(lab: Lab, label: str, cache: MemoryPolicyCache, *, now: float = NOW,
                  port: int | None = None) -> StsResult:
    domain = _fqdn(label).rstrip(".")
    return asyncio.run(fetch_cached(domain, lab.resolver(), cache, ca_file=lab.ca_file,
                                    timeout=5.0, port=port or lab.https.server_address[1],
                                    clock=lambda: now))


def _primed(label: str, record_id: str = GOOD_ID, policy: Policy = ENFORCED,
            fetched_at: float = NOW - 3600) -> MemoryPolicyCache:
    cache = MemoryPolicyCache()
    asyncio.run(cache.put(_fqdn(label).rstrip("."), CachedPolicy(record_id, policy, fetched_at)))
    return cache


def test_a_fetched_policy_is_cached_and_not_fetched_again_while_its_id_holds(lab: Lab) -> None:
    cache = MemoryPolicyCache()
    first = _cached_fetch(lab, "", cache)
    assert first.outcome is Outcome.OK and first.policy == ENFORCED
    fetches = len(lab.https.requests)
    again = _cached_fetch(lab, "", cache, now=NOW + 3600)
    assert (again.outcome, again.policy, again.record_id) == (Outcome.CACHED, ENFORCED, GOOD_ID)
    assert again.usable == ENFORCED
    assert "id unchanged" in again.detail and "fetched 3600 s ago" in again.detail
    assert len(lab.https.requests) == fetches  # the TXT lookup only


def test_a_new_id_or_a_policy_near_expiry_is_fetched_again(lab: Lab) -> None:
    changed = _primed("", record_id="old1", policy=Policy(Mode.TESTING, 86400, ("x.test",)))
    fetches = len(lab.https.requests)
    result = _cached_fetch(lab, "", changed)
    assert (result.outcome, result.policy) == (Outcome.OK, ENFORCED)
    assert asyncio.run(changed.get(DOMAIN)) == CachedPolicy(GOOD_ID, ENFORCED, NOW)
    old = _primed("", fetched_at=NOW - 604800 * 0.8)  # 20 % of max_age left
    assert _cached_fetch(lab, "", old).outcome is Outcome.OK
    assert len(lab.https.requests) == fetches + 2


@pytest.mark.parametrize(("label", "port", "why"), [
    ("", "refused", "connect_failed"),  # the policy host blocked
    ("missing", None, "http_status"),  # the policy file gone (an attacker answering 404)
    ("spf", None, "no_record"),  # the TXT record vanished
    ("servfail", None, "dns_tempfail"),  # the TXT lookup fails
    ("badid", None, "bad_record"),
    ("garbage", None, "bad_policy"),
])
def test_a_failure_never_replaces_a_cached_unexpired_policy(
        lab: Lab, label: str, port: str | None, why: str) -> None:
    record_id = {"missing": "m1", "garbage": "g1"}.get(label, GOOD_ID)  # the same id: refetch
    cache = _primed(label, record_id=record_id, fetched_at=NOW - 604800 * 0.9)  # due again
    result = _cached_fetch(lab, label, cache, port=_refused_port() if port else None)
    assert (result.outcome, result.policy) == (Outcome.CACHED, ENFORCED)
    assert why in result.detail
    assert asyncio.run(cache.get(_fqdn(label).rstrip("."))) == CachedPolicy(
        record_id, ENFORCED, NOW - 604800 * 0.9)  # still the one fetched before


def test_an_expired_policy_no_longer_applies(lab: Lab) -> None:
    cache = _primed("", fetched_at=NOW - 604800 - 1)
    result = _cached_fetch(lab, "", cache, port=_refused_port())
    assert result.outcome is Outcome.CONNECT_FAILED and result.usable is None


def test_a_fetched_mode_none_policy_replaces_an_enforced_one(lab: Lab) -> None:
    # The domain itself retires its policy: only a successful fetch may do that.
    cache = _primed("", record_id="old1")
    lab.https.replies["mta-sts.example.test"] = Reply(
        body=b"version: STSv1\r\nmode: none\r\nmax_age: 86400\r\n")
    try:
        result = _cached_fetch(lab, "", cache)
    finally:
        lab.https.replies["mta-sts.example.test"] = Reply()
    assert result.outcome is Outcome.OK and result.policy is not None
    assert result.policy.mode is Mode.NONE
    stored = asyncio.run(cache.get(DOMAIN))
    assert stored is not None and stored.policy.mode is Mode.NONE


def test_cached_policies_survive_json_and_reject_garbage() -> None:
    cached = CachedPolicy("id1", ENFORCED, NOW)
    assert CachedPolicy.from_json(cached.to_json()) == cached
    for bad in (None, {}, {"id": "x", "mode": "strict", "max_age": 1, "mx": [],
                           "fetched_at": 0}, {"id": "x", "mode": "enforce", "max_age": "a",
                                              "mx": [], "fetched_at": 0}, "text"):
        assert CachedPolicy.from_json(bad) is None, bad


def test_the_memory_cache_is_bounded() -> None:
    cache = MemoryPolicyCache(max_entries=2)
    for name in ("a.test", "b.test", "c.test"):
        asyncio.run(cache.put(name, CachedPolicy("i", ENFORCED, NOW)))
    assert len(cache) == 2 and asyncio.run(cache.get("a.test")) is None
