"""Turning a pyfunc prediction into the JSON body and the per-row facts the log and metrics keep.

The body carries exactly what ``pyfunc.predict`` returned (as ``mlflow models serve`` encodes it).
Per row we also keep a numeric ``score`` and a ``predicted_class``, read from the output by these
rules, in order (README "What `predictions` holds"):

1. One value per row (an array, a Series, a list, a one-column frame): a float is the score; an
   integer or boolean is the class and the score; text is the class.
2. Several named outputs per row (a DataFrame, a dict of per-row arrays, a list of per-row dicts,
   or a 2-D array whose columns the output signature names): the columns the model declares in
   its MLmodel ``metadata`` (``router_score_column``, ``router_class_column``), else columns
   named as a class (``label``, ``class``, ``predicted_class``) or a score (``score``,
   ``probability``, ``proba``).
3. Otherwise, columns that are class probabilities (every value in [0, 1], each row summing to
   1): the positive-class probability of two columns, or the top probability of more, and the
   argmax column's index as the class.
4. Anything else is not guessed: the rows keep their JSON only, and the answer counts in
   ``router_output_unread_total`` with the reason (``rows``: not one row per input row;
   ``columns``: several columns, none of the above; ``declared``: a declared column missing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import orjson
import pandas as pd

from router.mlflow_private import NumpyEncoder
from router.mlflow_private import jsonable as _mlflow_jsonable

# MLmodel ``metadata`` keys: which output column is the score, which the class.
SCORE_COLUMN_KEY = "router_score_column"
CLASS_COLUMN_KEY = "router_class_column"
# Column names read without a declaration (MLflow's transformers classifiers answer label, score).
CLASS_NAMES = ("label", "class", "predicted_class")
SCORE_NAMES = ("score", "probability", "proba")
# Rows of class probabilities sum to 1 up to float error (float32 models included).
_SUM_TOLERANCE = 1e-4
_SMALL = 16  # values in an output read in plain Python rather than with numpy calls


class Unread(StrEnum):
    """Why an answer's per-row score and class could not be read (``router_output_unread``)."""

    ROWS = "rows"  # not one output row per input row
    COLUMNS = "columns"  # several columns: none declared or named, not class probabilities
    DECLARED = "declared"  # a column the MLmodel declares is not in the output


@dataclass(frozen=True)
class OutputReading:
    """How one model's outputs are read, from its MLmodel (:func:`output_reading`)."""

    score_column: str | None = None  # declared in the MLmodel metadata
    class_column: str | None = None
    # The output signature's column names, when it names columns: they name a 2-D array's.
    column_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RowFacts:
    scores: list[float | None]
    classes: list[str | None]
    outputs: list[str]  # each row's prediction as JSON text
    unread: Unread | None = field(default=None)  # set when neither could be read


def output_reading(metadata: Mapping[str, Any], output_schema: Any) -> OutputReading:
    """The reading rules of one model: its declared columns, its output signature's names."""
    score = metadata.get(SCORE_COLUMN_KEY)
    label = metadata.get(CLASS_COLUMN_KEY)
    names = None
    if output_schema is not None and getattr(output_schema, "has_input_names", lambda: False)():
        names = tuple(str(n) for n in output_schema.input_names())
    return OutputReading(
        score if isinstance(score, str) and score else None,
        label if isinstance(label, str) and label else None,
        names,
    )


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


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _json_rows(jsonable: Any, n_rows: int) -> list[str]:
    if isinstance(jsonable, list) and len(jsonable) == n_rows:
        return [_dumps(row) for row in jsonable]
    if _is_columns(jsonable, n_rows):  # a dict of per-row lists: each row its own object
        return [_dumps({k: v[i] for k, v in jsonable.items()}) for i in range(n_rows)]
    # An output not shaped one-per-row: keep it whole on row 0 rather than guess a split.
    return [_dumps(jsonable)] + ["null"] * (n_rows - 1)


