"""A private, throwaway Postfix instance for the lab.

``LabPostfix`` writes its own ``main.cf`` and ``master.cf`` under a work directory (never
touching ``/etc/postfix``), keeps its queue and data directories there too, and starts the
Postfix master inside a private mount namespace in which ``/etc/resolv.conf`` is a bind mount
of a lab file. Postfix resolves MX/A/TLSA records through glibc's stub resolver, which only
reads ``/etc/resolv.conf``; the namespace gives this instance the lab resolver while the
machine's own resolver configuration stays untouched.

glibc (2.31 and later) strips the AD bit from answers unless ``options trust-ad`` is set or
the program asks with ``RES_TRUSTAD``. Postfix 3.7 asks by itself whenever it does DNSSEC
lookups (a lab resolv.conf without trust-ad still gets DNSSEC-validated answers through), so
the option in the lab file is for any other glibc consumer in the namespace and as a
statement of intent: the lab resolver is trusted.

Layout of the work directory:

* ``etc/``: ``config_directory`` (``main.cf``, ``master.cf``);
* ``spool/``: ``queue_directory``; ``spool/pid/master.pid`` names the master process;
* ``data/``: ``data_directory``;
* ``resolv.conf``: what the instance sees as ``/etc/resolv.conf``;
* ``maillog``: every Postfix log line (``maillog_file`` via the ``postlog`` service).

Unprivileged Postfix daemons open some files by absolute path (the data directory, and later
milter and socketmap sockets the lab puts in the work directory), so the work directory and
all its ancestors must be searchable by the ``postfix`` user: a directory under ``/tmp``
works, pytest's own ``tmp_path`` (under a mode-0700 directory) does not.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.lab.service import LabError, Service

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
MYHOSTNAME = "postfix.lab.invalid"

# contrib's tlsmilter-secure sets tls_required_enable=no (see contrib/postfix/master.cf.snippet),
# a parameter Postfix knows from 3.10 on; older versions' postconf calls it unused.
NEW_IN_3_10 = re.compile(r"^\S*postconf: warning: \S+master\.cf: "
                         r"unused parameter: tls_required_enable=no$")


@functools.cache
def postfix_version() -> tuple[int, ...]:
    """The installed Postfix's version, e.g. (3, 7, 11)."""
    done = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                          text=True, check=True, timeout=COMMAND_TIMEOUT)
    return tuple(int(part) for part in re.findall(r"\d+", done.stdout)[:3])


def postconf_warnings(stderr: str) -> str:
    """postconf's ``stderr`` less the one warning expected before Postfix 3.10."""
    expected = postfix_version() < (3, 10)
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not (expected and NEW_IN_3_10.match(line.strip())))


START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0

# Every service with chroot "n": nothing needs a copy of resolv.conf, certificates or sockets
# inside the queue directory. Columns: service type private unpriv chroot wakeup maxproc command.
MASTER_SERVICES = (
    "pickup    unix       n - n 60    1 pickup",
    "cleanup   unix       n - n -     0 cleanup",
    "qmgr      unix       n - n 300   1 qmgr",
    "tlsmgr    unix       - - n 1000? 1 tlsmgr",
    "rewrite   unix       - - n -     - trivial-rewrite",
    "bounce    unix       - - n -     0 bounce",
    "defer     unix       - - n -     0 bounce",
    "trace     unix       - - n -     0 bounce",
    "verify    unix       - - n -     1 verify",
    "flush     unix       n - n 1000? 0 flush",
    "proxymap  unix       - - n -     - proxymap",
    "smtp      unix       - - n -     - smtp",
    "relay     unix       - - n -     - smtp",
    "showq     unix       n - n -     - showq",
    "error     unix       - - n -     - error",
    "retry     unix       - - n -     - error",
    "discard   unix       - - n -     - discard",
    "local     unix       - n n -     - local",
    "virtual   unix       - n n -     - virtual",
    "lmtp      unix       - - n -     - lmtp",
    "anvil     unix       - - n -     1 anvil",
    "scache    unix       - - n -     1 scache",
    # Postfix refuses to start with maillog_file set and no postlog service.
    "postlog   unix-dgram n - n -     1 postlogd",
)


def process_start(pid: int) -> int | None:
    """Return the start time (clock ticks since boot) of the running process ``pid``, or None.

    A zombie, or a process past the point of no return in exit, counts as gone: the lab's
    daemons are reparented to PID 1 when the master exits, and PID 1 here may take a while to
    reap them. The start time tells a process from a later one that reuses its PID.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The fields follow the command name, which is in parentheses and may contain anything:
    # state is the first of them, starttime (field 22 of stat) the 20th.
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X", "x"):
        return None
    return int(fields[19])


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Tell whether ``pid`` is a running process (the same one, if ``started`` is given)."""
    now = process_start(pid)
    return now is not None and (started is None or now == started)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


