"""Metrics for the daemons: every labelled series at zero, probe reports, ``/metrics``.

Each daemon calls ``init_labels`` once at start: every label value a series can take is
created then, so a rate over a series that has never moved is 0, not "no data". The label
vocabularies come from their owners (``tlsmilter.labels``, ``assess.events``, the core).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import prometheus_client

from tlsmilter import __version__, config, metrics
from tlsmilter.assess.events import STEP_RESULTS, TIMED_STEPS, ProbeStep
from tlsmilter.assess.model import Code
from tlsmilter.commands.proof import ProofResult
from tlsmilter.core.delivery import PolicyAnswer
from tlsmilter.core.levels import UNKNOWN, Level
from tlsmilter.core.overrides import Kind as OverrideKind
from tlsmilter.core.reasons import MILTER_REASONS, OTHER
from tlsmilter.core.verdict import Action
from tlsmilter.errors import TlsmilterError
from tlsmilter.labels import (
    CACHE_BACKENDS,
    CACHE_ERROR,
    CACHE_OPS,
    NOT_SENSITIVE,
    UNCLASSIFIED,
    FailSafe,
    RecipientLevel,
    Stage,
)
from tlsmilter.store.base import State
from tlsmilter.store.scheduling import WARMUP_BUDGETS

log = logging.getLogger(__name__)

# Why a recipient domain failed a policy: an assessment's problem code, or the milter's own.
REFUSAL_REASONS = (*(c.value for c in Code), *MILTER_REASONS, UNKNOWN, OTHER)
_REFUSAL_REASONS = frozenset(REFUSAL_REASONS)
ASSESSMENT_RESULTS = (*(level.value for level in Level), UNKNOWN)
CACHE_RESULTS = (*(state.value for state in State), CACHE_ERROR)


def init_labels(settings: config.Config | None = None) -> None:
    """Create every labelled series at zero; with ``settings``, its policy names too.

    Idempotent: creating a labelled child that exists returns the existing one.
    """
    metrics.BUILD_INFO.labels(version=__version__).set(1)
    _init_messages([NOT_SENSITIVE, UNCLASSIFIED, *(settings.policies if settings else ())])
    for level in RecipientLevel:
        metrics.RECIPIENTS.labels(level=level.value)
    for stage in Stage:
        metrics.CALLBACK_SECONDS.labels(stage=stage.value)
    for budget in WARMUP_BUDGETS:
        metrics.WARMUP_DROPPED.labels(reason=budget)
    for reason in FailSafe:
        metrics.FAIL_SAFE.labels(reason=reason.value)
    for code in REFUSAL_REASONS:
        metrics.REFUSED_DOMAINS.labels(reason=code)
    for kind in OverrideKind:
        metrics.OVERRIDES_APPLIED.labels(kind=kind.value)
    for backend in CACHE_BACKENDS:
        for result in CACHE_RESULTS:
            metrics.CACHE_REQUESTS.labels(backend=backend, result=result)
        for op in CACHE_OPS:
            metrics.CACHE_SECONDS.labels(backend=backend, op=op)
    for step, results in STEP_RESULTS.items():
        for result in results:
            metrics.PROBES.labels(check=step.value, result=result)
    for step in TIMED_STEPS:
        metrics.PROBE_SECONDS.labels(check=step.value)
    for level_value in ASSESSMENT_RESULTS:
        metrics.ASSESSMENTS.labels(level=level_value)
    for answer in PolicyAnswer:
        metrics.POLICY_LOOKUPS.labels(answer=answer.value)
    for delivered in Level:
        for found in ProofResult:
            metrics.PROOF_DELIVERIES.labels(level=delivered.value, result=found.value)


def _init_messages(sensitivities: Iterable[str]) -> None:
    for sensitivity in sensitivities:
        for action in Action:
            metrics.MESSAGES.labels(sensitivity=sensitivity, verdict=action.value)


def refused_domain(reason: str) -> None:
    """Count a domain that failed a policy; an unknown ``reason`` counts as ``other``."""
    metrics.REFUSED_DOMAINS.labels(reason=reason if reason in _REFUSAL_REASONS else OTHER).inc()


def fail_safe(reason: FailSafe) -> None:
    metrics.FAIL_SAFE.labels(reason=reason.value).inc()


class ProbeMetrics:
    """The prober's ``ProbeObserver`` in the daemons: counts steps and assessments."""

    def step(self, step: ProbeStep, result: str) -> None:
        metrics.PROBES.labels(check=step.value, result=result).inc()

    def step_seconds(self, step: ProbeStep, seconds: float) -> None:
        metrics.PROBE_SECONDS.labels(check=step.value).observe(seconds)

    def assessed(self, level: str, seconds: float) -> None:
        metrics.ASSESSMENTS.labels(level=level).inc()
        metrics.ASSESSMENT_SECONDS.observe(seconds)


def start_metrics_server(listen: str) -> Callable[[], None] | None:
    """Serve /metrics on ``HOST:PORT`` in a daemon thread; return a function that stops it.

    An empty ``listen`` means no listener (returns None). A port that cannot be bound raises
    ``TlsmilterError`` naming the address.
    """
    if not listen:
        return None
    try:
        host, port = config.parse_host_port(listen, default_port=0)
    except ValueError as exc:
        raise TlsmilterError(f"metrics listen address {listen}: {exc}") from None
    if not port:
        raise TlsmilterError(f"metrics listen address {listen}: expected HOST:PORT")
    try:
        server, thread = prometheus_client.start_http_server(port, host,
                                                             registry=metrics.REGISTRY)
    except OSError as exc:
        raise TlsmilterError(f"metrics listen address {listen}: cannot listen: "
                             f"{exc.strerror or exc}") from None
    log.info("serving metrics on http://%s/metrics", listen)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
