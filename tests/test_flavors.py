"""``router.scoring.flavors``: the flavor's own estimator answers as ``pyfunc.predict`` does.

Each model kind the router calls directly is checked on 1,000 rows that went through the router's
own parser (what the fast path is promised), against ``PyFuncModel.predict`` on the same frame:
``predict`` and ``predict_proba`` outputs, and the plain-array input where the predictor claims it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec

from bench.models import PAIRS, breast_cancer_frame, scaled_logistic
from demo.data import FEATURES, make_churn_data
from demo.train import PIP_REQUIREMENTS, signature_for
from router.input.payload import parse_invocation
from router.scoring.flavors import predictor_for, probe_frame, same_output
from router.scoring.modelkind import ModelKind, model_kind
from tests.conftest import MlflowRegistry
from tests.pyfunc_models import ConstantModel

N_ROWS = 1_000


def _parsed(model: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as the router hands it to a model: a JSON body through ``parse_invocation``."""
    split = json.loads(frame.to_json(orient="split", index=False))
    body = json.dumps({"dataframe_split": split}).encode()
    parsed = parse_invocation(body, "application/json", model.metadata.get_input_schema(), N_ROWS)
    assert isinstance(parsed.data, pd.DataFrame)
    return parsed.data


def _kind(model: Any) -> ModelKind:
    """What the router assumes about ``model`` (how it calls it, whether it batches)."""
    return model_kind(model, model.metadata.get_input_schema(), batch_custom_models=False)


def _breast_cancer_rows(n: int = N_ROWS) -> pd.DataFrame:
    """``n`` rows drawn from the data set with a little noise: not only the training rows."""
    x, _ = breast_cancer_frame()
    rng = np.random.default_rng(7)
    rows = x.iloc[rng.integers(0, len(x), size=n)].reset_index(drop=True)
    return rows * rng.normal(1.0, 0.05, size=rows.shape)


@pytest.fixture(scope="module")
def bench_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The benchmark's numeric models (as pyfunc) keyed ``<name>/<alias>``, plus a ``predict``
    (labels) variant of the scaled logistic regression."""
    from bench.models import register_pair

    root = tmp_path_factory.mktemp("bench-models")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Operation with range is deprecated")
        for pair in PAIRS:
            register_pair(uri, pair)
        x, y = breast_cancer_frame()
        labels_path = root / "labels-model"
        mlflow.sklearn.save_model(
            scaled_logistic().fit(x, y),
            str(labels_path),
            signature=signature_for(x.head(5), n_outputs=1),
            serialization_format="skops",
            pip_requirements=PIP_REQUIREMENTS,
        )
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    models: dict[str, Any] = {}
    for pair in PAIRS:
        for alias in ("champion", "challenger"):
            version = client.get_model_version_by_alias(pair.name, alias)
            source = client.get_model_version_download_uri(pair.name, version.version)
            models[f"{pair.name}/{alias}"] = mlflow.pyfunc.load_model(source)
    models["breast-cancer/labels"] = mlflow.pyfunc.load_model(str(labels_path))
    yield models


@pytest.mark.parametrize(
    ("key", "takes_numpy"),
    [
        ("breast-cancer/champion", True),  # StandardScaler + LogisticRegression, predict_proba
        ("breast-cancer/challenger", True),  # decision tree
        ("breast-cancer-gbm/champion", True),  # HistGradientBoosting
        ("breast-cancer-gbm/challenger", True),  # random forest
        ("breast-cancer/labels", True),  # pyfunc predict = class labels
    ],
)
def test_numeric_models_answer_as_pyfunc_on_frames_and_arrays(
    bench_models: dict[str, Any], key: str, takes_numpy: bool
) -> None:
    model = bench_models[key]
    kind = _kind(model)
    predictor = kind.predictor
    assert (predictor.flavor, predictor.fast, kind.rows_independent) == (
        "mlflow.sklearn",
        True,
        True,
    )
    assert predictor.takes_numpy is takes_numpy
    frame = _parsed(model, _breast_cancer_rows())
    expected = model.predict(frame)
    assert isinstance(expected, np.ndarray) and len(expected) == N_ROWS
    assert same_output(predictor.predict(frame, None), expected)
    assert same_output(predictor.predict(frame.to_numpy(), None), expected)


@pytest.mark.parametrize("alias", ["champion", "challenger"])
def test_demo_pipelines_answer_as_pyfunc_and_keep_their_frames(
    mlflow_registry: MlflowRegistry, alias: str
) -> None:
    """The demo's ColumnTransformer pipelines select columns by name: frames only."""
    client = mlflow_registry.client()
    version = mlflow_registry.versions[alias]
    model = mlflow.pyfunc.load_model(
        client.get_model_version_download_uri(mlflow_registry.model_name, version)
    )
    kind = _kind(model)
    predictor = kind.predictor
    assert (predictor.fast, predictor.takes_numpy, kind.rows_independent) == (
        True,
        False,
        True,
    )
    frame = _parsed(model, make_churn_data(N_ROWS, seed=11)[FEATURES])
    expected = model.predict(frame)
    assert expected.shape == (N_ROWS, 2)
    assert same_output(predictor.predict(frame, None), expected)


