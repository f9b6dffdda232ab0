"""contrib/prometheus/alerts.yml: valid rules, each with a promtool unit test that fires it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tlsmilter import metrics
from tlsmilter.daemons import instrument

RULES_DIR = Path(__file__).resolve().parents[1] / "contrib" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
RULE_TESTS = RULES_DIR / "alerts.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: scripts/bootstrap installs Debian's prometheus package")
    return subprocess.run(["promtool", *args], cwd=RULES_DIR, capture_output=True, text=True,
                          timeout=60, check=False)


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_every_alert_passes_its_unit_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_expected_to_fire_in_some_unit_test() -> None:
    # An alert whose every test case expects silence would pass with a broken expression.
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:",
                            RULE_TESTS.read_text()))
    assert alert_names() and set(alert_names()) <= firing, set(alert_names()) - firing


def test_rules_use_only_metrics_tlsmilter_exports() -> None:
    instrument.init_labels()  # as every daemon does at start
    exported = set()
    for metric in metrics.REGISTRY.collect():
        exported.update(sample.name for sample in metric.samples)
    used = set(re.findall(r"\b(tlsmilter_\w+)", RULES.read_text()))
    assert used and used <= exported, used - exported
