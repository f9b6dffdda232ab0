"""Config loading: defaults, every error with its key, docs and example in step."""

from __future__ import annotations

import datetime
import json
import re
import tomllib
from pathlib import Path

import pytest

from tlsmilter import cli, config
from tlsmilter.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def issues_of(raw: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.from_mapping(raw)
    return [str(i) for i in info.value.issues]


def test_empty_file_is_the_default() -> None:
    assert config.from_mapping({}) == config.Config()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"prober": {"max_mxx": 3}}, "prober.max_mxx: unknown key (did you mean prober.max_mx?)"),
        ({"nope": {}}, "nope: unknown key"),
        ({"prober": {"max_mx": "3"}}, "prober.max_mx: expected an integer, got a string ('3')"),
        ({"prober": {"max_mx": True}}, "prober.max_mx: expected an integer, got a boolean"),
        ({"prober": {"max_mx": 0}}, "prober.max_mx: must be greater than 0"),
        ({"prober": {"resolver": "resolver.example"}}, "is not an IP address"),
        ({"prober": {"resolver": "127.0.0.1:99999"}}, "port must be a number from 1 to 65535"),
        ({"prober": {"ca_file": "/nonexistent/ca.pem"}}, "prober.ca_file: file does not exist"),
        ({"prober": {"min_tls_version": "1.0"}}, "prober.min_tls_version: expected one of"),
        ({"prober": {"timeouts": {"dns": -1}}}, "prober.timeouts.dns: must be greater than 0"),
        ({"prober": {"timeouts": 5}}, "prober.timeouts: expected a table"),
        ({"log": {"level": "loud"}}, "log.level: expected one of"),
        ({"cache": {"state_dir": "var/lib/tlsmilter"}}, "cache.state_dir: an absolute path"),
        ({"cache": {"snapshot_interval": 0}}, "cache.snapshot_interval: must be greater than 0"),
        ({"policies": {"private": {"reply": ["x"] * 9}}},
         "policies.private.reply: at most 8 lines, not 9"),
        ({"policies": {"private": {"reply": ["x" * 201]}}},
         "policies.private.reply: lines of at most 200 characters"),
    ],
)
def test_each_error_names_its_key(raw: dict[str, object], expected: str) -> None:
    (issue,) = issues_of(raw)
    assert expected in issue


def test_all_errors_are_reported_at_once() -> None:
    found = issues_of({"prober": {"max_mx": -1, "concurrency": "x"}, "log": {"level": 3}})
    assert len(found) == 3


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("127.0.0.1", "127.0.0.1", 53), ("127.0.0.1:5353", "127.0.0.1", 5353),
     ("::1", "::1", 53), ("[::1]:5353", "::1", 5353)],
)
def test_resolver_address_forms(text: str, host: str, port: int) -> None:
    assert config.parse_host_port(text, default_port=53) == (host, port)


