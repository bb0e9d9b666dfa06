"""The shipped Prometheus rules (scripts/prometheus/): valid for Prometheus (`promtool check rules`) and
doing what rules_test.yml says — SLI values on synthetic series, the burn-rate alerts firing at a 20x
burn and staying quiet at half the budget's rate (`promtool test rules`)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parent.parent / "scripts" / "prometheus"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def test_rules_are_valid():
    result = promtool("check", "rules", "recording_rules.yml", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests_pass():
    result = promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
