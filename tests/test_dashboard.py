"""contrib/grafana/tlsmilter.json: sound as a Grafana dashboard, and every panel's PromQL runs.

The structural tests read the JSON. The lab tests run the whole thing for real: a lab Postfix
with two milters (``serve`` on the embedded cache, and ``serve`` on Redis with a ``worker``
and a standalone ``policy-server``), lab traffic through it including a Redis outage, and
Debian's Prometheus scraping all four daemons every second with alerts.yml loaded. Each panel
query is then run over the test's time range as Grafana would (variables set to All).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import shutil
import smtplib
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tlsmilter
from tests.conftest import world_searchable_dir
from tests.daemons.test_e2e import CONTRIB, contrib_main, contrib_master
from tests.lab import daemons, mail
from tests.lab.daemons import Daemon
from tests.lab.lab import Lab
from tests.lab.postfix import LabPostfix
from tests.lab.prometheus import LabPrometheus
from tests.lab.redis_server import LabRedis, free_port
from tlsmilter import metrics
from tlsmilter.daemons import instrument
from tlsmilter.daemons.policy_server import HEALTH_EVERY

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "contrib" / "grafana" / "tlsmilter.json"
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"

SCRAPE = 1.0
RATE_INTERVAL = "4s"  # Grafana's $__rate_interval at a 1 s step: 4 x the scrape interval
JOBS = ("tlsmilter", "tlsmilter-worker", "tlsmilter-policy")

# Panels whose queries must show a value above zero at some point of the lab run. Every other
# panel must return data (series, possibly all zero or NaN). The lab cannot make the probe
# queue back up, nor keep milter sessions open while Prometheus looks, nor drop requests.
NONZERO = {
    "Daemons up", "Version", "Milter sessions/s", "Message rate by verdict",
    "Verdict mix of sensitive mail", "Sensitive messages by policy",
    "Sensitive mail refused, by verdict", "Refused recipient domains, by reason",
    "Level mix of recipients", "Recipients by level", "Callback latency p50/p95/p99 by stage",
    "End-of-message wait p50/p95/p99", "Cache hit ratio", "Cache lookups by result",
    "Cache latency p50/p95/p99", "Redis up", "Redis errors and outages",
    "Assessment freshness: age when served", "Assessments by level", "Probe step outcomes",
    "Assessment and probe duration p95", "Fail-safe activations", "Policy-server answers",
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


# --- structure ------------------------------------------------------------------------------


def test_dashboard_has_what_grafana_requires() -> None:
    board = dashboard()
    assert isinstance(board["title"], str) and board["title"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"])
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert isinstance(board["version"], int)
    assert {"from", "to"} <= set(board["time"])
    assert isinstance(board["annotations"]["list"], list)
    ids = [p["id"] for p in board["panels"]]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        assert p["type"] in {"row", "timeseries", "stat", "piechart"}, p["type"]
        assert p["title"]
        pos = p["gridPos"]
        assert all(isinstance(pos[k], int) for k in "hwxy")
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            assert p["panels"] == [] and p["collapsed"] is False
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        assert all(t["expr"] and t["datasource"] == p["datasource"] for t in p["targets"])
        assert isinstance(p["fieldConfig"]["defaults"], dict)
        assert isinstance(p["options"], dict)


def test_variables_select_datasource_job_and_instance() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert set(variables) == {"datasource", "job", "instance"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        var = variables[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"]
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert var["query"]["query"] == var["definition"]
        # "All" must mean every value the query found (tlsmilter's jobs), not ".*": that
        # would pull every other job in Prometheus into up{job=~"$job"}.
        assert "allValue" not in var
    assert "$job" in variables["instance"]["definition"]


def test_every_selector_is_filtered_by_job_and_instance() -> None:
    for expr in exprs():
        selectors = re.findall(r"\b([a-z_]+)\{([^}]*)\}", expr)
        assert selectors, expr
        for name, labels in selectors:
            assert 'job=~"$job"' in labels and 'instance=~"$instance"' in labels, (name, expr)


def test_every_rate_uses_the_rate_interval() -> None:
    for expr in exprs():
        ranges = re.findall(r"\[([^\]]+)\]", expr)
        assert all(r == "$__rate_interval" for r in ranges), expr
        functions = re.findall(r"\b(rate|irate|increase|deriv|delta)\(", expr)
        assert len(functions) == len(ranges), expr


def test_every_metric_the_dashboard_uses_exists() -> None:
    exported = {"up"}  # Prometheus's own, per target
    instrument.init_labels()
    for metric in metrics.REGISTRY.collect():
        exported.update(sample.name for sample in metric.samples)
    used = {name for expr in [*exprs(), *(v.get("definition", "") for v in
                                           dashboard()["templating"]["list"])]
            for name in re.findall(r"\b([a-z_]+)\{", expr)}
    assert used and used <= exported, used - exported


def test_panel_expectations_name_real_panels() -> None:
    titles = {p["title"] for p in panels()}
    assert not NONZERO - titles


# --- the lab run ----------------------------------------------------------------------------


@dataclass
class Observed:
    prometheus: LabPrometheus
    postfix: LabPostfix
    daemons: dict[str, Daemon]
    metrics_urls: dict[str, str]  # daemon name -> http://HOST:PORT/metrics
    started: float
    ended: float


def daemon(command: str, config: Path, log: Path, listen: str, ready: str) -> Daemon:
    return Daemon([command, "--metrics-listen", listen], config, log,
                  lambda d: d.said(ready))


def send(postfix: LabPostfix, to: str, sensitivity: str | None) -> int:
    """Submit one message; the SMTP reply code (250 when queued)."""
    headers = {"X-Sensitivity": sensitivity} if sensitivity else {}
    try:
        mail.submit(postfix.submit, mail.message(to, f"metrics {to}", headers))
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    return 250


def traffic(lab: Lab, postfix: LabPostfix, redis: LabRedis) -> None:
    secure, weak = ["dnssec-ca", "sts-enforce", "dane-ee"], ["plain", "tls10", "self-signed"]
    # Not sensitive: accepted at once; every RCPT misses the cache and starts a probe.
    for name in [*secure, *weak]:
        assert send(postfix, f"n@{lab.domain(name)}", None) == 250
    # Sensitive to a domain nobody asked for yet, whose second MX hangs: waits out eom_wait
    # (1 s) at end-of-message, then is tempfailed as not assessed.
    assert send(postfix, f"w@{lab.domain('hang-second')}", "private") == 451
    time.sleep(2)  # the probes finish (the lab answers fast)
    for name in secure:
        assert send(postfix, f"s@{lab.domain(name)}", "private") == 250
    for name in weak:
        assert send(postfix, f"s@{lab.domain(name)}", "private") == 550
    # Delivery of accepted sensitive mail asks the policy server.
    deadline = time.monotonic() + 30
    while not re.search(r"postfix/tlsmilter-(secure|verified|dane)/smtp", postfix.maillog()):
        assert time.monotonic() < deadline, postfix.maillog()[-3000:]
        time.sleep(0.2)
    # Redis goes away: the Redis milter fails safe, sensitive mail is tempfailed.
    redis.stop()
    try:
        assert send(postfix, f"r@{lab.domain('dnssec-ca')}", "private") == 451
        time.sleep(HEALTH_EVERY + 1)  # long enough for the idle policy server to notice
    finally:
        redis.start()


@pytest.fixture(scope="module")
def observed(lab: Lab) -> Iterator[Observed]:
    workdir = world_searchable_dir("tlsmilter-metrics-")
    host = f"{lab.base}.0.50"
    header_checks = workdir / "tlsmilter_header_checks"
    shutil.copy(CONTRIB / "tlsmilter_header_checks", header_checks)
    main = contrib_main(header_checks)
    # Two milters in turn: the embedded cache's, then the Redis one (whose policy server is
    # the one at tlsmilter/policy.sock that contrib's master.cf asks).
    options = main["smtpd_milters"].strip().strip("{}").split(",", 1)[1]
    main["smtpd_milters"] = ", ".join(f"{{ unix:{d}/milter.sock,{options} }}"
                                      for d in ("tlsmilter-memory", "tlsmilter"))
    postfix = LabPostfix(workdir / "postfix", listen=f"{lab.base}.0.51",
                         resolver=lab.dns.resolver[0], ca_file=lab.ca.ca_file,
                         extra_main=main, extra_master=contrib_master())
    redis = LabRedis(workdir / "redis", host=f"{lab.base}.0.52")
    listen = {name: f"{host}:{free_port(host)}" for name in ("memory", "redis", "worker",
                                                                "policy")}
    configs = {}
    for name, sockets, url in (("memory", "tlsmilter-memory", None),
                               ("redis", "tlsmilter", redis.url)):
        directory = postfix.queue_dir / sockets
        directory.mkdir(parents=True, mode=0o755)
        configs[name] = daemons.write_config(workdir / f"{name}.toml", lab, directory,
                                             redis_url=url)
    running = {
        "memory": daemon("serve", configs["memory"], workdir / "memory.log", listen["memory"],
                         "milter listening"),
        "worker": daemon("worker", configs["redis"], workdir / "worker.log", listen["worker"],
                         "worker "),
        "policy": daemon("policy-server", configs["redis"], workdir / "policy.log",
                         listen["policy"], "policy server on "),
        "redis": daemon("serve", configs["redis"], workdir / "redis.log", listen["redis"],
                        "milter listening"),
    }
    prometheus = LabPrometheus(workdir / "prometheus", f"{lab.base}.0.53", {
        "tlsmilter": [listen["memory"], listen["redis"]],
        "tlsmilter-worker": [listen["worker"]],
        "tlsmilter-policy": [listen["policy"]],
    }, scrape_interval=SCRAPE, rule_files=[ALERTS])
    started: list[Daemon] = []
    try:
        redis.start()
        for one in running.values():
            one.start()
            started.append(one)
        postfix.start()
        prometheus.start()
        # Every counter is scraped at zero before traffic, so rates see the increase.
        prometheus.wait_for('count(up{job=~"tlsmilter.*"} == 1) == 4')
        begin = time.time()
        traffic(lab, postfix, redis)
        time.sleep(3 * SCRAPE)  # scraped after the last message, and alerts evaluated
        yield Observed(prometheus, postfix, running,
                       {name: f"http://{address}/metrics" for name, address in listen.items()},
                       begin - 2, time.time())
    finally:
        prometheus.stop()
        postfix.stop()
        # In parallel: libmilter takes seconds to notice a stop, and each must exit 0.
        with concurrent.futures.ThreadPoolExecutor(len(running)) as pool:
            for stopped in [pool.submit(one.stop) for one in started]:
                stopped.result()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def substitute(expr: str) -> str:
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace('"$job"', '".*"')
            .replace('"$instance"', '".*"'))


@pytest.mark.lab
def test_every_panel_query_runs_and_shows_data(observed: Observed) -> None:
    empty, zero = [], []
    for panel in panels():
        values: list[float] = []
        for target in panel["targets"]:
            # An error raises PromQLError, naming the query.
            result = observed.prometheus.query_range(substitute(target["expr"]),
                                                     observed.started, observed.ended, SCRAPE)
            mine = [float(v) for series in result for _t, v in series["values"]]
            if all(math.isnan(v) for v in mine):  # nothing, or quantiles of nothing
                empty.append(f"{panel['title']}: {target.get('legendFormat', target['expr'])}")
            values += mine
        if panel["title"] in NONZERO and not any(v > 0 for v in values):
            zero.append(panel["title"])
    assert not empty and not zero, f"no data: {empty}; never above zero: {zero}"


@pytest.mark.lab
def test_variables_list_every_job_and_instance(observed: Observed) -> None:
    jobs = observed.prometheus.api("label/job/values", **{"match[]": "tlsmilter_build_info"})
    assert sorted(jobs) == sorted(JOBS)
    instances = observed.prometheus.api("label/instance/values",
                                        **{"match[]": 'tlsmilter_build_info{job=~"tlsmilter"}'})
    assert len(instances) == 2


@pytest.mark.lab
def test_every_daemon_serves_metrics_that_promtool_accepts(observed: Observed) -> None:
    for name, url in observed.metrics_urls.items():
        with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310  # http
            text = reply.read().decode()
        assert f'tlsmilter_build_info{{version="{tlsmilter.__version__}"}} 1.0' in text, name
        assert re.search(r"^process_resident_memory_bytes ", text, re.MULTILINE), name
        for line in text.splitlines():  # no label ever carries a domain or an address
            assert ".test" not in line and "127." not in line, (name, line)
        checked = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                                 capture_output=True, timeout=30, check=False)
        assert checked.returncode == 0, (name, checked.stdout + checked.stderr)


@pytest.mark.lab
def test_every_redis_daemon_sees_redis_back_without_traffic(observed: Observed) -> None:
    # Redis came back at the end of the traffic; no lookup has been made since.
    for name in ("redis", "worker", "policy"):
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(observed.metrics_urls[name], timeout=5) as reply:  # noqa: S310
                text = reply.read().decode()
            outages = re.search(r"^tlsmilter_redis_outages_total (\S+)$", text, re.MULTILINE)
            assert outages and float(outages.group(1)) >= 1, name  # it did see the outage
            if re.search(r"^tlsmilter_redis_up 1\.0$", text, re.MULTILINE):
                break
            assert time.monotonic() < deadline, f"{name} still reports Redis down"
            time.sleep(0.5)


@pytest.mark.lab
def test_alert_rules_load_and_the_outage_fired_the_fail_safe_alert(observed: Observed) -> None:
    groups = observed.prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(re.findall(r"- alert:", ALERTS.read_text()))
    assert all(rule["health"] == "ok" for rule in rules), rules
    firing = {(a["labels"]["alertname"], a["labels"].get("reason"))
              for a in observed.prometheus.api("alerts")["alerts"]}
    assert ("TlsmilterFailSafe", "cache_unavailable") in firing
    assert ("TlsmilterRedisErrors", None) in firing
    assert not {name for name, _ in firing} & {"TlsmilterDown", "TlsmilterHighRefusalRate"}
