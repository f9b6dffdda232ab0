"""The Postfix and systemd integration files parse, and agree with each other and with tlsmilter.

Postfix's own tools judge the Postfix snippets (postconf, postmap) in a throwaway config
directory; systemd's own tools judge the unit, sysusers and tmpfiles files. Nothing here
touches /etc/postfix or the running system. The last tests compare socket paths, names and
owners across contrib/, systemd/, docs/postfix.md and tlsmilter's configuration.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from tests.lab.postfix import MASTER_SERVICES, postconf_warnings, postfix_version
from tlsmilter import config
from tlsmilter.core.delivery import STRICT_SUFFIX, policy_maps
from tlsmilter.core.levels import Level
from tlsmilter.daemons.milter import ASSESSMENT_HEADER, ROUTE_HEADER, TAG_HEADER

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = ROOT / "contrib" / "postfix"
MAIN_SNIPPET = CONTRIB / "main.cf.snippet"
MASTER_SNIPPET = CONTRIB / "master.cf.snippet"
HEADER_CHECKS = CONTRIB / "tlsmilter_header_checks"
UNIT = ROOT / "systemd" / "tlsmilter.service"
SYSUSERS = ROOT / "systemd" / "tlsmilter.sysusers.conf"
TMPFILES = ROOT / "systemd" / "tlsmilter.tmpfiles.conf"
POSTFIX_DOC = ROOT / "docs" / "postfix.md"

# The transport of accepted sensitive mail for each level it may require, and its map's suffix.
TRANSPORTS = {Level.ENCRYPTED: ("tlsmilter-secure", STRICT_SUFFIX),
              Level.VERIFIED: ("tlsmilter-verified", "-verified"),
              Level.DANE: ("tlsmilter-dane", "-dane")}
TRANSPORT = TRANSPORTS[Level.ENCRYPTED][0]
TIMEOUT = 60


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.fail(f"{tool} not found: install the Debian package {package!r} "
                    "(scripts/bootstrap does)")
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False,
                          stdin=subprocess.DEVNULL)


def explain(argv: list[str]) -> str:
    """Re-run a Postfix command on a pseudo-terminal: some report problems only to a TTY."""
    if shutil.which("script") is None:
        return ""
    done = run("script", "--quiet", "--return", "--command", shlex.join(argv), "/dev/null")
    return done.stdout.replace("\r\n", "\n")


# --- parsing the files --------------------------------------------------------------------------


def main_cf_settings(path: Path = MAIN_SNIPPET) -> dict[str, str]:
    """``name = value`` lines of a main.cf fragment (no continuation lines are used)."""
    settings: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert not line[0].isspace(), f"{path.name}:{number}: unexpected continuation line"
        name, eq, value = line.partition("=")
        assert eq, f"{path.name}:{number}: not 'name = value': {line!r}"
        assert name.strip() not in settings, f"{path.name}:{number}: {name.strip()} set twice"
        settings[name.strip()] = value.strip()
    return settings


@dataclass(frozen=True)
class MilterEntry:
    endpoint: str
    options: dict[str, str]


def milter_entries(value: str) -> list[MilterEntry]:
    """Parse an smtpd_milters value: plain endpoints and ``{ endpoint, name=value, ... }``."""
    entries = []
    for group, plain in re.findall(r"\{([^}]*)\}|([^\s,{}]+)", value):
        if plain:
            entries.append(MilterEntry(plain, {}))
            continue
        first, *rest = [item for item in re.split(r"[\s,]+", group.strip()) if item]
        options = {}
        for item in rest:
            key, eq, val = item.partition("=")
            assert eq, f"per-milter setting without '=': {item!r} in {value!r}"
            options[key] = val
        entries.append(MilterEntry(first, options))
    return entries


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)([smhdw]?)", value)
    assert match, f"not a Postfix time value: {value!r}"
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match[2]]
    return int(match[1]) * unit


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of repeated keys, by key."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def table_lines(path: Path) -> list[list[str]]:
    """Non-comment lines of a sysusers.d or tmpfiles.d file, split like a shell would."""
    return [shlex.split(line) for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def doc_config() -> config.Config:
    """The tlsmilter.toml docs/postfix.md tells the operator to write (the [milter] block)."""
    blocks = re.findall(r"```toml\n(.*?)```", POSTFIX_DOC.read_text(), flags=re.S)
    chosen = [b for b in blocks if "[milter]" in b]
    assert len(chosen) == 1, f"expected one toml block with [milter] in {POSTFIX_DOC.name}"
    return config.from_mapping(tomllib.loads(chosen[0]), source=f"{POSTFIX_DOC.name} example")


def unix_path(spec: str) -> PurePosixPath:
    kind, _, path = spec.partition(":")
    assert kind == "unix", f"expected a unix: socket, got {spec!r}"
    return PurePosixPath(path)


# --- a throwaway Postfix configuration directory -------------------------------------------------


class PostfixConfig:
    """A config directory for postconf/postmap: minimal main.cf, a standard-like master.cf."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.postconf = need("postconf", "postfix")
        self.postmap = need("postmap", "postfix")
        (directory / "main.cf").write_text("compatibility_level = 3.6\n")
        self.settle()
        # Debian's layout: smtpd chrooted, like the services our snippet must coexist with.
        lines = ["smtp      inet  n - y - - smtpd", *MASTER_SERVICES]
        (directory / "master.cf").write_text("\n".join(lines) + "\n")

    def settle(self) -> None:
        """Backdate main.cf: Postfix waits ~2 s before reading a main.cf changed just now."""
        past = (self.dir / "main.cf").stat().st_mtime - 60
        os.utime(self.dir / "main.cf", (past, past))

    def append_master(self, text: str) -> None:
        with (self.dir / "master.cf").open("a") as master:
            master.write(text)

    def cmd(self, tool: str, *args: str) -> list[str]:
        return [tool, "-c", str(self.dir), *args]

    def check(self, *args: str) -> str:
        """Run postconf; it must succeed without a word on stderr. Returns stdout."""
        argv = self.cmd(self.postconf, *args)
        done = run(*argv)
        warnings = postconf_warnings(done.stderr)
        assert done.returncode == 0 and not warnings, (
            f"{shlex.join(argv)} exited {done.returncode}:\n{warnings}{explain(argv)}")
        return done.stdout

    def query(self, table: str, key: str) -> str | None:
        """postmap -q: the value, or None when the key is not found."""
        argv = self.cmd(self.postmap, "-q", key, table)
        done = run(*argv)
        if done.returncode == 1 and not done.stdout and not done.stderr:
            return None
        assert done.returncode == 0 and not done.stderr, (
            f"{shlex.join(argv)} exited {done.returncode}:\n{done.stderr}{explain(argv)}")
        return done.stdout.strip()

    def default(self, name: str) -> str:
        return self.check("-dh", name).strip()


