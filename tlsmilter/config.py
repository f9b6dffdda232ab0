"""Typed configuration, loaded from one TOML file.

Every key and its default lives here, once, as a dataclass field; ``docs/configuration.md``
documents each one and a test keeps the two in step. Loading collects every problem (unknown
key, wrong type, bad value) with its dotted key, so ``tlsmilter config check`` can print them
all at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import enum
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tlsmilter.core.domains import InvalidDomain, normalize_domain
from tlsmilter.core.labels import is_guid
from tlsmilter.core.levels import Level
from tlsmilter.core.overrides import Kind as OverrideKind
from tlsmilter.core.overrides import Override, parse_date
from tlsmilter.core.subject import Match as SubjectMatch
from tlsmilter.core.verdict import MAX_EXTRA_LINES
from tlsmilter.errors import ConfigError, ConfigIssue

DEFAULT_PATH = Path("/etc/tlsmilter/tlsmilter.toml")
ENV_VAR = "TLSMILTER_CONFIG"

Validator = Callable[[Any], str | None]


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _short_reply(lines: list[str]) -> str | None:
    # libmilter sends at most 32 reply lines; the domain lines need most of them.
    if len(lines) > MAX_EXTRA_LINES:
        return f"at most {MAX_EXTRA_LINES} lines, not {len(lines)}"
    if any(len(line) > 200 for line in lines):
        return "lines of at most 200 characters (SMTP reply lines are short)"
    return None


def check_resolver(value: str) -> str | None:
    """Why ``value`` is not a usable ``HOST[:PORT]`` resolver address, or None."""
    try:
        parse_host_port(value, default_port=53)
    except ValueError as exc:
        return str(exc)
    return None


def is_file(value: str) -> bool:
    return Path(value).is_file()


def _opt(default: Any, doc: str, check: Validator | None = None) -> Any:
    """A config field: its default, its one-line documentation, and an optional value check."""
    meta = {"doc": doc, "check": check}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_host_port(value: str, *, default_port: int) -> tuple[str, int]:
    """Split ``HOST[:PORT]`` (``[v6]:PORT`` for IPv6) into an IP address and a port."""
    host, port = value, default_port
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{value!r} is not HOST[:PORT]")
            port = _port(rest[1:], value)
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        port = _port(port_text, value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: port must be a number from 1 to 65535")
    return int(text)


class TlsVersion(enum.Enum):
    TLS1_2 = "1.2"
    TLS1_3 = "1.3"


@dataclass(frozen=True)
class TimeoutSettings:
    """Per-step budgets of a probe, in seconds."""

    dns: float = _opt(5.0, "One DNS query, including retries over TCP.", _positive)
    connect: float = _opt(10.0, "TCP connect to one MX address.", _positive)
    smtp: float = _opt(15.0, "Each SMTP step: greeting, EHLO, STARTTLS reply.", _positive)
    tls: float = _opt(10.0, "The TLS handshake after STARTTLS.", _positive)
    https: float = _opt(10.0, "Fetching the MTA-STS policy, connect to last byte.", _positive)
    domain: float = _opt(
        60.0,
        "Whole assessment of one domain; past it the result is `unknown`.",
        _positive,
    )


@dataclass(frozen=True)
class ProberSettings:
    """How domains are assessed."""

    resolver: str = _opt(
        "",
        "Validating resolver as `HOST[:PORT]` for every DNS lookup, the MTA-STS host "
        "included. Empty: the first nameserver of /etc/resolv.conf. DNSSEC status is taken "
        "from this resolver's AD bit, so it must validate and be trusted (loopback).",
        lambda v: check_resolver(v) if v else None,
    )
    ca_file: str = _opt(
        "",
        "PEM bundle of trusted CAs for SMTP certificates and the MTA-STS HTTPS fetch. "
        "Empty: the system trust store.",
        lambda v: None if not v or is_file(v) else "file does not exist",
    )
    max_mx: int = _opt(10, "At most this many MX hosts are probed per domain.", _positive)
    min_tls_version: TlsVersion = _opt(
        TlsVersion.TLS1_2, 'Lowest TLS version that counts as encrypted: "1.2" or "1.3".'
    )
    concurrency: int = _opt(20, "Domains assessed at the same time.", _positive)
    reserved_slots: int = _opt(
        5,
        "Of the `concurrency` slots, this many only probe domains a sensitive message is "
        "waiting for, so probes started ahead of time at RCPT cannot take them all. On Redis: "
        "of each worker's slots and of `worker.fleet_concurrency`.",
        lambda v: None if v >= 0 else "must be 0 or more",
    )
    queue_limit: int = _opt(
        1000,
        "Probes started ahead of time at RCPT that may be running or waiting at once; more "
        "are dropped and counted (tlsmilter_probe_queue_overflow_total). A probe a sensitive "
        "message waits for is never dropped and goes first. Embedded backend (`serve`).",
        _positive,
    )
    warmup_per_message: int = _opt(
        100,
        "New domains one message may have probed at RCPT; past it they are only probed if "
        "the message turns out sensitive (at end-of-message). Both backends.",
        _positive,
    )
    warmup_per_client: int = _opt(
        2000,
        "New domains one client address may have probed at RCPT per `warmup_window`. "
        "Both backends.",
        _positive,
    )
    warmup_window: float = _opt(60.0, "Seconds over which `warmup_per_client` counts.",
                                _positive)
    ehlo_name: str = _opt(
        "",
        "Name sent in EHLO by the prober. Empty: this machine's fully qualified name.",
    )
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)


class LogLevel(enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class LogSettings:
    level: LogLevel = _opt(LogLevel.INFO, "debug, info, warning or error.")


def check_milter_socket(value: str) -> str | None:
    """Why ``value`` is not a usable milter socket spec, or None."""
    return _socket(value)


def _socket(value: str) -> str | None:
    kind, _, rest = value.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return None
    if kind == "inet":
        port, _, host = rest.partition("@")
        if not port.isdigit():
            return "inet sockets are inet:PORT@127.0.0.1"
        try:
            loopback = ipaddress.ip_address(host or "0.0.0.0").is_loopback
        except ValueError:
            return f"{host!r} is not an IP address"
        return None if loopback else "must listen on a loopback address only"
    return "expected unix:/ABSOLUTE/PATH or inet:PORT@127.0.0.1"


def _mode(value: str) -> str | None:
    ok = len(value) == 4 and value[0] == "0" and all(c in "01234567" for c in value)
    return None if ok else 'expected an octal file mode like "0660"'


@dataclass(frozen=True)
class MilterSettings:
    """The milter Postfix talks to."""

    socket: str = _opt(
        "unix:/run/tlsmilter/milter.sock",
        "Where the milter listens: `unix:/PATH` (recommended) or `inet:PORT@127.0.0.1`. "
        "Over inet, libmilter's missing TCP_NODELAY costs ~40 ms per message.",
        _socket,
    )
    socket_mode: str = _opt("0660", "File mode of the unix socket (Postfix must be able to "
                            "write to it: put the postfix user in tlsmilter's group).", _mode)
    eom_wait: float = _opt(
        5.0,
        "Seconds a sensitive message waits at end-of-message for assessments still running. "
        "Domains not assessed by then count as unknown.",
        _positive,
    )
    monitor: bool = _opt(
        False, "Roll-out mode: never refuse or hold, only tag and log what would have happened."
    )
    local_transports: list[str] = _opt(
        ["local", "virtual", "lmtp", "error", "discard"],
        "Recipients whose Postfix transport (`{rcpt_mailer}`) is one of these are delivered "
        "locally and not checked.",
    )
    skip_domains: list[str] = _opt(
        [], "Recipient domains never checked (e.g. your own domains delivered internally)."
    )
    subject_tag: str = _opt(
        "", "Prefix added to the Subject by the `tag` action, e.g. `[insecure]`. Empty: none."
    )
    timeout: float = _opt(
        300.0,
        "Seconds libmilter waits for the MTA's next command before it drops the connection "
        "(a stalled or truncated packet holds a thread no longer). Keep it at least Postfix's "
        "`smtpd_timeout` (300 s): Postfix sends nothing while its SMTP client is idle.",
        _positive,
    )


class LevelName(enum.Enum):
    ENCRYPTED = "encrypted"
    VERIFIED = "verified"
    DANE = "dane"


class ActionName(enum.Enum):
    TAG = "tag"
    QUARANTINE = "quarantine"
    TEMPFAIL = "tempfail"
    REJECT = "reject"


@dataclass(frozen=True)
class PolicySettings:
    require: LevelName = _opt(LevelName.ENCRYPTED, "Lowest level every recipient domain must "
                              "have: encrypted, verified or dane.")
    on_insecure: ActionName = _opt(ActionName.REJECT, "Action when a domain is below `require`: "
                                   "tag, quarantine, tempfail or reject.")
    on_unknown: ActionName = _opt(ActionName.TEMPFAIL, "Action when a domain could not be "
                                  "assessed (yet): tag, quarantine, tempfail or reject.")
    reply: list[str] = _opt([], "Extra lines appended to the SMTP reply, e.g. a link to a "
                            "secure portal (at most 8 lines of at most 200 characters).",
                            _short_reply)


DEFAULT_POLICIES = {
    "personal": PolicySettings(require=LevelName.ENCRYPTED),
    "private": PolicySettings(require=LevelName.VERIFIED),
    "confidential": PolicySettings(require=LevelName.VERIFIED),
}


@dataclass(frozen=True)
class SensitivitySettings:
    """How a message is recognised as sensitive."""

    headers: list[str] = _opt(["X-Sensitivity", "Sensitivity"],
                              "Headers that carry a sensitivity value.")
    values: dict[str, str] = _opt(
        {"personal": "personal", "private": "private", "company-confidential": "confidential",
         "confidential": "confidential", "normal": ""},
        'Header value (case-insensitive) to policy name; `""` means not sensitive. Your '
        "entries are merged over the defaults.",
    )
    fail_safe_policy: str = _opt("confidential", "Policy for a non-empty value not in "
                                 "`values`: a typo never makes sensitive mail ordinary.")
    labels: dict[str, str] = _opt(
        {}, "Microsoft Purview label GUID (`msip_labels:` header), or `GUID@TENANT-SITEID` "
        "for one tenant's label, to policy name. A label counts unless `Enabled=false`.")
    label_names: dict[str, str] = _opt(
        {}, "Purview label display name (case-insensitive) to policy name; GUIDs are the "
        "reliable key, names can be renamed or translated.")
    subject_keywords: dict[str, str] = _opt(
        {}, "Subject keyword (case-insensitive, e.g. `[secure]`) to policy name; the Subject "
        "is RFC 2047 decoded first.")
    subject_match: SubjectMatch = _opt(
        SubjectMatch.START, '`"start"`: a keyword counts at the start of the Subject (after '
        '`RE:`, `Fwd:`...); `"anywhere"`: anywhere in it.')
    strip_subject_keyword: bool = _opt(
        False, "Remove the matched keyword from the Subject of mail that is delivered.")
    senders: dict[str, str] = _opt(
        {}, "Sender address, domain, or `.domain` (its subdomains) to the policy its mail "
        "needs at least, marked or not.")
    sender_from_header: bool = _opt(
        False, "Sender rules also read the `From:` header, not only the envelope sender.")


class OverrideAction(enum.Enum):
    REQUIRE = "require"
    DENY = "deny"


def _expiry(value: str) -> str | None:
    try:
        parse_date(value)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class OverrideSettings:
    """One recipient domain's override (`[overrides.domains."DOMAIN"]`)."""

    action: OverrideAction = _opt(
        OverrideAction.REQUIRE, '`"require"`: sensitive mail to the domain needs at least '
        '`level`, whatever its policy; `"deny"`: sensitive mail never goes there.')
    level: LevelName = _opt(LevelName.DANE, "The level `require` demands: encrypted, "
                            "verified or dane.")
    reason: str = _opt("", "Why (mandatory): shown in the log, the decision line and the "
                       "sender's reply.")
    expires: str = _opt("", "Last day it applies, as `YYYY-MM-DD` (UTC); empty: no end.",
                        _expiry)


