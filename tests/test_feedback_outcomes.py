"""An outcome is stored only when the configured metric can judge it (README "Feedback").

Before: a regression experiment took ``"abc"``, ``"150"`` or ``{"y": 1}`` as an outcome (200,
stored with no numeric form, counted in ``router_feedback_total``), and the right value sent
afterwards was a 409. Now each is a 400 naming the value and what the metric needs, and nothing is
stored. The rule is ``logschema.outcome_fits``, one table of cases here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from demo.data import FEATURES
from router.config import METRICS, MetricName
from router.errors import InvalidInput
from router.log.feedback import FeedbackItem
from router.log.predlog import PredictionLog
from router.logschema import OUTCOME_NEEDS, Arm, outcome_fits
from tests.conftest import MlflowRegistry, RunningRouter
from tests.live_router import RouterDir, split_body
from tests.metrics_text import scrape
from tests.pyfunc_models import ConstantRegressor, register_in
from tests.test_predlog import rec

FreshRegistry = Callable[[], MlflowRegistry]

# (metric, outcome, fits): one row's outcome as a client sends it (decoded JSON).
CASES: list[tuple[MetricName, Any, bool]] = [
    ("accuracy", 1, True),
    ("accuracy", 1.0, True),
    ("accuracy", True, True),
    ("accuracy", "churn", True),
    ("accuracy", "", False),
    ("accuracy", 0.7, False),  # a probability sent by mistake, not a class
    ("accuracy", {"y": 1}, False),
    ("accuracy", [1], False),  # a list inside a row's outcome
    ("log_loss", 0, True),
    ("log_loss", 1.0, True),
    ("log_loss", False, True),
    ("log_loss", "1", False),  # the evaluator reads 0/1 numbers only
    ("log_loss", 2, False),
    ("log_loss", 0.3, False),
    ("brier", True, True),
    ("brier", "churn", False),
    ("abs_error", 150, True),
    ("abs_error", -2.5, True),
    ("abs_error", "150", False),
    ("abs_error", "abc", False),
    ("abs_error", True, False),  # a boolean is no regression target
    ("squared_error", 0, True),
    ("squared_error", {"y": 1}, False),
    ("squared_error", [1], False),
    ("outcome", 12.5, True),
    ("outcome", True, True),
    ("outcome", "yes", False),
]


@pytest.mark.parametrize(("metric", "outcome", "fits"), CASES, ids=[repr(c) for c in CASES])
def test_what_each_metric_takes_as_an_outcome(metric: MetricName, outcome: Any, fits: bool) -> None:
    assert outcome_fits(metric, outcome) is fits


def test_every_metric_says_what_it_needs() -> None:
    assert set(OUTCOME_NEEDS) == set(METRICS)


@pytest.fixture
def plog(tmp_path: Path) -> Iterator[PredictionLog]:
    log = PredictionLog(f"sqlite:///{tmp_path / 'predictions.db'}")
    log.start()
    assert log.wait_prepared(30.0)
    try:
        yield log
    finally:
        log.close()


def _logged(plog: PredictionLog, request_id: str, n_rows: int) -> None:
    plog.enqueue([rec(request_id, i, score=0.5) for i in range(n_rows)])
    plog.flush()


def test_a_batch_with_one_unfit_outcome_stores_nothing(plog: PredictionLog) -> None:
    _logged(plog, "a", 1)
    _logged(plog, "b", 3)
    with pytest.raises(InvalidInput) as info:
        plog.record_feedback(
            [FeedbackItem("a", 1), FeedbackItem("b", [0, "1", 1])], metric="log_loss"
        )
    message = info.value.message
    assert "'b'" in message and "row 1" in message and '"1"' in message, message
    assert "log_loss" in message and OUTCOME_NEEDS["log_loss"] in message, message
    with plog.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM outcomes").scalar() == 0
    results = plog.record_feedback(
        [FeedbackItem("a", 1), FeedbackItem("b", [0, True, 1])], metric="log_loss"
    )
    assert [r.created for r in results] == [1, 3]


def test_a_regression_experiment_refuses_outcomes_it_cannot_judge(
    fresh_registry: FreshRegistry, router_dir: RouterDir, running_router: RunningRouter
) -> None:
    """The issue's walk-through: the wrong values are 400s, the right one is then stored."""
    registry = fresh_registry()
    version = register_in(registry, ConstantRegressor(100.0), alias="champion")
    settings = router_dir.settings(
        registry, routing={"challenger_weight": 0.0}, experiment={"metric": "squared_error"}
    )
    row = registry.holdout[FEATURES].iloc[[0]]
    with running_router(settings) as client:
        served = client.post("/invocations", json=split_body(row))
        assert served.status_code == 200, served.text
        assert served.json()["predictions"] == [100.0]
        request_id = served.json()["request_id"]
        # A list holds one value per row: [[1]] is row 0's outcome [1].
        for wrong, shown in (
            ("abc", '"abc"'),
            ("150", '"150"'),
            ({"y": 1}, '{"y":1}'),
            ([[1]], "row 0 [1]"),
            (True, "true"),
        ):
            answer = client.post("/feedback", json={"request_id": request_id, "outcome": wrong})
            assert answer.status_code == 400, (wrong, answer.text)
            message = answer.json()["message"]
            assert "squared_error" in message and "needs a number" in message, message
            assert f"{shown} cannot be judged" in message, message
        assert router_dir.log_rows("SELECT COUNT(*) FROM outcomes") == [(0,)]
        labels = {"arm": Arm.CHAMPION.value, "model_version": version}
        assert scrape(client).total("router_feedback_total", **labels) == 0

        right = client.post("/feedback", json={"request_id": request_id, "outcome": 150})
        assert right.status_code == 200, right.text
        assert right.json()["accepted"] == [{"request_id": request_id, "rows": 1, "created": 1}]
        metrics = scrape(client)
    assert metrics.total("router_feedback_total", **labels) == 1
    assert metrics.total("router_feedback_squared_error_total", **labels) == (100.0 - 150.0) ** 2
    assert router_dir.log_rows("SELECT outcome, outcome_value FROM outcomes") == [("150", 150.0)]
