"""Turning a pyfunc prediction into the JSON body and the per-row facts the log and metrics keep.

The body carries exactly what ``pyfunc.predict`` returned (as ``mlflow models serve`` encodes it).
Per row we also keep a numeric ``score`` (the output, or the positive-class probability of a
two-column probability output, or the top probability of a wider one) and a ``predicted_class``
(the label for label outputs, the argmax column index for probability outputs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd

from router.mlflow_private import NumpyEncoder
from router.mlflow_private import jsonable as _mlflow_jsonable


@dataclass(frozen=True)
class RowFacts:
    scores: list[float | None]
    classes: list[str | None]
    outputs: list[str]  # each row's prediction as JSON text


def to_jsonable(prediction: Any) -> Any:
    """The JSON-able form of a pyfunc output, exactly as MLflow's scoring server encodes it.

    That is ``predictions_to_json``: a DataFrame as records, a Series as the records of a
    one-column frame (``[{"0": 0.2}, ...]`` for an unnamed one), arrays as lists, numpy scalars,
    bytes (base64) and dates (ISO 8601) by MLflow's ``NumpyEncoder``. The index of a DataFrame or
    Series output is not sent, as MLflow does not send it. One difference: a NaN or infinite
    number is written as ``null`` (MLflow writes ``NaN``, which is not JSON).
    """
    if isinstance(prediction, np.ndarray) and prediction.dtype.kind in "biuf":
        return prediction.tolist()  # the common case, without a round trip through text
    jsonable = _mlflow_jsonable(prediction, pandas_orient="records")
    return json.loads(json.dumps(jsonable, cls=NumpyEncoder))


def _as_array(prediction: Any) -> np.ndarray | None:
    if isinstance(prediction, pd.DataFrame):
        frame = prediction.iloc[:, 0] if prediction.shape[1] == 1 else prediction
        return np.asarray(frame)
    if isinstance(prediction, pd.Series | np.ndarray | list):
        try:
            return np.asarray(prediction)
        except ValueError:  # ragged rows
            return None
    return None


def _json_rows(jsonable: Any, n_rows: int) -> list[str]:
    if isinstance(jsonable, list) and len(jsonable) == n_rows:
        return [orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY).decode() for row in jsonable]
    # An output not shaped one-per-row: keep it whole on row 0 rather than guess a split.
    whole = orjson.dumps(jsonable, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    return [whole] + ["null"] * (n_rows - 1)


def row_facts(prediction: Any, jsonable: Any, n_rows: int) -> RowFacts:
    """Per-row score, class and JSON text; unknown shapes keep the JSON and leave the rest empty."""
    outputs = _json_rows(jsonable, n_rows)
    empty: list[Any] = [None] * n_rows
    array = _as_array(prediction)
    if array is None or array.shape[0] != n_rows:
        return RowFacts(list(empty), list(empty), outputs)
    if array.ndim == 2 and array.shape[1] >= 2 and np.issubdtype(array.dtype, np.number):
        probabilities = array.astype(np.float64)
        top = probabilities.argmax(axis=1)
        if array.shape[1] == 2:
            scores = probabilities[:, 1]
        else:
            scores = probabilities[np.arange(n_rows), top]
        return RowFacts(scores.tolist(), [str(i) for i in top.tolist()], outputs)
    if array.ndim != 1:
        return RowFacts(list(empty), list(empty), outputs)
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        finite = np.isfinite(values)
        return RowFacts(
            [float(v) if ok else None for v, ok in zip(values.tolist(), finite, strict=True)],
            list(empty),
            outputs,
        )
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        ints = array.astype(np.int64).tolist()
        return RowFacts([float(v) for v in ints], [str(v) for v in ints], outputs)
    return RowFacts(list(empty), [None if v is None else str(v) for v in array.tolist()], outputs)