@pytest.fixture
def postfix_dir(tmp_path: Path) -> Iterator[PostfixConfig]:
    directory = tmp_path / "postfix"
    directory.mkdir()
    yield PostfixConfig(directory)


def parameters(postconf_output: str) -> dict[str, str]:
    """``name = value`` lines as postconf -n / -P prints them."""
    found = {}
    for line in postconf_output.splitlines():
        name, _, value = line.partition(" = ")
        found[name.strip()] = value.strip()
    return found


# --- 1. systemd ---------------------------------------------------------------------------------


UNITS = {"tlsmilter.service": "serve", "tlsmilter-policy.service": "policy-server",
         "tlsmilter-worker@.service": "worker --metrics-listen 127.0.0.1:%i"}


def verify_unit(unit_text: str, directory: Path, name: str = UNIT.name) -> list[str]:
    """``systemd-analyze verify`` a unit; return its complaints (empty when clean)."""
    analyze = need("systemd-analyze", "systemd")
    # A template is verified as one of its instances.
    unit = directory / name.replace("@.", "@9465.")
    unit.write_text(unit_text)
    done = run(analyze, "verify", "--man=no", str(unit))
    output = (done.stdout + done.stderr).splitlines()
    complaints = [line for line in output if unit.name in line]
    if done.returncode != 0 and not complaints:
        complaints = output or [f"systemd-analyze verify exited {done.returncode}"]
    return complaints


