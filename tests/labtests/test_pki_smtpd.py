"""The lab's own building blocks behave as declared: test CA, SMTP servers, HTTPS servers."""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import itertools
import random
import smtplib
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from tests.lab.https import POLICY_PATH, HttpsServer, PolicyResponse
from tests.lab.model import Cert, Smtp, Tls, Tlsa, TlsaTarget
from tests.lab.pki import CA_NAME, LabCA, tlsa_data_for
from tests.lab.smtpd import SmtpServer

pytestmark = pytest.mark.lab

HOST = "mx1.pki-smtpd.lab.test"
CLIENT = "client.lab.test"  # passed to smtplib so that it does not ask DNS for our own name
TIMEOUT = 5.0

_NET = random.randint(100, 250)
_hosts = itertools.count(1)

# OpenSSL verify error codes (x509_vfy.h)
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT = 18
X509_V_ERR_HOSTNAME_MISMATCH = 62


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def address() -> str:
    """A fresh loopback address per test, so port 25 is never shared between tests."""
    return f"127.{_NET}.1.{next(_hosts)}"


@pytest.fixture
def smtpd(ca: LabCA, address: str) -> Iterator[Callable[[Smtp], SmtpServer]]:
    """Start SMTP servers on ``address`` port 25; all are stopped after the test."""
    servers: list[SmtpServer] = []

    def start(behaviour: Smtp) -> SmtpServer:
        server = SmtpServer(HOST, address, behaviour, ca)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


