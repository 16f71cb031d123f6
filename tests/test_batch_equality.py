"""Batched answers equal unbatched ones, for every flavor the router batches.

In process, with real models saved by their MLflow flavor and loaded as the router loads them: 32
one-row requests parsed as the router parses them and scored at once by one
:class:`~router.scoring.scorer.ModelScorer` share model calls; each answer must equal what
``pyfunc.predict`` gives that row alone.
"""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from demo.data import FEATURES, LABEL
from demo.train import challenger_model, champion_model, signature_for
from router.input.payload import parse_invocation
from router.registry import LoadedModel, ModelRef
from router.scoring.scorer import ModelScorer, Scored, ScorerOptions
from tests.conftest import MlflowRegistry

N = 32
NUMERIC = ["tenure_months", "monthly_charges", "total_charges", "support_calls", "age"]


def _save(flavor: str, model: Any, train: pd.DataFrame, path: Path) -> Any:
    signature = signature_for(train.head(5))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Operation with range is deprecated")
        if flavor == "sklearn":
            mlflow.sklearn.save_model(
                model,
                str(path),
                signature=signature,
                pyfunc_predict_fn="predict_proba",
                serialization_format="cloudpickle",
            )
        else:
            from mlflow import lightgbm as mlflow_lightgbm

            mlflow_lightgbm.save_model(model, str(path), signature=signature)
    return mlflow.pyfunc.load_model(str(path))


def _models(registry: MlflowRegistry) -> dict[str, tuple[str, Any, list[str]]]:
    models: dict[str, tuple[str, Any, list[str]]] = {
        "sklearn-column-transformer": ("sklearn", champion_model(), FEATURES),
        "sklearn-gradient-boosting": ("sklearn", challenger_model(), FEATURES),
        "sklearn-numeric-numpy": (
            "sklearn",
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
            NUMERIC,
        ),
    }
    try:
        import lightgbm
    except ImportError:  # pragma: no cover - a dev dependency
        return models
    models["lightgbm"] = (
        "lightgbm",
        lightgbm.LGBMClassifier(n_estimators=20, verbose=-1),
        NUMERIC,
    )
    return models


CASES = [
    "sklearn-column-transformer",
    "sklearn-gradient-boosting",
    "sklearn-numeric-numpy",
    "lightgbm",
]


@pytest.mark.parametrize("case", CASES)
def test_batched_answers_equal_each_row_scored_alone(
    case: str, mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    models = _models(mlflow_registry)
    if case not in models:
        pytest.skip(f"{case}: flavor not installed")
    flavor, estimator, columns = models[case]
    data = mlflow_registry.holdout
    train = data[columns]
    estimator.fit(train, data[LABEL])
    pyfunc = _save(flavor, estimator, train, tmp_path / case)
    schema = pyfunc.metadata.get_input_schema()
    loaded = LoadedModel(ModelRef("champion", "1", None, "alias"), pyfunc, schema, time.time())
    rows = train.head(N).reset_index(drop=True)
    bodies = [
        json.dumps(
            {"dataframe_split": json.loads(rows.iloc[[i]].to_json(orient="split", index=False))}
        ).encode()
        for i in range(N)
    ]
    parsed = [parse_invocation(b, "application/json", schema, 1000) for b in bodies]
    calls: list[int] = []

    async def score_all() -> tuple[list[Scored], ModelScorer]:
        options = ScorerOptions(
            threads=2, timeout_s=None, batch_max_rows=N, batch_wait_s=0.0, batch_custom_models=False
        )
        scorer = ModelScorer(loaded, "champion", options, on_batch=calls.append)
        return list(await asyncio.gather(*(scorer.score(p) for p in parsed))), scorer

    answers, scorer = asyncio.run(score_all())
    assert scorer.kind.batchable
    assert max(calls) > 1, calls  # the requests did share calls
    for i, answer in enumerate(answers):
        alone = pyfunc.predict(rows.iloc[[i]])
        assert type(answer.prediction) is type(alone)
        np.testing.assert_allclose(answer.prediction, alone, rtol=1e-12, atol=1e-15)
