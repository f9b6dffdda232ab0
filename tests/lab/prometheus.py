"""A private Prometheus server for the lab.

``LabPrometheus`` runs Debian's ``prometheus`` in the foreground as a child of the test
process, on one loopback address, with its own config, data directory and log under the work
directory, scraping the given targets at a short interval. Tests query it over its HTTP API,
as Grafana does; ``stop`` ends it by its PID.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.lab.redis_server import free_port
from tests.lab.service import LabError, Service, stop_process

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class PromQLError(LabError):
    """Prometheus refused a query; the message carries its error."""


class LabPrometheus(Service):
    """``prometheus`` on ``host``, scraping ``jobs`` (job name -> ``HOST:PORT`` targets)."""

    def __init__(self, workdir: Path, host: str, jobs: Mapping[str, Sequence[str]], *,
                 scrape_interval: float = 1.0, rule_files: Sequence[Path] = ()) -> None:
        self.workdir = workdir
        self.host = host
        self.port = free_port(host)
        self.jobs = jobs
        self.scrape_interval = scrape_interval
        self.rule_files = rule_files
        self.log_file = workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        if self._proc is not None:
            raise LabError("Prometheus is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        every = f"{round(self.scrape_interval * 1000)}ms"
        # JSON is YAML: no YAML library needed to write the config.
        config.write_text(json.dumps({
            "global": {"scrape_interval": every, "scrape_timeout": every,
                       "evaluation_interval": every},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}
                               for job, targets in self.jobs.items()],
        }, indent=1))
        argv = ["prometheus", f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={self.host}:{self.port}", "--log.level=warn"]
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise LabError(f"prometheus exited with status {self._proc.returncode}:\n"
                               f"{self.log_tail()}")
            try:
                ready = f"{self.url}/-/ready"
                with urllib.request.urlopen(ready, timeout=1) as reply:  # noqa: S310  # http
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise LabError(f"Prometheus on {self.url} not ready in {START_TIMEOUT:.0f} s:\n"
                       f"{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-20:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after a bound; idempotent."""
        proc, self._proc = self._proc, None
        stop_process(proc, STOP_TIMEOUT)

    # -- the HTTP API ---------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``; the ``data`` of a success, else ``PromQLError``."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310  # http
                body = json.load(reply)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with a JSON error body
            body = json.load(exc)
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector result of ``expr`` now."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float,
                    step: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{step}")
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll until ``expr`` has a non-empty result; return it."""
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)):
            if time.monotonic() > deadline:
                raise LabError(f"{expr!r} still empty after {timeout:.0f} s")
            time.sleep(self.scrape_interval / 2)
        return result