def client_context(ca: LabCA, *, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    ctx.check_hostname = check_hostname
    return ctx


def tls10_client_context(ca: LabCA) -> ssl.SSLContext:
    ctx = client_context(ca, check_hostname=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


class RawSmtp:
    """A bare SMTP client for what smtplib hides: exact replies and TLS with a chosen SNI."""

    def __init__(self, address: str, port: int = 25) -> None:
        self.sock = socket.create_connection((address, port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = self.file.readline().decode()
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line[4:].rstrip("\r\n"))
            if line[3:4] != "-":
                return int(line[:3]), lines

    def cmd(self, line: str) -> tuple[int, list[str]]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self, ctx: ssl.SSLContext, server_hostname: str) -> ssl.SSLSocket:
        assert self.cmd(f"EHLO {CLIENT}")[0] == 250
        assert self.cmd("STARTTLS")[0] == 220
        self.file.close()
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)
        self.file = self.sock.makefile("rb")
        return self.sock

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def smtp_client(address: str, port: int = 25) -> smtplib.SMTP:
    return smtplib.SMTP(address, port, local_hostname=CLIENT, timeout=TIMEOUT)


def test_none_delivers_in_plaintext(smtpd: Callable[[Smtp], SmtpServer]) -> None:
    server = smtpd(Smtp(tls=Tls.NONE))
    with smtp_client(server.address) as smtp:
        code, _ = smtp.ehlo()
        assert code == 250
        assert not smtp.has_extn("starttls")
        smtp.sendmail("a@example.test", ["b@x.test", "c@y.test"], b"Subject: hi\r\n\r\n.dot\r\n")
    (message,) = server.wait_for_messages(1, TIMEOUT)
    assert message.mail_from == "a@example.test"
    assert message.rcpt_tos == ("b@x.test", "c@y.test")
    assert (
        message.data == b"Subject: hi\r\n\r\n.dot\r\n"
    )  # smtplib stuffed it, the server unstuffed
    assert message.tls_version is None
    assert message.cipher is None
    assert message.helo == CLIENT
    assert ipaddress.ip_address(message.peer[0]).is_loopback
    assert server.connections == 1


@pytest.mark.parametrize(("tls", "version"), [(Tls.TLS13, "TLSv1.3"), (Tls.TLS12, "TLSv1.2")])
def test_tls_version_cap(
    smtpd: Callable[[Smtp], SmtpServer], ca: LabCA, tls: Tls, version: str
) -> None:
    server = smtpd(Smtp(tls=tls))
    ctx = client_context(ca, check_hostname=False)  # smtplib sends the IP as server name
    assert ctx.maximum_version in (ssl.TLSVersion.MAXIMUM_SUPPORTED, ssl.TLSVersion.TLSv1_3)
    with smtp_client(server.address) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        smtp.starttls(context=ctx)
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.version() == version
        smtp.ehlo()
        assert not smtp.has_extn("starttls")  # no second STARTTLS inside TLS
        smtp.sendmail("from@example.test", ["to@x.test"], b"Subject: tls\r\n\r\nbody\r\n")
    (message,) = server.wait_for_messages(1, TIMEOUT)
    assert message.tls_version == version
    assert message.cipher
    assert message.rcpt_tos == ("to@x.test",)
    assert message.data == b"Subject: tls\r\n\r\nbody\r\n"


def test_tls10_only(smtpd: Callable[[Smtp], SmtpServer], ca: LabCA) -> None:
    server = smtpd(Smtp(tls=Tls.TLS10))
    with smtp_client(server.address) as smtp:
        smtp.starttls(context=tls10_client_context(ca))
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.version() == "TLSv1"
        smtp.sendmail("from@example.test", ["to@x.test"], b"\r\nold\r\n")
    assert server.wait_for_messages(1, TIMEOUT)[0].tls_version == "TLSv1"

    with smtp_client(server.address) as smtp, pytest.raises(ssl.SSLError):
        smtp.starttls(context=client_context(ca, check_hostname=False))
    assert server.sessions[-1].tls_error


def test_certificate_kinds(ca: LabCA, address: str) -> None:
    """Each kind fails verification for its own reason; one server, switched between kinds."""
    server = SmtpServer(HOST, address, Smtp(cert=Cert.CA), ca)
    with server:
        client = RawSmtp(address)
        tls = client.starttls(client_context(ca), HOST)
        assert tls.getpeercert()["subjectAltName"] == (("DNS", HOST),)  # type: ignore[index]
        client.close()

        expected = {
            Cert.SELF_SIGNED: X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
            Cert.EXPIRED: X509_V_ERR_CERT_HAS_EXPIRED,
            Cert.WRONG_NAME: X509_V_ERR_HOSTNAME_MISMATCH,
        }
        for kind, code in expected.items():
            server.behaviour = Smtp(cert=kind)
            client = RawSmtp(address)
            with pytest.raises(ssl.SSLCertVerificationError) as failure:
                client.starttls(client_context(ca), HOST)
            client.close()
            assert failure.value.verify_code == code, kind


def test_hang_accepts_and_stays_silent(smtpd: Callable[[Smtp], SmtpServer]) -> None:
    server = smtpd(Smtp(tls=Tls.HANG))
    with socket.create_connection((server.address, 25), timeout=TIMEOUT) as sock:
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.sendall(b"EHLO " + CLIENT.encode() + b"\r\n")  # still nothing, even when spoken to
        with pytest.raises(TimeoutError):
            sock.recv(1)
    (session,) = server.wait_for_connections(1, TIMEOUT)
    assert session.tls is Tls.HANG
    assert server.connections == 1


def test_break_fails_the_handshake(smtpd: Callable[[Smtp], SmtpServer], ca: LabCA) -> None:
    server = smtpd(Smtp(tls=Tls.BREAK))
    with smtp_client(server.address) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        with pytest.raises(ssl.SSLError, match="WRONG_VERSION_NUMBER"):
            smtp.starttls(context=client_context(ca, check_hostname=False))
        smtp.close()
    assert server.messages == []


def test_behaviour_switch_affects_next_connection(
    smtpd: Callable[[Smtp], SmtpServer], ca: LabCA
) -> None:
    server = smtpd(Smtp(tls=Tls.TLS13))
    with smtp_client(server.address) as old:
        old.ehlo()
        assert old.has_extn("starttls")

        server.behaviour = Smtp(tls=Tls.NONE)
        assert server.behaviour == Smtp(tls=Tls.NONE)
        with smtp_client(server.address) as new:
            new.ehlo()
            assert not new.has_extn("starttls")
            new.sendmail("a@example.test", ["b@x.test"], b"\r\nplain\r\n")

        # the session that began under TLS13 keeps it
        old.starttls(context=client_context(ca, check_hostname=False))
        old.sendmail("a@example.test", ["b@x.test"], b"\r\ntls\r\n")
    plain, tls = server.wait_for_messages(2, TIMEOUT)
    assert plain.tls_version is None
    assert tls.tls_version == "TLSv1.3"
    assert [s.tls for s in server.sessions] == [Tls.TLS13, Tls.NONE]


def test_smtp_state_machine(smtpd: Callable[[Smtp], SmtpServer], ca: LabCA) -> None:
    server = smtpd(Smtp(tls=Tls.TLS12))
    client = RawSmtp(server.address)
    try:
        assert client.greeting == (220, [f"{HOST} ESMTP lab"])
        assert client.cmd("MAIL FROM:<a@example.test>")[0] == 503  # no EHLO yet
        assert client.cmd("VRFY root")[0] == 502
        assert client.cmd("NOOP")[0] == 250
        code, lines = client.cmd(f"EHLO {CLIENT}")
        assert code == 250
        assert lines[0] == HOST
        assert "STARTTLS" in lines
        assert "PIPELINING" not in lines  # Postfix would pipeline, and we answer in lockstep
        assert client.cmd("RCPT TO:<b@x.test>")[0] == 503
        assert client.cmd("DATA")[0] == 503
        assert client.cmd("MAIL FROM:<>")[0] == 250  # null sender
        assert client.cmd("MAIL FROM:<a@example.test>")[0] == 503  # nested
        assert client.cmd("RSET")[0] == 250
        assert client.cmd("MAIL FROM:<a@example.test>")[0] == 250
        client.starttls(client_context(ca), HOST)
        assert client.cmd("MAIL FROM:<a@example.test>")[0] == 503  # TLS forgot the EHLO
        code, lines = client.cmd(f"EHLO {CLIENT}")
        assert (code, "STARTTLS" in lines) == (250, False)
        assert client.cmd("STARTTLS")[0] == 503
        assert client.cmd("MAIL FROM:<a@example.test> SIZE=10")[0] == 250
        assert client.cmd("RCPT TO:<b@x.test>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        # a client vanishing mid-DATA must end the session quietly (no thread traceback)
        client.sock.sendall(b"Subject: cut\r\n\r\nhalf a mess")
    finally:
        client.close()
    deadline = time.monotonic() + TIMEOUT
    while not server.sessions[0].closed and time.monotonic() < deadline:
        time.sleep(0.01)
    session = server.sessions[0]
    assert session.closed
    assert session.tls_version == "TLSv1.2"
    assert session.commands[-2:] == ["RCPT", "DATA"]
    assert server.messages == []


def test_ipv6_and_ephemeral_port(ca: LabCA) -> None:
    with SmtpServer(HOST, "::1", Smtp(tls=Tls.TLS13), ca, port=0) as server:
        assert server.port != 0
        with smtp_client("::1", server.port) as smtp:
            smtp.starttls(context=client_context(ca, check_hostname=False))
            smtp.sendmail("a@example.test", ["b@x.test"], b"\r\nv6\r\n")
        (message,) = server.wait_for_messages(1, TIMEOUT)
        assert message.peer[0] == "::1"
        assert message.tls_version == "TLSv1.3"


def test_stop_cuts_hanging_connections_and_frees_the_port(ca: LabCA, address: str) -> None:
    server = SmtpServer(HOST, address, Smtp(tls=Tls.HANG), ca)
    server.start()
    hanging = socket.create_connection((address, 25), timeout=TIMEOUT)
    talking = socket.create_connection((address, 25), timeout=TIMEOUT)
    talking.sendall(b"EHLO " + CLIENT.encode() + b"\r\n")
    server.wait_for_connections(2, TIMEOUT)
    with pytest.raises(OSError, match="in use"):  # SO_REUSEADDR must not hide a clash
        SmtpServer(HOST, address, Smtp(), ca).start()
    try:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
        assert hanging.recv(1) == b""  # the server closed its end
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, 25), timeout=TIMEOUT).close()
    finally:
        hanging.close()
        talking.close()
    with SmtpServer(HOST, address, Smtp(tls=Tls.NONE), ca) as again:
        with smtp_client(address) as smtp:
            assert smtp.noop()[0] == 250
        assert again.connections == 1
    assert server.sessions[0].closed