class LabPostfix(Service):
    """A Postfix instance listening on one loopback address, relaying to the lab's DNS.

    ``resolver`` is the address of the DNS resolver (port 53) the instance uses. None means no
    DNS: lookups go to port 53 of the listen address, where nothing listens, so they fail at
    once and never leave the loopback lab.

    ``extra_main`` overrides or adds ``main.cf`` parameters (milters, policy maps, queue
    lifetimes, TLS levels); ``extra_master`` appends ``master.cf`` lines, e.g. a dedicated
    transport with ``-o`` overrides on continuation lines starting with whitespace.

    The configuration is written by the constructor, so ``postconf()`` also works before
    ``start()``.
    """

    def __init__(
        self,
        workdir: Path,
        listen: str,
        port: int = 25,
        resolver: str | None = None,
        ca_file: Path | None = None,
        extra_main: dict[str, str] | None = None,
        extra_master: list[str] | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.listen = listen
        self.port = port
        self.resolver = resolver if resolver is not None else listen
        self.ca_file = ca_file
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.workdir / "data"
        self.resolv_conf = self.workdir / "resolv.conf"
        self.maillog_file = self.workdir / "maillog"
        self._seen: dict[int, int] = {}  # every process pids() found: PID -> start time
        self._write_config(extra_main or {}, extra_master or [])
        daemon_dir = self._run("postconf", "-c", str(self.config_dir), "-h", "daemon_directory")
        self.daemon_dir = Path(daemon_dir.stdout.strip())

    @property
    def submit(self) -> tuple[str, int]:
        """Where to connect to hand mail to this instance (smtplib host and port)."""
        return self.listen, self.port

    # -- configuration -------------------------------------------------------------------

    def main_cf_defaults(self) -> dict[str, str]:
        """Return the lab's ``main.cf`` parameters before ``extra_main`` is applied."""
        params = {
            "compatibility_level": "3.6",
            # Our own name, fixed, so Postfix never looks the machine's name up in DNS.
            "myhostname": MYHOSTNAME,
            "mydomain": "lab.invalid",
            "myorigin": "$myhostname",
            # Only our own name is local, and local mail is thrown away: DSNs and postmaster
            # notices for senders @$myhostname vanish instead of queueing for a relay that
            # does not exist. Every other domain is relayed to its MX.
            "mydestination": "$myhostname, localhost",
            "local_transport": "discard:lab-local-sink",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "relayhost": "",
            # Postfix refuses an inet_interfaces address that is not configured on an
            # interface, and 127.N.0.x is only routed to lo, not assigned to it. smtpd binds
            # the lab address through its master.cf entry; "loopback-only" just keeps every
            # other address out of what Postfix considers its own.
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_banner": "$myhostname ESMTP tlsmilter-lab",
            "smtputf8_enable": "yes",
            "biff": "no",
            "append_dot_mydomain": "no",
            # Tests submit bursts of mail; do not slow smtpd down on errors or queue load.
            "smtpd_error_sleep_time": "0s",
            "in_flow_delay": "0s",
            # Look MX/A/TLSA records up in DNS with the DO bit and trust the resolver's AD bit,
            # so DANE is possible wherever a TLS policy asks for it.
            "smtp_host_lookup": "dns",
            "smtp_dns_support_level": "dnssec",
            "smtp_address_preference": "ipv4",
            "smtp_tls_security_level": "may",
            "smtp_tls_loglevel": "1",
            "smtp_connect_timeout": "5s",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog_file),
            # Postfix only logs to files under these prefixes (default /var and /dev/stdout).
            "maillog_file_prefixes": str(self.workdir),
            # Deferred mail is retried every few seconds, so tests see retries happen.
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "maximal_queue_lifetime": "1h",
            "bounce_queue_lifetime": "1h",
        }
        if self.ca_file is not None:
            params["smtp_tls_CAfile"] = str(self.ca_file)
        return params

    def master_cf_lines(self) -> list[str]:
        """Return the lab's ``master.cf`` lines before ``extra_master`` is appended."""
        return [
            f"{self.listen}:{self.port} inet n - n - - smtpd",
            *MASTER_SERVICES,
        ]

    def _write_config(self, extra_main: dict[str, str], extra_master: list[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_reachable()
        self.workdir.chmod(0o755)
        self.config_dir.mkdir(mode=0o755, exist_ok=True)
        # postfix-script cds into the queue directory before doing anything, even "check";
        # "post-install create-missing" (run by check and start) makes its subdirectories and
        # the data directory with the owners and modes Postfix insists on.
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        params = self.main_cf_defaults() | extra_main
        main_cf = "".join(f"{name} = {value}\n" for name, value in params.items())
        (self.config_dir / "main.cf").write_text(main_cf)
        self._backdate_main_cf()
        master_cf = "\n".join([*self.master_cf_lines(), *extra_master]) + "\n"
        (self.config_dir / "master.cf").write_text(master_cf)
        self.resolv_conf.write_text(
            "# tlsmilter lab: bind-mounted over /etc/resolv.conf in Postfix's mount namespace\n"
            f"nameserver {self.resolver}\n"
            # A resolver that does not answer costs 2 x 2 s per lookup, not glibc's 2 x 5 s.
            "options trust-ad timeout:2 attempts:2\n"
        )
        # The file keeps its own mode when bind-mounted; unprivileged smtp processes read it.
        self.resolv_conf.chmod(0o644)

    def _backdate_main_cf(self) -> None:
        """Make ``main.cf`` look old, so Postfix reads it without waiting.

        Every Postfix program rereads a main.cf changed in the last second or two, in 0.3 s
        steps, until it is sure no editor is still writing it: 2.5 s per command otherwise.
        We write the file whole before any Postfix program looks at it.
        """
        settled = time.time() - 60
        os.utime(self.config_dir / "main.cf", (settled, settled))

    def _check_reachable(self) -> None:
        """Refuse a work directory the postfix user could not reach by absolute path."""
        for directory in self.workdir.parents:
            if not directory.stat().st_mode & stat.S_IXOTH:
                raise LabError(
                    f"{directory} is not searchable by others (chmod o+x), so the postfix user "
                    f"cannot reach {self.workdir}"
                )

    def postconf(self, **params: str) -> None:
        """Set ``main.cf`` parameters; reload the running instance to apply them.

        A reload makes daemons exit when idle, so a process busy at the time may still work
        with the old values for a moment; ``inet_interfaces`` changes need stop() and start().
        """
        if not params:
            return
        settings = [f"{name}={value}" for name, value in params.items()]
        self._run("postconf", "-c", str(self.config_dir), "-e", *settings)
        self._backdate_main_cf()
        if self.running():
            self._run("postfix", "-c", str(self.config_dir), "reload")

    # -- lifecycle ---------------------------------------------------------------------

    def check(self) -> None:
        """Validate the configuration and create missing queue directories.

        Any ``postconf`` warning is an error here: it catches misspelt parameter names in
        ``extra_main``, and ``-o`` overrides in ``extra_master`` that nothing uses. Postfix
        commands print their messages only when stderr is a terminal, so ``script`` lends
        ``postfix check`` a pseudo-terminal to make the reason for a failure visible.
        """
        for what in ("-n", "-M"):
            warnings = postconf_warnings(
                self._run("postconf", "-c", str(self.config_dir), what).stderr)
            if warnings:
                raise LabError(f"postconf {what} for {self.config_dir}:\n{warnings}")
        command = shlex.join(["postfix", "-c", str(self.config_dir), "check"])
        self._run("script", "--quiet", "--return", "--command", command, "/dev/null")

    def start(self) -> None:
        """Start the instance; return once smtpd answers 220 on the listen address."""
        if self.running():
            raise LabError(f"Postfix in {self.workdir} is already running")
        host_resolv_before = HOST_RESOLV_CONF.read_bytes()
        self.check()
        deadline = time.monotonic() + START_TIMEOUT
        try:
            # The mount namespace outlives this shell: the daemonised master stays in it.
            # Paths travel as positional parameters, so no quoting is involved.
            self._run(
                "unshare", "--mount", "--propagation", "private",
                "sh", "-c", 'mount --bind "$1" /etc/resolv.conf && exec postfix -c "$2" start',
                "sh", str(self.resolv_conf), str(self.config_dir),
                hint="the master reports start-up errors (often a bad master.cf entry) only "
                "to syslog, which the lab does not read",
            )  # fmt: skip
            master = self.master_pid()
            if master is None:
                raise LabError("postfix start returned but no master process is running")
            self._check_namespace(master, host_resolv_before)
            self._wait_banner(deadline)
        except BaseException:
            self.stop()
            raise

    def _check_namespace(self, master: int, host_resolv_before: bytes) -> None:
        if HOST_RESOLV_CONF.read_bytes() != host_resolv_before:
            raise LabError("the host's /etc/resolv.conf changed while starting Postfix")
        seen = Path(f"/proc/{master}/root/etc/resolv.conf").read_bytes()
        if seen != self.resolv_conf.read_bytes():
            raise LabError(f"the Postfix master (PID {master}) does not see the lab resolv.conf")
        mounts = Path(f"/proc/{master}/mountinfo").read_text().splitlines()
        if not any(line.split()[4] == str(HOST_RESOLV_CONF) for line in mounts):
            raise LabError(f"no bind mount on /etc/resolv.conf in PID {master}'s namespace")

    def _wait_banner(self, deadline: float) -> None:
        last_error = "no attempt"
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(self.submit, timeout=2) as conn:
                    banner = conn.recv(512)
                    conn.sendall(b"QUIT\r\n")
                if banner.startswith(b"220 "):
                    return
                last_error = f"unexpected banner {banner!r}"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.1)
        raise LabError(
            f"Postfix smtpd on {self.listen}:{self.port} did not answer 220 within "
            f"{START_TIMEOUT:.0f} s ({last_error}); maillog tail:\n{_tail(self.maillog())}"
        )

    def stop(self) -> None:
        """Stop the instance and make sure none of its processes is left; idempotent.

        Done means every process ``pids()`` ever found has ended, not only that it finds none
        any more: an exiting daemon drops its working directory and executable (so ``pids()``
        no longer sees it) a moment before it really ends.
        """
        if self.running():
            # "postfix stop" waits up to 5 s itself, then kills the master's process group.
            subprocess.run(
                ["postfix", "-c", str(self.config_dir), "stop"],
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        if not self._wait_gone(STOP_TIMEOUT):
            for pid in self._left():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not self._wait_gone(STOP_TIMEOUT):
                raise LabError(f"Postfix processes survived SIGKILL: {self._left()}")
        self._seen.clear()

    def _left(self) -> list[int]:
        """The instance's processes still running: found now, or found before and not ended."""
        found = set(self.pids())
        return sorted(found.union(pid for pid, started in self._seen.items()
                                  if pid_alive(pid, started)))

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._left():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # -- inspection --------------------------------------------------------------------

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def master_pid(self) -> int | None:
        """Return the PID of the running master process, or None."""
        pid = self._read_master_pid()
        # The pid file outlives the master, and its number may since belong to anything.
        if pid is None or pid not in self.pids() or self._exe(pid).name != "master":
            return None
        return pid

    def running(self) -> bool:
        """Tell whether the master process is running."""
        return self.master_pid() is not None

    def pids(self) -> list[int]:
        """Return the live processes of this instance: the master and its daemons.

        They are recognised by what they are, not by remembered PIDs that may have been
        reused: a Postfix daemon program whose working directory is our queue directory
        (every Postfix daemon works from there). Each is remembered with its start time, so
        that ``stop()`` can wait for it to really end.
        """
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                cwd = Path(f"/proc/{pid}/cwd").readlink()
            except OSError:  # gone meanwhile, or a zombie: those have no working directory
                continue
            if cwd == self.queue_dir and self._exe(pid).parent == self.daemon_dir:
                started = process_start(pid)
                if started is not None:
                    self._seen[pid] = started
                    found.append(pid)
        return sorted(found)

    @staticmethod
    def _exe(pid: int) -> Path:
        try:
            return Path(f"/proc/{pid}/exe").readlink()
        except OSError:
            return Path()

    def queue(self) -> list[dict[str, Any]]:
        """Return the queue as ``postqueue -j`` reports it, one dict per message."""
        out = self._run("postqueue", "-c", str(self.config_dir), "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        """Ask the queue manager to retry all deferred mail now."""
        self._run("postqueue", "-c", str(self.config_dir), "-f")

    def wait_queue_empty(self, timeout: float) -> None:
        """Wait until the queue is empty; raise LabError listing what is left otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.queue()
            if not left:
                return
            if time.monotonic() >= deadline:
                raise LabError(
                    f"Postfix queue not empty after {timeout} s: {left}\n"
                    f"maillog tail:\n{_tail(self.maillog())}"
                )
            time.sleep(0.2)

    def maillog(self) -> str:
        """Return the instance's log so far ("" before the first line is logged)."""
        try:
            return self.maillog_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _run(self, *argv: str, hint: str = "") -> subprocess.CompletedProcess[str]:
        """Run a command; raise LabError with its output and the maillog tail if it fails."""
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabError(f"{shlex.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            raise LabError(
                f"{shlex.join(argv)} failed with status {proc.returncode}"
                f"{f' ({hint})' if hint else ''}:\n{proc.stdout}{proc.stderr}"
                f"maillog tail:\n{_tail(self.maillog())}"
            )
        return proc
