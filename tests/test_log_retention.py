"""Retention (``router/log/retention.py``, ``python -m router.log retention``) on real SQLite and
PostgreSQL: a running experiment keeps every row, a finished one goes whole, champion-only traffic
goes by age, outcomes go with their last prediction row, and no transaction removes more than a
batch. The registry the command reads is a real MLflow registry.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from router.log.retention import DAY_S, apply_retention, plan_retention
from tests.conftest import MlflowRegistry
from tests.router_process import clean_env
from tests.synthlog import insert_rows
from tests.test_predlog import Backend, backend

__all__ = ["backend"]

NOW = 1_700_000_000.0
RUNNING_BY_REGISTRY = "churn-predictor:v1-vs-v2"  # what the test registry's aliases give
RUNNING_BY_TRAFFIC = "churn-predictor:v3-vs-v4"
FINISHED = "churn-predictor:v2-vs-v3"
CHAMPION_ONLY = "churn-predictor:v2-vs-vnone"


def _rows(eid: str, first_day: float, last_day: float, n: int) -> list[dict[str, Any]]:
    """``n`` one-row requests of ``eid`` spread from ``first_day`` to ``last_day`` days ago."""
    rows = []
    for i in range(n):
        age = first_day + (last_day - first_day) * i / max(n - 1, 1)
        rows.append(
            {
                "request_id": f"{eid}-{i}",
                "row_index": 0,
                "arm": "champion" if i % 2 else "challenger",
                "experiment_id": eid,
                "model_name": "churn-predictor",
                "model_version": "1",
                "ts": NOW - age * DAY_S,
                "latency_s": 0.001,
                "status": "ok",
                "routing_key_hash": None,
                "reason": None,
                "score": 0.5,
                "predicted_class": "1",
                "output": None,
            }
        )
    return rows


def _outcome(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "request_id": row["request_id"],
        "row_index": 0,
        "outcome": "1",
        "outcome_value": 1.0,
        "ts": row["ts"] + 60,
    }


@pytest.fixture
def log(backend: Backend) -> Backend:
    """A log holding the four kinds of experiment id, each with an outcome per request."""
    predictions = [
        *_rows(RUNNING_BY_REGISTRY, 40, 20, 30),  # idle for 20 days, but the aliases point at it
        *_rows(RUNNING_BY_TRAFFIC, 30, 0.01, 40),  # old rows, still served
        *_rows(FINISHED, 10, 5, 50),
        *_rows(CHAMPION_ONLY, 3, 0, 31),  # ages 3.0, 2.9, ... 0 days: 21 rows older than 1 day
    ]
    # A shadow row of a finished request: its outcome must stay until both rows are gone.
    shadow = {**_rows(FINISHED, 10, 10, 1)[0], "arm": "shadow"}
    engine = sa.create_engine(backend.url)
    try:
        insert_rows(engine, [*predictions, shadow], [_outcome(r) for r in predictions])
    finally:
        engine.dispose()
    return backend


def _per_experiment(backend: Backend) -> dict[str, int]:
    sql = "SELECT experiment_id, count(*) FROM predictions GROUP BY experiment_id"
    return {eid: int(n) for eid, n in backend.query(sql)}


def _older_than(backend: Backend, eid: str, days: float) -> int:
    cutoff = NOW - days * DAY_S
    sql = f"SELECT count(*) FROM predictions WHERE experiment_id = '{eid}' AND ts < {cutoff!r}"
    return int(backend.query(sql)[0][0])


def test_running_experiments_keep_every_row_finished_ones_go_whole(log: Backend) -> None:
    engine = sa.create_engine(log.url)
    deleted_per_statement: list[int] = []

    @sa.event.listens_for(engine, "after_cursor_execute")
    def count(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM PREDICTIONS"):
            deleted_per_statement.append(cursor.rowcount)

    try:
        plan = plan_retention(engine, 1.0, {RUNNING_BY_REGISTRY}, now=NOW)
        assert plan.running == (RUNNING_BY_REGISTRY, RUNNING_BY_TRAFFIC)
        assert plan.finished == (FINISHED,)
        assert plan.by_age == (CHAMPION_ONLY,)
        champion_only_old = _older_than(log, CHAMPION_ONLY, 1.0)
        assert champion_only_old == 20  # the row exactly 1 day old is not older than the cutoff
        result = apply_retention(engine, plan, batch_rows=7)
    finally:
        engine.dispose()
    assert _per_experiment(log) == {
        RUNNING_BY_REGISTRY: 30,
        RUNNING_BY_TRAFFIC: 40,
        CHAMPION_ONLY: 31 - champion_only_old,
    }
    assert _older_than(log, CHAMPION_ONLY, 1.0) == 0
    assert result.removed == {FINISHED: 51, CHAMPION_ONLY: champion_only_old}
    # Bounded: no DELETE removed more than a batch, and it took as many batches as that needs.
    assert deleted_per_statement and max(deleted_per_statement) <= 7
    assert sum(deleted_per_statement) == 51 + champion_only_old
    assert result.batches == math.ceil(51 / 7) + math.ceil(champion_only_old / 7)
    # Outcomes: those of removed rows are gone (the shadowed request's too), the rest kept.
    assert result.outcomes_removed == 50 + champion_only_old
    assert log.count("outcomes") == 30 + 40 + (31 - champion_only_old)
    orphans = log.query(
        "SELECT count(*) FROM outcomes o WHERE NOT EXISTS (SELECT 1 FROM predictions p "
        "WHERE p.request_id = o.request_id AND p.row_index = o.row_index)"
    )
    assert orphans == [(0,)]


def test_a_second_pass_removes_nothing(log: Backend) -> None:
    engine = sa.create_engine(log.url)
    try:
        first = apply_retention(engine, plan_retention(engine, 1.0, set(), now=NOW), 1000)
        second = apply_retention(engine, plan_retention(engine, 1.0, set(), now=NOW), 1000)
    finally:
        engine.dispose()
    # Without the registry's word the idle experiment is finished: that is why the command reads it.
    assert RUNNING_BY_REGISTRY in first.removed
    assert (second.rows_removed, second.outcomes_removed, second.batches) == (0, 0, 0)


def _command(
    registry: MlflowRegistry, workdir: Path, log_url: str, *args: str
) -> subprocess.CompletedProcess[str]:
    config = {
        "model": {"name": registry.model_name, "tracking_uri": registry.tracking_uri},
        "prediction_log": {"url": log_url, "retention_batch_rows": 10},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "router.log", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env({}),
        cwd=workdir,
    )


def test_the_command_reads_the_running_experiment_from_the_registry(
    log: Backend, mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    # The fixture's rows are dated around NOW (2023); measure the age from today instead.
    days = 1.0 + (time.time() - NOW) / DAY_S
    dry = _command(
        mlflow_registry, tmp_path, log.url, "retention", "--days", str(days), "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["running"] == [RUNNING_BY_REGISTRY, RUNNING_BY_TRAFFIC]
    assert plan["finished"] == [FINISHED]
    assert _per_experiment(log)[FINISHED] == 51  # a dry run removes nothing
    done = _command(mlflow_registry, tmp_path, log.url, "retention", "--days", str(days))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows_removed"][FINISHED] == 51
    assert set(_per_experiment(log)) == {RUNNING_BY_REGISTRY, RUNNING_BY_TRAFFIC, CHAMPION_ONLY}


def test_the_command_refuses_without_a_retention_period(
    log: Backend, mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    done = _command(mlflow_registry, tmp_path, log.url, "retention")
    assert done.returncode == 2  # a bad configuration, as for every command
    assert done.stderr.strip() == (
        "python -m router.log: configuration error: "
        "prediction_log.retention_days is not set (or pass --days)"
    )
    assert done.stdout == ""