def test_stop_cuts_a_stalled_handshake(ca: LabCA, address: str) -> None:
    server = SmtpServer(HOST, address, Smtp(tls=Tls.TLS13), ca)
    server.start()
    client = RawSmtp(address)
    try:
        assert client.cmd(f"EHLO {CLIENT}")[0] == 250
        assert client.cmd("STARTTLS")[0] == 220  # and no ClientHello ever follows
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
    finally:
        client.close()


def test_tlsa_data_matches_the_presented_certificate(
    smtpd: Callable[[Smtp], SmtpServer], ca: LabCA
) -> None:
    server = smtpd(Smtp(tls=Tls.TLS13, cert=Cert.CA))
    client = RawSmtp(server.address)
    der = client.starttls(client_context(ca), HOST).getpeercert(binary_form=True)
    client.close()
    assert der is not None
    presented = x509.load_der_x509_certificate(der)
    spki = presented.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    issued = ca.issue(HOST, Cert.CA)
    assert issued.tlsa_data(3, 1, 1) == hashlib.sha256(spki).hexdigest()
    assert issued.tlsa_data(3, 0, 0) == der.hex()
    assert issued.tlsa_data(3, 1, 2) == hashlib.sha512(spki).hexdigest()

    ca_der = ca.ca_cert.public_bytes(serialization.Encoding.DER)
    assert issued.tlsa_data(2, 0, 1) == hashlib.sha256(ca_der).hexdigest()
    # DANE-TA with a digest only matches a CA the server sends: the chain file carries it
    chain = x509.load_pem_x509_certificates(issued.cert_file.read_bytes())
    assert chain == [presented, ca.ca_cert]
    self_signed = ca.issue(HOST, Cert.SELF_SIGNED)
    assert x509.load_pem_x509_certificates(self_signed.cert_file.read_bytes()) == [self_signed.cert]
    assert self_signed.tlsa_data(2, 1, 1) == self_signed.tlsa_data(3, 1, 1)

    assert ca.tlsa_for(issued, Tlsa()) == issued.tlsa_data(3, 1, 1)
    assert ca.tlsa_for(issued, Tlsa(2, 0, 1, TlsaTarget.TA)) == issued.tlsa_data(2, 0, 1)
    wrong = ca.tlsa_for(issued, Tlsa(3, 1, 1, TlsaTarget.WRONG))
    assert wrong == tlsa_data_for(ca.unrelated.cert, 1, 1)
    assert wrong not in (issued.tlsa_data(3, 1, 1), issued.tlsa_data(2, 1, 1))
    with pytest.raises(ValueError, match="selector"):
        tlsa_data_for(presented, 2, 1)


