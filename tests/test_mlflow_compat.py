"""The router against `mlflow models serve`, case by case, in the same test.

Each case is sent to the router (real uvicorn, real registry) and to MLflow's own scoring app
(``mlflow.pyfunc.scoring_server.init(model)``, under uvicorn in this process) serving the same
model version; the status code, the ``error_code`` and the predictions must be equal. The cases
follow MLflow's own scoring-server tests (malformed JSON, wrong shapes, content types, each
format, params) on several model kinds, plus a corpus of casting cases. ``KNOWN_DIFFERENCES``
lists the cases where the two deliberately differ; each must still differ (so the list stays
exact) and each is named on docs/migration.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, scoring_server
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
from sklearn.linear_model import LinearRegression

from demo.train import (
    PIP_REQUIREMENTS,
    experiment_id,
    label_version,
    using_tracking_uri,
)
from router.config import settings_from_mapping
from tests.conftest import MlflowRegistry, serve_in_thread, serve_router, sqlite_uri

# Six models registered and served twice each: setup is slow on a loaded machine.
pytestmark = pytest.mark.timeout(600)

JSON = "application/json"
REPO = Path(__file__).resolve().parent.parent


class SumModel(PythonModel):
    """A tensor model: the sum of each row."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        return np.asarray(model_input).sum(axis=1)


class ScaledModel(PythonModel):
    """Takes params; answers an unnamed ``pd.Series`` (MLflow encodes it as records)."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.Series:
        scale = (params or {}).get("scale", 1.0)
        return pd.Series(model_input["x"].to_numpy() * scale)


class EchoModel(PythonModel):
    """Answers its input as a DataFrame, so the values each cast gives are visible."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        return model_input


TYPED = Schema(
    [
        ColSpec(DataType.long, "a"),
        ColSpec(DataType.integer, "b"),
        ColSpec(DataType.double, "c"),
        ColSpec(DataType.float, "d"),
        ColSpec(DataType.string, "s"),
        ColSpec(DataType.boolean, "f"),
        ColSpec(DataType.double, "opt", required=False),
    ]
)
TYPED_ROW: dict[str, Any] = {"a": 1, "b": 2, "c": 1.5, "d": 2.5, "s": "x", "f": True}


def _log(tracking_uri: str, name: str, log: Any) -> None:
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = experiment_id(client, f"{name}-training")
    with using_tracking_uri(tracking_uri), mlflow.start_run(experiment_id=exp):
        info = log(name)
    label_version(client, name, str(info.registered_model_version), alias="champion")