def with_venv_exec_start(text: str, args: str = "serve") -> str:
    """The unit with ExecStart pointing at this venv's tlsmilter (verify needs it to exist)."""
    command = Path(sys.executable).parent / "tlsmilter"
    assert command.exists(), f"{command} missing: is the package installed in this venv?"
    lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert lines == [f"ExecStart=/usr/local/bin/tlsmilter {args}"], lines
    return text.replace("ExecStart=/usr/local/bin/tlsmilter ", f"ExecStart={command} ")


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    text = (ROOT / "systemd" / name).read_text()
    complaints = verify_unit(with_venv_exec_start(text, UNITS[name]), tmp_path, name)
    assert not complaints, "\n".join(complaints)


@pytest.mark.parametrize("name", UNITS)
def test_every_daemon_is_notify_and_hardened_alike(name: str) -> None:
    text = (ROOT / "systemd" / name).read_text()
    assert "Type=notify" in text and "NotifyAccess=main" in text
    hardening = UNIT.read_text().partition("# --- Hardening")[2].partition("[Install]")[0]
    assert hardening.strip() and hardening in text


def test_verify_harness_catches_a_broken_unit(tmp_path: Path) -> None:
    broken = with_venv_exec_start(UNIT.read_text()).replace("Type=notify", "Type=notifyy")
    assert verify_unit(broken, tmp_path), "a bad Type= went unnoticed: the check is blind"


def test_unit_runs_tlsmilter_serve_as_designed() -> None:
    unit = unit_settings()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["Restart"] == ["always"]  # any exit systemd did not ask for
    # The cache is saved where systemd gives the service a writable state directory.
    assert unit["StateDirectory"] == ["tlsmilter"]
    assert config.Config().cache.state_dir == "/var/lib/" + unit["StateDirectory"][0]
    # tlsmilter needs up to ~4 s to stop (libmilter's poll interval): leave room.
    assert seconds(unit["TimeoutStopSec"][0]) >= 10
    assert unit["User"] == ["tlsmilter"] and unit["Group"] == ["tlsmilter"]
    assert "DynamicUser" not in unit
    assert unit["CapabilityBoundingSet"] == [""]
    for flag in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                 "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                 "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictNamespaces",
                 "LockPersonality", "RestrictRealtime", "RestrictSUIDSGID",
                 "MemoryDenyWriteExecute"):
        assert unit.get(flag) == ["yes"], flag
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["SystemCallArchitectures"] == ["native"]
    assert "@system-service" in unit["SystemCallFilter"]
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # Sockets must be reachable by group postfix, so no group bits may be masked off.
    assert int(unit["UMask"][0], 8) & 0o070 == 0