def _is_columns(value: Any, n_rows: int) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(
            isinstance(v, list | np.ndarray | pd.Series) and len(v) == n_rows
            for v in value.values()
        )
    )


def row_facts(
    prediction: Any, jsonable: Any, n_rows: int, reading: OutputReading | None = None
) -> RowFacts:
    """Per-row score, class and JSON text, by the module's rules; ``unread`` says why not."""
    outputs = _json_rows(jsonable, n_rows)
    reading = reading or OutputReading()
    if (
        isinstance(prediction, np.ndarray)
        and prediction.ndim == 2
        and prediction.shape[0] == n_rows
        and prediction.shape[1] >= 2
        and prediction.dtype.kind in "iuf"
        and reading.column_names is None
    ):
        # The common case (``predict_proba``), without a column per name: probabilities or not.
        if prediction.size <= _SMALL:
            return _from_small_probabilities(prediction.tolist(), outputs)
        return _from_probabilities(_probabilities(prediction), n_rows, outputs)
    shaped = _shape(prediction, n_rows, reading)
    if shaped is None:
        return _unread(Unread.ROWS, outputs, n_rows)
    if isinstance(shaped, np.ndarray):
        scores, classes = _one_value(shaped)
        if scores is None and classes is None:
            return _unread(Unread.COLUMNS, outputs, n_rows)
        empty: list[Any] = [None] * n_rows
        return RowFacts(scores or list(empty), classes or list(empty), outputs)
    return _from_columns(shaped, n_rows, reading, outputs)


def _unread(reason: Unread, outputs: list[str], n_rows: int) -> RowFacts:
    return RowFacts([None] * n_rows, [None] * n_rows, outputs, reason)


Columns = dict[str, np.ndarray]


def _shape(prediction: Any, n_rows: int, reading: OutputReading) -> np.ndarray | Columns | None:
    """One value per row (a 1-D array), named columns, or None when not one row per input row."""
    if isinstance(prediction, pd.DataFrame):
        if len(prediction) != n_rows:
            return None
        if prediction.shape[1] == 1:
            return np.asarray(prediction.iloc[:, 0])
        return {str(c): prediction.iloc[:, i].to_numpy() for i, c in enumerate(prediction.columns)}
    if isinstance(prediction, dict):
        if not _is_columns(prediction, n_rows):
            return None
        return {str(k): np.asarray(v) for k, v in prediction.items()}
    if isinstance(prediction, list) and prediction and all(isinstance(r, dict) for r in prediction):
        if len(prediction) != n_rows:
            return None
        frame = pd.DataFrame.from_records(prediction)
        return {str(c): frame[c].to_numpy() for c in frame.columns}
    if not isinstance(prediction, pd.Series | np.ndarray | list):
        return None
    try:
        array = np.asarray(prediction)
    except ValueError:  # ragged rows
        return None
    if array.ndim == 0 or array.shape[0] != n_rows:
        return None
    if array.ndim == 1:
        return array
    if array.ndim != 2:
        return None
    if array.shape[1] == 1:
        return array[:, 0]
    names = reading.column_names
    if names is None or len(names) != array.shape[1]:
        names = tuple(str(i) for i in range(array.shape[1]))
    return {name: array[:, i] for i, name in enumerate(names)}


def _one_value(array: np.ndarray) -> tuple[list[float | None] | None, list[str | None] | None]:
    """Scores and classes of a one-value-per-row output (None: that fact is not in it)."""
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        finite = np.isfinite(values)
        return [
            float(v) if ok else None for v, ok in zip(values.tolist(), finite, strict=True)
        ], None
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        ints = array.astype(np.int64).tolist()
        return [float(v) for v in ints], [str(v) for v in ints]
    values = array.tolist()
    if any(isinstance(v, list | tuple | dict | np.ndarray) for v in values):
        return None, None  # a structure per row: nothing to read as a score or class
    return None, [None if v is None else str(v) for v in values]


