"""The columns a JSON input names, whatever the model: the protocol's shapes, made uniform.

``dataframe_split`` (``columns`` + rows), ``dataframe_records`` and ``instances`` / ``inputs`` as
rows of objects or as an object of columns all become ``{column name: values}``. Shapes without
column names (rows as lists, a tensor) give None: they are for models without named columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import Any

from router.errors import BadRequest
from router.input.schema import names_text as _names

Columns = dict[str, Sequence[Any]]


def columns_of(fmt: str, value: Any) -> Columns | None:
    """Column name -> raw values, or None when the input does not name its columns.

    ``value`` has at least one row (``router.input.rowcount`` counted them first). Raises
    :class:`BadRequest` for a shape that cannot be columns; the caller keeps the error for models
    with named columns (other models are parsed by MLflow's own functions, which take other
    shapes).
    """
    if fmt == "dataframe_split":
        return _split_columns(value)
    if fmt == "dataframe_records":
        if not isinstance(value, list):
            raise BadRequest(f"{fmt} must be a list of objects, one per row")
        return _record_columns(value, fmt)
    # instances / inputs: rows as objects, columns as an object of lists, or one column's values.
    if isinstance(value, dict):
        return _dict_columns(value, fmt)
    if not isinstance(value, list):
        raise BadRequest(f"{fmt} must be a list of rows or an object of columns")
    if isinstance(value[0], dict):
        return _record_columns(value, fmt)
    return None


def split_index(value: Any) -> list[Any] | None:
    index = value.get("index") if isinstance(value, dict) else None
    data = value.get("data") if isinstance(value, dict) else None
    if index is not None and (
        not isinstance(index, list) or not isinstance(data, list) or len(index) != len(data)
    ):
        n_rows = len(data) if isinstance(data, list) else 0
        raise BadRequest(f"dataframe_split.index must be a list with one label per row ({n_rows})")
    return index


def _split_columns(value: Any) -> Columns | None:
    fmt = "dataframe_split"
    if (
        not isinstance(value, dict)
        or "data" not in value
        or set(value) - {"columns", "data", "index"}
    ):
        raise BadRequest(
            f"{fmt} must be an object with 'columns' and 'data' (and optionally 'index')"
        )
    data = value["data"]
    if not isinstance(data, list):
        raise BadRequest(f"{fmt}.data must be a list of rows")
    names = value.get("columns")
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise BadRequest(f"{fmt}.columns must be a list of column names (strings)")
    if len(set(names)) != len(names):
        duplicated = sorted({name for name in names if names.count(name) > 1})
        raise BadRequest(f"{fmt}.columns names a column more than once: {_names(duplicated)}")
    if len(names) == 1 and not isinstance(data[0], list):
        return {names[0]: data}  # pandas takes a flat list for one column
    if set(map(type, data)) != {list} or set(map(len, data)) != {len(names)}:
        raise BadRequest(f"each row of {fmt}.data must be a list of {len(names)} values")
    return dict(zip(names, zip(*data, strict=True), strict=True))


def _record_columns(records: list[Any], fmt: str) -> Columns:
    if set(map(type, records)) != {dict}:
        raise BadRequest(f"{fmt} must be a list of objects, one per row")
    names: dict[str, None] = dict.fromkeys(records[0])
    if len(records) > 1:
        names.update(dict.fromkeys(set().union(*records)))
    # A key missing from a record is a missing value (pandas makes it NaN), here None.
    return {name: list(map(dict.get, records, repeat(name))) for name in names}


def _dict_columns(value: dict[str, Any], fmt: str) -> Columns:
    is_list = [isinstance(column, list) for column in value.values()]
    if not any(is_list):  # one row given as column -> value
        return {name: [column] for name, column in value.items()}
    lengths = {len(column) for column in value.values() if isinstance(column, list)}
    if not all(is_list) or len(lengths) != 1:
        raise BadRequest(
            f"{fmt} as an object of columns needs a list of the same length for every column"
        )
    return value
