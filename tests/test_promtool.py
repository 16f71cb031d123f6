"""promtool's checks of the Prometheus config and alert rules, and the alerts' unit tests.

Also parses every dashboard expression (Grafana variables substituted) with promtool, so a query
with a syntax error fails here before the live-Prometheus test runs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.promql import (
    PROMETHEUS_DIR,
    ROOT,
    alert_rules,
    annotation_queries,
    panel_queries,
    substitute,
)

pytestmark = pytest.mark.prometheus


@pytest.fixture(scope="module")
def promtool() -> str:
    # A skip only locally: conftest fails a skipped `prometheus` test in CI.
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH (Debian package `prometheus`; .ci/run installs it)")
    return path


def _run(promtool: str, *args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_check_config(promtool: str) -> None:
    # rule_files are resolved relative to the config file, whatever the working directory.
    out = _run(promtool, "check", "config", "deploy/prometheus/prometheus.yml")
    assert "SUCCESS" in out


def test_check_rules(promtool: str) -> None:
    out = _run(promtool, "check", "rules", "deploy/prometheus/alerts.yml")
    assert f"{len(alert_rules())} rules found" in out
    # Every alert is exercised by a promtool unit test (a new alert without one fails here).
    tested = set(
        re.findall(r"alertname:\s*(\w+)", (PROMETHEUS_DIR / "alerts_test.yml").read_text())
    )
    assert {rule.name for rule in alert_rules()} <= tested


def test_alert_unit_tests(promtool: str) -> None:
    out = _run(promtool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in out


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    queries = panel_queries() + annotation_queries()
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": substitute(q.expr)} for i, q in enumerate(queries)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = _run(promtool, "check", "rules", str(path))
    assert f"{len(rules)} rules found" in out