@pytest.mark.parametrize("api", ["sklearn", "booster"])
def test_lightgbm_models_answer_as_pyfunc_on_frames_and_arrays(tmp_path: Path, api: str) -> None:
    """mlflow.lightgbm's pyfunc ends in the raw model's ``predict``: called directly."""
    import lightgbm
    from mlflow import lightgbm as mlflow_lightgbm

    x, y = breast_cancer_frame()
    if api == "sklearn":
        raw: Any = lightgbm.LGBMClassifier(n_estimators=20, verbose=-1).fit(x, y)
    else:
        params = {"objective": "binary", "verbose": -1}
        raw = lightgbm.train(params, lightgbm.Dataset(x, y), num_boost_round=20)
    path = tmp_path / f"lightgbm-{api}"
    mlflow_lightgbm.save_model(raw, str(path), signature=signature_for(x.head(5), n_outputs=1))
    model = mlflow.pyfunc.load_model(str(path))
    predictor = predictor_for(model)
    assert (predictor.flavor, predictor.fast, predictor.takes_numpy) == (
        "mlflow.lightgbm",
        True,
        True,
    )
    frame = _parsed(model, _breast_cancer_rows())
    expected = model.predict(frame)
    assert len(expected) == N_ROWS
    assert same_output(predictor.predict(frame, None), expected)
    assert same_output(predictor.predict(frame.to_numpy(), None), expected)


def test_params_go_through_pyfunc_and_its_params_schema(tmp_path: Path) -> None:
    x, y = breast_cancer_frame()
    base = signature_for(x.head(5))
    signature = ModelSignature(
        inputs=base.inputs,
        outputs=base.outputs,
        params=ParamSchema([ParamSpec("threshold", "double", 0.5)]),
    )
    path = tmp_path / "with-params"
    mlflow.sklearn.save_model(
        scaled_logistic().fit(x, y),
        str(path),
        signature=signature,
        serialization_format="skops",
        pyfunc_predict_fn="predict_proba",
        pip_requirements=PIP_REQUIREMENTS,
    )
    model = mlflow.pyfunc.load_model(str(path))
    predictor = predictor_for(model)
    assert predictor.fast
    frame = _parsed(model, x.head(3))
    with pytest.raises(MlflowException):
        model.predict(frame, params={"threshold": "high"})
    with pytest.raises(MlflowException):
        predictor.predict(frame, {"threshold": "high"})
    assert same_output(predictor.predict(frame, {"threshold": 0.2}), model.predict(frame))


def test_a_custom_pyfunc_goes_through_pyfunc_and_opts_in_to_batching(tmp_path: Path) -> None:
    frame = make_churn_data(8, seed=3)[FEATURES]
    for opt_in, independent in ((None, False), (True, True)):
        path = tmp_path / f"custom-{opt_in}"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Operation with range is deprecated")
            mlflow.pyfunc.save_model(
                str(path),
                python_model=ConstantModel(0.25),
                signature=signature_for(frame.head(5)),
                input_example=frame.head(5),
                metadata=None if opt_in is None else {"router_batchable": opt_in},
                pip_requirements=PIP_REQUIREMENTS,
            )
        model = mlflow.pyfunc.load_model(str(path))
        kind = _kind(model)
        predictor = kind.predictor
        assert (predictor.flavor, predictor.fast, predictor.takes_numpy) == (
            "mlflow.pyfunc.model",
            False,
            False,
        )
        assert kind.rows_independent is independent
        parsed = _parsed(model, frame)
        assert same_output(predictor.predict(parsed, None), model.predict(parsed))


def test_probe_frame_is_typed_by_the_signature() -> None:
    example = pd.DataFrame({"b": [1.5], "a": np.array([2], dtype=np.int64)})
    probe = probe_frame(signature_for(example).inputs, rows=4)
    assert list(probe.columns) == ["b", "a"]
    assert [str(t) for t in probe.dtypes] == ["float64", "int64"]
    assert len(probe) == 4 and probe["b"].nunique() == 4


def test_same_output_compares_type_shape_dtype_and_values() -> None:
    a = np.array([[0.1, 0.9]])
    assert same_output(a, a.copy())
    assert same_output(np.array([np.nan]), np.array([np.nan]))
    assert not same_output(a, a.astype(np.float32))
    assert not same_output(a, a.T)
    assert not same_output(a, a + 1e-12)
    assert not same_output(a, a.tolist())
    assert same_output(pd.Series([1, 2]), pd.Series([1, 2]))