@dataclass(frozen=True)
class OverridesSettings:
    """Per-domain overrides postmasters set."""

    warn_days: int = _opt(14, "Days ahead of an override's expiry from which applying it logs "
                          "a warning (once per domain and process).",
                          lambda v: None if v >= 0 else "must be 0 or more")
    domains: dict[str, OverrideSettings] = _opt({}, "Recipient domain to its override.")


class CacheBackend(enum.Enum):
    MEMORY = "memory"
    REDIS = "redis"


@dataclass(frozen=True)
class CacheSettings:
    """Where assessments are kept, and for how long."""

    backend: CacheBackend = _opt(
        CacheBackend.MEMORY,
        '`"memory"`: in-process, for one MTA, nothing else to run. `"redis"`: shared by '
        "every milter, worker and policy server pointed at the same Redis (see `[redis]`).",
    )
    max_entries: int = _opt(100_000, "Domains kept by the memory backend; the least recently "
                            "used go first.", _positive)
    ttl: float = _opt(21600.0, "Seconds an `encrypted`, `verified` or `dane` result stays "
                      "fresh.", _positive)
    ttl_none: float = _opt(3600.0, "Seconds a `none` result stays fresh.", _positive)
    ttl_unknown: float = _opt(300.0, "Seconds an `unknown` result is kept (never served "
                              "stale).", _positive)
    stale_max: float = _opt(86400.0, "Seconds past expiry a result may still be served while "
                            "it is re-assessed.", _positive)
    refresh_before: float = _opt(
        600.0,
        "A lookup of a result due to expire within this many seconds re-assesses it in the "
        "background, so domains in use are refreshed before they expire.",
        lambda v: None if v >= 0 else "must be 0 or more",
    )
    state_dir: str = _opt(
        "/var/lib/tlsmilter",
        "Directory where the memory backend keeps its assessments and MTA-STS policies across "
        'restarts (systemd\'s `StateDirectory=`); `""`: the cache starts empty at every start.',
        lambda v: None if v == "" or v.startswith("/") else 'an absolute path, or "" for none',
    )
    snapshot_interval: float = _opt(300.0, "Seconds between saves of the memory backend's "
                                    "assessments to `state_dir`; one more is made at stop.",
                                    _positive)


