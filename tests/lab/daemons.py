"""tlsmilter's own daemons (``serve``, ``worker``, ``policy-server``) as lab processes.

Each runs ``python -m tlsmilter.cli`` in a subprocess with a config file written for the lab
(resolver, CA, short timeouts) and its output in a log file, so tests can read the decision
lines and what the daemon said about Redis.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from tests.lab.lab import Lab
from tests.lab.service import stop_process


class Stoppable(Protocol):
    def stop(self) -> None: ...


START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
PROBER_EHLO = "prober.lab.invalid"  # how lab SMTP servers tell probes from deliveries


def write_config(path: Path, lab: Lab, sockets: Path, *, redis_url: str | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """A config for the lab: sockets in ``sockets``, Redis backend when ``redis_url``.

    ``overrides`` are merged table by table, e.g. ``{"prober.timeouts": {"domain": 2.0}}``.
    """
    tables: dict[str, dict[str, Any]] = {
        "milter": {"socket": f"unix:{sockets / 'milter.sock'}", "socket_mode": "0666",
                   "eom_wait": 1.0},
        "policy_server": {"socket": f"unix:{sockets / 'policy.sock'}", "metrics_listen": ""},
        "metrics": {"listen": ""},
        "worker": {"metrics_listen": ""},
        "prober": {"resolver": lab.resolver, "ca_file": str(lab.ca.ca_file),
                   "ehlo_name": PROBER_EHLO},
        "prober.timeouts": {"connect": 3.0, "smtp": 3.0, "tls": 3.0, "https": 3.0,
                            "domain": 10.0},
        "log": {"level": "debug"},
        # Each run starts with an empty cache (tests/daemons/test_restart.py sets a directory).
        "cache": {"state_dir": ""},
    }
    if redis_url:
        tables["cache"] = {"backend": "redis"}
        tables["redis"] = {"url": redis_url}
    for table, values in (overrides or {}).items():
        tables.setdefault(table, {}).update(values)
    # JSON spells strings, numbers, booleans and lists of them as TOML does.
    path.write_text("".join(
        f"[{table}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in
                                  values.items())
        for table, values in tables.items()))
    return path


class Daemon:
    """One ``tlsmilter COMMAND`` process; ``ready()`` says when it serves."""

    def __init__(self, command: list[str], config: Path, log: Path,
                 ready: Callable[[Daemon], bool] = lambda _daemon: True) -> None:
        self.command = command
        self.config = config
        self.log = log
        self.ready = ready
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def pid(self) -> int:
        assert self.process is not None, "not running"
        return self.process.pid

    def start(self) -> None:
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tlsmilter.cli", "--config", str(self.config),
                 *self.command], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready(self):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tlsmilter {' '.join(self.command)} did not start:\n"
                                   f"{self.text()[-3000:]}")
            time.sleep(0.05)

    def terminate(self) -> None:
        """Send SIGTERM without waiting (stop several daemons at once, then ``stop()``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def stop(self) -> None:
        """SIGTERM; the daemon must exit 0 (a clean drain), else the test fails."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        assert stop_process(process, STOP_TIMEOUT) == 0, self.text()[-3000:]

    def kill(self) -> None:
        """SIGKILL: the daemon dies mid-work, as in a crash."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def said(self, words: str) -> bool:
        """Whether the current run (not an earlier one) logged ``words``."""
        if not self.log.exists():
            return False
        with self.log.open("rb") as log:
            log.seek(self._log_start)
            return words.encode() in log.read()

    def decisions(self) -> list[str]:
        return [line for line in self.text().splitlines() if " decision " in line]


def serve(config: Path, log: Path) -> Daemon:
    # The socket mode is fixed right after libmilter creates the file, then it logs this.
    return Daemon(["serve"], config, log, lambda d: d.said("milter listening"))


def policy_server(config: Path, log: Path) -> Daemon:
    return Daemon(["policy-server"], config, log, lambda d: d.said("policy server on "))


def worker(config: Path, log: Path) -> Daemon:
    return Daemon(["worker"], config, log, lambda d: d.said("worker "))


def stop_all(things: Iterable[Stoppable]) -> None:
    """Stop every one (daemons first signalled together, since serve takes seconds); a
    failure to stop one cleanly is raised only after all the others were stopped too."""
    things = list(things)
    for thing in things:
        if isinstance(thing, Daemon):
            thing.terminate()
    failure: BaseException | None = None
    for thing in things:
        try:
            thing.stop()
        except BaseException as exc:  # re-raised below, after the rest
            failure = failure or exc
    if failure is not None:
        raise failure
