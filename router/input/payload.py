"""Parse ``POST /invocations`` bodies as MLflow's scoring server (``mlflow models serve``) does.

Formats (``application/json``): exactly one of ``dataframe_split``, ``dataframe_records``,
``instances``, ``inputs``, plus an optional ``params`` object passed through to ``predict``. Also
``text/csv`` (a header row, as ``DataFrame.to_csv`` writes) and ``application/vnd.apache.parquet``.

With a column-based signature (named ``ColSpec`` inputs; what ``infer_signature`` gives for a
DataFrame) every format becomes the model's columns in signature order
(:class:`router.input.rows.Rows`, one typed array per column; the batcher builds the frame per
model call), typed and cast exactly as
``mlflow models serve`` would hand them to the model (``router.input.casting``):
extra columns are dropped, MLflow's casts applied, and what MLflow refuses is a 400 before
predicting, with MLflow's ``error_code``. The ``validation`` settings make it stricter (unknown
columns, lossy casts) and refuse Infinity. Tensor-based signatures, unnamed columns and models
without a signature are parsed by MLflow's own functions; tensor inputs are checked for their
per-row feature count. All differences from MLflow: docs/migration.md.
Not supported: the unified LLM chat format and signatures inferred from type hints.

Two steps, so that each arm is checked against its own signature: :func:`decode_invocation` reads
the body once, whatever the model; :func:`conform` makes one model's input from it (its columns,
in its order, typed). :func:`parse_invocation` does both.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import utils as model_utils
from mlflow.pyfunc import scoring_server
from mlflow.types import DataType, ParamSchema, Schema
from mlflow.utils import proto_json_utils

from router.config import Casting, ExtraColumns, NonFinite
from router.errors import (
    BadRequest,
    InvalidInput,
    PayloadTooLarge,
    RouterError,
)
from router.input import casting as casting_rules
from router.input.bodies import PARQUET_MEDIA_TYPE, load_json, read_csv, read_parquet
from router.input.bodies import media_type as media_type_of
from router.input.casting import ColumnPlan
from router.input.casting import names_text as _names
from router.input.columns import Columns, columns_of, split_index
from router.input.rows import Rows

FORMAT_KEYS: tuple[str, ...] = ("dataframe_split", "dataframe_records", "instances", "inputs")
PARAMS_KEY = "params"
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_CSV = "text/csv"
CONTENT_TYPE_PARQUET = PARQUET_MEDIA_TYPE
CONTENT_TYPES: tuple[str, ...] = (CONTENT_TYPE_JSON, CONTENT_TYPE_CSV, CONTENT_TYPE_PARQUET)

InputData: TypeAlias = pd.DataFrame | np.ndarray | dict[str, np.ndarray]

# The scoring server's own helpers (untyped): used where the fast path does not apply.
_mlflow_dataframe: Callable[..., pd.DataFrame] = proto_json_utils.dataframe_from_parsed_json
_mlflow_tf_serving: Callable[..., Any] = proto_json_utils.parse_tf_serving_input
_mlflow_csv: Callable[..., pd.DataFrame] = scoring_server.parse_csv_input
_mlflow_params: Callable[..., Any] = model_utils._enforce_params_schema

_KEYS_HINT = (
    f"the body must be a JSON object with exactly one of the keys {', '.join(FORMAT_KEYS)} "
    f"(and optionally '{PARAMS_KEY}')"
)


@dataclass(frozen=True)
class ParsedInput:
    """One request's input for one model: its checked :class:`~router.input.rows.Rows` (a model with
    named columns, on the fast path), or what ``PyFuncModel.predict`` takes."""

    model_input: Rows | InputData
    n_rows: int
    params: dict[str, Any] | None
    format: str  # one of FORMAT_KEYS, or "csv" / "parquet"

    @cached_property
    def data(self) -> InputData:
        """The input as ``PyFuncModel.predict(data, params=params)`` takes it (built on demand:
        the scoring path joins requests' rows before building anything)."""
        if isinstance(self.model_input, Rows):
            return self.model_input.frame()
        return self.model_input


@dataclass(frozen=True)
class RawInput:
    """One request's body as decoded, before any model's signature is applied.

    Decoding does not depend on a model, so one ``RawInput`` serves both arms: each arm's
    :func:`conform` takes its own columns from it without decoding the body again.
    """

    format: str  # one of FORMAT_KEYS, or "csv" / "parquet"
    n_rows: int
    params: dict[str, Any] | None
    value: Any  # the JSON value under the format key; the read DataFrame for CSV and Parquet
    columns: Columns | None  # column name -> values, when the input names its columns
    index: list[Any] | None  # the dataframe_split index a client sent
    columns_error: RouterError | None = None  # why the input has no usable columns, if so
    body: bytes = b""  # CSV only: string columns are read again as text


def decode_invocation(body: bytes, content_type: str | None, max_rows: int) -> RawInput:
    """Decode one ``/invocations`` body, independently of any model.

    Raises :class:`UnsupportedMediaType` (415), :class:`BadRequest` (400: not JSON, not the
    protocol's shape) or :class:`InvalidInput` (no rows, too many rows), each naming the problem.
    """
    media_type = media_type_of(content_type, CONTENT_TYPES)
    if media_type == CONTENT_TYPE_JSON:
        return _decode_json(body, max_rows)
    frame = _read_table(body, media_type, max_rows)
    fmt = "csv" if media_type == CONTENT_TYPE_CSV else "parquet"
    _check_row_count(len(frame), max_rows, fmt, read_all=fmt == "parquet")
    columns: Columns = {str(name): frame[name] for name in frame.columns}
    return RawInput(
        format=fmt,
        n_rows=len(frame),
        params=None,
        value=frame,
        columns=columns,
        index=None,
        body=body if fmt == "csv" else b"",
    )


def conform(
    raw: RawInput,
    input_schema: Schema | None,
    *,
    extra_columns: ExtraColumns = "ignore",
    casting: Casting = "mlflow",
    non_finite: NonFinite = "reject",
    params_schema: ParamSchema | None = None,
    plan: ColumnPlan | None = None,
) -> ParsedInput:
    """Check and type a decoded input for ONE model's signature (its own columns, in its order).

    Accepts and casts what ``mlflow models serve`` accepts for the same model, with the same
    values (see :mod:`router.input.casting`); the switches are ``ValidationSettings``'.
    ``params`` are checked against ``params_schema`` when given. Raises :class:`BadRequest` or
    :class:`InvalidInput` (400) naming the problem. Cheap to call once per arm: the body is not
    decoded again. ``plan``: :func:`router.input.casting.column_plan` of ``input_schema``, made
    once per model (else here, per call).
    """
    schema = input_schema
    if params_schema is not None:
        _check_params(raw.params, params_schema)
    data: Rows | InputData
    if casting_rules.is_named_columns(schema):
        assert schema is not None
        plan = plan if plan is not None else casting_rules.column_plan(schema)
        columns = _columns_for(raw, schema)
        casting_rules.check_columns(columns, plan, extra_columns)
        try:
            data = casting_rules.typed_rows(columns, raw.n_rows, raw.index, plan)
        except InvalidInput:
            if casting == "strict":
                raise
            data = casting_rules.enforce_like_mlflow(_parse_with_mlflow(raw, schema), schema)
        n_rows = raw.n_rows
    else:
        data = _parse_with_mlflow(raw, schema)
        n_rows = raw.n_rows if raw.format in ("csv", "parquet") else _row_count(data)
        if schema is not None and schema.is_tensor_spec():
            casting_rules.check_tensor(data, schema)
        elif schema is not None:
            casting_rules.check_unnamed(data, schema)
    if non_finite == "reject":
        casting_rules.check_finite(data)
    return ParsedInput(model_input=data, n_rows=n_rows, params=raw.params, format=raw.format)


def parse_invocation(
    body: bytes,
    content_type: str | None,
    input_schema: Schema | None,
    max_rows: int,
    **rules: Any,
) -> ParsedInput:
    """Decode one ``/invocations`` body and conform it to one model's signature (``rules``: the
    keyword arguments of :func:`conform`)."""
    raw = decode_invocation(body, content_type, max_rows)
    return conform(raw, input_schema, **rules)


# --- content type and JSON ------------------------------------------------------------------


def _decode_json(body: bytes, max_rows: int) -> RawInput:
    document = load_json(body, as_mlflow=True)
    if not isinstance(document, dict):
        raise BadRequest(f"{_KEYS_HINT}; got a JSON {_json_type(document)}")
    unknown = [key for key in document if key not in FORMAT_KEYS and key != PARAMS_KEY]
    if unknown:
        raise BadRequest(f"unknown key(s) {_names(unknown)}: {_KEYS_HINT}")
    present = [key for key in FORMAT_KEYS if key in document]
    if len(present) != 1:
        got = f"got {_names(present)}" if present else "got none"
        raise BadRequest(f"{_KEYS_HINT}; {got}")
    fmt = present[0]
    params = document.get(PARAMS_KEY)
    if params is not None and not isinstance(params, dict):
        raise BadRequest(f"'{PARAMS_KEY}' must be a JSON object, got a {_json_type(params)}")
    value = document[fmt]
    n_rows = _raw_row_count(fmt, value)
    _check_row_count(n_rows, max_rows, fmt)
    index = split_index(value) if fmt == "dataframe_split" else None
    try:
        columns = columns_of(fmt, value)
    except RouterError as exc:  # only an error for models with named columns: see conform
        return RawInput(fmt, n_rows, params, value, None, index, columns_error=exc)
    return RawInput(fmt, n_rows, params, value, columns, index)


# --- column-based signatures -----------------------------------------------------------------


def _columns_for(raw: RawInput, schema: Schema) -> Columns:
    """The input's columns for a model whose signature names its columns."""
    if raw.columns_error is not None:
        raise raw.columns_error
    if raw.format == "csv":
        return _csv_columns(raw, schema)
    if raw.columns is not None:
        return raw.columns
    if raw.format == "dataframe_split":
        raise InvalidInput(
            f"{raw.format} needs 'columns' naming the model's inputs: "
            f"{_names(schema.input_names())}"
        )
    names = schema.input_names()
    if len(names) == 1:
        return {str(names[0]): raw.value}
    raise InvalidInput(
        f"{raw.format} as a list of values needs one object per row naming the model's inputs "
        f"({_names(names)}); for rows as lists use dataframe_split with 'columns'"
    )


# --- other signatures: MLflow's own parsing ---------------------------------------------------


def _parse_with_mlflow(raw: RawInput, schema: Schema | None) -> InputData:
    """What MLflow's scoring server parses from the body for this model (its casts included)."""
    try:
        if raw.format == "parquet":
            return raw.value  # typed by the file; MLflow does not cast it either
        if raw.format == "csv":
            if not casting_rules.is_named_columns(schema):
                return raw.value  # MLflow cannot read CSV for a tensor signature; we can
            return _mlflow_csv(io.StringIO(raw.body.decode()), schema)
        if raw.format in ("instances", "inputs"):
            data: InputData = _mlflow_tf_serving({raw.format: raw.value}, schema=schema)
        else:
            orient = raw.format[len("dataframe_") :]
            data = _mlflow_dataframe(raw.value, pandas_orient=orient, schema=schema)
    except MlflowException as exc:
        raise BadRequest(exc.message) from exc
    return data


def _check_params(params: dict[str, Any] | None, schema: ParamSchema) -> None:
    try:
        _mlflow_params(params, schema)
    except MlflowException as exc:
        raise InvalidInput(f"params: {exc.message}") from exc


# --- CSV and Parquet --------------------------------------------------------------------------


def _read_table(body: bytes, media_type: str, max_rows: int) -> pd.DataFrame:
    if media_type == CONTENT_TYPE_PARQUET:
        return read_parquet(body, max_rows)
    # One row past the limit is enough to know the limit is exceeded.
    return read_csv(body, nrows=max_rows + 1)


def _csv_columns(raw: RawInput, schema: Schema) -> Columns:
    """A CSV's columns, with the signature's string columns read again as text ("007" not 7)."""
    assert raw.columns is not None
    text = [
        str(spec.name)
        for spec in schema.inputs
        if spec.type == DataType.string and str(spec.name) in raw.columns
    ]
    if not text:
        return raw.columns
    # The body already parsed once, with these very rows: reading it again cannot fail.
    strings = read_csv(raw.body, usecols=text, dtype=object, nrows=raw.n_rows)
    return {**raw.columns, **{name: strings[name] for name in text}}


# --- helpers ----------------------------------------------------------------------------------


def _check_row_count(n_rows: int, max_rows: int, fmt: str, *, read_all: bool = True) -> None:
    """``read_all=False``: the reader stopped after ``max_rows + 1`` rows."""
    if n_rows == 0:
        raise BadRequest(f"no rows: {fmt} is empty")
    if n_rows > max_rows:
        count = str(n_rows) if read_all else f"more than {max_rows}"
        raise PayloadTooLarge(
            f"too many rows: {fmt} has {count} rows; the limit is {max_rows} per request "
            "(limits.max_rows)"
        )


def _raw_row_count(fmt: str, value: Any) -> int:
    """Rows in the JSON before any conversion, so oversized requests cost nothing more."""
    rows: Any = value
    if isinstance(value, dict):
        rows = value.get("data") if fmt == "dataframe_split" else next(iter(value.values()), [])
        if fmt != "dataframe_split" and not isinstance(rows, list):
            return 1  # an object of single values is one row
    return len(rows) if isinstance(rows, list) else 1


def _row_count(data: Any) -> int:
    if isinstance(data, dict):
        data = next(iter(data.values()), [])
    if isinstance(data, pd.DataFrame | list):
        return len(data)
    if isinstance(data, np.ndarray):
        return int(data.shape[0]) if data.ndim else 1
    return 1


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