def test_values_are_typed() -> None:
    cfg = config.from_mapping({"prober": {"min_tls_version": "1.3", "timeouts": {"dns": 2}}})
    assert cfg.prober.min_tls_version is config.TlsVersion.TLS1_3
    assert cfg.prober.timeouts.dns == 2.0 and isinstance(cfg.prober.timeouts.dns, float)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[prober\nmax_mx = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_example_config_is_valid_and_shows_defaults() -> None:
    assert config.load(ROOT / "contrib" / "tlsmilter.toml") == config.Config()


def test_every_key_is_documented_with_its_default() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for key, field in config.documented_keys().items():
        row = re.search(rf"^\| `{re.escape(key)}` \|(.*)$", doc, re.MULTILINE)
        assert row, f"{key} is not documented in docs/configuration.md"
        default = field.default_factory() if callable(field.default_factory) else field.default
        if isinstance(default, dict):
            shown = [f'"{k}" = "{v}"' for k, v in default.items()]
        else:
            value = default.value if hasattr(default, "value") else default
            shown = [f"`{json.dumps(value)}`"]
        for part in shown:
            assert part in row.group(1), f"{key}: docs do not show the default {part}"


@pytest.mark.parametrize(
    ("sensitivity", "expected"),
    [
        ({"labels": {"not-a-guid": "private"}}, "sensitivity.labels.not-a-guid: expected a "
                                                "label GUID"),
        ({"labels": {"f42aa342-8706-4288-bd11-ebb85995028c@tenant": "private"}},
         "or GUID@TENANT-SITEID"),
        ({"labels": {"f42aa342-8706-4288-bd11-ebb85995028c": "secret"}},
         "no policy named 'secret'"),
        ({"labels": {"F42AA342-8706-4288-BD11-EBB85995028C": "private",
                     "f42aa342-8706-4288-bd11-ebb85995028c": "private"}}, "duplicate of"),
        ({"label_names": {"Secret": "nope"}}, "sensitivity.label_names.Secret: no policy"),
        ({"subject_keywords": {"[secure]": "nope"}}, "no policy named 'nope'"),
        ({"subject_keywords": {" ": "private"}}, "must not be empty"),
        ({"subject_match": "middle"}, "sensitivity.subject_match: expected one of"),
        ({"senders": {"a@b@c": "private"}}, "expected an address, a domain"),
        ({"senders": {"HR.example.org": "private", "hr.example.org.": "personal"}},
         "duplicate of"),
        ({"strip_subject_keyword": "yes"}, "expected true or false"),
    ],
)
def test_marking_rules_are_checked(sensitivity: dict[str, object], expected: str) -> None:
    (issue,) = issues_of({"sensitivity": sensitivity})
    assert expected in issue


def test_the_documented_m365_example_is_valid() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    example = doc.split("**Worked example: an M365 tenant's labels.**")[1]
    toml = example.split("```toml\n")[1].split("```")[0]
    cfg = config.from_mapping(tomllib.loads(toml))
    assert cfg.sensitivity.labels["f42aa342-8706-4288-bd11-ebb85995028c"] == "confidential"
    assert cfg.sensitivity.senders == {"hr.example.org": "personal"}


@pytest.mark.parametrize(
    ("domains", "expected"),
    [
        ({"m.example": {"action": "require", "level": "dane"}},
         "overrides.domains.m.example.reason: a reason is required"),
        ({"m.example": {"reason": " "}}, "a reason is required"),
        ({"m.example": {"action": "trust", "reason": "r"}}, "expected one of 'require', 'deny'"),
        ({"m.example": {"level": "none", "reason": "r"}}, "level: expected one of"),
        ({"m.example": {"reason": "r", "expires": "31-12-2026"}}, "is not a date as YYYY-MM-DD"),
        ({"M.Example.": {"reason": "r"}, "m.example": {"reason": "r"}}, "duplicate of"),
        ({"bücher.example": {"reason": "r"}, "xn--bcher-kva.example": {"reason": "r"}},
         "duplicate of"),
        ({"not a domain": {"reason": "r"}}, "overrides.domains.not a domain: not a domain"),
    ],
)
def test_overrides_are_checked(domains: dict[str, object], expected: str) -> None:
    (issue,) = issues_of({"overrides": {"domains": domains}})
    assert expected in issue


def test_an_expired_override_loads_but_config_check_reports_it() -> None:
    cfg = config.from_mapping({"overrides": {"domains": {
        "old.example": {"action": "deny", "reason": "r", "expires": "2026-12-01"},
        "new.example": {"reason": "r", "expires": "2026-12-02"}}}})
    (issue,) = config.expiry_issues(cfg, datetime.date(2026, 12, 2))
    assert str(issue).startswith("overrides.domains.old.example.expires: expired on 2026-12-01")


def test_config_check_exits_1_on_an_expired_override(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[overrides.domains."old.example"]\naction = "deny"\nreason = "gone"\n'
                    'expires = "2020-01-01"\n')
    assert cli.main(["config", "check", str(path)]) == 1
    assert "expired on 2020-01-01" in capsys.readouterr().err
    path.write_text('[overrides.domains."old.example"]\naction = "deny"\nreason = "gone"\n')
    assert cli.main(["config", "check", str(path)]) == 0
