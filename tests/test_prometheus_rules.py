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


@pytest.mark.slow   # ~0.5 s of promtool evaluating 4 h of 1-minute series: kept out of the fast tier
def test_rules_unit_tests_pass():
    result = promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(tmp_path):
    """Every target of scripts/grafana/sub300.json parses ($__rate_interval as Grafana would fill it)."""
    import json

    dashboard = json.loads((RULES.parent / "grafana" / "sub300.json").read_text())
    exprs = [t["expr"].replace("$__rate_interval", "1m") for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) == 8 and exprs
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:panel:q{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))   # JSON is YAML
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
