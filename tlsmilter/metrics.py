"""Prometheus metrics: the registry and every metric tlsmilter exports, defined once.

Nothing else lives here: the label vocabularies belong to the code that produces them (and
``tlsmilter.labels`` for the daemons' own), and ``daemons.instrument`` creates every labelled
series at zero when a daemon starts and serves ``/metrics``. No label ever carries an
unbounded value (a domain, an address, an IP): per-domain views belong to ``tlsmilter report``.

docs/metrics.md documents each metric, its labels and the dashboard and alerts built on them.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

# Counters expose only ``_total``: the ``_created`` series doubles every counter for nothing
# a dashboard or alert here uses.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

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
OVERRIDES_APPLIED = Counter("tlsmilter_overrides_applied_total", "Recipient domains of "
                            "sensitive messages a per-domain override applied to, by kind.",
                            ["kind"], registry=REGISTRY)
OVERRIDES_EXPIRED = Counter("tlsmilter_overrides_expired_total", "Per-domain overrides found "
                            "past their expiry date and no longer applied (once per domain "
                            "and process).", registry=REGISTRY)

# cache (instrumented by the cache backends)
CACHE_REQUESTS = Counter("tlsmilter_cache_requests_total", "Cache lookups by backend and "
                         "result.", ["backend", "result"], registry=REGISTRY)
CACHE_SECONDS = Histogram("tlsmilter_cache_seconds", "Cache operation latency.",
                          ["backend", "op"], buckets=CACHE_BUCKETS, registry=REGISTRY)
ASSESSMENT_AGE = Histogram("tlsmilter_assessment_age_seconds", "Age of the cached assessment "
                           "a lookup served.", buckets=AGE_BUCKETS, registry=REGISTRY)

# probing (prober, embedded backend, worker)
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
WARMUP_DROPPED = Counter("tlsmilter_warmup_dropped_total", "Warm-up probes RCPT did not start "
                         "because a message's or a client's budget was spent.", ["reason"],
                         registry=REGISTRY)
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
REDIS_BREAKER_OPEN = Gauge("tlsmilter_redis_breaker_open", "1 while the circuit breaker of "
                           "this process's Redis connection is open: commands fail at once "
                           "until the recovery probe gets an answer.", registry=REGISTRY)
REDIS_SHORT_CIRCUITED = Counter("tlsmilter_redis_short_circuited_total", "Redis commands "
                                "failed at once by the open circuit breaker, without waiting "
                                "on Redis.", registry=REGISTRY)

# policy server
POLICY_LOOKUPS = Counter("tlsmilter_policy_lookups_total", "Postfix TLS policy lookups, by "
                         "the answer given.", ["answer"], registry=REGISTRY)

# proof --follow
PROOF_DELIVERIES = Counter("tlsmilter_proof_deliveries_total", "Sensitive deliveries Postfix "
                           "logged as sent, by the level their TLS proves (none: in clear) and "
                           "what proof found.", ["level", "result"], registry=REGISTRY)
