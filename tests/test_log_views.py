"""The warehouse views (``experiment_assignments``, ``prediction_facts``) return what the
evaluator's aggregation sees: the same units per arm, the same requests, client errors, fallbacks,
judged rows and correct ones. Real SQLite and PostgreSQL, synthetic logs with sticky users, client
errors and challenger fallbacks, and the evaluator's own ``read_summary``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from experiments.aggregate import read_summary
from router.log.warehouse import create_views
from router.logschema import ASSIGNMENTS_VIEW, FACTS_VIEW, Arm
from tests.router_process import clean_env
from tests.synthlog import T0, write_log
from tests.synthlog import Arm as Spec
from tests.test_predlog import Backend, backend

__all__ = ["backend"]

EID = "churn-predictor:v1-vs-v2"
WINDOW_S = 600.0
CUTOFF = T0 + 10_000_000.0  # every prediction matured


@pytest.mark.parametrize("users", [0, 300], ids=["requests-are-units", "sticky-users"])
def test_views_agree_with_the_evaluators_aggregation(backend: Backend, users: int) -> None:
    write_log(
        backend.url,
        experiment_id=EID,
        n_requests=3000,
        users=users,
        challenger_weight=0.3,
        champion=Spec(accuracy=0.7, error_rate=0.02),
        challenger=Spec(accuracy=0.75, error_rate=0.05),
        client_error_rate=0.03,
        seed=users,
    )
    write_log(backend.url, experiment_id="other:v1-vs-v2", n_requests=50, seed=9)  # not ours
    engine = sa.create_engine(backend.url)
    try:
        with engine.begin() as conn:
            assert create_views(conn) == [ASSIGNMENTS_VIEW, FACTS_VIEW]
        with engine.connect() as conn:
            summary = read_summary(
                conn,
                EID,
                metric="accuracy",
                cutoff=CUTOFF,
                window_s=WINDOW_S,
                cap_quantile=None,
                default_weight=0.3,
            )
            for arm, data in (
                (Arm.CHAMPION, summary.champion),
                (Arm.CHALLENGER, summary.challenger),
            ):
                units, requests = conn.execute(
                    sa.text(
                        f"SELECT COUNT(*), SUM(requests) FROM {ASSIGNMENTS_VIEW} "
                        "WHERE experiment_id = :e AND arm = :a"
                    ),
                    {"e": EID, "a": arm.value},
                ).one()
                facts = conn.execute(
                    sa.text(
                        "SELECT SUM(CASE WHEN row_index = 0 AND status = 'client_error' "
                        "THEN 1 ELSE 0 END),"
                        " SUM(CASE WHEN row_index = 0 AND status = 'fallback' THEN 1 ELSE 0 END),"
                        " SUM(CASE WHEN judged THEN 1 ELSE 0 END),"
                        " SUM(CASE WHEN judged AND predicted_class = outcome THEN 1 ELSE 0 END) "
                        "FROM (SELECT f.*, (status IN ('ok', 'fallback') AND ts <= :cutoff AND "
                        "outcome_ts IS NOT NULL AND outcome_ts <= ts + :w) AS judged "
                        f"FROM {FACTS_VIEW} f WHERE experiment_id = :e AND arm = :a) t"
                    ),
                    {"e": EID, "a": arm.value, "cutoff": CUTOFF, "w": WINDOW_S},
                ).one()
                assert (units, requests) == (data.units, data.requests), arm
                client_errors, fallbacks, judged, correct = facts
                assert (client_errors, fallbacks) == (data.client_errors, data.fallbacks), arm
                assert (judged, correct) == (data.metric.sum_y, data.metric.sum_x), arm
                assert data.units > 0 and judged > 0  # the comparison compared something
            if users:
                assert summary.keyed
                unit_types = conn.execute(
                    sa.text(
                        f"SELECT DISTINCT unit_type FROM {ASSIGNMENTS_VIEW} "
                        "WHERE experiment_id = :e"
                    ),
                    {"e": EID},
                ).all()
                assert unit_types == [("routing_key",)]
            versions = conn.execute(
                sa.text(
                    f"SELECT arm, model_version, COUNT(*) FROM {ASSIGNMENTS_VIEW} "
                    "WHERE experiment_id = :e GROUP BY arm, model_version ORDER BY arm"
                ),
                {"e": EID},
            ).all()
            # A fallback row carries the champion's version; the assignment names the arm's own.
            assert [(a, v) for a, v, _ in versions] == [("challenger", "2"), ("champion", "1")]
    finally:
        engine.dispose()


def test_the_views_command_is_idempotent_and_needs_the_tables(
    backend: Backend, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"model": {"name": "m"}, "prediction_log": {"url": backend.url}}),
        encoding="utf-8",
    )

    def views() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "router.log", "--config", str(config), "views"],
            capture_output=True,
            text=True,
            timeout=120,
            env=clean_env({}),
            cwd=tmp_path,
        )

    first = views()
    assert first.returncode == 1
    assert "no predictions/outcomes tables yet" in first.stderr
    write_log(backend.url, experiment_id=EID, n_requests=10)
    for _ in range(2):
        done = views()
        assert done.returncode == 0, done.stderr
    assert backend.query(f"SELECT COUNT(*) FROM {FACTS_VIEW}") == [(10,)]
