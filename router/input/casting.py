"""One model's columns typed and cast for its signature: the values, once the column names were
checked (``router.input.schema``).

Two ways to type a column, both giving what MLflow's scoring server hands the model:

- :func:`typed_rows`, the fast path, takes values already of the column's type (and safe
  widening: 3 into a double column, 3.0 into a long column) and builds the typed array directly;
  anything else raises :class:`InvalidInput` naming the column and row.
- :func:`enforce_like_mlflow` is MLflow's own code: the scoring server's parsing (its casts:
  ``"3"`` or ``1.5`` into a long column gives 3 or 1, ``7`` into a string column stays 7, as
  ``astype`` does), then ``_enforce_schema`` as ``PyFuncModel.predict`` runs it. Used when the
  fast path refuses, so that what MLflow accepts is accepted with the same values, and what it
  refuses is refused before predicting with MLflow's message and ``error_code``.

:func:`check_finite` refuses Infinity in numeric input (``validation.non_finite``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.types import ColSpec, DataType, Schema
from pandas.api.types import infer_dtype

from router.errors import InvalidInput
from router.input.rows import Rows
from router.input.schema import ColumnPlan
from router.mlflow_private import cast_columns as _mlflow_cast
from router.mlflow_private import enforce_schema as _mlflow_enforce

_NUMBER_KINDS = frozenset({"integer", "floating", "mixed-integer-float", "empty"})
# The Python types JSON values decode to, for which the column's array is built without inference
# (None, NaN and other types take pandas' ``infer_dtype`` route).
_PLAIN_NUMBERS = frozenset({int, float})
_INT = frozenset({int})
_BOOL = frozenset({bool})
_STR = frozenset({str})
_UNKNOWN: frozenset[type] = frozenset()
_INTEGER_TYPES = frozenset({DataType.integer, DataType.long})
_FLOAT_TYPES = frozenset({DataType.float, DataType.double})
_EXPECTED = {
    DataType.double: "double (a number)",
    DataType.float: "float (a number)",
    DataType.long: "long (an integer)",
    DataType.integer: "integer (a 32-bit integer)",
    DataType.boolean: "boolean (true or false)",
    DataType.string: "string",
}


def typed_rows(
    columns: Mapping[str, Sequence[Any]], n_rows: int, index: list[Any] | None, plan: ColumnPlan
) -> Rows:
    """The model's columns, in its order, typed; InvalidInput for a value not of its type."""
    names = tuple(name for name in plan.names if name in columns)
    doubles = [name for name in names if name in plan.doubles]
    block = _plain_doubles(doubles, columns)
    if block is not None and len(doubles) == len(names):
        return Rows(names, tuple(block), n_rows, index, block=block)
    converted = {} if block is None else dict(zip(doubles, block, strict=True))
    arrays = tuple(
        converted[name] if name in converted else _convert(name, plan.specs[name], columns[name])
        for name in names
    )
    return Rows(names, arrays, n_rows, index)


def _plain_doubles(
    doubles: Sequence[str], columns: Mapping[str, Sequence[Any]]
) -> np.ndarray | None:
    """The double columns as one (columns x rows) array when they hold plain JSON numbers only
    (numeric models' usual input), else None: one array call instead of one per column; anything
    else is left to ``_convert``."""
    if len(doubles) < 2:
        return None
    values = [columns[name] for name in doubles]
    if not all(map(_is_list, values)):
        return None
    if not set(map(type, itertools.chain.from_iterable(values))) <= _PLAIN_NUMBERS:
        return None
    try:
        return np.array(values, dtype=np.float64)
    except OverflowError:  # an integer past any double: the columns are named one by one
        return None


def _is_list(values: Sequence[Any]) -> bool:
    return isinstance(values, list | tuple)


def enforce_like_mlflow(data: Any, schema: Schema) -> Any:
    """MLflow's ``_enforce_schema`` on input its scoring server parsed; its faults as 400s."""
    try:
        return _mlflow_enforce(data, schema)
    except MlflowException as exc:
        raise InvalidInput(exc.message) from exc
    except (ValueError, TypeError, OverflowError, KeyError) as exc:
        # What PyFuncModel.predict reports as a schema failure (INVALID_PARAMETER_VALUE).
        raise InvalidInput(f"the input does not fit the model signature: {exc}") from exc


def check_finite(data: Any) -> None:
    """Refuse Infinity / -Infinity (also 1e400, which JSON readers make infinite) by column."""
    if isinstance(data, Rows):
        floats = data.float_columns()
        values = data.block if data.block is not None else [array for _, array in floats]
        if floats and np.isinf(np.concatenate(values, axis=None)).any():
            for name, array in floats:
                _refuse_infinite(f"column '{name}'", array)
    elif isinstance(data, pd.DataFrame):
        for name, column in data.items():
            if column.dtype.kind == "f":
                _refuse_infinite(f"column '{name}'", column.to_numpy())
    elif isinstance(data, np.ndarray):
        if data.dtype.kind == "f":
            _refuse_infinite("the input", data)
    elif isinstance(data, dict):
        for name, value in data.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                _refuse_infinite(f"input '{name}'", value)


