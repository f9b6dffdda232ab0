"""MTA-STS (RFC 8461): find a domain's policy record, fetch its policy over HTTPS, parse it.

The parsers are pure and raise ``PolicyError``; ``fetch`` does the I/O and never raises for a
remote problem: every way a domain can fail to publish a usable policy is an ``Outcome``.
``fetch_cached`` adds the policy cache RFC 8461 requires of senders (sections 3.3 and 5.1): a
policy is fetched again only when the TXT record's ``id`` changes or the cached one nears
expiry, and a failed fetch or a vanished TXT record never replaces a cached, unexpired policy,
which is exactly what an attacker blocking the policy fetch would need.

Every name is resolved through the project's ``Resolver`` (never the system resolver), so the
policy host's address comes from the same validating resolver as every other fact the prober
reports, and the lab can point it at its own name servers.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import http.client
import re
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import dns.rdtypes.txtbase

from tlsmilter.assess.dns import Answer, Resolver, Status
from tlsmilter.errors import TlsmilterError

__all__ = [
    "MAX_AGE_LIMIT",
    "POLICY_PATH",
    "CachedPolicy",
    "MemoryPolicyCache",
    "Mode",
    "Outcome",
    "Policy",
    "PolicyCache",
    "PolicyError",
    "StsResult",
    "fetch",
    "fetch_cached",
    "mx_matches",
    "parse_policy",
    "parse_record",
]

POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: one year
DEFAULT_MAX_SIZE = 64 * 1024  # RFC 8461 3.3 suggests senders cap policy bodies at 64 KiB

_RECORD_VERSION = "v=STSv1"
_WSP = " \t"
_RECORD_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_RECORD_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_MAX_AGE = re.compile(r"[0-9]{1,10}")


class PolicyError(TlsmilterError):
    """An MTA-STS TXT record or policy file that does not follow RFC 8461."""


class Mode(enum.Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class Policy:
    """A parsed policy file; ``mx`` holds lowercase patterns without trailing dots."""

    mode: Mode
    max_age: int
    mx: tuple[str, ...]

    def covers(self, host: str) -> bool:
        """True if ``host`` (an MX host name) matches any of the policy's ``mx`` patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


class Outcome(enum.Enum):
    """How a fetch ended; values double as reason codes and metric labels."""

    OK = "ok"
    NO_RECORD = "no_record"
    BAD_RECORD = "bad_record"
    DNS_TEMPFAIL = "dns_tempfail"
    CONNECT_FAILED = "connect_failed"
    CERT_INVALID = "cert_invalid"
    REDIRECT = "redirect"
    HTTP_STATUS = "http_status"
    CONTENT_TYPE = "content_type"
    TOO_LARGE = "too_large"
    BAD_POLICY = "bad_policy"
    TIMEOUT = "timeout"
    CACHED = "cached"  # a cached, unexpired policy: its id is current, or fetching failed


@dataclass(frozen=True)
class StsResult:
    outcome: Outcome
    record_id: str | None = None
    policy: Policy | None = None
    detail: str = ""

    @property
    def usable(self) -> Policy | None:
        """The policy to apply: fetched now, or cached (RFC 8461 5.1)."""
        return self.policy if self.outcome in (Outcome.OK, Outcome.CACHED) else None


# --- the policy cache (RFC 8461 3.3) ----------------------------------------------------------

REFRESH_FRACTION = 0.25  # fetch again once less than this part of max_age is left


@dataclass(frozen=True)
class CachedPolicy:
    """A policy as last fetched: with the TXT ``id`` it was fetched under, at ``fetched_at``
    (wall-clock seconds, so several hosts and restarts agree)."""

    record_id: str
    policy: Policy
    fetched_at: float

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.policy.max_age

    @property
    def refresh_at(self) -> float:
        return self.expires_at - self.policy.max_age * REFRESH_FRACTION

    def to_json(self) -> dict[str, Any]:
        return {"id": self.record_id, "mode": self.policy.mode.value,
                "max_age": self.policy.max_age, "mx": list(self.policy.mx),
                "fetched_at": self.fetched_at}

    @classmethod
    def from_json(cls, data: Any) -> CachedPolicy | None:
        """The policy ``to_json`` stored, or None for anything else (never raises)."""
        try:
            policy = Policy(Mode(data["mode"]), int(data["max_age"]),
                            tuple(str(p) for p in data["mx"]))
            return cls(str(data["id"]), policy, float(data["fetched_at"]))
        except (KeyError, TypeError, ValueError):
            return None