def test_ca_certificate_and_cache(ca: LabCA) -> None:
    assert ca.ca_cert.subject.rfc4514_string() == f"CN={CA_NAME}"
    assert x509.load_pem_x509_certificates(ca.ca_file.read_bytes()) == [ca.ca_cert]
    constraints = ca.ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert ca.issue(HOST, Cert.CA) is ca.issue(HOST, Cert.CA)
    assert ca.issue(HOST, Cert.CA).cert != ca.issue(HOST, Cert.EXPIRED).cert
    assert Path(ca.issue(HOST, Cert.CA).key_file).stat().st_mode & 0o077 == 0


def test_cryptography_verifier(ca: LabCA) -> None:
    verifier = PolicyBuilder().store(Store([ca.ca_cert])).build_server_verifier(x509.DNSName(HOST))
    chain = verifier.verify(ca.issue(HOST, Cert.CA).cert, [])
    assert chain[-1] == ca.ca_cert
    for kind in (Cert.WRONG_NAME, Cert.EXPIRED, Cert.SELF_SIGNED):
        with pytest.raises(VerificationError):
            verifier.verify(ca.issue(HOST, kind).cert, [])


def _https_get(
    address: str, ctx: ssl.SSLContext, host: str, path: str
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """GET ``path`` from the server at ``address`` port 443 as ``host`` (SNI and Host)."""
    raw = socket.create_connection((address, 443), timeout=TIMEOUT)
    with ctx.wrap_socket(raw, server_hostname=host) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        with response:
            return response.status, response.headers, response.read()


def test_https_policy_server(ca: LabCA, address: str) -> None:
    host = "mta-sts.pki-smtpd.lab.test"
    policy = "version: STSv1\r\nmode: enforce\r\nmx: *.lab.test\r\nmax_age: 86400\r\n"
    with HttpsServer(host, address, ca, PolicyResponse(body=policy)) as server:
        ctx = client_context(ca)

        status, headers, body = _https_get(address, ctx, host, POLICY_PATH)
        assert (status, headers["Content-Type"], body) == (200, "text/plain", policy.encode())

        assert _https_get(address, ctx, host, "/other")[0] == 404

        server.response = PolicyResponse(redirect="https://elsewhere.lab.test/policy")
        status, headers, _ = _https_get(address, ctx, host, POLICY_PATH)
        assert (status, headers["Location"]) == (301, "https://elsewhere.lab.test/policy")

        server.response = PolicyResponse(body=policy, content_type="text/html", pad_to=100_000)
        status, headers, body = _https_get(address, ctx, host, POLICY_PATH)
        assert (status, headers["Content-Type"]) == (200, "text/html")
        assert len(body) >= 100_000
        assert body.startswith(policy.encode())

        assert server.request_count == 4
        assert {r.host for r in server.requests} == {host}
        paths = [r.path for r in server.requests]
        assert paths == [POLICY_PATH, "/other", POLICY_PATH, POLICY_PATH]

        with pytest.raises(ssl.SSLCertVerificationError):
            _https_get(address, ctx, "mta-sts.other.lab.test", POLICY_PATH)

        # a client that never handshakes must not hold up stop()
        stalled = socket.create_connection((address, 443), timeout=TIMEOUT)
        time.sleep(0.05)
        started = time.monotonic()
    try:
        assert time.monotonic() - started < 1.0
        assert stalled.recv(1) == b""
    finally:
        stalled.close()
