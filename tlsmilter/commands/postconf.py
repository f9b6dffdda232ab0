"""What Postfix's own tools say about its configuration, for ``tlsmilter doctor``.

``read_postfix`` runs ``postconf`` (main.cf values, expanded), ``postconf -M`` (master.cf
services) and ``postconf -P`` (their ``-o`` overrides), each with ``-c DIR`` when given, and
``postmap -q`` for the header-checks table. The rest is pure: the ``PostfixView`` they
produce, and the parsing of milter lists and socket names.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tlsmilter.errors import UsageError

TIMEOUT = 30.0
MAIN_PARAMS = ("smtpd_milters", "non_smtpd_milters", "milter_default_action",
               "milter_header_checks", "queue_directory", "smtp_tls_security_level",
               "smtp_tls_policy_maps", "smtp_dns_support_level", "smtp_tls_loglevel",
               "mail_version", "tls_required_enable")


@dataclass(frozen=True)
class Service:
    """One master.cf entry: ``name/type``, chroot, command, and its ``-o`` overrides."""

    name: str
    type: str
    chroot: bool
    command: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class PostfixView:
    """main.cf values, master.cf services, and a lookup in the header-checks tables."""

    main: dict[str, str]
    services: dict[str, Service]  # "name/type" -> service
    header_filter: dict[str, str]  # "X-TLSMilter-Route: <level>" -> postmap's answer ("" none)
    header_error: str = ""  # why the table could not be queried

    def param(self, service: Service | None, name: str) -> str:
        """The value ``service`` runs with: its ``-o`` override, else main.cf's."""
        if service is not None and name in service.params:
            return service.params[name]
        return self.main.get(name, "")

    @property
    def queue_directory(self) -> Path:
        return Path(self.main.get("queue_directory") or "/var/spool/postfix")

    @property
    def version(self) -> tuple[int, ...]:
        numbers = re.findall(r"\d+", self.main.get("mail_version", ""))
        return tuple(int(part) for part in numbers[:2])


def milter_entries(value: str) -> list[tuple[str, dict[str, str]]]:
    """``smtpd_milters``'s entries as (socket name, options): plain names and ``{ name,
    key=value, ... }`` groups, separated by commas or spaces."""
    entries: list[tuple[str, dict[str, str]]] = []
    for group, plain in re.findall(r"\{([^}]*)\}|([^\s,{}]+)", value):
        if plain:
            entries.append((plain, {}))
            continue
        parts = [p.strip() for p in group.split(",") if p.strip()]
        if parts:
            options = dict(p.partition("=")[::2] for p in parts[1:])
            entries.append((parts[0], {k.strip(): v.strip() for k, v in options.items()}))
    return entries


def socket_path(name: str, chrooted: bool, queue_directory: Path) -> str:
    """Where a Postfix daemon finds the socket ``unix:PATH`` (or ``inet:HOST:PORT``), in
    tlsmilter's spelling (``unix:/PATH``, ``inet:PORT@HOST``): a relative path is relative to
    the queue directory, an absolute one to the chroot (the queue directory) if chrooted."""
    kind, sep, rest = name.partition(":")
    if not sep:
        kind, rest = "unix", name
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        return f"inet:{port}@{host}"
    if kind != "unix":
        return name
    path = Path(rest)
    if not path.is_absolute():
        return f"unix:{queue_directory / path}"
    return f"unix:{queue_directory / path.relative_to('/')}" if chrooted else f"unix:{path}"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise UsageError(f"{argv[0]} not found: is Postfix installed?")
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"{argv[0]}: {exc}") from None


def _postconf(config_dir: str | None, *args: str) -> str:
    argv = ["postconf", *(["-c", config_dir] if config_dir else []), *args]
    done = _run(argv)
    if done.returncode != 0:
        raise UsageError(f"{' '.join(argv)} failed: {done.stderr.strip()[:500]}")
    return done.stdout


def _assignments(text: str) -> dict[str, str]:
    pairs = (line.partition("=") for line in text.splitlines())  # "name =" when empty
    return {name.strip(): value.strip() for name, sep, value in pairs if sep}


def read_postfix(config_dir: str | None, levels: list[str]) -> PostfixView:
    """Ask Postfix's tools; ``levels`` are the route header values to look up."""
    main = _assignments(_postconf(config_dir, "-x", *MAIN_PARAMS))
    services: dict[str, Service] = {}
    for line in _postconf(config_dir, "-M").splitlines():
        fields = line.split()
        if len(fields) >= 8:
            services[f"{fields[0]}/{fields[1]}"] = Service(fields[0], fields[1],
                                                          fields[4] != "n", fields[7])
    for key, value in _assignments(_postconf(config_dir, "-P")).items():
        name, _, param = key.rpartition("/")
        if name in services:
            services[name].params[param] = value
    view = PostfixView(main, services, {})
    tables = main.get("milter_header_checks", "").replace(",", " ").split()
    for level in levels:
        header = f"X-TLSMilter-Route: {level}"
        view.header_filter[header] = ""
        for table in tables:
            done = _run(["postmap", *(["-c", config_dir] if config_dir else []), "-q", header,
                         table])
            if done.returncode == 0:
                view.header_filter[header] = done.stdout.strip()
                break
            if done.returncode != 1 or done.stderr.strip():
                view.header_error = done.stderr.strip()[:300] or f"postmap exit {done.returncode}"
    return view
