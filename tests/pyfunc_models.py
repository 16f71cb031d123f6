"""Small pyfunc models for tests: constant, slow and failing arms, and a helper to register them.

Each returns what the demo models return, a ``(n_rows, 2)`` float64 array ``[1 - p, p]``, so the
router treats them like the sklearn ones. MLflow pickles ``python_model`` by reference to this
module: loading in the test process just works; a model loaded in another process (e.g. a router
started as a subprocess) needs ``include_code=True`` so the module ships with the model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc.model import PythonModel
from mlflow.tracking import MlflowClient
from mlflow.types import Schema

from demo.data import FEATURES
from demo.train import (
    PIP_REQUIREMENTS,
    experiment_id,
    label_version,
    signature_for,
    using_tracking_uri,
)

if TYPE_CHECKING:  # conftest is pytest's to import; a second import would run it twice
    from tests.conftest import MlflowRegistry


def _constant_proba(n_rows: int, p: float) -> np.ndarray:
    return np.tile(np.array([1.0 - p, p], dtype=np.float64), (n_rows, 1))


class ConstantModel(PythonModel):
    """Always predicts churn probability ``p`` (so class 1 when ``p > 0.5``)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        return _constant_proba(len(model_input), self.p)


class SlowModel(PythonModel):
    """Sleeps ``delay_s`` per call, then answers like ``ConstantModel(p)``."""

    def __init__(self, delay_s: float, p: float = 0.5) -> None:
        self.delay_s = delay_s
        self.p = p

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        time.sleep(self.delay_s)
        return _constant_proba(len(model_input), self.p)


class FailingModel(PythonModel):
    """Raises ``RuntimeError(message)`` on every predict (loading succeeds)."""

    def __init__(self, message: str = "FailingModel always fails") -> None:
        self.message = message

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        raise RuntimeError(self.message)


class ColumnsModel(PythonModel):
    """Answers ``ConstantModel(p)`` only when given exactly ``columns`` (in any order); raises
    otherwise, so a test sees which view of a request each model received."""

    def __init__(self, columns: list[str], p: float = 0.5) -> None:
        self.columns = sorted(columns)
        self.p = p

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        got = sorted(map(str, model_input.columns))
        if got != self.columns:
            raise AssertionError(f"ColumnsModel got columns {got}, expected {self.columns}")
        return _constant_proba(len(model_input), self.p)


class RequestNormalisedModel(PythonModel):
    """Scores each row against the mean of its request: rows are NOT scored independently.

    ``p = sigmoid(x - mean(x))`` over ``column`` of the frame it is given, so a one-row request
    always gets ``[0.5, 0.5]``, and the same row in a shared call with others usually does not.
    """

    def __init__(self, column: str) -> None:
        self.column = column

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        x = model_input[self.column].to_numpy(dtype=np.float64)
        p = 1.0 / (1.0 + np.exp(-(x - x.mean())))
        return np.column_stack([1.0 - p, p])


class NaNModel(PythonModel):
    """Answers ``[nan, nan]`` per row: an output no classifier can give."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        return np.full((len(model_input), 2), np.nan)


class ExtraRowModel(PythonModel):
    """Answers one row more than it was given."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        return _constant_proba(len(model_input) + 1, 0.5)


class BlockingModel(PythonModel):
    """Blocks every predict until ``<gate_dir>/release`` exists (bounded), creating
    ``<gate_dir>/started`` first: a hung model whose hang a test controls."""

    def __init__(self, gate_dir: str, p: float = 0.5) -> None:
        self.gate_dir = gate_dir
        self.p = p

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        gate = Path(self.gate_dir)
        (gate / "started").touch()
        deadline = time.monotonic() + 60.0
        while not (gate / "release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("BlockingModel: never released")
            time.sleep(0.01)
        return _constant_proba(len(model_input), self.p)


class ConstantRegressor(PythonModel):
    """Answers ``value`` (a float) for every row: a regressor."""

    def __init__(self, value: float) -> None:
        self.value = value

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        return np.full(len(model_input), self.value, dtype=np.float64)


def register_pyfunc(
    tracking_uri: str,
    name: str,
    python_model: PythonModel,
    input_example: pd.DataFrame,
    alias: str | None = None,
    *,
    tags: Mapping[str, str] | None = None,
    include_code: bool = False,
    experiment_name: str | None = None,
    artifact_location: str | None = None,
    metadata: Mapping[str, object] | None = None,
    outputs: Schema | Literal["tensor"] | None = "tensor",
) -> str:
    """Log ``python_model`` with a signature built from ``input_example``; return the version.

    The signature's inputs are ``input_example``'s columns (pass the demo's ``FEATURES`` frame to
    share the sklearn versions' schema), outputs a ``(-1, 2)`` float64 tensor (``outputs``: another
    output schema, or None for none). ``alias`` is moved
    to the new version. ``include_code`` ships this module as ``code_paths`` so another process
    can unpickle the model. ``metadata`` lands in the MLmodel's ``metadata`` (e.g.
    ``{"router_batchable": True}``).
    """
    example = input_example.head(5)
    signature = signature_for(example)
    if outputs != "tensor":
        signature = ModelSignature(inputs=signature.inputs, outputs=outputs)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp_id = experiment_id(client, experiment_name or f"{name}-training", artifact_location)
    with (
        using_tracking_uri(tracking_uri),
        mlflow.start_run(experiment_id=exp_id),
        warnings.catch_warnings(),
    ):
        # MLflow 3.17 compares the example's columns with a ``range`` (deprecated by pandas 3).
        warnings.filterwarnings("ignore", message="Operation with range is deprecated")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model,
            signature=signature,
            input_example=example,
            registered_model_name=name,
            pip_requirements=PIP_REQUIREMENTS,
            code_paths=[__file__] if include_code else None,
            metadata=dict(metadata) if metadata else None,
        )
    version = str(info.registered_model_version)
    label_version(client, name, version, tags=tags, alias=alias)
    return version


