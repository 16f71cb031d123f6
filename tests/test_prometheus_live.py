"""Every dashboard query and every alert expression, run by a real Prometheus over a real router.

A router (real uvicorn, a copy of the session's MLflow registry, both arms at 50%) is scraped every
second by a Prometheus subprocess on 127.0.0.1 that also loads ``deploy/prometheus/alerts.yml``.
Traffic with feedback goes to both arms in three batches, each one waited for in Prometheus (so
every counter has risen across several scrapes and every ``rate()`` is positive). Then, through
the HTTP API, with the Grafana variables substituted:

- each panel target parses, and returns a number for each arm its legend shows (``{{arm}}``,
  restricted to the arms its ``arm`` matchers admit), or at least one number otherwise;
- each annotation query parses, and "Model version changes" marks both arms entering service;
- each alert expression evaluates, and every rule group loaded and evaluates with health "ok";
- every metric any of them selects is exported by the router (a misspelt name returns nothing
  silently in PromQL).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import MlflowRegistry, free_port
from tests.live_router import (
    http_client,
    keys_for,
    send_with_feedback,
    wait_until,
)
from tests.promql import (
    ALERTS,
    JOB,
    PanelQuery,
    alert_rules,
    annotation_queries,
    metric_names,
    panel_queries,
    substitute,
)

pytestmark = [pytest.mark.prometheus, pytest.mark.timeout(180)]

SALT = "prometheus-live"
WEIGHT = 0.5
BATCHES = 3
PER_ARM_PER_BATCH = 4
POLL_S = 0.2  # between looks at Prometheus, which scrapes every second


def _prometheus_binary() -> str:
    # A skip only locally: conftest fails a skipped `prometheus` test in CI.
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus not on PATH (Debian package `prometheus`; .ci/run installs it)")
    return path


class Prometheus:
    """The HTTP API of the Prometheus under test."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)

    def query(self, expr: str) -> dict[str, Any]:
        """An instant query's whole answer (``status``, ``data`` or ``error``)."""
        answer: dict[str, Any] = self.client.get("/api/v1/query", params={"query": expr}).json()
        return answer

    def vector(self, expr: str) -> list[dict[str, Any]]:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}\n{answer}"
        assert answer["data"]["resultType"] == "vector", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        result = self.vector(expr)
        return float(result[0]["value"][1]) if result else None

    def rules(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self.client.get("/api/v1/rules").json()["data"]["groups"]
        return groups


@pytest.fixture
def router_routing() -> dict[str, Any]:
    """For ``fresh_router`` (conftest): both arms at ``WEIGHT``, keys hashed with ``SALT``."""
    return {"challenger_weight": WEIGHT, "salt": SALT}


@pytest.fixture
def prometheus(fresh_router: tuple[str, MlflowRegistry], tmp_path: Path) -> Iterator[Prometheus]:
    binary = _prometheus_binary()
    target = fresh_router[0].removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    api = Prometheus(f"http://127.0.0.1:{port}")
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {process.returncode}:\n{log_path.read_text()}"
                )
            try:  # /-/ready: the TSDB is open (queries answer 503 before that)
                if api.client.get("/-/ready").status_code != 200:
                    return False
            except httpx.TransportError:
                return False
            return api.scalar(f'up{{job="{JOB}"}}') == 1.0

        wait_until(up, "Prometheus to scrape the router", interval_s=POLL_S)
        yield api
    finally:
        api.client.close()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _send_batch(client: httpx.Client, registry: MlflowRegistry, batch: int) -> int:
    """PER_ARM_PER_BATCH one-row requests to each arm, each with its true outcome as feedback."""
    n = PER_ARM_PER_BATCH
    rows = registry.holdout.iloc[batch * 2 * n : (batch + 1) * 2 * n].reset_index(drop=True)
    keys = [
        key
        for arm in ("champion", "challenger")
        for key in keys_for(arm, n, salt=SALT, weight=WEIGHT, start=batch * 1000)
    ]
    answers = send_with_feedback(client, rows, keys)
    assert {answer["arm"] for answer in answers} == {"champion", "challenger"}
    return len(keys)