def _from_columns(
    columns: Columns, n_rows: int, reading: OutputReading, outputs: list[str]
) -> RowFacts:
    empty: list[Any] = [None] * n_rows
    declared = [c for c in (reading.score_column, reading.class_column) if c is not None]
    if any(c not in columns for c in declared):
        return _unread(Unread.DECLARED, outputs, n_rows)
    score_name = reading.score_column or next((n for n in SCORE_NAMES if n in columns), None)
    class_name = reading.class_column or next((n for n in CLASS_NAMES if n in columns), None)
    if score_name is None and class_name is None:
        numeric = all(c.dtype.kind in "iuf" for c in columns.values())
        matrix = np.column_stack(list(columns.values())) if numeric else None
        return _from_probabilities(_probabilities(matrix), n_rows, outputs)
    scores = _scores(columns[score_name]) if score_name is not None else None
    classes = _classes(columns[class_name]) if class_name is not None else None
    if scores is None and classes is None:
        return _unread(Unread.DECLARED if declared else Unread.COLUMNS, outputs, n_rows)
    return RowFacts(scores or list(empty), classes or list(empty), outputs)


def _scores(values: np.ndarray) -> list[float | None] | None:
    """A column as scores: numbers (booleans as 0/1), NaN and infinity as None; None if not
    numeric."""
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError):
            return None
    floats = values.astype(np.float64)
    return [float(v) if np.isfinite(v) else None for v in floats.tolist()]


def _classes(values: np.ndarray) -> list[str | None]:
    """A column as class labels: integers and booleans as their integer text, else text."""
    if np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_:
        return [str(v) for v in values.astype(np.int64).tolist()]
    if np.issubdtype(values.dtype, np.floating):
        return [
            None if not np.isfinite(v) else str(int(v)) if float(v).is_integer() else str(v)
            for v in values.tolist()
        ]
    return [None if v is None else str(v) for v in values.tolist()]


def _probabilities(matrix: np.ndarray | None) -> np.ndarray | None:
    """``matrix`` (n, k) as float64 when its rows are class probabilities, else None."""
    if matrix is None:
        return None
    p = matrix.astype(np.float64, copy=False)
    sums = p.sum(axis=1)
    # min/max are NaN when any value is: every comparison below is then False.
    valid = p.min() >= 0.0 and p.max() <= 1.0 and sums.min() >= 1.0 - _SUM_TOLERANCE
    return p if valid and sums.max() <= 1.0 + _SUM_TOLERANCE else None


def _from_small_probabilities(rows: list[list[float]], outputs: list[str]) -> RowFacts:
    """:func:`_from_probabilities` in plain Python: for a few values, a dozen numpy calls cost
    more than the loop (a request's output is usually one row)."""
    scores: list[float | None] = []
    classes: list[str | None] = []
    for row in rows:
        total = 0.0
        for v in row:
            if not 0.0 <= v <= 1.0:  # NaN fails too
                return _unread(Unread.COLUMNS, outputs, len(rows))
            total += v
        if abs(total - 1.0) > _SUM_TOLERANCE:
            return _unread(Unread.COLUMNS, outputs, len(rows))
        top = max(row)
        index = row.index(top)
        scores.append(float(row[1] if len(row) == 2 else top))
        classes.append(str(index))
    return RowFacts(scores, classes, outputs)


def _from_probabilities(p: np.ndarray | None, n_rows: int, outputs: list[str]) -> RowFacts:
    """The positive-class probability (two columns) or the top one, and the argmax index."""
    if p is None:
        return _unread(Unread.COLUMNS, outputs, n_rows)
    top = p.argmax(axis=1)
    scores = p[:, 1] if p.shape[1] == 2 else p[np.arange(n_rows), top]
    return RowFacts(scores.tolist(), [str(i) for i in top.tolist()], outputs)
