"""How many rows a request has, and the one row limit (``limits.max_rows``) with its message.

A body's rows are counted once, as it is decoded (:func:`json_rows` before any conversion, so an
oversized request costs nothing more; a CSV or Parquet table's length), and checked by
:func:`check_rows`: none is a 400, more than the limit a 413. A Parquet footer states its row
count, so too many rows are refused before decoding (:func:`check_row_limit`). The one other
count is of what MLflow's parsing builds for a model without named columns
(:func:`parsed_rows`): those rows, not the body's, are the model's input rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from router.errors import BadRequest, PayloadTooLarge


def check_rows(n_rows: int, max_rows: int, fmt: str, *, read_all: bool = True) -> None:
    """At least one row, at most ``max_rows``. ``read_all=False``: the reader stopped after
    ``max_rows + 1`` rows, so the exact count is unknown."""
    if n_rows == 0:
        raise BadRequest(f"no rows: {fmt} is empty")
    check_row_limit(n_rows, max_rows, fmt, read_all=read_all)


def check_row_limit(n_rows: int, max_rows: int, fmt: str, *, read_all: bool = True) -> None:
    """At most ``max_rows`` rows, else :class:`PayloadTooLarge` naming the count and the limit."""
    if n_rows > max_rows:
        count = str(n_rows) if read_all else f"more than {max_rows}"
        raise PayloadTooLarge(
            f"too many rows: {fmt} has {count} rows; the limit is {max_rows} per request "
            "(limits.max_rows)"
        )


def json_rows(fmt: str, value: Any) -> int:
    """Rows under a JSON format key, before any conversion."""
    rows: Any = value
    if isinstance(value, dict):
        rows = value.get("data") if fmt == "dataframe_split" else next(iter(value.values()), [])
        if fmt != "dataframe_split" and not isinstance(rows, list):
            return 1  # an object of single values is one row
    return len(rows) if isinstance(rows, list) else 1


def parsed_rows(data: Any) -> int:
    """Rows of a model input MLflow's parsing built (a frame, an array, a dict of arrays)."""
    if isinstance(data, dict):
        data = next(iter(data.values()), [])
    if isinstance(data, pd.DataFrame | list):
        return len(data)
    if isinstance(data, np.ndarray):
        return int(data.shape[0]) if data.ndim else 1
    return 1