def _redis_url(value: str) -> str | None:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("redis", "rediss", "unix") or not rest:
        return "expected redis://HOST[:PORT][/DB], rediss://... (TLS) or unix:///PATH"
    return None


def check_listen(value: str) -> str | None:
    """Why ``value`` is not a usable ``HOST:PORT`` listen address (empty: off), or None."""
    if not value:
        return None
    try:
        _host, port = parse_host_port(value, default_port=0)
    except ValueError as exc:
        return str(exc)
    return None if port else "expected HOST:PORT ([ADDRESS]:PORT for IPv6)"


@dataclass(frozen=True)
class RedisSettings:
    """The shared Redis used by `cache.backend = "redis"`: assessments and the probe queue."""

    url: str = _opt(
        "redis://127.0.0.1:6379/0",
        "`redis://[:PASSWORD@]HOST[:PORT][/DB]`, `rediss://...` for TLS, or "
        "`unix:///PATH[?db=N]`. The password is never logged.",
        _redis_url,
    )
    ca_file: str = _opt(
        "", "PEM bundle of CAs trusted for `rediss://` (TLS). Empty: the system trust store.",
        lambda v: None if not v or is_file(v) else "file does not exist")
    sentinels: list[str] = _opt(
        [],
        'Redis Sentinel addresses as `"HOST:PORT"`. When set, the master named '
        "`sentinel_service` is found through them, and `url` only gives the password, "
        "database and TLS.",
    )
    sentinel_service: str = _opt("mymaster", "The Sentinel service (master) name.")
    prefix: str = _opt("tlsmilter:", "Prefix of every key, so several installations can "
                       "share one Redis.", lambda v: None if v else "must not be empty")
    timeout: float = _opt(
        1.0,
        "Seconds for connecting and for each command. Past it Redis counts as down: normal "
        "mail passes, sensitive mail is tempfailed, further commands fail at once (the "
        "circuit breaker) until a PING, tried once a second, is answered, and tlsmilter "
        "reconnects by itself.",
        _positive,
    )


