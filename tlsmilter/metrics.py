"""Prometheus metrics: every metric tlsmilter exports, defined once, with its label values.

All metrics live in one registry (``REGISTRY``), served by ``start_metrics_server`` from
``serve``, ``worker`` and ``policy-server``. No label ever carries an unbounded value (a
domain, an address, an IP): per-domain views belong to ``tlsmilter report``. Label values
are the values of the enums that produce them, and every one is pre-initialised to zero, so
a rate over a series that has never moved is 0, not "no data". Pre-initialisation is
idempotent: creating a labelled child that exists returns the existing one.

docs/metrics.md documents each metric, its labels and the dashboard and alerts built on them.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from tlsmilter import __version__
from tlsmilter.assess.dns import Status as DnsStatus
from tlsmilter.assess.model import Code, DaneStatus
from tlsmilter.assess.mtasts import Outcome as StsOutcome
from tlsmilter.config import parse_host_port
from tlsmilter.errors import TlsmilterError
from tlsmilter.levels import UNKNOWN, Level
from tlsmilter.policy import Action

if TYPE_CHECKING:
    from tlsmilter.config import Config

log = logging.getLogger(__name__)

# Counters expose only ``_total``: the ``_created`` series doubles every counter for nothing
# a dashboard or alert here uses.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# --- label values ---------------------------------------------------------------------------

NOT_SENSITIVE = "normal"  # sensitivity label of a message no policy applies to
UNCLASSIFIED = "unclassified"  # sensitivity label when classifying the message itself failed


class Stage(enum.Enum):
    """Milter callbacks timed by ``tlsmilter_milter_callback_seconds``."""

    MAIL = "mail"
    RCPT = "rcpt"
    HEADER = "header"
    EOM = "eom"


class RecipientLevel(enum.Enum):
    """What the milter knew of a recipient's domain at RCPT time."""

    NONE = "none"
    ENCRYPTED = "encrypted"
    VERIFIED = "verified"
    DANE = "dane"
    UNKNOWN = "unknown"  # assessed, but the assessment failed temporarily
    PENDING = "pending"  # not in the cache yet: a probe was started
    INVALID = "invalid"  # an address literal or a name that is not a domain
    SKIPPED = "skipped"  # in milter.skip_domains
    LOCAL = "local"  # delivered by a local transport (milter.local_transports)


class FailSafe(enum.Enum):
    """Why the fail-safe rules stepped in (normal mail passes, sensitive mail is tempfailed)."""

    CALLBACK_ERROR = "callback_error"  # an exception in MAIL, RCPT or a header callback
    CLASSIFY_ERROR = "classify_error"  # classifying the message's sensitivity failed
    DECIDE_ERROR = "decide_error"  # gathering assessments or deciding failed
    CACHE_UNAVAILABLE = "cache_unavailable"  # the cache (Redis) could not be read


class SmtpResult(enum.Enum):
    """How a STARTTLS probe of one MX address ended."""

    TLS = "tls"
    NO_STARTTLS = "no_starttls"
    TLS_FAILED = "tls_failed"  # STARTTLS refused or the handshake failed
    CONNECT_FAILED = "connect_failed"
    SMTP_ERROR = "smtp_error"  # connected, but the SMTP dialogue failed before EHLO finished


class Check(enum.Enum):
    """The steps of an assessment counted by ``tlsmilter_probes_total``."""

    MX = "mx"
    ADDRESS = "address"
    TLSA = "tlsa"
    TLSRPT = "tlsrpt"
    MTA_STS = "mta_sts"
    SMTP = "smtp"
    PKIX = "pkix"
    DANE = "dane"


_DNS = tuple(s.value for s in DnsStatus)
PROBE_RESULTS: dict[Check, tuple[str, ...]] = {
    Check.MX: _DNS,
    Check.ADDRESS: _DNS,
    Check.TLSA: _DNS,
    Check.TLSRPT: _DNS,
    Check.MTA_STS: tuple(o.value for o in StsOutcome),
    Check.SMTP: tuple(r.value for r in SmtpResult),
    Check.PKIX: (Code.CERT_VALID.value, Code.CERT_UNTRUSTED.value, Code.CERT_EXPIRED.value,
                 Code.CERT_NAME_MISMATCH.value),
    Check.DANE: tuple(d.value for d in DaneStatus),
}
TIMED_CHECKS = (Check.MX, Check.MTA_STS, Check.SMTP)  # tlsmilter_probe_seconds{check}

# Why a recipient domain failed a sensitive message's policy: the first problem code of its
# assessment (model.Code), or one of these. They are also the decision log's ``reasons=``.
INVALID_DOMAIN = "invalid_domain"  # an address literal or a name that is not a domain
NOT_ASSESSED = "not_assessed"  # no assessment by the end of the end-of-message wait
LEVEL_TOO_LOW = "level_too_low"  # assessed without problems, but below what the policy needs
OTHER = "other"  # a code this version does not know (an entry written by another version)
REFUSAL_REASONS = (*(c.value for c in Code), INVALID_DOMAIN, NOT_ASSESSED, LEVEL_TOO_LOW,
                   UNKNOWN, OTHER)