def _refuse_infinite(what: str, values: np.ndarray) -> None:
    infinite = np.isinf(values)
    if infinite.any():
        position = np.argwhere(infinite)[0]
        row = int(position[0]) if position.size else 0
        # BAD_REQUEST: what MLflow answers when the model then raises on it.
        raise InvalidInput(
            error_code="BAD_REQUEST",
            message=f"{what} has a non-finite number ({values[tuple(position)]}) in row {row}: "
            "Infinity and numbers too large for a double are refused before predicting "
            "(validation.non_finite: pass hands them to the model)",
        )


def _convert(name: str, spec: ColSpec, values: Sequence[Any]) -> Any:
    """One column's values as the array MLflow's scoring server would build, or InvalidInput."""
    t = spec.type
    if not isinstance(t, DataType):
        return _convert_with_mlflow(name, spec, values)
    # Decoded JSON values are plain Python ones: their types say enough without inference. A
    # read CSV or Parquet column (a Series) is inferred by pandas, faster than a loop over it.
    kinds = set(map(type, values)) if _is_list(values) else _UNKNOWN
    if t in _FLOAT_TYPES:
        if (kinds and kinds <= _PLAIN_NUMBERS) or infer_dtype(values, skipna=True) in _NUMBER_KINDS:
            try:
                return np.array(values, dtype=t.to_numpy())  # None -> NaN, as in pandas
            except OverflowError:
                raise _out_of_range(name, t, np.finfo(t.to_numpy())) from None
        raise _wrong_type(name, t, values)
    if t in _INTEGER_TYPES:
        return _convert_integers(name, t, values, plain=kinds == _INT)
    if t == DataType.boolean:
        if kinds == _BOOL or infer_dtype(values, skipna=False) == "boolean":
            return np.array(values, dtype=np.bool_)
        if infer_dtype(values, skipna=True) in ("boolean", "empty"):
            raise _null_value(name, t, values)
        raise _wrong_type(name, t, values)
    if t == DataType.string:
        if kinds == _STR or infer_dtype(values, skipna=True) in ("string", "empty"):
            return np.array(values, dtype=object)  # the frame infers pandas' string dtype
        raise _wrong_type(name, t, values)
    return _convert_with_mlflow(name, spec, values)


def _convert_integers(name: str, t: DataType, values: Sequence[Any], *, plain: bool) -> np.ndarray:
    dtype = t.to_numpy()
    limits = np.iinfo(dtype)
    kind = "integer" if plain else infer_dtype(values, skipna=False)
    if kind == "integer":
        try:
            return np.array(values, dtype=dtype)
        except OverflowError:
            raise _out_of_range(name, t, limits) from None
    if kind in ("floating", "mixed-integer-float"):
        try:
            floats = np.array(values, dtype=np.float64)
        except OverflowError:
            raise _out_of_range(name, t, limits) from None
        if np.isnan(floats).any():
            raise _null_value(name, t, values)
        if not np.array_equal(floats, np.trunc(floats)):  # fractions and infinities
            raise _wrong_type(name, t, values)
        if floats.min() < limits.min or floats.max() > limits.max:
            raise _out_of_range(name, t, limits)
        return floats.astype(dtype)
    if infer_dtype(values, skipna=True) in _NUMBER_KINDS:
        raise _null_value(name, t, values)
    raise _wrong_type(name, t, values)


def _convert_with_mlflow(name: str, spec: ColSpec, values: Sequence[Any]) -> Any:
    """Datetime, binary, array, object, map and any-typed columns: MLflow's own conversion."""
    column = pd.Series(list(values), dtype=object)
    try:
        frame = _mlflow_cast(pd.DataFrame({name: column}), Schema([spec]))
    except MlflowException as exc:
        raise InvalidInput(f"column '{name}' does not fit {spec.type}: {exc.message}") from exc
    return frame[name].array


def _fits(t: DataType, value: Any) -> bool:
    """Whether one value has the column's type, nulls aside (error path only)."""
    if value is None:
        return True
    if t == DataType.string:
        return isinstance(value, str)
    if isinstance(value, bool | np.bool_):
        return t == DataType.boolean
    if t == DataType.boolean or not isinstance(value, int | float | np.integer | np.floating):
        return False
    if t not in _INTEGER_TYPES or isinstance(value, int | np.integer):
        return True  # an integer past any double never goes through float()
    return float(value).is_integer() or value != value


def _wrong_type(name: str, t: DataType, values: Sequence[Any]) -> InvalidInput:
    row, value = next(((i, v) for i, v in enumerate(values) if not _fits(t, v)), (0, None))
    return InvalidInput(f"column '{name}' expects {_EXPECTED[t]}, but row {row} has {_show(value)}")


def _null_value(name: str, t: DataType, values: Sequence[Any]) -> InvalidInput:
    row = next(i for i, v in enumerate(values) if v is None or (isinstance(v, float) and v != v))
    kind = "a boolean" if t == DataType.boolean else "an integer"
    return InvalidInput(
        f"column '{name}' is {t.name} ({kind} type), which cannot hold null or NaN, "
        f"but row {row} is null or missing"
    )


def _out_of_range(name: str, t: DataType, limits: np.iinfo | np.finfo) -> InvalidInput:
    return InvalidInput(
        f"column '{name}' is {t.name}: a value is outside [{limits.min}, {limits.max}]"
    )


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {text!r}"
    if isinstance(value, bool | np.bool_):
        return f"the boolean {str(bool(value)).lower()}"
    if isinstance(value, int | float | np.integer | np.floating):
        return f"the number {value}"
    return "a JSON object" if isinstance(value, dict) else "a JSON list"