class PolicyCache(Protocol):
    """Where ``fetch_cached`` keeps each domain's last valid policy (memory or Redis)."""

    async def get(self, domain: str) -> CachedPolicy | None: ...

    async def put(self, domain: str, cached: CachedPolicy) -> None: ...


class MemoryPolicyCache:
    """A process's policy cache: bounded, least recently used dropped first."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedPolicy] = OrderedDict()
        self.changes = 0  # puts so far: whoever saves the cache can tell it changed

    async def get(self, domain: str) -> CachedPolicy | None:
        cached = self._entries.get(domain)
        if cached is not None:
            self._entries.move_to_end(domain)
        return cached

    async def put(self, domain: str, cached: CachedPolicy) -> None:
        self._entries[domain] = cached
        self._entries.move_to_end(domain)
        self.changes += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def items(self) -> list[tuple[str, CachedPolicy]]:
        """Every cached domain and policy, least recently used first (a copy)."""
        return list(self._entries.items())

    def restore(self, items: list[tuple[str, CachedPolicy]], now: float) -> int:
        """Add ``items`` that have not expired at ``now``; how many were added."""
        added = 0
        for domain, cached in items:
            if now < cached.expires_at:
                self._entries[domain] = cached
                added += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return added

    def __len__(self) -> int:
        return len(self._entries)


# --- pure parsing -------------------------------------------------------------------------


def _is_sts_record(text: str) -> bool:
    # "v=STSv10; ..." is some other version, not STSv1; the version may be followed by
    # whitespace before the ";" (RFC 8461 erratum 6285), so do not insist on "v=STSv1;".
    if not text.startswith(_RECORD_VERSION):
        return False
    rest = text[len(_RECORD_VERSION):]
    return rest == "" or rest[0] in ";" + _WSP


def _parse_one_record(text: str) -> str:
    fields = [field.strip(_WSP) for field in text.split(";")]
    if fields[-1] == "" and len(fields) > 1:
        fields.pop()  # the grammar allows one trailing delimiter
    if fields[0] != _RECORD_VERSION:
        raise PolicyError(f"TXT record {text!r}: must begin with {_RECORD_VERSION}")
    record_id: str | None = None
    for field in fields[1:]:
        name, sep, value = field.partition("=")
        if not sep or not _FIELD_NAME.fullmatch(name):
            raise PolicyError(f"TXT record {text!r}: malformed field {field!r}")
        if name == "id":
            if record_id is not None:
                raise PolicyError(f"TXT record {text!r}: more than one id")
            if not _RECORD_ID.fullmatch(value):
                raise PolicyError(f"TXT record {text!r}: id must be 1-32 letters or digits")
            record_id = value
        elif not _RECORD_EXT_VALUE.fullmatch(value):
            raise PolicyError(f"TXT record {text!r}: malformed value in field {field!r}")
    if record_id is None:
        raise PolicyError(f"TXT record {text!r}: no id field")
    return record_id


def parse_record(txt: list[str]) -> str | None:
    """Return the id of the one STSv1 record among the TXT strings of ``_mta-sts.<domain>``.

    Records that do not begin with ``v=STSv1`` are ignored (RFC 8461 3.1), so ``None`` means
    the domain publishes no STS record. Several STSv1 records, or a malformed one, raise
    ``PolicyError``: the RFC says a sender must then act as if the domain had no policy, but
    a report should say the domain tried and got it wrong, which ``None`` would hide.
    """
    candidates = [text for text in txt if _is_sts_record(text)]
    if not candidates:
        return None
    if len(candidates) > 1:
        raise PolicyError(f"{len(candidates)} STSv1 TXT records; RFC 8461 allows exactly one")
    return _parse_one_record(candidates[0])


def _normalize_name(name: str) -> str:
    # DNS names compare case-insensitively, and MX targets often come fully qualified.
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def _valid_pattern(pattern: str) -> bool:
    base = pattern[2:] if pattern.startswith("*.") else pattern
    labels = base.split(".")
    return len(base) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _policy_fields(text: str) -> list[tuple[int, str, str]]:
    fields: list[tuple[int, str, str]] = []
    # splitlines() would also split on \v, \f, U+2028 ...; RFC 8461 terms lines by LF or CRLF.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r").strip(_WSP)
        if not line:
            continue  # blank lines (e.g. after the final newline) carry nothing
        name, sep, value = line.partition(":")
        name = name.strip(_WSP)
        if not sep or not _FIELD_NAME.fullmatch(name):
            raise PolicyError(f"policy line {number}: expected 'key: value', got {line[:80]!r}")
        fields.append((number, name, value.strip(_WSP)))
    return fields


def parse_policy(text: str) -> Policy:
    """Parse an RFC 8461 3.2 policy file; raise ``PolicyError`` saying what is wrong.

    Unknown keys are ignored (they are the RFC's extension point). A repeated ``version``,
    ``mode`` or ``max_age`` is refused: the RFC gives no rule to pick one, so the policy is
    ambiguous. Field names and values are case-sensitive, as the RFC's grammar says.
    """
    singles: dict[str, str] = {}
    mx: list[str] = []
    for number, name, value in _policy_fields(text):
        if name == "mx":
            pattern = _normalize_name(value)
            if not _valid_pattern(pattern):
                raise PolicyError(f"policy line {number}: invalid mx pattern {value!r}")
            mx.append(pattern)
        elif name in ("version", "mode", "max_age"):
            if name in singles:
                raise PolicyError(f"policy line {number}: {name} given more than once")
            singles[name] = value
    missing = [key for key in ("version", "mode", "max_age") if key not in singles]
    if missing:
        raise PolicyError(f"policy lacks required field(s): {', '.join(missing)}")
    if singles["version"] != "STSv1":
        raise PolicyError(f"policy version {singles['version']!r} is not STSv1")
    try:
        mode = Mode(singles["mode"])
    except ValueError:
        raise PolicyError(
            f"policy mode {singles['mode']!r} is not enforce, testing or none"
        ) from None
    raw_age = singles["max_age"]
    if not _MAX_AGE.fullmatch(raw_age) or int(raw_age) > MAX_AGE_LIMIT:
        raise PolicyError(f"policy max_age {raw_age!r} is not an integer 0..{MAX_AGE_LIMIT}")
    if not mx and mode is not Mode.NONE:
        raise PolicyError(f"policy in mode {mode.value} lists no mx")
    # Duplicates add nothing to matching; keep the publisher's order for reports.
    return Policy(mode=mode, max_age=int(raw_age), mx=tuple(dict.fromkeys(mx)))


def mx_matches(pattern: str, host: str) -> bool:
    """True if MX ``host`` matches policy ``pattern`` (RFC 8461 4.1).

    Case and one trailing dot are ignored. ``*.example.com`` matches exactly one extra
    leftmost label: ``mx.example.com`` but neither ``example.com`` nor ``a.b.example.com``.
    A ``*`` anywhere else (including a bare ``*``) matches nothing.
    """
    pattern = _normalize_name(pattern)
    host = _normalize_name(host)
    if not host or "*" in host:
        return False
    if pattern.startswith("*."):
        base = pattern[2:]
        label, dot, rest = host.partition(".")
        return bool(base) and "*" not in base and bool(label) and bool(dot) and rest == base
    return "*" not in pattern and pattern == host


# --- I/O ----------------------------------------------------------------------------------


def _txt_strings(answer: Answer) -> list[str]:
    texts = []
    for rdata in answer.rdatas:
        if isinstance(rdata, dns.rdtypes.txtbase.TXTBase):
            # A record split into several character-strings is one record (RFC 8461 3.1).
            texts.append(b"".join(rdata.strings).decode("utf-8", errors="replace"))
    return texts


@functools.lru_cache(maxsize=8)
def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    # Loading the system store costs milliseconds; a context is safe to share across threads.
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsmilterError(f"cannot load CA file {ca_file}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to an address we resolved ourselves, but verifies and sends SNI for the name.

    Overriding ``connect`` keeps http.client from calling getaddrinfo on the host name,
    which would ask the system resolver instead of ours.
    """

    def __init__(
        self, host: str, address: str, port: int, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _http_get(
    host: str, address: str, port: int, context: ssl.SSLContext, timeout: float, max_size: int
) -> tuple[Outcome, str, str]:
    """Blocking GET of the policy; returns (outcome, detail, body text when OK)."""
    deadline = time.monotonic() + timeout
    conn = _PinnedHTTPSConnection(host, address, port, context, timeout)
    try:
        conn.request(
            "GET", POLICY_PATH,
            headers={"Connection": "close", "Accept": "text/plain", "User-Agent": "tlsmilter"},
        )
        response = conn.getresponse()
        status = response.status
        if 300 <= status < 400:
            location = response.getheader("Location", "")
            return Outcome.REDIRECT, f"HTTP {status} redirect to {location!r} refused", ""
        if status != 200:
            return Outcome.HTTP_STATUS, f"HTTP {status} {response.reason}", ""
        content_type = response.getheader("Content-Type")
        media_type = (content_type or "").split(";", 1)[0].strip(_WSP).lower()
        if media_type != "text/plain":
            return Outcome.CONTENT_TYPE, f"Content-Type {content_type!r}, not text/plain", ""
        body = b""
        # Bounded reads so neither a huge body nor a slow trickle outlives the budget.
        while len(body) <= max_size:
            if time.monotonic() > deadline:
                raise TimeoutError("policy body not received in time")
            chunk = response.read(min(16384, max_size + 1 - len(body)))
            if not chunk:
                break
            body += chunk
        if len(body) > max_size:
            return Outcome.TOO_LARGE, f"policy larger than {max_size} bytes", ""
        try:
            return Outcome.OK, "", body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Outcome.BAD_POLICY, f"policy is not UTF-8: {exc.reason}", ""
    except TimeoutError:
        return Outcome.TIMEOUT, f"no answer from {host} within {timeout:g}s", ""
    except ssl.SSLCertVerificationError as exc:
        return Outcome.CERT_INVALID, f"certificate of {host}: {exc.verify_message}", ""
    except ssl.SSLError as exc:
        return Outcome.CONNECT_FAILED, f"TLS with {host} failed: {exc.reason or exc}", ""
    except ConnectionError as exc:  # before HTTPException: RemoteDisconnected is both
        return Outcome.CONNECT_FAILED, f"{host} [{address}]:{port}: {exc}", ""
    except http.client.HTTPException as exc:
        return Outcome.HTTP_STATUS, f"malformed HTTP response: {type(exc).__name__} {exc}", ""
    except OSError as exc:
        return Outcome.CONNECT_FAILED, f"{host} [{address}]:{port}: {exc}", ""
    finally:
        conn.close()


async def _policy_address(host: str, resolver: Resolver) -> tuple[str | None, StsResult | None]:
    """First address of the policy host via our resolver, or the result explaining why not."""
    answers = []
    for rdtype in ("A", "AAAA"):
        answer = await resolver.query(host, rdtype)
        if answer.status is Status.OK and answer.records:
            return answer.records[0], None
        answers.append(answer)
    temporary = [a for a in answers if a.status.temporary]
    if temporary:
        failed = temporary[0]
        detail = f"{host} {failed.rdtype}: {failed.status.value} {failed.detail}".strip()
        return None, StsResult(Outcome.DNS_TEMPFAIL, detail=detail)
    return None, StsResult(Outcome.CONNECT_FAILED, detail=f"{host} has no A or AAAA record")


async def fetch(
    domain: str,
    resolver: Resolver,
    *,
    ca_file: str | None,
    timeout: float,
    max_size: int = DEFAULT_MAX_SIZE,
    port: int = 443,
) -> StsResult:
    """Discover and fetch the MTA-STS policy of ``domain`` (RFC 8461 3.1-3.3).

    DNS lookups are bounded by the resolver's own timeout; the HTTPS fetch (connect, TLS,
    request, body) by ``timeout``. ``ca_file`` replaces the system trust store when given.
    Redirects are refused, as the RFC requires. ``port`` exists for tests. The one exception
    is ``TlsmilterError`` for an unreadable ``ca_file``: local misconfiguration, not a remote
    failure. Trust stores are loaded once per ``ca_file`` and process.
    """
    domain = _normalize_name(domain)
    record_id, failure = await _record(domain, resolver)
    if record_id is None:
        assert failure is not None
        return failure
    return await _fetch_policy(domain, record_id, resolver, ca_file=ca_file, timeout=timeout,
                               max_size=max_size, port=port)


async def fetch_cached(
    domain: str,
    resolver: Resolver,
    cache: PolicyCache,
    *,
    ca_file: str | None,
    timeout: float,
    max_size: int = DEFAULT_MAX_SIZE,
    port: int = 443,
    clock: Callable[[], float] = time.time,
) -> StsResult:
    """``fetch``, with ``cache`` as RFC 8461 sections 3.3 and 5.1 ask of a sender.

    - The TXT record is always looked up. When its ``id`` is the cached policy's and that
      policy is not near expiry, the cached policy applies and nothing is fetched.
    - Otherwise the policy is fetched; a valid one replaces the cached one.
    - A failed fetch, a vanished or broken TXT record, or a failed TXT lookup never replaces
      a cached policy that has not expired: it keeps applying (``Outcome.CACHED``, with the
      failure in ``detail``). Only a successful fetch can replace it, e.g. with mode ``none``.
    """
    domain = _normalize_name(domain)
    now = clock()
    cached = await cache.get(domain)
    if cached is not None and now >= cached.expires_at:
        cached = None
    record_id, failure = await _record(domain, resolver)
    if cached is not None and record_id == cached.record_id and now < cached.refresh_at:
        return _from_cache(cached, now, "id unchanged")
    if record_id is None:
        assert failure is not None
        return _from_cache(cached, now, failure) if cached is not None else failure
    result = await _fetch_policy(domain, record_id, resolver, ca_file=ca_file, timeout=timeout,
                                 max_size=max_size, port=port)
    if result.outcome is Outcome.OK and result.policy is not None:
        await cache.put(domain, CachedPolicy(record_id, result.policy, now))
        return result
    return _from_cache(cached, now, result) if cached is not None else result


def _from_cache(cached: CachedPolicy, now: float, why: str | StsResult) -> StsResult:
    reason = why if isinstance(why, str) else f"{why.outcome.value}: {why.detail}".rstrip(": ")
    policy = cached.policy
    age = max(0, int(now - cached.fetched_at))
    return StsResult(Outcome.CACHED, record_id=cached.record_id, policy=policy,
                     detail=f"cached policy id {cached.record_id}, mode {policy.mode.value}, "
                            f"max_age {policy.max_age}, fetched {age} s ago ({reason})")


async def _record(domain: str, resolver: Resolver) -> tuple[str | None, StsResult | None]:
    """The id of ``domain``'s STS record, or why there is none."""
    record_name = f"_mta-sts.{domain}"
    answer = await resolver.query(record_name, "TXT")
    if answer.status.temporary:
        detail = f"{record_name} TXT: {answer.status.value} {answer.detail}".strip()
        return None, StsResult(Outcome.DNS_TEMPFAIL, detail=detail)
    if answer.status is not Status.OK:
        return None, StsResult(Outcome.NO_RECORD,
                               detail=f"{record_name} TXT: {answer.status.value}")
    try:
        record_id = parse_record(_txt_strings(answer))
    except PolicyError as exc:
        return None, StsResult(Outcome.BAD_RECORD, detail=str(exc))
    if record_id is None:
        return None, StsResult(Outcome.NO_RECORD,
                               detail=f"{record_name} has no v=STSv1 TXT record")
    return record_id, None


async def _fetch_policy(domain: str, record_id: str, resolver: Resolver, *, ca_file: str | None,
                        timeout: float, max_size: int, port: int) -> StsResult:
    """Fetch and parse the policy of ``domain``, whose TXT record has ``record_id``."""
    host = f"mta-sts.{domain}"
    address, failure = await _policy_address(host, resolver)
    if address is None:
        assert failure is not None
        return StsResult(failure.outcome, record_id=record_id, detail=failure.detail)
    context = _tls_context(ca_file)
    try:
        async with asyncio.timeout(timeout):
            outcome, detail, body = await asyncio.to_thread(
                _http_get, host, address, port, context, timeout, max_size
            )
    except TimeoutError:
        # The worker thread's socket timeouts end it shortly after; we need not wait for it.
        return StsResult(Outcome.TIMEOUT, record_id=record_id,
                         detail=f"no policy from {host} within {timeout:g}s")
    if outcome is not Outcome.OK:
        return StsResult(outcome, record_id=record_id, detail=detail)
    try:
        policy = parse_policy(body)
    except PolicyError as exc:
        return StsResult(Outcome.BAD_POLICY, record_id=record_id, detail=str(exc))
    return StsResult(Outcome.OK, record_id=record_id, policy=policy,
                     detail=f"mode {policy.mode.value}, max_age {policy.max_age}")