def register_in(
    registry: MlflowRegistry, python_model: PythonModel, alias: str | None = None, **options: Any
) -> str:
    """:func:`register_pyfunc` as a new version of ``registry``'s model, taking the demo's
    ``FEATURES`` (its holdout's columns) like the sklearn versions; ``options`` as there."""
    return register_pyfunc(
        registry.tracking_uri,
        registry.model_name,
        python_model,
        registry.holdout[FEATURES],
        alias,
        **options,
    )


class ScriptedModel(PythonModel):
    """Answers like ``ConstantModel(p)``, but hangs while ``<control>/hang`` exists and raises
    while ``<control>/raise`` exists: a test scripts its faults from outside the process."""

    def __init__(self, control_dir: str, p: float = 0.5, max_hang_s: float = 60.0) -> None:
        self.control_dir = control_dir
        self.p = p
        self.max_hang_s = max_hang_s

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        control = Path(self.control_dir)
        deadline = time.monotonic() + self.max_hang_s
        while (control / "hang").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if (control / "raise").exists():
            raise RuntimeError("scripted failure")
        return _constant_proba(len(model_input), self.p)


class StaggeredLoadModel(PythonModel):
    """Answers like ``ConstantModel(p)``; the first process to load it loads at once, every later
    one ``extra_s`` later (the first creates ``<gate_dir>/first``): workers that become ready at
    different times, on purpose."""

    def __init__(self, gate_dir: str, extra_s: float, p: float = 0.5) -> None:
        self.gate_dir = gate_dir
        self.extra_s = extra_s
        self.p = p

    def load_context(self, context: object) -> None:
        try:
            (Path(self.gate_dir) / "first").open("x").close()
        except FileExistsError:
            time.sleep(self.extra_s)

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        return _constant_proba(len(model_input), self.p)


# -- outputs of every shape, for the rules of router/scoring/outputs.py -------------------------
def _labels(n_rows: int) -> np.ndarray:
    """1, 0, 1, ... per row: a class each, the same in every model below."""
    labels: np.ndarray = (np.arange(n_rows) % 2 == 0).astype(np.int64)
    return labels


def _label_probability(n_rows: int) -> np.ndarray:
    """The probability of the row's label: 0.9 for a 1, 0.2 for a 0 (never the argmax's index)."""
    return np.where(_labels(n_rows) == 1, 0.9, 0.2)


class LabelProbabilityFrameModel(PythonModel):
    """Answers a DataFrame of ``label`` and ``proba`` (two numeric columns, not [p0, p1])."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> pd.DataFrame:
        n = len(model_input)
        return pd.DataFrame({"label": _labels(n), "proba": _label_probability(n)})


class LabelProbabilityDictModel(PythonModel):
    """Answers a dict of per-row arrays: ``{"label": [...], "proba": [...]}``."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> dict[str, np.ndarray]:
        n = len(model_input)
        return {"label": _labels(n), "proba": _label_probability(n)}


class LabelProbabilityArrayModel(PythonModel):
    """Answers an unnamed ``(n, 2)`` array ``[label, proba]``; only its output signature names
    the columns."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> np.ndarray:
        n = len(model_input)
        return np.column_stack([_labels(n).astype(np.float64), _label_probability(n)])


class DecisionSeriesModel(PythonModel):
    """Answers a named ``pd.Series`` of class labels (``churn`` / ``stay``)."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> pd.Series:
        return pd.Series(np.where(_labels(len(model_input)) == 1, "churn", "stay"), name="decision")


class DeclaredColumnsModel(PythonModel):
    """Answers ``p_churn``, ``decision`` and ``note``: names no rule knows, which its MLmodel
    declares (``router_score_column``, ``router_class_column``)."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> pd.DataFrame:
        n = len(model_input)
        labels = _labels(n)
        return pd.DataFrame(
            {
                "p_churn": np.where(labels == 1, 0.9, 0.1),
                "decision": np.where(labels == 1, "churn", "stay"),
                "note": ["-"] * n,
            }
        )


class IntervalModel(PythonModel):
    """A regressor answering ``lower`` and ``upper`` bounds: two numbers that are no class
    probabilities, and no column says which is the score."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> pd.DataFrame:
        n = len(model_input)
        return pd.DataFrame({"lower": np.full(n, 90.0), "upper": np.full(n, 110.0)})


class DtypesModel(PythonModel):
    """MLflow's own scoring-server test model (tests/pyfunc/test_scoring_server.py,
    ``test_serving_model_with_schema``): one row per input *column*, ``[name, dtype]``."""

    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> list[list[str]]:
        return [[str(k), str(v)] for k, v in model_input.dtypes.items()]