_REFUSAL_REASONS = frozenset(REFUSAL_REASONS)

ASSESSMENT_RESULTS = (*(level.value for level in Level), UNKNOWN)
CACHE_BACKENDS = ("memory", "redis")
# cache.State values plus "error"; spelled out because the cache modules import this one.
CACHE_RESULTS = ("hit", "stale", "miss", "error")
CACHE_OPS = ("get", "put")

# --- buckets --------------------------------------------------------------------------------

CALLBACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
CACHE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0)
PROBE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
AGE_BUCKETS = (60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 21600.0, 43200.0, 86400.0,
               108000.0)

# --- the metrics ----------------------------------------------------------------------------

BUILD_INFO = Gauge("tlsmilter_build_info", "Always 1; the version label says which tlsmilter "
                   "runs.", ["version"], registry=REGISTRY)

# milter (serve)
MILTER_SESSIONS = Counter("tlsmilter_milter_sessions_total", "SMTP sessions Postfix opened "
                          "with the milter.", registry=REGISTRY)
MILTER_SESSIONS_ACTIVE = Gauge("tlsmilter_milter_sessions_active", "Milter sessions open now.",
                               registry=REGISTRY)
MESSAGES = Counter("tlsmilter_messages_total", "Messages that reached end-of-message, by the "
                   "policy that applied (normal: none) and the verdict.",
                   ["sensitivity", "verdict"], registry=REGISTRY)
RECIPIENTS = Counter("tlsmilter_recipients_total", "Recipients, by what was known of their "
                     "domain's level at RCPT time.", ["level"], registry=REGISTRY)
CALLBACK_SECONDS = Histogram("tlsmilter_milter_callback_seconds", "Time spent in each milter "
                             "callback.", ["stage"], buckets=CALLBACK_BUCKETS, registry=REGISTRY)
EOM_WAIT_SECONDS = Histogram("tlsmilter_eom_wait_seconds", "Time a sensitive message waited at "
                             "end-of-message for assessments still running.",
                             buckets=CALLBACK_BUCKETS, registry=REGISTRY)
EOM_UNASSESSED = Counter("tlsmilter_eom_unassessed_total", "Recipient domains of sensitive "
                         "messages still not assessed when the end-of-message wait ended.",
                         registry=REGISTRY)
REFUSED_DOMAINS = Counter("tlsmilter_refused_domains_total", "Recipient domains that failed "
                          "a sensitive message's policy (refused, held, tagged or, in monitor "
                          "mode, would have been), by the first problem found.", ["reason"],
                          registry=REGISTRY)
FAIL_SAFE = Counter("tlsmilter_fail_safe_total", "Faults handled by the fail-safe rules, by "
                    "reason.", ["reason"], registry=REGISTRY)

# cache (instrumented by the cache backends)
CACHE_REQUESTS = Counter("tlsmilter_cache_requests_total", "Cache lookups by backend and "
                         "result.", ["backend", "result"], registry=REGISTRY)
CACHE_SECONDS = Histogram("tlsmilter_cache_seconds", "Cache operation latency.",
                          ["backend", "op"], buckets=CACHE_BUCKETS, registry=REGISTRY)
ASSESSMENT_AGE = Histogram("tlsmilter_assessment_age_seconds", "Age of the cached assessment "
                           "a lookup served.", buckets=AGE_BUCKETS, registry=REGISTRY)

# probing (prober, engine, worker)
PROBES = Counter("tlsmilter_probes_total", "Assessment steps by check and result.",
                 ["check", "result"], registry=REGISTRY)
PROBE_SECONDS = Histogram("tlsmilter_probe_seconds", "Duration of one assessment step.",
                          ["check"], buckets=PROBE_BUCKETS, registry=REGISTRY)
ASSESSMENTS = Counter("tlsmilter_assessments_total", "Domain assessments finished, by "
                      "resulting level (or unknown).", ["level"], registry=REGISTRY)
ASSESSMENT_SECONDS = Histogram("tlsmilter_assessment_seconds", "Duration of a whole domain "
                               "assessment.", buckets=PROBE_BUCKETS, registry=REGISTRY)
PROBE_QUEUE_LENGTH = Gauge("tlsmilter_probe_queue_length", "Domains waiting to be probed.",
                           registry=REGISTRY)
PROBES_IN_FLIGHT = Gauge("tlsmilter_probes_in_flight", "Domain assessments running now.",
                         registry=REGISTRY)
PROBE_QUEUE_OVERFLOW = Counter("tlsmilter_probe_queue_overflow_total", "Probe requests "
                               "dropped because the queue was full.", registry=REGISTRY)
