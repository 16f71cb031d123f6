"""What the router may assume about a model from its MLmodel: may its requests share a predict
call, and may its output hold non-finite numbers. Decided once per loaded model.

Batching is safe only when each row's answer depends on that row alone: the flavors named in
``router.scoring.flavors.INDEPENDENT_ROW_FLAVORS`` (their pyfunc calls the estimator row-wise),
or a model whose MLmodel ``metadata`` says ``router_batchable: true``. Anything else, custom
``python_function`` models in particular, is scored one request per call unless
``server.batch_custom_models`` opts every version of the served model in;
``router_batchable: false`` opts any model out.

Outputs: a model whose signature declares its outputs (probabilities, labels, scores: what every
flavor's ``infer_signature`` records) promises values of a type, and a non-finite number (NaN,
±inf) in its numeric output is an invalid output, unless the MLmodel's ``metadata`` says
``router_nonfinite_output: true`` (a regressor that may answer NaN on purpose). A model without an
output signature is of unknown kind: its output is served as ``mlflow models serve`` serves it
(an echo of an optional column may well hold NaN); the metrics skip non-finite values either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.types import DataType

from router.input.schema import is_named_columns
from router.scoring.flavors import BATCHABLE_KEY


@dataclass(frozen=True)
class ModelKind:
    batchable: bool
    nonfinite_output: bool


def model_kind(
    pyfunc_model: Any, input_schema: Any, *, rows_independent: bool, batch_custom_models: bool
) -> ModelKind:
    """The facts above for one loaded pyfunc model (``input_schema``: its signature's inputs;
    ``rows_independent``: what ``router.scoring.flavors`` says of its flavor and metadata)."""
    extra = getattr(getattr(pyfunc_model, "metadata", None), "metadata", None)
    extra = extra if isinstance(extra, dict) else {}
    named = is_named_columns(input_schema)
    # Only typed column frames are batched (tensors: shapes may differ between requests).
    opted_out = extra.get(BATCHABLE_KEY) is False
    batchable = named and not opted_out and (rows_independent or batch_custom_models)
    meta = getattr(pyfunc_model, "metadata", None)
    get_outputs = getattr(meta, "get_output_schema", None)
    declared = callable(get_outputs) and get_outputs() is not None
    nonfinite = extra.get("router_nonfinite_output") is True or not declared
    return ModelKind(batchable, nonfinite)


def type_name(t: Any) -> str:
    """A signature column type as MLflow spells it (``long``, ``double``, ``Array(string)``)."""
    return t.name if isinstance(t, DataType) else str(t)


def output_problem(output: Any, n_rows: int, *, nonfinite_ok: bool) -> str | None:
    """Why ``output`` is not a valid answer for ``n_rows`` input rows, or None when it is.

    Row-shaped outputs (arrays, frames, series, lists) must hold exactly one row per input row.
    Dicts of named outputs and scalars are passed through as MLflow serves them.
    """
    rows = isinstance(output, pd.DataFrame | pd.Series | list) or (
        isinstance(output, np.ndarray) and output.ndim > 0
    )
    if rows and len(output) != n_rows:
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
