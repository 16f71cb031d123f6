"""Parse ``POST /invocations`` bodies as MLflow's scoring server (``mlflow models serve``) does.

Formats (``application/json``): exactly one of ``dataframe_split``, ``dataframe_records``,
``instances``, ``inputs``, plus an optional ``params`` object passed through to ``predict``. Also
``text/csv`` (a header row, as ``DataFrame.to_csv`` writes) and ``application/vnd.apache.parquet``.

Two steps, so that each arm is checked against its own signature:

1. :func:`decode_invocation` reads the body once, whatever the model (``router.input.bodies``
   bounds the decoding, ``router.input.rowcount`` counts the rows once and applies the limit,
   ``router.input.columns`` makes JSON shapes columns): a :class:`RawInput`.
2. :func:`conform` makes one model's input from it. With a column-based signature (named
   ``ColSpec`` inputs; what ``infer_signature`` gives for a DataFrame) that is the model's columns
   in signature order (:class:`router.input.rows.Rows`, one typed array per column; the batcher
   builds the frame per model call): the column names checked against the signature
   (``router.input.schema``: missing ones refused, unknown ones dropped or refused), then the
   values typed and cast exactly as ``mlflow models serve`` would hand them to the model
   (``router.input.casting``); what MLflow refuses is a 400 before predicting, with MLflow's
   ``error_code``. The ``validation`` settings make it stricter (unknown columns, lossy casts)
   and refuse Infinity. Tensor-based signatures, unnamed columns and models without a signature
   are parsed by MLflow's own functions and checked for their shape.

:func:`parse_invocation` does both. All differences from MLflow: docs/migration.md.
Not supported: the unified LLM chat format and signatures inferred from type hints.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.types import ParamSchema, Schema

from router.config import Casting, ExtraColumns, NonFinite
from router.errors import BadRequest, InvalidInput, RouterError
from router.input.bodies import PARQUET_MEDIA_TYPE, load_json, read_csv, read_parquet
from router.input.bodies import media_type as media_type_of
from router.input.casting import check_finite, enforce_like_mlflow, typed_rows
from router.input.columns import Columns, columns_of, split_index
from router.input.rowcount import check_rows, json_rows, parsed_rows
from router.input.rows import Rows
from router.input.schema import (
    ColumnPlan,
    check_columns,
    check_shape,
    column_plan,
    is_named_columns,
)
from router.input.schema import names_text as _names
from router.mlflow_private import (
    enforce_params_schema,
    parse_csv,
    parse_dataframe,
    parse_tf_serving,
)

FORMAT_KEYS: tuple[str, ...] = ("dataframe_split", "dataframe_records", "instances", "inputs")
PARAMS_KEY = "params"
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_CSV = "text/csv"
CONTENT_TYPE_PARQUET = PARQUET_MEDIA_TYPE
CONTENT_TYPES: tuple[str, ...] = (CONTENT_TYPE_JSON, CONTENT_TYPE_CSV, CONTENT_TYPE_PARQUET)

InputData: TypeAlias = pd.DataFrame | np.ndarray | dict[str, np.ndarray]
TABLE_FORMATS = ("csv", "parquet")  # the formats of a CSV or Parquet body (their own media types)

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
    format: str  # one of FORMAT_KEYS, or one of TABLE_FORMATS

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

    format: str  # one of FORMAT_KEYS, or one of TABLE_FORMATS
    n_rows: int
    params: dict[str, Any] | None
    value: Any  # the JSON value under the format key; the read DataFrame for CSV and Parquet
    columns: Columns | None  # column name -> values, when the input names its columns
    index: list[Any] | None  # the dataframe_split index a client sent
    columns_error: RouterError | None = None  # why the input has no usable columns, if so
    body: bytes = b""  # CSV only: see text_columns

    def text_columns(self, names: tuple[str, ...]) -> Columns:
        """A CSV's columns ``names`` as the text the client sent ("007", where the first read
        gave 7), as MLflow reads the string columns of a signature. Decoding cannot know which
        columns a model takes as strings, so these are read again, only when a model asks."""
        # The body already parsed once, with these very rows: reading it again cannot fail.
        strings = read_csv(self.body, usecols=list(names), dtype=object, nrows=self.n_rows)
        return {name: strings[name] for name in names}


def decode_invocation(body: bytes, content_type: str | None, max_rows: int) -> RawInput:
    """Decode one ``/invocations`` body, independently of any model.

    Raises :class:`UnsupportedMediaType` (415), :class:`BadRequest` (400: not JSON, not the
    protocol's shape, no rows) or :class:`PayloadTooLarge` (413: too many rows, or a body that
    would decode too large), each naming the problem.
    """
    media_type = media_type_of(content_type, CONTENT_TYPES)
    if media_type == CONTENT_TYPE_JSON:
        return _decode_json(body, max_rows)
    if media_type == CONTENT_TYPE_PARQUET:
        return _table_input("parquet", read_parquet(body, max_rows), max_rows)
    # One row past the limit is enough to know the limit is exceeded.
    return _table_input("csv", read_csv(body, nrows=max_rows + 1), max_rows, body=body)


def conform(
    raw: RawInput,
    input_schema: Schema | None,
    *,
    extra_columns: ExtraColumns = "ignore",
    casting: Casting = "mlflow",
    non_finite: NonFinite = "reject",
    params_schema: ParamSchema | None = None,
    plan: ColumnPlan | None = None,
    known_columns: frozenset[str] | None = None,
) -> ParsedInput:
    """Check and type a decoded input for ONE model's signature (its own columns, in its order).

    Accepts and casts what ``mlflow models serve`` accepts for the same model, with the same
    values (see :mod:`router.input.casting`); the switches are ``ValidationSettings``'.
    ``params`` are checked against ``params_schema`` when given. ``plan``:
    :func:`router.input.schema.column_plan` of ``input_schema``, made once per model (else here,
    per call). ``known_columns``: during a schema change, the columns either arm takes (a column
    is unknown only when neither does). Raises :class:`BadRequest` or :class:`InvalidInput` (400)
    naming the problem. Cheap to call once per arm: the body is not decoded again.
    """
    if params_schema is not None:
        _check_params(raw.params, params_schema)
    data: Rows | InputData
    if is_named_columns(input_schema):
        assert input_schema is not None
        plan = plan if plan is not None else column_plan(input_schema)
        columns = _columns_for(raw, plan)
        check_columns(columns, plan, extra_columns, known_columns)
        try:
            data = typed_rows(columns, raw.n_rows, raw.index, plan)
        except InvalidInput:
            if casting == "strict":
                raise
            data = enforce_like_mlflow(_parse_with_mlflow(raw, input_schema), input_schema)
        n_rows = raw.n_rows
    else:
        data = _parse_with_mlflow(raw, input_schema)
        # The rows MLflow built are the model's input rows, whatever the body's shape.
        n_rows = raw.n_rows if raw.format in TABLE_FORMATS else parsed_rows(data)
        if input_schema is not None:
            check_shape(data, input_schema)
    if non_finite == "reject":
        check_finite(data)
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


# --- decoding -------------------------------------------------------------------------------


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
    n_rows = json_rows(fmt, value)
    check_rows(n_rows, max_rows, fmt)
    index = split_index(value) if fmt == "dataframe_split" else None
    try:
        columns = columns_of(fmt, value)
    except RouterError as exc:  # only an error for models with named columns: see conform
        return RawInput(fmt, n_rows, params, value, None, index, columns_error=exc)
    return RawInput(fmt, n_rows, params, value, columns, index)


def _table_input(fmt: str, frame: pd.DataFrame, max_rows: int, body: bytes = b"") -> RawInput:
    """A read CSV or Parquet table; a Parquet reader reads every row (its footer was checked
    against the limit), a CSV reader at most one past the limit."""
    check_rows(len(frame), max_rows, fmt, read_all=fmt == "parquet")
    columns: Columns = {str(name): frame[name] for name in frame.columns}
    return RawInput(fmt, len(frame), None, frame, columns, None, body=body)


# --- column-based signatures -----------------------------------------------------------------


def _columns_for(raw: RawInput, plan: ColumnPlan) -> Columns:
    """The input's columns for a model whose signature names its columns."""
    if raw.columns_error is not None:
        raise raw.columns_error
    if raw.format == "csv":
        assert raw.columns is not None  # a read table names its columns
        text = tuple(name for name in plan.strings if name in raw.columns)
        return {**raw.columns, **raw.text_columns(text)} if text else raw.columns
    if raw.columns is not None:
        return raw.columns
    if raw.format == "dataframe_split":
        raise InvalidInput(
            f"{raw.format} needs 'columns' naming the model's inputs: {_names(plan.names)}"
        )
    if len(plan.names) == 1:
        return {plan.names[0]: raw.value}
    raise InvalidInput(
        f"{raw.format} as a list of values needs one object per row naming the model's inputs "
        f"({_names(plan.names)}); for rows as lists use dataframe_split with 'columns'"
    )


# --- other signatures: MLflow's own parsing ---------------------------------------------------


def _parse_with_mlflow(raw: RawInput, schema: Schema | None) -> InputData:
    """What MLflow's scoring server parses from the body for this model (its casts included)."""
    try:
        if raw.format == "parquet":
            return raw.value  # typed by the file; MLflow does not cast it either
        if raw.format == "csv":
            if not is_named_columns(schema):
                return raw.value  # MLflow cannot read CSV for a tensor signature; we can
            return parse_csv(io.StringIO(raw.body.decode()), schema)
        if raw.format in ("instances", "inputs"):
            data: InputData = parse_tf_serving({raw.format: raw.value}, schema=schema)
        else:
            orient = raw.format[len("dataframe_") :]
            data = parse_dataframe(raw.value, pandas_orient=orient, schema=schema)
    except MlflowException as exc:
        raise BadRequest(exc.message) from exc
    return data


def _check_params(params: dict[str, Any] | None, schema: ParamSchema) -> None:
    try:
        enforce_params_schema(params, schema)
    except MlflowException as exc:
        raise InvalidInput(f"params: {exc.message}") from exc


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