WORKER_SLOTS = Gauge("tlsmilter_worker_slots", "Probes this worker may run at once.",
                     registry=REGISTRY)
WORKER_SLOTS_BUSY = Gauge("tlsmilter_worker_slots_busy", "Probe slots of this worker in use.",
                          registry=REGISTRY)

# Redis
REDIS_UP = Gauge("tlsmilter_redis_up", "1 while Redis answers, 0 while it is unreachable.",
                 registry=REGISTRY)
REDIS_ERRORS = Counter("tlsmilter_redis_errors_total", "Redis commands that failed.",
                       registry=REGISTRY)
REDIS_OUTAGES = Counter("tlsmilter_redis_outages_total", "Times Redis went from up to down.",
                        registry=REGISTRY)

# policy server
POLICY_LOOKUPS = Counter("tlsmilter_policy_lookups_total", "Postfix TLS policy lookups, by "
                         "the answer given.", ["answer"], registry=REGISTRY)


# --- pre-initialisation ---------------------------------------------------------------------


def _init_messages(sensitivities: Iterable[str]) -> None:
    for sensitivity in sensitivities:
        for action in Action:
            MESSAGES.labels(sensitivity=sensitivity, verdict=action.value)


def init_labels(settings: Config | None = None) -> None:
    """Create every labelled series at zero; with ``settings``, its policy names too.

    Idempotent and cheap: call it from every place that may be first (daemon start, the
    milter's policy set-up, tests).
    """
    from tlsmilter.policyserver import Answer  # imported here: policyserver imports us

    _init_static()
    _init_messages(settings.policies if settings else ())
    for answer in Answer:
        POLICY_LOOKUPS.labels(answer=answer.value)


def _init_static() -> None:
    BUILD_INFO.labels(version=__version__).set(1)
    _init_messages([NOT_SENSITIVE, UNCLASSIFIED])
    for level in RecipientLevel:
        RECIPIENTS.labels(level=level.value)
    for stage in Stage:
        CALLBACK_SECONDS.labels(stage=stage.value)
    for reason in FailSafe:
        FAIL_SAFE.labels(reason=reason.value)
    for code in REFUSAL_REASONS:
        REFUSED_DOMAINS.labels(reason=code)
    for backend in CACHE_BACKENDS:
        for result in CACHE_RESULTS:
            CACHE_REQUESTS.labels(backend=backend, result=result)
        for op in CACHE_OPS:
            CACHE_SECONDS.labels(backend=backend, op=op)
    for check, results in PROBE_RESULTS.items():
        for result in results:
            PROBES.labels(check=check.value, result=result)
    for check in TIMED_CHECKS:
        PROBE_SECONDS.labels(check=check.value)
    for level_value in ASSESSMENT_RESULTS:
        ASSESSMENTS.labels(level=level_value)


# --- helpers for instrumented code ----------------------------------------------------------


def probe(check: Check, result: str) -> None:
    """Count one assessment step; ``result`` must be one of ``PROBE_RESULTS[check]``."""
    PROBES.labels(check=check.value, result=result).inc()


def refused_domain(reason: str) -> None:
    """Count a domain that failed a policy; an unknown ``reason`` counts as ``other``."""
    REFUSED_DOMAINS.labels(reason=reason if reason in _REFUSAL_REASONS else OTHER).inc()


def fail_safe(reason: FailSafe) -> None:
    FAIL_SAFE.labels(reason=reason.value).inc()


def smtp_result(connected: bool, starttls: bool | None, tls_version: str | None) -> SmtpResult:
    """Classify an ``AddressProbe`` by its fields (never by its error text)."""
    if not connected:
        return SmtpResult.CONNECT_FAILED
    if tls_version is not None:
        return SmtpResult.TLS
    if starttls is None:
        return SmtpResult.SMTP_ERROR
    return SmtpResult.TLS_FAILED if starttls else SmtpResult.NO_STARTTLS


# --- the /metrics endpoint ------------------------------------------------------------------


def start_metrics_server(listen: str) -> Callable[[], None] | None:
    """Serve /metrics on ``HOST:PORT`` in a daemon thread; return a function that stops it.

    An empty ``listen`` means no listener (returns None). A port that cannot be bound raises
    ``TlsmilterError`` naming the address.
    """
    if not listen:
        return None
    try:
        host, port = parse_host_port(listen, default_port=0)
    except ValueError as exc:
        raise TlsmilterError(f"metrics listen address {listen}: {exc}") from None
    if not port:
        raise TlsmilterError(f"metrics listen address {listen}: expected HOST:PORT")
    init_labels()
    try:
        server, thread = prometheus_client.start_http_server(port, host, registry=REGISTRY)
    except OSError as exc:
        raise TlsmilterError(f"metrics listen address {listen}: cannot listen: "
                             f"{exc.strerror or exc}") from None
    log.info("serving metrics on http://%s/metrics", listen)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


_init_static()  # the rest once policyserver is importable: see init_labels
