"""The ``tlsmilter`` command.

Each subcommand lives in its own small function; a ``TlsmilterError`` becomes one clear
message on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tlsmilter import __version__, config
from tlsmilter.errors import ConfigError, TlsmilterError, UsageError

if TYPE_CHECKING:
    from tlsmilter.assess.mtasts import PolicyCache

# Exit codes, documented in the README (Commands).
EXIT_OK = 0
EXIT_ERROR = 1  # bad input, bad config, or a runtime failure
EXIT_USAGE = 2  # argparse's own code for a malformed command line
EXIT_CHECK_NONE = 3  # check: some domain rated none
EXIT_CHECK_UNKNOWN = 4  # check: some domain could not be assessed (and none rated none)

Handler = Callable[[argparse.Namespace], int]


def _config_check(args: argparse.Namespace) -> int:
    path = config.resolve_path(args.file or args.config)
    try:
        loaded = config.load(path)
        expired = config.expiry_issues(loaded, datetime.datetime.now(datetime.UTC).date())
        if expired:  # the daemons start with them and ignore them; the check says so
            raise ConfigError(str(path), expired)
    except ConfigError as exc:
        print(f"{exc.source}: invalid", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{path}: OK")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from tlsmilter.assess import render
    from tlsmilter.assess.model import Assessment
    from tlsmilter.assess.prober import Prober
    from tlsmilter.core.domains import normalize_domain
    from tlsmilter.core.overrides import describe as describe_override

    loaded = config.load_optional(args.config)
    settings = loaded.prober
    overrides: dict[str, object] = {}
    if args.resolver is not None:
        problem = config.check_resolver(args.resolver)
        if problem:
            raise UsageError(f"--resolver: {problem}")
        overrides["resolver"] = args.resolver
    if args.ca_file is not None:
        overrides["ca_file"] = args.ca_file
    if args.timeout is not None:
        if args.timeout <= 0:
            raise UsageError("--timeout must be greater than 0")
        overrides["timeouts"] = dataclasses.replace(settings.timeouts, domain=args.timeout)
    settings = dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]  # mixed kwargs
    if settings.ca_file and not config.is_file(settings.ca_file):
        raise UsageError(f"--ca-file: {settings.ca_file}: no such file")
    domains = [normalize_domain(d) for d in args.domains]

    async def run() -> list[Assessment]:
        async with _deployed_sts_cache(loaded) as sts_cache:
            return await Prober(settings, sts_cache=sts_cache).assess_many(domains)

    results = asyncio.run(run())
    domain_overrides = config.domain_overrides(loaded)
    today = datetime.datetime.now(datetime.UTC).date()
    for assessment in results:
        if args.json:
            print(json.dumps(assessment.to_json(), sort_keys=True))
            continue
        print(render.render(assessment))
        override = domain_overrides.get(assessment.domain)
        if override is not None:  # after the assessed level: what sensitive mail gets
            print(f"  override: {describe_override(override, today)}")
    levels = {a.level for a in results}
    if "none" in levels:
        return EXIT_CHECK_NONE
    if "unknown" in levels:
        return EXIT_CHECK_UNKNOWN
    return EXIT_OK


@contextlib.asynccontextmanager
async def _deployed_sts_cache(settings: config.Config) -> AsyncIterator[PolicyCache | None]:
    """The MTA-STS policy cache the deployment keeps (RFC 8461 3.3), so ``check`` sees what
    ``serve`` or the workers would: Redis's, or the one ``serve`` saves in ``cache.state_dir``
    (read, never written: a policy fetched now is not saved). None when there is neither."""
    from tlsmilter.assess.mtasts import MemoryPolicyCache

    if settings.cache.backend is config.CacheBackend.REDIS:
        from tlsmilter.store.redis.connection import connect_async
        from tlsmilter.store.redis.records import Keys
        from tlsmilter.store.redis.stspolicies import RedisPolicyCache

        client = connect_async(settings.redis)
        try:
            yield RedisPolicyCache(client, Keys(settings.redis.prefix))
        finally:
            await client.aclose()
        return
    if not settings.cache.state_dir:
        yield None
        return
    from tlsmilter.store.stsfile import FILE_NAME, load_policies

    cache = MemoryPolicyCache()
    cache.restore(load_policies(Path(settings.cache.state_dir) / FILE_NAME, set_aside=False),
                  time.time())
    yield cache


def _serve(args: argparse.Namespace) -> int:
    from tlsmilter.daemons.serve import serve

    settings = _serve_settings(args)
    _setup_logging(settings.log.level.value)
    return serve(settings, reread=lambda: _serve_settings(args))  # on SIGHUP


def _serve_settings(args: argparse.Namespace) -> config.Config:
    settings = config.load_optional(args.config)
    settings = _with_metrics_listen(settings, args.metrics_listen, "metrics.listen")
    if args.socket:
        problem = config.check_milter_socket(args.socket)
        if problem:
            raise UsageError(f"--socket: {problem}")
        settings = dataclasses.replace(
            settings, milter=dataclasses.replace(settings.milter, socket=args.socket))
    return settings


def _with_metrics_listen(settings: config.Config, value: str | None,
                         key: str) -> config.Config:
    """Apply ``--metrics-listen`` to the dotted config ``key`` it overrides."""
    if value is None:
        return settings
    problem = config.check_listen(value)
    if problem:
        raise UsageError(f"--metrics-listen: {problem}")
    section, name = key.split(".")
    replaced = dataclasses.replace(getattr(settings, section), **{name: value})
    return dataclasses.replace(settings, **{section: replaced})


def _worker(args: argparse.Namespace) -> int:
    from tlsmilter.daemons.worker import run_worker

    settings = config.load_optional(args.config)
    settings = _with_metrics_listen(settings, args.metrics_listen, "worker.metrics_listen")
    _setup_logging(settings.log.level.value)
    return run_worker(settings)


def _policy_server(args: argparse.Namespace) -> int:
    from tlsmilter.daemons.policy_server import run_policy_server

    settings = config.load_optional(args.config)
    settings = _with_metrics_listen(settings, args.metrics_listen,
                                    "policy_server.metrics_listen")
    if args.socket:
        if not args.socket.startswith("unix:/"):
            raise UsageError("--socket: expected unix:/PATH")
        settings = dataclasses.replace(settings, policy_server=dataclasses.replace(
            settings.policy_server, socket=args.socket))
    _setup_logging(settings.log.level.value)
    return run_policy_server(settings)


def _cache(args: argparse.Namespace) -> int:
    from tlsmilter.commands.cache import run_cache_command

    return run_cache_command(config.load_optional(args.config), args)


def _report(args: argparse.Namespace) -> int:
    from tlsmilter.commands.report import run_report

    return run_report(config.load_optional(args.config), args)


def _proof(args: argparse.Namespace) -> int:
    if args.follow:
        from tlsmilter.daemons.proof_follow import run_follow

        if args.logs or args.csv:
            raise UsageError("--follow reads standard input, as JSON or lines, not --csv")
        if args.metrics_listen:
            problem = config.check_listen(args.metrics_listen)
            if problem:
                raise UsageError(f"--metrics-listen: {problem}")
        return run_follow(args)
    from tlsmilter.commands.proof import run_proof

    return run_proof(args)


def _doctor(args: argparse.Namespace) -> int:
    from tlsmilter.commands.doctor import run_doctor

    return run_doctor(config.load_optional(args.config), args)


def _setup_logging(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
    # One line per event, no timestamps: journald (or the operator's runner) adds them.
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsmilter",
        description="Keep sensitive e-mail from leaving Postfix over insecure transport.",
    )
    parser.add_argument("--version", action="version", version=f"tlsmilter {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"config file (default: ${config.ENV_VAR} or {config.DEFAULT_PATH})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chk = commands.add_parser(
        "check",
        help="assess how securely domains can receive mail",
        description="Assess each DOMAIN's MX hosts (DNSSEC, DANE, MTA-STS, STARTTLS, "
        "certificates) and rate it none, encrypted, verified or dane. Exit status: 0 all "
        "domains encrypted or better, 3 some domain rated none, 4 some domain unknown, "
        "1 error.",
    )
    chk.add_argument("domains", nargs="+", metavar="DOMAIN")
    chk.add_argument("--json", action="store_true", help="one JSON object per domain and line")
    chk.add_argument("--resolver", metavar="HOST[:PORT]",
                     help="validating resolver for every lookup (default: prober.resolver)")
    chk.add_argument("--ca-file", metavar="PATH",
                     help="trusted CAs for SMTP certificates and MTA-STS (default: system)")
    chk.add_argument("--timeout", type=float, metavar="S",
                     help="budget for each domain in seconds (default: prober.timeouts.domain)")
    chk.set_defaults(handler=_check)

    srv = commands.add_parser(
        "serve",
        help="run the milter with the embedded cache and prober",
        description="Run the milter Postfix connects to (smtpd_milters), with the embedded "
        "in-process cache and prober. Stops cleanly on SIGTERM.",
    )
    srv.add_argument("--socket", metavar="SPEC",
                     help="unix:/PATH or inet:PORT@127.0.0.1 (default: milter.socket)")
    srv.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve /metrics here; \"\" for none (default: metrics.listen)")
    srv.set_defaults(handler=_serve)

    wrk = commands.add_parser(
        "worker",
        help="probe domains from the shared Redis queue",
        description="Take probe requests from the Redis queue that milters fill (cache.backend "
        "= \"redis\"), assess the domains and store the results for every milter. Run as many "
        "as you like, on any host; each domain is probed once at a time across all of them. "
        "Stops cleanly on SIGTERM.",
    )
    wrk.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve /metrics here; \"\" for none (default: worker.metrics_listen)")
    wrk.set_defaults(handler=_worker)

    pol = commands.add_parser(
        "policy-server",
        help="answer Postfix smtp_tls_policy_maps lookups from the shared cache",
        description="Serve Postfix's smtp_tls_policy_maps over the socketmap protocol, from "
        "the Redis cache the milters use (cache.backend = \"redis\"). With the embedded "
        "cache, tlsmilter serve runs the policy server itself. Stops cleanly on SIGTERM.",
    )
    pol.add_argument("--socket", metavar="unix:/PATH",
                     help="where to listen (default: policy_server.socket)")
    pol.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve /metrics here; \"\" for none (default: "
                     "policy_server.metrics_listen)")
    pol.set_defaults(handler=_policy_server)

    cch = commands.add_parser("cache", help="inspect or flush the shared assessment cache",
                              description="Look at the Redis cache (cache.backend = "
                              "\"redis\"): one domain, all domains, queue and counters; or "
                              "drop entries so they are assessed again.")
    cch_commands = cch.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    get = cch_commands.add_parser("get", help="show the cached assessment of a domain")
    get.add_argument("domain", metavar="DOMAIN")
    get.add_argument("--json", action="store_true", help="print the stored JSON")
    lst = cch_commands.add_parser("list", help="list cached domains with level and age")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    fls = cch_commands.add_parser("flush", help="drop one domain, or every entry")
    fls.add_argument("domain", nargs="?", metavar="DOMAIN",
                     help="the domain to drop (default: all entries of this prefix)")
    cch_commands.add_parser("stats", help="entries by level, queue length, workers")
    cch.set_defaults(handler=_cache)  # every ACTION: commands.cache dispatches on it

    rep = commands.add_parser(
        "report",
        help="per-domain report from the decision log and the cache",
        description="Summarise tlsmilter's decision log lines (and, with the Redis backend, "
        "the shared cache): the domains most often refused for sensitive mail and why, and "
        "the level mix of the domains seen. Reads the log from files or standard input, "
        "e.g. journalctl -u tlsmilter -o cat | tlsmilter report.",
    )
    rep.add_argument("logs", nargs="*", metavar="LOG",
                     help="log files with decision lines (default: standard input)")
    rep.add_argument("--top", type=int, default=10, metavar="N",
                     help="how many refused domains to list (default: 10)")
    rep.set_defaults(handler=_report)

    prf = commands.add_parser(
        "proof",
        help="per sensitive message: the TLS each recipient's delivery really used",
        description="Join Postfix's mail log with tlsmilter's decision and policy-answer "
        "lines by queue ID: one record per sensitive message with its sensitivity, policy, "
        "verdict and, per recipient, the level assessed, the TLS policy, relay, the TLS "
        "Postfix negotiated and the final status. Reads files (rotated and .gz too) or "
        "standard input, e.g. journalctl -u postfix@- -u tlsmilter -o short-iso | tlsmilter "
        "proof. Exit status: 0 no violation, 5 some sensitive delivery left in clear, below "
        "its required level or through the wrong transport, 1 error.",
    )
    prf.add_argument("logs", nargs="*", metavar="LOG",
                     help="mail log and tlsmilter log files (default: standard input)")
    prf.add_argument("--queue-id", action="append", metavar="QID",
                     help="only this message (repeatable)")
    prf.add_argument("--message-id", action="append", metavar="ID",
                     help="only the message with this Message-ID (repeatable)")
    prf.add_argument("--sender", action="append", metavar="ADDRESS",
                     help="only messages from this envelope sender (repeatable)")
    prf.add_argument("--since", metavar="TIME", help="only messages at or after TIME (ISO)")
    prf.add_argument("--until", metavar="TIME", help="only messages before TIME (ISO)")
    prf.add_argument("--json", action="store_true", help="one JSON object per message and line")
    prf.add_argument("--csv", action="store_true", help="CSV, one row per recipient")
    prf.add_argument("--follow", action="store_true",
                     help="judge each sensitive delivery as its line arrives on standard "
                     "input, e.g. from journalctl -f; with --metrics-listen, count them")
    prf.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="with --follow: serve /metrics here")
    prf.set_defaults(handler=_proof)

    doc = commands.add_parser(
        "doctor",
        help="check that Postfix is wired so sensitive mail cannot leave below its level",
        description=("Check the Postfix set-up with postconf, postconf -M and postconf -P "
                     "(milters, header-checks routes, each transport's TLS floor, policy map, "
                     "DNSSEC and log level, sockets seen from the chroot), the resolver and "
                     "serve's sockets. One line per finding: what is wrong, why it matters, "
                     "the fix. Exit status: 0 all well, 5 some FAIL (sensitive mail can leave "
                     "below its level), 6 only WARN findings, 1 error."))
    doc.add_argument("-c", dest="postfix_config", metavar="DIR",
                     help="Postfix configuration directory (default: Postfix's own)")
    doc.add_argument("--resolv-conf", default="/etc/resolv.conf", metavar="PATH",
                     help="the resolver configuration Postfix uses (default: /etc/resolv.conf)")
    doc.add_argument("--signed-name", default="isc.org", metavar="NAME",
                     help="a DNSSEC-signed name the resolver must answer with AD "
                     "(default: isc.org)")
    doc.set_defaults(handler=_doctor)

    cfg = commands.add_parser("config", help="work with the configuration file")
    cfg_commands = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = cfg_commands.add_parser(
        "check", help="validate a config file and print every error with its key"
    )
    check.add_argument("file", nargs="?", help="file to check (default: the --config path)")
    check.set_defaults(handler=_config_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except TlsmilterError as exc:
        print(f"tlsmilter: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