@dataclass(frozen=True)
class WorkerSettings:
    """`tlsmilter worker`: probe workers sharing the Redis probe queue."""

    queue_max: int = _opt(
        10_000,
        "Most domains waiting in each probe queue (warm-up and urgent). Requests beyond it "
        "are dropped and counted; the domain is asked for again at its next lookup.",
        _positive,
    )
    claim_after: float = _opt(
        120.0,
        "Seconds a taken probe may stay unfinished before another worker takes it over (its "
        "worker died). Must exceed `prober.timeouts.domain`.",
        _positive,
    )
    fleet_concurrency: int = _opt(
        100, "Probes running at the same time across all workers (each worker also keeps to "
        "`prober.concurrency`).", _positive)
    metrics_listen: str = _opt(
        "127.0.0.1:9465", "Where `worker` serves /metrics as `HOST:PORT`; empty: none. With "
        "several workers on one host, give each its own with `--metrics-listen`.", check_listen)


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics of `serve`."""

    listen: str = _opt(
        "127.0.0.1:9464",
        "Where `serve` serves /metrics as `HOST:PORT`; empty: no listener. Loopback by "
        "default: expose it further only on purpose.",
        check_listen,
    )


@dataclass(frozen=True)
class PolicyServerSettings:
    """The Postfix `smtp_tls_policy_maps` socketmap server."""

    socket: str = _opt("unix:/run/tlsmilter/policy.sock", "Where it listens (`unix:/PATH`).",
                       lambda v: None if v.startswith("unix:/") else "expected unix:/PATH")
    map_name: str = _opt("tlspolicy", "The socketmap name Postfix asks for (`NAME-strict`: "
                         "TEMP instead of NOTFOUND; `NAME-encrypted`, `NAME-verified`, "
                         "`NAME-dane`: also TEMP below that level).")
    socket_mode: str = _opt("0666", "File mode of the socket (Postfix's smtp client must reach "
                            "it).", _mode)
    metrics_listen: str = _opt(
        "127.0.0.1:9466", "Where the standalone `policy-server` serves /metrics as "
        "`HOST:PORT`; empty: none. Inside `serve` it shares `metrics.listen`.", check_listen)


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``Config()`` is the documented default."""

    milter: MilterSettings = field(default_factory=MilterSettings)
    sensitivity: SensitivitySettings = field(default_factory=SensitivitySettings)
    policies: dict[str, PolicySettings] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    overrides: OverridesSettings = field(default_factory=OverridesSettings)
    prober: ProberSettings = field(default_factory=ProberSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    policy_server: PolicyServerSettings = field(default_factory=PolicyServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)


T = TypeVar("T")


def load(path: Path) -> Config:
    """Read and validate a TOML config file; raise ``ConfigError`` listing every problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [ConfigIssue("", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), [ConfigIssue("", "not UTF-8 text")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [ConfigIssue("", f"not valid TOML: {exc}")]) from None
    return from_mapping(raw, source=str(path))


def from_mapping(raw: Mapping[str, Any], *, source: str = "<config>") -> Config:
    issues: list[ConfigIssue] = []
    config = _build(Config, raw, "", issues)
    if not issues:
        config = _merge_defaults(config)
        issues.extend(_cross_check(config))
    if issues:
        raise ConfigError(source, issues)
    return config


def _merge_defaults(config: Config) -> Config:
    """Named policies and sensitivity values the file gives are merged over the defaults."""
    values = {**SensitivitySettings().values, **{k.lower(): v for k, v in
                                         config.sensitivity.values.items()}}
    return dataclasses.replace(
        config,
        policies={**DEFAULT_POLICIES, **config.policies},
        sensitivity=dataclasses.replace(config.sensitivity, values=values),
    )


def _cross_check(config: Config) -> list[ConfigIssue]:
    issues = []
    for value, policy in config.sensitivity.values.items():
        if policy and policy not in config.policies:
            issues.append(ConfigIssue(f"sensitivity.values.{value}",
                                      f"no policy named {policy!r} (see [policies])"))
    if config.sensitivity.fail_safe_policy not in config.policies:
        issues.append(ConfigIssue("sensitivity.fail_safe_policy",
                                  f"no policy named {config.sensitivity.fail_safe_policy!r}"))
    for i, address in enumerate(config.redis.sentinels):
        problem = check_listen(address) if address else "must not be empty"
        if problem:
            issues.append(ConfigIssue(f"redis.sentinels[{i}]", problem))
    if config.worker.claim_after <= config.prober.timeouts.domain:
        issues.append(ConfigIssue("worker.claim_after", "must exceed prober.timeouts.domain "
                                  f"({config.prober.timeouts.domain:g}), or a slow probe is "
                                  "taken over while it still runs"))
    if not config.sensitivity.headers:
        issues.append(ConfigIssue("sensitivity.headers", "at least one header is needed"))
    issues.extend(_check_markers(config))
    issues.extend(_check_overrides(config))
    return issues


def _check_overrides(config: Config) -> list[ConfigIssue]:
    """Override domains must be valid and given once (case, trailing dot, IDN aside)."""
    issues = []
    seen: dict[str, str] = {}
    for domain, override in config.overrides.domains.items():
        dotted = f"overrides.domains.{domain}"
        if not override.reason.strip():
            issues.append(ConfigIssue(f"{dotted}.reason", "a reason is required"))
        try:
            name = normalize_domain(domain)
        except InvalidDomain as exc:
            issues.append(ConfigIssue(dotted, f"not a domain: {exc.why}"))
            continue
        if name in seen:
            issues.append(ConfigIssue(dotted, f"duplicate of {seen[name]!r}"))
        seen.setdefault(name, domain)
    return issues


def domain_overrides(config: Config) -> dict[str, Override]:
    """The per-domain overrides, by normalised domain (``from_mapping`` checked every domain
    and date)."""
    return {normalize_domain(domain): Override(
                normalize_domain(domain), OverrideKind(o.action.value), Level(o.level.value),
                o.reason, parse_date(o.expires))
            for domain, o in config.overrides.domains.items()}


def expiry_issues(config: Config, today: datetime.date) -> list[ConfigIssue]:
    """Overrides past their expiry date: no longer applied, so `config check` flags them
    (a daemon still starts with them, and ignores them)."""
    issues = []
    for domain, override in config.overrides.domains.items():
        expires = parse_date(override.expires)
        if expires is not None and today > expires:
            issues.append(ConfigIssue(f"overrides.domains.{domain}.expires",
                                      f"expired on {expires.isoformat()}: no longer applied; "
                                      "remove it or set a new date"))
    return issues


def _check_markers(config: Config) -> list[ConfigIssue]:
    """Labels, keywords and sender rules: known policies, valid keys, no duplicates."""
    sens = config.sensitivity
    issues = []
    for table, rules in (("labels", sens.labels), ("label_names", sens.label_names),
                         ("subject_keywords", sens.subject_keywords), ("senders", sens.senders)):
        seen: dict[str, str] = {}
        for key, policy in rules.items():
            dotted = f"sensitivity.{table}.{key}"
            if policy not in config.policies:
                issues.append(ConfigIssue(dotted, f"no policy named {policy!r} (see [policies])"))
            folded = " ".join(key.split()).lower().rstrip(".")
            if folded in seen:
                issues.append(ConfigIssue(dotted, f"duplicate of {seen[folded]!r}"))
            seen.setdefault(folded, key)
            problem = _marker_key_problem(table, key)
            if problem:
                issues.append(ConfigIssue(dotted, problem))
    return issues


def _marker_key_problem(table: str, key: str) -> str | None:
    if not key.strip():
        return "must not be empty"
    if table == "labels":
        guid, at, tenant = key.partition("@")
        if not is_guid(guid) or (at and not is_guid(tenant)):
            return ("expected a label GUID like 3a1e5f7c-0b2d-4e6f-8a9b-0c1d2e3f4a5b, "
                    "or GUID@TENANT-SITEID")
    if table == "senders" and (" " in key.strip() or key.count("@") > 1 or key.endswith("@")):
        return "expected an address, a domain, or .domain for its subdomains"
    return None


def resolve_path(cli_value: str | None) -> Path:
    """Config path: ``--config``, else ``$TLSMILTER_CONFIG``, else the default."""
    if cli_value:
        return Path(cli_value)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def load_optional(cli_value: str | None) -> Config:
    """Like ``load``, but a missing *default* file means the built-in defaults."""
    path = resolve_path(cli_value)
    if cli_value is None and ENV_VAR not in os.environ and not path.exists():
        return Config()
    return load(path)


def _build(cls: type[T], raw: Mapping[str, Any], prefix: str, issues: list[ConfigIssue]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # T is a dataclass
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            issues.append(ConfigIssue(dotted, f"unknown key{hint}"))
            continue
        converted = _convert(hints[key], value, dotted, issues)
        if converted is _INVALID:
            continue
        check = fields[key].metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            issues.append(ConfigIssue(dotted, problem))
            continue
        values[key] = converted
    return cls(**values)


_INVALID = object()


def _convert(hint: Any, value: Any, dotted: str, issues: list[ConfigIssue]) -> Any:
    def bad(expected: str) -> object:
        issues.append(ConfigIssue(dotted, f"expected {expected}, got {_describe(value)}"))
        return _INVALID

    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            return bad("a table")
        return _build(hint, value, f"{dotted}.", issues)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = [m.value for m in hint]
        if value not in choices:
            return bad("one of " + ", ".join(repr(c) for c in choices))
        return hint(value)
    if hint is bool:
        return value if isinstance(value, bool) else bad("true or false")
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value if ok else bad("an integer")
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else bad("a number")
    if hint is str:
        return value if isinstance(value, str) else bad("a string")
    origin = typing.get_origin(hint)
    if origin is tuple or origin is list:
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list):
            return bad("a list")
        items = [_convert(item, v, f"{dotted}[{i}]", issues) for i, v in enumerate(value)]
        return _INVALID if _INVALID in items else origin(items)
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            return bad("a table")
        out = {k: _convert(item, v, f"{dotted}.{k}", issues) for k, v in value.items()}
        return _INVALID if _INVALID in out.values() else out
    if isinstance(hint, types.UnionType):
        raise TypeError(f"config field {dotted}: unions are not supported, use a default")
    raise TypeError(f"config field {dotted}: unsupported type {hint!r}")


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})"


def documented_keys(cls: type[Any] = Config, prefix: str = "") -> dict[str, dataclasses.Field[Any]]:
    """Every leaf key as a dotted name, for the docs and the test that keeps them complete."""
    out: dict[str, dataclasses.Field[Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out.update(documented_keys(hint, f"{prefix}{f.name}."))
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(
                typing.get_args(hint)[1]):
            out.update(documented_keys(typing.get_args(hint)[1], f"{prefix}{f.name}.NAME."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out