def _wait_scraped(prometheus: Prometheus, expr: str, value: float) -> None:
    wait_until(
        lambda: prometheus.scalar(expr) == value,
        f"{expr} == {value} in Prometheus",
        interval_s=POLL_S,
    )


def _is_number(sample: dict[str, Any]) -> bool:
    return math.isfinite(float(sample["value"][1]))


def test_every_dashboard_query_and_alert_expression_works_on_a_live_router(
    fresh_router: tuple[str, MlflowRegistry], prometheus: Prometheus
) -> None:
    started = time.monotonic()
    base_url, registry = fresh_router
    selector = f'job="{JOB}"'
    sent = 0
    with http_client(base_url) as client:
        for batch in range(BATCHES):
            sent += _send_batch(client, registry, batch)
            # Wait for the scrape that saw this batch: counters then rise across several scrapes.
            for metric in ("router_requests_total", "router_feedback_total"):
                _wait_scraped(prometheus, f"sum({metric}{{{selector}}})", sent)
    instance = base_url.removeprefix("http://")
    # The whole run fits in the rate window, so every rate() sees all the traffic.
    window = f"{math.ceil(time.monotonic() - started) + 30}s"
    variables = {
        "${datasource}": "prometheus",
        "$__rate_interval": window,
        "$__interval": "1s",
        "$__range": window,
        "$instance": instance,
        "$model": registry.model_name,
        "$job": JOB,
    }

    failures: list[str] = []
    panels = panel_queries()
    assert len(panels) >= 30
    for q in panels:
        failures += _check_panel(prometheus, q, substitute(q.expr, variables))

    annotations = {q.panel: q for q in annotation_queries()}
    for q in annotations.values():
        answer = prometheus.query(substitute(q.expr, variables))
        if answer["status"] != "success":
            failures.append(f"annotation {q.name}: {answer.get('error')}")
    # Inside the first 5 minutes both versions "entered service": the annotation must mark them.
    entered = prometheus.vector(substitute(annotations["Model version changes"].expr, variables))
    assert {s["metric"]["arm"] for s in entered} == {"champion", "challenger"}, entered

    rules = alert_rules()
    assert len(rules) >= 9
    for rule in rules:
        answer = prometheus.query(rule.expr)
        if answer["status"] != "success":
            failures.append(f"alert {rule.name}: {answer.get('error')}")

    exported = {s["metric"]["__name__"] for s in prometheus.vector(f"{{{selector}}}")}
    for expr in (
        [q.expr for q in panels] + [q.expr for q in annotations.values()] + [r.expr for r in rules]
    ):
        for name in metric_names(expr) - exported:
            failures.append(f"{name} is not exported by the router (selected by: {expr})")

    assert not failures, "\n".join(failures)
    _assert_rules_healthy(prometheus, {r.name for r in rules})


def _check_panel(prometheus: Prometheus, q: PanelQuery, expr: str) -> list[str]:
    answer = prometheus.query(expr)
    if answer["status"] != "success":
        return [f"{q.name}: {answer.get('errorType')}: {answer.get('error')}\n  {expr}"]
    result = answer["data"]["result"]
    numbers = [s for s in result if _is_number(s)]
    if not q.per_arm:
        return [] if numbers else [f"{q.name}: no number in {result}\n  {expr}"]
    expected = q.arms()
    assert expected, f"{q.name}: its legend is per arm but it admits no arm"
    shown = {s["metric"].get("arm") for s in numbers}
    missing = expected - shown
    return [f"{q.name}: no number for {sorted(missing)} in {result}\n  {expr}"] if missing else []


def _assert_rules_healthy(prometheus: Prometheus, names: set[str]) -> None:
    """Every rule loaded and has been evaluated without error."""

    def evaluated() -> list[dict[str, Any]]:
        rules = [rule for group in prometheus.rules() for rule in group["rules"]]
        done = all(not rule["lastEvaluation"].startswith("0001-") for rule in rules)
        return rules if done and rules else []

    rules = wait_until(evaluated, "every alert rule to be evaluated", interval_s=POLL_S)
    assert {rule["name"] for rule in rules} == names
    unhealthy = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy, unhealthy