def _register_kinds(tracking_uri: str) -> None:
    x = pd.DataFrame({"u": [1.0, 2.0, 3.0, 4.0], "v": [0.5, 1.0, 0.0, 2.0], "w": [1, 2, 3, 5]})
    y = np.array([1.0, 2.0, 2.5, 5.0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Operation with range is deprecated")
        warnings.filterwarnings("ignore", message=".*Hint: Inferred schema contains integer")
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        _log(
            tracking_uri,
            "compat-regressor",
            lambda name: mlflow.sklearn.log_model(
                LinearRegression().fit(x, y),
                name="model",
                input_example=x.head(2),
                registered_model_name=name,
                pip_requirements=PIP_REQUIREMENTS,
            ),
        )
        _log(
            tracking_uri,
            "compat-nosig",
            lambda name: mlflow.sklearn.log_model(
                LinearRegression().fit(x[["u", "v"]].to_numpy(), y),
                name="model",
                registered_model_name=name,
                pip_requirements=PIP_REQUIREMENTS,
            ),
        )
        for name, model, signature in (
            (
                "compat-tensor",
                SumModel(),
                ModelSignature(Schema([TensorSpec(np.dtype(np.float64), (-1, 3))])),
            ),
            (
                "compat-params",
                ScaledModel(),
                ModelSignature(
                    Schema([ColSpec(DataType.double, "x")]),
                    params=ParamSchema([ParamSpec("scale", DataType.double, 1.0)]),
                ),
            ),
            ("compat-typed", EchoModel(), ModelSignature(TYPED)),
        ):
            _log(
                tracking_uri,
                name,
                lambda name, model=model, signature=signature: mlflow.pyfunc.log_model(
                    name="model",
                    python_model=model,
                    signature=signature,
                    registered_model_name=name,
                    pip_requirements=PIP_REQUIREMENTS,
                ),
            )


@dataclass(frozen=True)
class Pair:
    """The router and MLflow's scoring app, serving the same model version."""

    router_url: str
    mlflow_url: str  # MLflow's scoring app, under uvicorn in this process


def _router_settings(tracking_uri: str, name: str, log_dir: Path) -> Any:
    return settings_from_mapping(
        {
            "model": {"name": name, "tracking_uri": tracking_uri},
            "routing": {"challenger_weight": 0.0},
            "prediction_log": {"url": f"sqlite:///{log_dir / f'{name}.db'}"},
        },
        env={},
    )


@pytest.fixture(scope="module")
def pairs(
    mlflow_registry: MlflowRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Pair]]:
    """Kind -> the pair serving it. ``classifier`` is the demo's logistic regression."""
    root = tmp_path_factory.mktemp("compat")
    tracking_uri = sqlite_uri(root / "mlflow.db")
    _register_kinds(tracking_uri)
    models = {
        "classifier": (mlflow_registry.tracking_uri, mlflow_registry.model_name),
        "regressor": (tracking_uri, "compat-regressor"),
        "no-signature": (tracking_uri, "compat-nosig"),
        "tensor": (tracking_uri, "compat-tensor"),
        "params": (tracking_uri, "compat-params"),
        "typed": (tracking_uri, "compat-typed"),
    }
    with pytest.MonkeyPatch.context() as patch, contextlib.ExitStack() as stack:
        # MLflow's init() marks the process as a serving environment; undone on exit.
        patch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
        result: dict[str, Pair] = {}
        for kind, (uri, name) in models.items():
            with using_tracking_uri(uri):
                model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
            theirs = stack.enter_context(serve_in_thread(scoring_server.init(model)))
            ours = stack.enter_context(serve_router(_router_settings(uri, name, root)))
            result[kind] = Pair(str(ours.base_url), theirs)
        yield result


@dataclass(frozen=True)
class Answer:
    status: int
    error_code: str | None
    predictions: Any

    @classmethod
    def of(cls, status: int, text: str) -> Answer:
        try:
            body = json.loads(text)
        except ValueError:  # MLflow answers 415 in plain text
            body = None
        if status == 200:
            return cls(status, None, _nan_as_none(body["predictions"]))
        code = body.get("error_code") if isinstance(body, dict) else None
        return cls(status, code, None)


def _nan_as_none(value: Any) -> Any:
    """MLflow writes NaN (not JSON), the router null: the same missing value."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_nan_as_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_as_none(v) for k, v in value.items()}
    return value


def _both(pair: Pair, body: bytes, content_type: str) -> tuple[Answer, Answer]:
    headers = {"Content-Type": content_type}
    ours = httpx.post(f"{pair.router_url}/invocations", content=body, headers=headers)
    theirs = httpx.post(f"{pair.mlflow_url}/invocations", content=body, headers=headers)
    return Answer.of(ours.status_code, ours.text), Answer.of(theirs.status_code, theirs.text)


def _js(value: Any) -> bytes:
    return json.dumps(value).encode()


def _frame_of(kind: str, mlflow_registry: MlflowRegistry) -> pd.DataFrame:
    if kind == "classifier":
        return mlflow_registry.holdout.drop(columns=["churned"]).head(3).reset_index(drop=True)
    return pd.DataFrame({"u": [1.0, 2.5, -1.0], "v": [0.5, 0.0, 3.0], "w": [1, 2, 3]})


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(frame.to_json(orient="records"))
    return records


def _split(frame: pd.DataFrame, **extra: Any) -> dict[str, Any]:
    split: dict[str, Any] = json.loads(frame.to_json(orient="split", index=False))
    return {**split, **extra}


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return buffer.getvalue()


def _protocol_cases(registry: MlflowRegistry) -> list[tuple[str, str, bytes, str]]:
    """(case, model kind, body, content type): MLflow's scoring-server test cases and more."""
    clf = _frame_of("classifier", registry)
    reg = _frame_of("regressor", registry)
    rows = _records(clf)
    first = rows[0]
    return [
        ("records", "classifier", _js({"dataframe_records": rows}), JSON),
        (
            "records charset",
            "classifier",
            _js({"dataframe_records": rows}),
            f"{JSON}; charset=UTF-8",
        ),
        ("split", "classifier", _js({"dataframe_split": _split(clf)}), JSON),
        (
            "split with index",
            "classifier",
            _js({"dataframe_split": _split(clf, index=[7, 8, 9])}),
            JSON,
        ),
        ("instances records", "classifier", _js({"instances": rows}), JSON),
        ("inputs columns", "classifier", _js({"inputs": clf.to_dict(orient="list")}), JSON),
        ("csv", "classifier", clf.to_csv(index=False).encode(), "text/csv"),
        ("parquet", "classifier", _parquet(clf), "application/vnd.apache.parquet"),
        ("malformed json", "classifier", b"this is,,,, not valid json", JSON),
        ("json number", "classifier", b"1", JSON),
        ("json string", "classifier", b'"1"', JSON),
        ("json list", "classifier", b"[1]", JSON),
        ("no format key", "classifier", _js({"not": "a serialized dataframe"}), JSON),
        (
            "two format keys",
            "classifier",
            _js({"dataframe_records": [], "dataframe_split": {"data": []}}),
            JSON,
        ),
        ("split given records", "classifier", _js({"dataframe_split": rows}), JSON),
        ("records given split", "classifier", _js({"dataframe_records": _split(clf)}), JSON),
        (
            "index longer than data",
            "no-signature",
            _js({"dataframe_split": {"index": [1, 2], "data": [[1], [2], [3]]}}),
            JSON,
        ),
        ("empty csv", "classifier", b"", "text/csv"),
        ("unsupported content type", "classifier", b"{}", "not_a_supported_content_type"),
        ("unknown content type parameter", "classifier", b"{}", f"{JSON}; something=something"),
        ("latin-1 charset", "classifier", b"{}", f"{JSON}; charset=latin-1"),
        (
            "extra column",
            "classifier",
            _js({"dataframe_records": [{**first, "customer_id": "c-9"}]}),
            JSON,
        ),
        (
            "missing column",
            "classifier",
            _js({"dataframe_records": [{k: v for k, v in first.items() if k != "tenure_months"}]}),
            JSON,
        ),
        (
            "text in a double column",
            "classifier",
            _js({"dataframe_records": [{**first, "monthly_charges": "lots"}]}),
            JSON,
        ),
        (
            "Infinity in a double column",
            "classifier",
            _js({"dataframe_records": [first]}).replace(
                json.dumps(first["monthly_charges"]).encode(), b"Infinity", 1
            ),
            JSON,
        ),
        ("regressor records", "regressor", _js({"dataframe_records": _records(reg)}), JSON),
        ("regressor inputs", "regressor", _js({"inputs": reg.to_dict(orient="list")}), JSON),
        (
            "no signature: instances of rows",
            "no-signature",
            _js({"instances": reg[["u", "v"]].to_numpy().tolist()}),
            JSON,
        ),
        (
            "no signature: split without columns",
            "no-signature",
            _js({"dataframe_split": {"data": reg[["u", "v"]].to_numpy().tolist()}}),
            JSON,
        ),
        (
            "no signature: one column for two features",
            "no-signature",
            _js({"dataframe_split": {"data": [[1.0], [2.0]]}}),
            JSON,
        ),
        (
            "no signature: inputs as a column object",
            "no-signature",
            _js({"inputs": {"u": [1.0], "v": [2.0]}}),
            JSON,
        ),
        ("tensor inputs", "tensor", _js({"inputs": [[1, 2, 3], [4, 5, 6]]}), JSON),
        ("tensor instances", "tensor", _js({"instances": [[1, 2, 3]]}), JSON),
        ("tensor split", "tensor", _js({"dataframe_split": {"data": [[1, 2, 3]]}}), JSON),
        ("tensor wrong feature count", "tensor", _js({"inputs": [[1, 2]]}), JSON),
        ("tensor ragged rows", "tensor", _js({"inputs": [[1, 2, 3], [4, 5]]}), JSON),
        ("tensor Infinity", "tensor", b'{"inputs": [[1, Infinity, 3]]}', JSON),
        ("params absent", "params", _js({"dataframe_records": [{"x": 1.5}, {"x": 2.0}]}), JSON),
        (
            "params given",
            "params",
            _js({"dataframe_records": [{"x": 1.5}], "params": {"scale": 2}}),
            JSON,
        ),
        (
            "params invalid value",
            "params",
            _js({"dataframe_records": [{"x": 1.5}], "params": {"scale": "high"}}),
            JSON,
        ),
        (
            "params unknown name",
            "params",
            _js({"dataframe_records": [{"x": 1.5}], "params": {"other": 1}}),
            JSON,
        ),
    ]


# Casting corpus: one cell of TYPED_ROW changed (None: the key left out), in three formats.
CASTS: list[tuple[str, Any]] = [
    ("a", "3"),
    ("a", 1.5),
    ("a", 3.0),
    ("a", True),
    ("a", None),
    ("a", "x"),
    ("a", 2**70),
    ("a", [1]),
    ("b", 2**40),
    ("b", "7"),
    ("c", 1),
    ("c", "2.5"),
    ("c", "x"),
    ("c", True),
    ("d", 1),
    ("d", "2.5"),
    ("s", 7),
    ("s", 1.5),
    ("s", True),
    ("f", 1),
    ("f", 0),
    ("f", "true"),
    ("f", "x"),
    ("opt", 1.0),
    ("opt", "x"),
    ("zzz", "extra"),
]
MISSING = "<missing>"
CASTS += [("c", MISSING), ("opt", MISSING), ("s", None), ("f", None)]


def _cast_body(column: str, value: Any, fmt: str) -> bytes:
    row = dict(TYPED_ROW)
    if value == MISSING:
        row.pop(column, None)
    else:
        row[column] = value
    other = dict(TYPED_ROW)
    if fmt == "dataframe_split":
        names = list(dict.fromkeys([*row, *other]))
        data = [[r.get(n) for n in names] for r in (row, other)]
        return _js({fmt: {"columns": names, "data": data}})
    return _js({fmt: [row, other]})


# The cases where the router deliberately answers otherwise, each explained in docs/migration.md.
KNOWN_DIFFERENCES: dict[str, str] = {
    "tensor Infinity": "Infinity refused before predicting (validation.non_finite)",
    "instances: opt = 1.0": "instances rows with different keys: a missing key is null",
    "instances: zzz = 'extra'": "instances rows with different keys: a missing key is null",
    f"instances: c = {MISSING!r}": "instances rows with different keys: a missing key is null",
    "instances: s = None": "null in a string column stays null (MLflow: the string 'None')",
}


def _compare(case: str, pair: Pair, body: bytes, content_type: str) -> str | None:
    """None when the router answers as MLflow does (or differs as documented), else why not."""
    ours, theirs = _both(pair, body, content_type)
    if case in KNOWN_DIFFERENCES:
        if ours == theirs:
            return f"{case}: no longer differs; update KNOWN_DIFFERENCES and docs/migration.md"
        return None
    same = ours.status == theirs.status and ours.predictions == theirs.predictions
    if theirs.error_code is not None:
        same = same and ours.error_code == theirs.error_code
    return None if same else f"{case}: router {ours}, MLflow {theirs}"


def test_scoring_protocol_cases_answer_as_mlflow(
    pairs: dict[str, Pair], mlflow_registry: MlflowRegistry
) -> None:
    cases = _protocol_cases(mlflow_registry)
    problems = [_compare(case, pairs[kind], body, ct) for case, kind, body, ct in cases]
    found = [p for p in problems if p]
    if found:
        pytest.fail("\n".join(found), pytrace=False)


@pytest.mark.parametrize("fmt", ["dataframe_records", "dataframe_split", "instances"])
def test_casting_corpus_answers_as_mlflow(pairs: dict[str, Pair], fmt: str) -> None:
    problems = [
        _compare(
            f"{fmt}: {column} = {value!r}", pairs["typed"], _cast_body(column, value, fmt), JSON
        )
        for column, value in CASTS
    ]
    found = [p for p in problems if p]
    if found:
        pytest.fail("\n".join(found), pytrace=False)


def test_health_and_version_answer_as_mlflow(pairs: dict[str, Pair]) -> None:
    pair = pairs["classifier"]
    for path in ("/ping", "/health", "/version"):
        ours = httpx.get(f"{pair.router_url}{path}")
        theirs = httpx.get(f"{pair.mlflow_url}{path}")
        assert ours.status_code == theirs.status_code == 200, path
    assert httpx.get(f"{pair.router_url}/version").text == mlflow.__version__


def test_mlflows_scoring_server_client_works_against_the_router(
    pairs: dict[str, Pair], mlflow_registry: MlflowRegistry
) -> None:
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    url = httpx.URL(pairs["classifier"].router_url)
    client = ScoringServerClient(host=url.host, port=url.port)
    client.wait_server_ready(timeout=10)
    assert client.get_version() == mlflow.__version__
    frame = _frame_of("classifier", mlflow_registry)
    with using_tracking_uri(mlflow_registry.tracking_uri):
        model = mlflow.pyfunc.load_model(mlflow_registry.uri_for("champion"))
    got = client.invoke(frame).get_predictions()
    np.testing.assert_allclose(np.asarray(got), model.predict(frame))


def test_every_known_difference_is_on_the_migration_page() -> None:
    page = (REPO / "docs" / "migration.md").read_text(encoding="utf-8")
    for case in KNOWN_DIFFERENCES:
        assert f"`{case}`" in page, case
