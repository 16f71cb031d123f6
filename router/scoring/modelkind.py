"""What the router may assume about one model, decided once when its scorer is built
(:class:`ModelKind`): how it is called, may its requests share a predict call, may its output
hold non-finite numbers. The scorer and its batcher read this value; nothing else looks at the
MLmodel for these facts.

Batching is safe only when each row's answer depends on that row alone: the flavors named in
``INDEPENDENT_ROW_FLAVORS`` (their pyfunc calls the estimator row-wise), or a model whose MLmodel
``metadata`` says ``router_batchable: true``. Anything else, custom ``python_function`` models in
particular, is scored one request per call unless ``server.batch_custom_models`` opts every
version of the served model in; ``router_batchable: false`` opts any model out. Only typed column
frames are batched (tensors: shapes may differ between requests).

Outputs: a model whose signature declares its outputs (probabilities, labels, scores: what every
flavor's ``infer_signature`` records) promises values of a type, one row per input row, and a
non-finite number (NaN, ±inf) in its numeric output is an invalid output, unless the MLmodel's
``metadata`` says ``router_nonfinite_output: true`` (a regressor that may answer NaN on purpose).
A model without an output signature is of unknown kind: its output is served as ``mlflow models
serve`` serves it, whatever its length (MLflow's own test model answers one row per input
*column*) and whatever its numbers (an echo of an optional column may well hold NaN); its rows
are then logged without a score or class, and counted. How the score and class are read from an
output (declared columns, names, class probabilities) is ``outputs.OutputReading``, also decided
here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from router.input.schema import is_named_columns
from router.scoring.flavors import Predictor, predictor_for
from router.scoring.outputs import OutputReading, output_reading

# Flavors whose rows are scored independently: a batch's answers equal the requests' answers.
INDEPENDENT_ROW_FLAVORS = frozenset({"mlflow.sklearn", "mlflow.xgboost", "mlflow.lightgbm"})
# MLmodel ``metadata`` keys: false opts a model out of batching, true opts a custom pyfunc in;
# true lets a model answer NaN / ±inf.
BATCHABLE_KEY = "router_batchable"
NONFINITE_KEY = "router_nonfinite_output"


@dataclass(frozen=True)
class ModelKind:
    """What the router may assume about one loaded model (see the module docstring)."""

    predictor: Predictor  # how it is called: the flavor's estimator, or pyfunc
    rows_independent: bool  # a batch of requests scores as the requests one by one
    batchable: bool  # its requests may share a predict call (the batcher's ``enabled``)
    nonfinite_output: bool  # NaN / ±inf in its output is an answer, not an invalid output
    output_declared: bool  # its signature declares outputs: one row per input row is required
    reading: OutputReading  # how its score and class are read from an output


def model_kind(model: Any, input_schema: Any, *, batch_custom_models: bool) -> ModelKind:
    """The facts above for one loaded pyfunc model (``input_schema``: its signature's inputs),
    its MLmodel read once."""
    meta = getattr(model, "metadata", None)
    extra = getattr(meta, "metadata", None)
    extra = extra if isinstance(extra, dict) else {}
    predictor = predictor_for(model)
    flag = extra.get(BATCHABLE_KEY)
    independent = flag if isinstance(flag, bool) else predictor.flavor in INDEPENDENT_ROW_FLAVORS
    batchable = (
        is_named_columns(input_schema)
        and flag is not False
        and (independent or batch_custom_models)
    )
    get_outputs = getattr(meta, "get_output_schema", None)
    output_schema = get_outputs() if callable(get_outputs) else None
    declared = output_schema is not None
    nonfinite = extra.get(NONFINITE_KEY) is True or not declared
    reading = output_reading(extra, output_schema)
    return ModelKind(predictor, independent, batchable, nonfinite, declared, reading)


def output_problem(
    output: Any, n_rows: int, *, nonfinite_ok: bool, rows_checked: bool = True
) -> str | None:
    """Why ``output`` is not a valid answer for ``n_rows`` input rows, or None when it is.

    With ``rows_checked`` (a declared output signature), row-shaped outputs (arrays, frames,
    series, lists) must hold exactly one row per input row. Dicts of named outputs and scalars are
    passed through as MLflow serves them.
    """
    rows = isinstance(output, pd.DataFrame | pd.Series | list) or (
        isinstance(output, np.ndarray) and output.ndim > 0
    )
    if rows_checked and rows and len(output) != n_rows:
        return f"{len(output)} output rows for {n_rows} input rows"
    if nonfinite_ok:
        return None
    if _has_nonfinite(output):
        return "non-finite value (NaN or infinity) in the output"
    return None


def _has_nonfinite(output: Any) -> bool:
    if isinstance(output, pd.DataFrame):
        numeric = output.select_dtypes(include=[np.number])
        return bool(numeric.size) and not bool(
            np.isfinite(numeric.to_numpy(dtype=np.float64, na_value=np.nan)).all()
        )
    if isinstance(output, pd.Series):
        output = output.to_numpy()
    if isinstance(output, list):
        try:
            output = np.asarray(output)
        except ValueError:  # ragged
            return False
    if isinstance(output, np.ndarray) and output.dtype.kind in "fc":
        return not bool(np.isfinite(output).all())
    if isinstance(output, float | np.floating):
        return not np.isfinite(output)
    return False
