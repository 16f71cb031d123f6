"""Outputs of real custom pyfunc models: served as MLflow serves them, read by their names.

Each case registers a model, serves it with the router (real uvicorn, real registry, SQLite log)
and with MLflow's own scoring app (``mlflow.pyfunc.scoring_server.init``, the app of ``mlflow
models serve``), sends the same three rows to both, and checks that the predictions are equal and
what the log's rows hold (``router/scoring/outputs.py``, issue 19 items 5 and 6):

- Before, any two numeric output columns were read as ``[p0, p1]``: a ``label``/``proba`` frame
  was logged with the argmax's index as its class (0 for a label of 1) and an interval regressor's
  upper bound as a "probability"; a dict output or a declared score column left nothing, silently.
- Before, MLflow's own test model, answering one row per input *column*, got a 500 from the
  router (200 from MLflow): a model without an output signature is served what it answers, its
  rows logged without a score or class, and counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import mlflow
import pytest
from mlflow.pyfunc import scoring_server
from mlflow.pyfunc.model import PythonModel
from mlflow.types import ColSpec, DataType, Schema

from demo.data import FEATURES
from demo.train import using_tracking_uri
from tests.conftest import MlflowRegistry, RunningRouter
from tests.live_router import RouterDir, split_body
from tests.metrics_text import scrape
from tests.pyfunc_models import (
    DecisionSeriesModel,
    DeclaredColumnsModel,
    DtypesModel,
    IntervalModel,
    LabelProbabilityArrayModel,
    LabelProbabilityDictModel,
    LabelProbabilityFrameModel,
    register_pyfunc,
)

RunningServer = Callable[..., AbstractContextManager[str]]
N_ROWS = 3
LABEL_PROBA = Schema([ColSpec(DataType.long, "label"), ColSpec(DataType.double, "proba")])
CHURN = ["1", "0", "1"]  # the class of each of the three rows (tests/pyfunc_models.py _labels)
P_LABEL = [0.9, 0.2, 0.9]


@dataclass(frozen=True)
class Case:
    name: str
    model: PythonModel
    outputs: Schema | None
    classes: Sequence[str | None]
    scores: Sequence[float | None]
    unread: str | None = None  # the router_output_unread_total reason, when nothing is read
    metadata: dict[str, Any] | None = None


NOTHING: list[Any] = [None] * N_ROWS
CASES = [
    Case("label+probability frame", LabelProbabilityFrameModel(), LABEL_PROBA, CHURN, P_LABEL),
    Case("dict output", LabelProbabilityDictModel(), LABEL_PROBA, CHURN, P_LABEL),
    Case("array named by its signature", LabelProbabilityArrayModel(), LABEL_PROBA, CHURN, P_LABEL),
    Case(
        "Series",
        DecisionSeriesModel(),
        Schema([ColSpec(DataType.string, "decision")]),
        ["churn", "stay", "churn"],
        NOTHING,
    ),
    Case(
        "declared score and class columns",
        DeclaredColumnsModel(),
        Schema(
            [
                ColSpec(DataType.double, "p_churn"),
                ColSpec(DataType.string, "decision"),
                ColSpec(DataType.string, "note"),
            ]
        ),
        ["churn", "stay", "churn"],
        [0.9, 0.1, 0.9],
        metadata={"router_score_column": "p_churn", "router_class_column": "decision"},
    ),
    Case(
        "interval: two numbers, no probabilities",
        IntervalModel(),
        Schema([ColSpec(DataType.double, "lower"), ColSpec(DataType.double, "upper")]),
        NOTHING,
        NOTHING,
        unread="columns",
    ),
    Case(
        "declared column missing",
        LabelProbabilityFrameModel(),
        LABEL_PROBA,
        NOTHING,
        NOTHING,
        unread="declared",
        metadata={"router_score_column": "p_churn"},
    ),
    # MLflow's own scoring-server test model: no output signature, one row per input column.
    Case("one row per input column", DtypesModel(), None, NOTHING, NOTHING, unread="rows"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outputs_are_served_as_mlflow_serves_them_and_read_by_their_names(
    case: Case,
    fresh_registry: Callable[[], MlflowRegistry],
    router_dir: RouterDir,
    running_router: RunningRouter,
    running_server: RunningServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = fresh_registry()
    name = "outputs-model"
    version = register_pyfunc(
        registry.tracking_uri,
        name,
        case.model,
        registry.holdout[FEATURES],
        alias="champion",
        outputs=case.outputs,
        metadata=case.metadata,
    )
    with using_tracking_uri(registry.tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    # MLflow's init() marks the process as a serving environment; monkeypatch undoes it.
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    body = split_body(registry.holdout.head(N_ROWS))
    settings = router_dir.settings(registry, model={"name": name})
    with (
        running_server(scoring_server.init(model)) as mlflow_url,
        running_router(settings) as client,
    ):
        theirs = httpx.post(f"{mlflow_url}/invocations", json=body)
        ours = client.post("/invocations", json=body, headers={"X-Request-Id": "r"})
        metrics = scrape(client)
    assert theirs.status_code == 200, theirs.text
    assert ours.status_code == 200, ours.text
    assert ours.json()["predictions"] == theirs.json()["predictions"]

    rows = router_dir.log_rows(
        "SELECT row_index, status, predicted_class, score, output FROM predictions "
        "WHERE request_id = 'r' ORDER BY row_index"
    )
    assert [r[:2] for r in rows] == [(i, "ok") for i in range(N_ROWS)]
    assert [r[2] for r in rows] == case.classes
    assert [r[3] for r in rows] == pytest.approx(case.scores)
    unread = metrics.total(
        "router_output_unread_total", model_version=version, reason=case.unread or ""
    )
    assert unread == (1 if case.unread else 0)
    assert metrics.total("router_output_unread_total") == (1 if case.unread else 0)
    outputs = [json.loads(r[4]) for r in rows]
    predictions = theirs.json()["predictions"]
    if case.unread == "rows":  # kept whole on row 0, as MLflow answered it
        assert outputs == [predictions, None, None]
    elif isinstance(predictions, dict):  # one object per row
        assert outputs == [{k: v[i] for k, v in predictions.items()} for i in range(N_ROWS)]
    else:
        assert outputs == predictions
