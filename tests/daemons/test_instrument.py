"""tlsmilter.metrics: names, bounded pre-initialised labels, and the /metrics endpoint."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request

import pytest

import tlsmilter
from tlsmilter import config, metrics
from tlsmilter.assess.events import STEP_RESULTS, smtp_result
from tlsmilter.core.delivery import PolicyAnswer
from tlsmilter.daemons import instrument
from tlsmilter.errors import TlsmilterError
from tlsmilter.labels import FailSafe
from tlsmilter.store.base import State

# Label names allowed anywhere: each has a closed set of values. A domain, address, host or
# IP label would be unbounded.
BOUNDED_LABELS = {"version", "sensitivity", "verdict", "level", "stage", "reason", "backend",
                  "result", "op", "check", "answer", "le", "kind"}


def families() -> dict[str, list[tuple[str, dict[str, str]]]]:
    instrument.init_labels(config.Config())
    return {m.name: [(s.name, s.labels) for s in m.samples] for m in metrics.REGISTRY.collect()}


def test_every_tlsmilter_metric_is_prefixed_and_bounded() -> None:
    ours = {name: samples for name, samples in families().items()
            if not name.startswith(("process_", "python_"))}
    assert all(name.startswith("tlsmilter_") for name in ours), sorted(ours)
    for name, samples in ours.items():
        for _sample, labels in samples:
            assert set(labels) <= BOUNDED_LABELS, (name, labels)


def test_contract_metrics_exist_with_every_label_value_at_zero() -> None:
    samples = {(n, tuple(sorted(labels.items()))) for family in families().values()
               for n, labels in family}

    def has(name: str, **labels: str) -> bool:
        return (name, tuple(sorted(labels.items()))) in samples

    for backend in ("memory", "redis"):
        for result in ("hit", "stale", "miss", "error"):
            assert has("tlsmilter_cache_requests_total", backend=backend, result=result)
        for op in ("get", "put"):
            assert has("tlsmilter_cache_seconds_count", backend=backend, op=op)
    for name in ("tlsmilter_assessment_age_seconds_count", "tlsmilter_probe_queue_length",
                 "tlsmilter_probes_in_flight", "tlsmilter_probe_queue_overflow_total",
                 "tlsmilter_worker_slots", "tlsmilter_worker_slots_busy", "tlsmilter_redis_up",
                 "tlsmilter_redis_errors_total", "tlsmilter_redis_outages_total",
                 "tlsmilter_milter_sessions_total", "tlsmilter_eom_wait_seconds_count"):
        assert has(name), name
    assert has("tlsmilter_build_info", version=tlsmilter.__version__)
    for kind in ("require", "deny"):  # an override's kind: the config's two actions
        assert has("tlsmilter_overrides_applied_total", kind=kind)
    assert has("tlsmilter_overrides_expired_total")
    for policy in (*config.Config().policies, "normal"):
        assert has("tlsmilter_messages_total", sensitivity=policy, verdict="reject")
    for answer in PolicyAnswer:
        assert has("tlsmilter_policy_lookups_total", answer=answer.value)
    for level in ("none", "encrypted", "verified", "dane", "unknown", "pending", "local"):
        assert has("tlsmilter_recipients_total", level=level)
    for check, results in STEP_RESULTS.items():
        for result in results:
            assert has("tlsmilter_probes_total", check=check.value, result=result)
    for reason in FailSafe:
        assert has("tlsmilter_fail_safe_total", reason=reason.value)


def test_cache_results_are_the_cache_states_plus_error() -> None:
    assert (*(s.value for s in State), "error") == instrument.CACHE_RESULTS


def test_pre_initialisation_is_idempotent() -> None:
    before = families()
    instrument.init_labels(config.Config())
    assert families() == before


def test_unknown_refusal_reasons_count_as_other() -> None:
    def other() -> float:
        return metrics.REGISTRY.get_sample_value("tlsmilter_refused_domains_total",
                                                 {"reason": "other"}) or 0.0
    before = other()
    instrument.refused_domain("no_starttls")
    instrument.refused_domain("made-up code from elsewhere")
    assert other() == before + 1


@pytest.mark.parametrize(("connected", "starttls", "version", "result"), [
    (False, None, None, "connect_failed"), (True, None, None, "smtp_error"),
    (True, False, None, "no_starttls"), (True, True, None, "tls_failed"),
    (True, True, "TLSv1.3", "tls")])
def test_smtp_probe_results(connected: bool, starttls: bool | None, version: str | None,
                            result: str) -> None:
    assert smtp_result(connected, starttls, version).value == result


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_metrics_server_serves_text_promtool_accepts_and_stops() -> None:
    listen = f"127.0.0.1:{free_loopback_port()}"
    stop = instrument.start_metrics_server(listen)
    assert stop is not None
    try:
        url = f"http://{listen}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        with pytest.raises(TlsmilterError, match=f"metrics listen address {listen}: cannot "
                                                 "listen: Address already in use"):
            instrument.start_metrics_server(listen)
    finally:
        stop()
    with pytest.raises(OSError), urllib.request.urlopen(url, timeout=2):
        pass
    assert "_created" not in text
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: scripts/bootstrap installs Debian's prometheus")
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                             capture_output=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_no_listen_address_means_no_server() -> None:
    assert instrument.start_metrics_server("") is None
