"""Accuracy and error defined once: the live feedback metrics count what the evaluator counts.

A predicted class is correct for an outcome by ``logschema.class_matches`` in both places (numbers
compare numerically: the class ``"01"`` is right about an outcome of ``1``); the error metrics are
computed from the outcome's stored numeric form (``ScoredRow.outcome_value``, the column the
evaluator reads), never from the outcome again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc.model import PythonModel
from prometheus_client import CollectorRegistry

from demo.data import FEATURES
from experiments.decision import row_metric
from router.config import MetricName
from router.log.feedback import FeedbackItem, FeedbackResult
from router.log.predlog import PredictionLog, PredictionRecord
from router.logschema import Arm, RowStatus, outcome_number
from router.metrics import RouterMetrics
from router.recording import Recorder
from router.server.app import create_app
from tests.conftest import MlflowRegistry
from tests.live_router import http_client, query_log, router_settings, split_body, wait_ready
from tests.metrics_text import scrape
from tests.pyfunc_models import register_pyfunc
from tests.test_predlog import rec

RunningServer = Callable[..., AbstractContextManager[str]]
FreshRegistry = Callable[[], MlflowRegistry]


class LabelModel(PythonModel):
    """Answers the class label ``label`` (text) for every row."""

    def __init__(self, label: str) -> None:
        self.label = label

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        return np.array([self.label] * len(model_input), dtype=object)


# Outcomes as clients send them, and whether the class "01" is correct for each.
OUTCOMES: list[tuple[Any, bool]] = [
    (1, True),
    (1.0, True),
    (True, True),
    ("01", True),
    ("1", False),  # text compares as text
    (0, False),
]


def test_the_feedback_metric_and_the_evaluator_agree_on_accuracy(
    fresh_registry: FreshRegistry, running_server: RunningServer, tmp_path: Path
) -> None:
    registry = fresh_registry()
    frame = registry.holdout[FEATURES]
    version = register_pyfunc(
        registry.tracking_uri, registry.model_name, LabelModel("01"), frame, alias="champion"
    )
    log_path = tmp_path / "predictions.db"
    settings = router_settings(registry, log_path, routing={"challenger_weight": 0.0})
    with running_server(create_app(settings)) as url, http_client(url) as client:
        wait_ready(client)
        for i, (outcome, _) in enumerate(OUTCOMES):
            answer = client.post(
                "/invocations", json=split_body(frame.iloc[[i]]), headers={"X-Request-Id": f"r{i}"}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["predictions"] == ["01"]
            fed = client.post("/feedback", json={"request_id": f"r{i}", "outcome": outcome})
            assert fed.status_code == 200, fed.text
        metrics = scrape(client)
    labels = {"arm": Arm.CHAMPION.value, "model_version": version}
    assert metrics.total("router_feedback_total", **labels) == len(OUTCOMES)
    correct = sum(ok for _, ok in OUTCOMES)
    assert metrics.total("router_feedback_correct_total", **labels) == correct

    logged = query_log(
        f"sqlite:///{log_path}",
        "SELECT p.request_id, p.score, p.predicted_class, o.outcome, o.outcome_value"
        " FROM predictions p JOIN outcomes o USING (request_id, row_index)"
        " WHERE p.arm = :arm ORDER BY p.request_id",
        arm=Arm.CHAMPION.value,
    )
    assert len(logged) == len(OUTCOMES)
    evaluated = {rid: row_metric("accuracy", *values) for rid, *values in logged}
    assert evaluated == {f"r{i}": 1.0 if ok else 0.0 for i, (_, ok) in enumerate(OUTCOMES)}


def test_the_error_metrics_use_the_stored_numeric_outcome(tmp_path: Path) -> None:
    plog = PredictionLog(f"sqlite:///{tmp_path / 'predictions.db'}")
    plog.start()
    # The writer creates the tables in its own thread: feedback before that is a 503.
    assert plog.wait_prepared(30.0)
    try:
        plog.enqueue(
            [
                PredictionRecord(
                    request_id="r1",
                    row_index=0,
                    arm=Arm.CHAMPION.value,
                    experiment_id="m:v1-vs-vnone",
                    model_name="m",
                    model_version="1",
                    ts=time.time(),
                    latency_s=0.001,
                    status=RowStatus.OK.value,
                    score=0.8,
                    predicted_class="1",
                )
            ]
        )
        [result] = plog.record_feedback([FeedbackItem("r1", True)])
    finally:
        plog.close()
    [row] = result.rows
    assert row.outcome_value == outcome_number(True) == 1.0

    registry = CollectorRegistry()
    recorder = Recorder("m", RouterMetrics(registry), plog)
    recorder.feedback(result)
    # A row whose stored numeric form differs from the outcome's: the metric follows the former.
    other = replace(row, outcome_value=0.5)
    recorder.feedback(FeedbackResult("r2", [other], 1))

    labels = {"arm": Arm.CHAMPION.value, "model_version": "1"}
    evaluated = [
        (
            row_metric("abs_error", r.score, r.predicted_class, json.dumps(r.outcome), v),
            row_metric("squared_error", r.score, r.predicted_class, json.dumps(r.outcome), v),
        )
        for r, v in ((row, row.outcome_value), (other, other.outcome_value))
    ]
    abs_total = registry.get_sample_value("router_feedback_abs_error_total", labels)
    squared_total = registry.get_sample_value("router_feedback_squared_error_total", labels)
    assert abs_total == pytest.approx(abs(0.8 - 1.0) + abs(0.8 - 0.5))
    assert abs_total == pytest.approx(sum(a for a, _ in evaluated if a is not None))
    assert squared_total == pytest.approx((0.8 - 1.0) ** 2 + (0.8 - 0.5) ** 2)
    assert squared_total == pytest.approx(sum(s for _, s in evaluated if s is not None))


def test_every_live_metric_judges_served_rows_as_the_evaluator_does(tmp_path: Path) -> None:
    """Each metric's live sum over its judged rows equals the evaluator's row metric; an error
    row (nothing served) is fed back but judged by none."""
    plog = PredictionLog(f"sqlite:///{tmp_path / 'predictions.db'}")
    plog.start()
    assert plog.wait_prepared(30.0)
    rows = [  # (request id, status, score, class, outcome)
        ("a", RowStatus.OK, 0.8, "1", 1),
        ("b", RowStatus.OK, 0.3, "0", 1),
        ("c", RowStatus.FALLBACK, 0.6, "1", 0),
        ("d", RowStatus.ERROR, None, None, 1),
    ]
    try:
        plog.enqueue(
            [
                rec(rid, status=status.value, score=score, predicted_class=cls)
                for rid, status, score, cls, _ in rows
            ]
        )
        results = plog.record_feedback([FeedbackItem(rid, y) for rid, *_, y in rows])
    finally:
        plog.close()
    registry = CollectorRegistry()
    recorder = Recorder("m", RouterMetrics(registry), plog)
    for result in results:
        recorder.feedback(result)

    labels = {"arm": Arm.CHAMPION.value, "model_version": "1"}
    assert registry.get_sample_value("router_feedback_total", labels) == len(rows)
    sums: dict[MetricName, str] = {
        "accuracy": "router_feedback_correct_total",
        "log_loss": "router_feedback_log_loss_total",
        "brier": "router_feedback_brier_total",
        "abs_error": "router_feedback_abs_error_total",
        "squared_error": "router_feedback_squared_error_total",
        "outcome": "router_feedback_outcome_total",
    }
    for metric, name in sums.items():
        evaluated = [
            row_metric(metric, score, cls, json.dumps(y), outcome_number(y))
            for _, status, score, cls, y in rows
            if status is not RowStatus.ERROR
        ]
        judged = [v for v in evaluated if v is not None]
        live = registry.get_sample_value(name, labels)
        count = registry.get_sample_value(
            "router_feedback_judged_total", {**labels, "metric": metric}
        )
        assert count == len(judged) == 3, metric
        assert live == pytest.approx(sum(judged)), metric