def test_sysusers_file_creates_the_service_user(tmp_path: Path) -> None:
    sysusers = need("systemd-sysusers", "systemd")
    (tmp_path / "etc").mkdir()
    done = run(sysusers, f"--root={tmp_path}", str(SYSUSERS))
    assert done.returncode == 0, done.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert "tlsmilter" in users
    assert users["tlsmilter"][6] == "/usr/sbin/nologin"
    groups = {line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert "tlsmilter" in groups


def test_tmpfiles_entry_creates_the_socket_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to tlsmilter:postfix needs root")
    tmpfiles = need("systemd-tmpfiles", "systemd")
    (tmp_path / "etc").mkdir()
    assert run(need("systemd-sysusers", "systemd"), f"--root={tmp_path}",
               str(SYSUSERS)).returncode == 0
    with (tmp_path / "etc" / "group").open("a") as group:
        group.write("postfix:x:4242:\n")
    (_kind, directory, *_rest), = table_lines(TMPFILES)
    (tmp_path / directory.lstrip("/")).parent.mkdir(parents=True)
    done = run(tmpfiles, f"--root={tmp_path}", "--create", str(TMPFILES))
    assert done.returncode == 0, done.stderr
    st = (tmp_path / directory.lstrip("/")).stat()
    assert oct(st.st_mode & 0o7777) == oct(0o2750)
    assert st.st_gid == 4242


# --- 2. main.cf ---------------------------------------------------------------------------------


def test_main_cf_snippet_every_setting_is_explained() -> None:
    lines = MAIN_SNIPPET.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert number > 0 and lines[number - 1].startswith("#"), (
                f"{MAIN_SNIPPET.name}:{number + 1}: {line.split('=')[0].strip()} has no comment "
                "right above it")


def test_main_cf_snippet_is_accepted_by_postconf(postfix_dir: PostfixConfig) -> None:
    settings = main_cf_settings()
    postfix_dir.check("-e", *(f"{name} = {value}" for name, value in settings.items()))
    postfix_dir.settle()
    shown = parameters(postfix_dir.check("-n"))
    for name, value in settings.items():
        assert shown.get(name) == value, f"postconf -n shows {name} = {shown.get(name)!r}"
    # The macros tlsmilter reads come from Postfix's defaults; the snippet relies on that.
    after = parameters(postfix_dir.check("milter_rcpt_macros", "milter_end_of_data_macros"))
    assert "{rcpt_mailer}" in after["milter_rcpt_macros"].split()
    assert "i" in after["milter_end_of_data_macros"].split()


def test_main_cf_snippet_milter_settings() -> None:
    settings = main_cf_settings()
    eom_wait = config.Config().milter.eom_wait
    for parameter in ("smtpd_milters", "non_smtpd_milters"):
        entries = milter_entries(settings[parameter])
        assert len(entries) == 1, parameter
        (entry,) = entries
        # With tlsmilter down Postfix can't tell sensitive mail from normal: never accept.
        assert entry.options["default_action"] == "tempfail", parameter
        assert seconds(entry.options["content_timeout"]) > eom_wait + 10, parameter
        assert seconds(entry.options["connect_timeout"]) <= 30, parameter
    assert settings["milter_protocol"] == "6"
    assert settings["smtp_tls_security_level"] == "may"


def test_postconf_warns_about_unknown_parameters(postfix_dir: PostfixConfig) -> None:
    """The checks above rely on postconf's warnings; make sure it still gives them."""
    postfix_dir.check("-e", "milter_default_actoin = tempfail")
    postfix_dir.settle()
    done = run(*postfix_dir.cmd(postfix_dir.postconf, "-n"))
    assert "unused parameter" in done.stderr


# --- 3. milter_header_checks ------------------------------------------------------------------


def test_header_checks_route_sensitive_mail(postfix_dir: PostfixConfig) -> None:
    table = f"regexp:{HEADER_CHECKS}"
    for level in Level:
        if level is Level.NONE:
            continue  # never a route: mail to such a domain is refused or tagged
        assert postfix_dir.query(table, f"{ROUTE_HEADER}: {level.value}") == \
            f"FILTER {TRANSPORTS[level][0]}:", level
    assert postfix_dir.query(table, f"{ROUTE_HEADER.lower()}: verified") == \
        "FILTER tlsmilter-verified:"
    # A value tlsmilter never writes still gets a transport that never goes below encrypt.
    assert postfix_dir.query(table, f"{ROUTE_HEADER}: verified-ish") == f"FILTER {TRANSPORT}:"


def test_header_checks_leave_other_headers_alone(postfix_dir: PostfixConfig) -> None:
    table = f"regexp:{HEADER_CHECKS}"
    for header in ("Subject: X-TLSMilter-Route: verified",
                   "X-Sensitivity: private",
                   f"{ASSESSMENT_HEADER}: policy=private; require=verified; verdict=accept",
                   f"{TAG_HEADER}: insecure: example.com (would reject)",
                   "Received: from x by y"):
        assert postfix_dir.query(table, header) is None, header


def test_main_cf_names_the_shipped_header_checks_table() -> None:
    value = main_cf_settings()["milter_header_checks"]
    kind, _, path = value.partition(":")
    assert kind == "regexp"  # postfix-pcre is not installed by default on Debian
    assert PurePosixPath(path) == PurePosixPath("/etc/postfix") / HEADER_CHECKS.name


# --- 4. master.cf -------------------------------------------------------------------------------


@pytest.mark.parametrize("level", list(TRANSPORTS), ids=lambda level: level.value)
def test_master_cf_snippet_defines_the_transport_of_each_level(
        postfix_dir: PostfixConfig, level: Level) -> None:
    transport, suffix = TRANSPORTS[level]
    postfix_dir.append_master(MASTER_SNIPPET.read_text())
    postfix_dir.check("-n")  # also reports master.cf -o overrides nothing uses
    entry = postfix_dir.check("-M", f"{transport}/unix").split()
    assert entry[:8] == [transport, "unix", "-", "-", "n", "-", "-", "smtp"], entry
    overrides = parameters(postfix_dir.check("-P"))
    prefix = f"{transport}/unix/"
    mine = {k.removeprefix(prefix): v for k, v in overrides.items() if k.startswith(prefix)}
    assert mine["syslog_name"] == f"postfix/{transport}"
    assert mine["smtp_tls_security_level"] == "encrypt"
    assert mine["smtp_dns_support_level"] == "dnssec"
    _endpoint, map_name = policy_map(mine["smtp_tls_policy_maps"])
    assert map_name == config.Config().policy_server.map_name + suffix
    # The map must be one the policy server answers, and require the transport's level.
    maps = policy_maps(config.Config().policy_server.map_name)
    assert maps[map_name].strict
    assert maps[map_name].required in (level, None)
    minimum = config.Config().prober.min_tls_version.value
    assert mine["smtp_tls_mandatory_protocols"] == f">=TLSv{minimum}"
    # Postfix 3.10+ would otherwise let a "TLS-Required: no" header, which cleanup records
    # before the milter deletes it, skip the policy lookup and deliver at "may".
    assert mine["tls_required_enable"] == "no"


def test_only_the_3_10_parameter_is_forgiven_and_only_before_3_10() -> None:
    warning = ("postconf: warning: /etc/postfix/master.cf: "
               "unused parameter: tls_required_enable=no\n")
    other = "postconf: warning: /etc/postfix/master.cf: unused parameter: tls_required=no\n"
    forgiven = postfix_version() < (3, 10)
    assert postconf_warnings(warning) == ("" if forgiven else warning)
    assert postconf_warnings(other) == other


def test_master_cf_check_catches_bad_overrides(postfix_dir: PostfixConfig) -> None:
    """A misspelt -o must make postconf complain, or the test above proves nothing."""
    postfix_dir.append_master(MASTER_SNIPPET.read_text().replace(
        "smtp_dns_support_level=", "smtp_dns_suport_level="))
    done = run(*postfix_dir.cmd(postfix_dir.postconf, "-M"))
    assert "unused parameter" in done.stderr


# --- 5. one set of paths everywhere ---------------------------------------------------------------


def queue_directory(postfix_dir: PostfixConfig) -> PurePosixPath:
    return PurePosixPath(postfix_dir.default("queue_directory"))


def postfix_socket_path(name: str, queue_dir: PurePosixPath) -> PurePosixPath:
    """Where a Postfix daemon finds a unix socket named in its configuration.

    Relative names resolve against the queue directory, chrooted or not; an absolute name
    would mean different files for chrooted and unchrooted daemons.
    """
    path = PurePosixPath(name)
    assert not path.is_absolute(), f"{name}: use a name relative to the queue directory"
    return queue_dir / path


def policy_map(value: str) -> tuple[str, str]:
    kind, rest = value.split(":", 1)
    assert kind == "socketmap", value
    endpoint, _, map_name = rest.rpartition(":")
    return endpoint, map_name


def test_socket_paths_agree(postfix_dir: PostfixConfig) -> None:
    queue_dir = queue_directory(postfix_dir)
    wanted = doc_config()  # what docs/postfix.md tells the operator to configure
    milter_sock = unix_path(wanted.milter.socket)
    policy_sock = unix_path(wanted.policy_server.socket)
    socket_dir = milter_sock.parent
    assert policy_sock.parent == socket_dir
    assert socket_dir.parent == queue_dir, "sockets must be inside the Postfix queue directory"

    main = main_cf_settings()
    for parameter in ("smtpd_milters", "non_smtpd_milters"):
        (entry,) = milter_entries(main[parameter])
        assert postfix_socket_path(unix_path(entry.endpoint).as_posix(), queue_dir) == \
            milter_sock, parameter

    postfix_dir.append_master(MASTER_SNIPPET.read_text())
    overrides = parameters(postfix_dir.check("-P"))
    for transport, suffix in TRANSPORTS.values():
        endpoint, map_name = policy_map(overrides[f"{transport}/unix/smtp_tls_policy_maps"])
        assert postfix_socket_path(unix_path(endpoint).as_posix(), queue_dir) == policy_sock
        # Strict: a domain tlsmilter cannot vouch for defers, never gets the floor.
        assert map_name == wanted.policy_server.map_name + suffix

    unit = unit_settings()
    assert unit["ReadWritePaths"] == [str(socket_dir)]
    assert "RuntimeDirectory" not in unit  # no socket lives in /run in this set-up

    (kind, directory, mode, user, group, _age), = table_lines(TMPFILES)
    assert (kind, PurePosixPath(directory)) == ("d", socket_dir)
    assert user == unit["User"][0] and group == postfix_dir.default("mail_owner")
    # Setgid directory: sockets belong to group postfix; the milter socket's mode lets the
    # group in, others are kept out by the directory.
    assert int(mode, 8) == 0o2750
    assert int(wanted.milter.socket_mode, 8) & 0o060 == 0o060

    (sysuser,) = table_lines(SYSUSERS)
    assert sysuser[:2] == ["u", unit["User"][0]]


def test_docs_name_the_same_paths() -> None:
    doc = POSTFIX_DOC.read_text()
    wanted = doc_config()
    main = main_cf_settings()
    (entry,) = milter_entries(main["smtpd_milters"])
    master = MASTER_SNIPPET.read_text()
    maps = re.findall(r"-o smtp_tls_policy_maps=(\S+)", master)
    assert len(maps) == len(TRANSPORTS)
    transports = [transport for transport, _suffix in TRANSPORTS.values()]
    for text in (entry.endpoint, *maps, str(unix_path(wanted.milter.socket)),
                 str(unix_path(wanted.policy_server.socket)), *transports, HEADER_CHECKS.name,
                 main["milter_header_checks"].partition(":")[2]):
        assert f"`{text}`" in doc or text in doc, f"docs/postfix.md never mentions {text}"
    for name in (MAIN_SNIPPET, MASTER_SNIPPET, HEADER_CHECKS, UNIT, SYSUSERS, TMPFILES):
        assert name.relative_to(ROOT).as_posix() in doc, f"docs/postfix.md skips {name.name}"


def test_docs_alternative_uses_tlsmilters_defaults() -> None:
    """The /run/tlsmilter alternative in docs/postfix.md relies on the built-in defaults."""
    doc = POSTFIX_DOC.read_text()
    alternative = doc[doc.index("## Alternative: sockets in /run/tlsmilter"):]
    defaults = config.Config()
    milter_sock = unix_path(defaults.milter.socket)
    policy_sock = unix_path(defaults.policy_server.socket)
    assert f"unix:{milter_sock}" in alternative
    assert (f"socketmap:unix:{policy_sock}:{defaults.policy_server.map_name}{STRICT_SUFFIX}"
            in alternative)
    assert f"RuntimeDirectory={milter_sock.parent.name}" in alternative
    assert milter_sock.parent == policy_sock.parent == PurePosixPath("/run") / "tlsmilter"
