"""Every PromQL expression the project ships, and the Grafana variables they use.

Shared by ``test_promtool.py`` (syntax, through promtool) and ``test_prometheus_live.py`` (run
against a real Prometheus scraping a real router), so both check exactly the same expressions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "champion-challenger.json"
JOB = "champion-challenger-router"  # prometheus.yml's job name; alerts.yml selects it
ARMS = ("champion", "challenger")

# Values the Grafana variables take for a syntax check (what "All" and a 15 s scrape give).
GRAFANA_VARIABLES: Mapping[str, str] = {
    "${datasource}": "prometheus",
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
    "$model": ".*",
    "$job": ".*",
}


@dataclass(frozen=True)
class PanelQuery:
    """One query target of a dashboard panel (or an annotation, with ``ref_id`` "annotation")."""

    panel: str
    ref_id: str
    expr: str
    legend: str

    @property
    def name(self) -> str:
        return f"{self.panel} [{self.ref_id}]"

    @property
    def per_arm(self) -> bool:
        """Grafana draws one series per arm: the legend names the arm."""
        return "{{arm}}" in self.legend

    def arms(self) -> set[str]:
        """The arms (of champion, challenger) that the query's ``arm`` matchers admit."""
        admitted = set(ARMS)
        for op, value in re.findall(r'\barm\s*(=~|!~|!=|=)\s*"([^"]*)"', self.expr):
            admitted = {
                arm
                for arm in admitted
                if {
                    "=": arm == value,
                    "!=": arm != value,
                    "=~": re.fullmatch(value, arm) is not None,
                    "!~": re.fullmatch(value, arm) is None,
                }[op]
            }
        return admitted


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def panel_queries(dashboard: Mapping[str, Any] | None = None) -> list[PanelQuery]:
    """Every target of every panel, in dashboard order (rows have none)."""
    dashboard = load_dashboard() if dashboard is None else dashboard
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def annotation_queries(dashboard: Mapping[str, Any] | None = None) -> list[PanelQuery]:
    dashboard = load_dashboard() if dashboard is None else dashboard
    return [
        PanelQuery(a["name"], "annotation", a["expr"], a.get("titleFormat", ""))
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    ]


def alert_rules(path: Path = ALERTS) -> list[AlertRule]:
    groups = yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    return [
        AlertRule(rule.get("alert") or rule["record"], rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


def substitute(expr: str, variables: Mapping[str, str] = GRAFANA_VARIABLES) -> str:
    """Replace the Grafana variables (longest name first: ``$__range`` before ``$__rate...``)."""
    for variable in sorted(variables, key=len, reverse=True):
        expr = expr.replace(variable, variables[variable])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Names of the metrics an expression selects (``name{...}`` selectors)."""
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr)) - {"by", "without"}
