"""The command line: help everywhere, clear errors, documented exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from tlsmilter import __version__, cli

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlsmilter.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"tlsmilter {__version__}"


def subcommands(parser: argparse.ArgumentParser | None = None,
                prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """Every subcommand path, e.g. ["config", "check"], walked from the real parser."""
    parser = parser or cli.build_parser()
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append([*prefix, name])
                found.extend(subcommands(sub, (*prefix, name)))
    return found


@pytest.mark.parametrize("words", subcommands(), ids=" ".join)
def test_every_subcommand_has_help(words: list[str]) -> None:
    done = run(*words, "--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: tlsmilter " + " ".join(words))


def test_config_check_reports_every_error_and_fails(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[prober]\nmax_mx = "ten"\nresolvr = "1.1.1.1"\n')
    done = run("config", "check", str(path))
    assert done.returncode == 1
    assert "prober.max_mx: expected an integer" in done.stderr
    assert "prober.resolvr: unknown key (did you mean prober.resolver?)" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_check_accepts_the_example() -> None:
    done = run("config", "check", str(ROOT / "contrib" / "tlsmilter.toml"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": OK")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "[10.0.0.1]"], "address literal"),
        (["check", "bad..domain"], "not a mail domain"),
        (["check", "example.test", "--resolver", "dns.example"], "--resolver: "),
        (["check", "example.test", "--timeout", "0"], "--timeout must be greater than 0"),
        (["check", "example.test", "--ca-file", "/nonexistent.pem"], "--ca-file: "),
    ],
)
def test_check_rejects_bad_input_without_traceback(args: list[str], message: str) -> None:
    done = run(*args)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
