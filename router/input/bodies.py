"""Bounded decoding of request bodies: no body within ``limits.max_body_bytes`` decodes into more
than a stated amount of memory, and every malformed body is a 4xx naming the problem.

Why each bound exists (a few hundred bytes can otherwise become gigabytes):

* **Parquet** is refused before any native decoder sees it unless its footer, read from the
  bytes (``router/input/parquet_footer.py``: no pyarrow accessor, some of which abort the
  process), proves it well-formed (one tree of columns, one chunk per leaf column per row group,
  chunks inside the body and never overlapping) and small: at most ``max_rows`` rows and
  ``MAX_COLUMNS`` leaf columns, and at most ``MAX_DECODED_BYTES`` once decompressed and once
  decoded to fixed-width values, as every page header says (``router/input/parquet_pages.py``: a
  footer's sizes are only the writer's word). Run-length and dictionary encoding let one small
  page stand for millions of values, so every string and binary column, nested ones included,
  is read dictionary-encoded (a dictionary plus indices, never a string per row) and its dense
  size is computed before it is expanded.
* **CSV** is read only up to ``max_rows + 1`` rows, after its header was checked against
  ``MAX_COLUMNS`` (pandas spends ~1 KB per column: a 1.4 MB header of 150,000 columns was 175 MB).
* **JSON** is counted first (at most ``MAX_JSON_CONTAINERS`` objects and arrays: an empty object
  is 2 bytes on the wire and 64 in memory), parsed by orjson (which refuses lone surrogates), and
  its nesting bounded to ``MAX_JSON_DEPTH`` (deeper values made Python code downstream recurse
  past its limit: a 500); the ``json.loads`` path kept for MLflow's literals and long integers
  applies the same rules.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from router.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from router.input.parquet_footer import BYTE_ARRAY, Footer, read_footer
from router.input.parquet_pages import MalformedPage, chunk_pages
from router.input.rowcount import check_row_limit
from router.input.schema import names_text

PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
MAX_JSON_DEPTH = 64
MAX_COLUMNS = 4096
MAX_DECODED_BYTES = 16 * 1_048_576
# Objects and arrays per JSON body: an empty object is 2 bytes on the wire and ~64 in memory.
MAX_JSON_CONTAINERS = 100_000
_LONG_DIGITS = re.compile(rb"\d{19,}")  # an integer that may not fit 64 bits
_CELL_BYTES, _VALUE_BYTES = 160, 32  # measured: pandas 3, an ndarray per list, a dict per struct
_PANDAS_METADATA_ERRORS = (ValueError, TypeError, LookupError, AttributeError, pa.ArrowException)


# --- content type -----------------------------------------------------------------------------


def media_type(content_type: str | None, accepted: tuple[str, ...]) -> str:
    """The media type, after MLflow's rules: only a UTF-8 ``charset`` parameter is allowed."""
    names = ", ".join(accepted)
    if not content_type:
        raise UnsupportedMediaType(f"missing Content-Type: send {names}")
    kind, *parameters = (part.strip() for part in content_type.split(";"))
    kind = kind.lower()
    if kind not in accepted:
        raise UnsupportedMediaType(f"unsupported Content-Type '{content_type}': send {names}")
    for parameter in filter(None, parameters):
        key, _, value = parameter.partition("=")
        key = key.strip().lower()
        if key != "charset":
            raise UnsupportedMediaType(
                f"unsupported Content-Type parameter '{key}' (only charset=utf-8 is accepted)"
            )
        if value.strip().strip('"').lower() != "utf-8":
            raise UnsupportedMediaType(f"unsupported charset '{value.strip()}': only utf-8")
    return kind


def refuse_parquet(content_type: str | None) -> None:
    """415 for a Parquet body where the operator turned Parquet off (``limits.parquet: false``)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == PARQUET_MEDIA_TYPE:
        raise UnsupportedMediaType(
            "Parquet bodies are turned off on this router (limits.parquet: false): send "
            "application/json or text/csv"
        )


# --- JSON -------------------------------------------------------------------------------------


def load_json(body: bytes, *, as_mlflow: bool = False) -> Any:
    """Parse a JSON body, bounded in size and depth; ``BadRequest`` naming the problem otherwise.

    ``as_mlflow=True`` reads what MLflow's scoring server (``json.loads``) reads: ``NaN`` and
    ``Infinity`` literals (Python clients send them for missing values), and integers past 64
    bits kept as integers (orjson would make them floats, which a long column would then take);
    lone surrogates are refused all the same.
    """
    # An upper bound (a brace inside a string counts too), found at C speed before parsing.
    containers = body.count(b"{") + body.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        raise PayloadTooLarge(
            f"JSON body has up to {containers} objects and arrays; the limit is "
            f"{MAX_JSON_CONTAINERS} (send fewer rows, or the rows as dataframe_split lists)"
        )
    if as_mlflow and _LONG_DIGITS.search(body):
        document = _python_loads(body, None)
    else:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if not as_mlflow:
                raise BadRequest(f"malformed JSON: {exc}") from exc
            document = _python_loads(body, exc)
    if containers > MAX_JSON_DEPTH:  # fewer containers than levels cannot nest too deep
        _check_depth(document)
    return document


def _python_loads(body: bytes, orjson_error: ValueError | None) -> Any:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {orjson_error or exc}") from exc
    _check_strings(document)
    return document


def _check_depth(document: Any) -> None:
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, dict | list):
            continue  # a scalar document has no children
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, dict | list):
                if depth >= MAX_JSON_DEPTH:
                    raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
                stack.append((child, depth + 1))


def _check_strings(document: Any) -> None:
    """``json.loads`` accepts lone surrogates (``"\\ud800"``), which cannot be encoded again."""
    stack: list[Any] = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            _check_utf8(value)
        elif isinstance(value, dict):
            for key in value:
                _check_utf8(key)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"malformed JSON: a string holds a lone surrogate ({exc.reason})") from exc


# --- CSV --------------------------------------------------------------------------------------


def read_csv(body: bytes, **options: Any) -> pd.DataFrame:
    """``pandas.read_csv`` of the body (pass ``nrows``), after its header was checked."""
    _check_csv_header(body)
    try:
        return pd.read_csv(io.BytesIO(body), **options)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BadRequest(f"malformed CSV: {exc}") from exc


def _check_csv_header(body: bytes) -> None:
    text = io.TextIOWrapper(io.BytesIO(body), encoding="utf-8", errors="replace", newline="")
    try:
        header = next(csv.reader(text), [])
    except csv.Error as exc:
        raise BadRequest(f"malformed CSV: {exc}") from exc
    if len(header) > MAX_COLUMNS:
        raise PayloadTooLarge(
            f"too many columns: the CSV header has {len(header)}; the limit is {MAX_COLUMNS}"
        )


# --- Parquet ----------------------------------------------------------------------------------


def read_parquet(body: bytes, max_rows: int) -> pd.DataFrame:
    """Refused from the footer and page headers when too large or malformed; decoded with every
    string column (nested ones included) kept dictionary-encoded until its dense size is known
    to fit ``MAX_DECODED_BYTES``."""
    footer = _check_footer(body, max_rows)
    _check_names(footer.columns)
    strings = [i for i, leaf in enumerate(footer.leaves) if leaf.physical == BYTE_ARRAY]
    try:
        parquet = pq.ParquetFile(pa.BufferReader(body), read_dictionary=strings or None)
        # One row group at a time: a nested column's dictionaries cannot span row groups.
        parts = [parquet.read_row_group(g) for g in range(footer.row_groups)] or [parquet.read()]
        # Indices a corrupt page points past its dictionary with fail here, as malformed.
        decoded = sum(_dense_bytes(chunk) for part in parts for chunk in _chunks_of(part))
        decoded += _python_object_bytes(parts)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise BadRequest(f"malformed Parquet: {exc}") from exc
    if decoded > MAX_DECODED_BYTES:
        raise PayloadTooLarge(
            f"Parquet body decodes to {decoded} bytes; the limit is {MAX_DECODED_BYTES}"
        )
    try:
        schema = parts[0].schema
        dense = pa.schema(map(_dense_field, schema), metadata=schema.metadata)
        frame = pa.concat_tables([part.cast(dense) for part in parts]).to_pandas()
    except _PANDAS_METADATA_ERRORS as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise BadRequest(f"malformed Parquet (its pandas metadata): {why}") from exc
    _check_names([str(name) for name in frame.columns])
    return frame


def _check_footer(body: bytes, max_rows: int) -> Footer:
    """Rows and columns from the footer; sizes from every page header (the footer's own sizes are
    only the writer's word, while a page header's is what the reader allocates and decodes)."""
    footer = read_footer(body, MAX_COLUMNS)
    check_row_limit(footer.num_rows, max_rows, "parquet")
    uncompressed = 0
    fixed = 0  # bytes of the decoded values of every column, strings aside (dictionaries are)
    for chunk in footer.chunks:
        try:
            pages = chunk_pages(body, chunk.start, chunk.length)
        except MalformedPage as exc:
            raise BadRequest(f"malformed Parquet: {exc}") from exc
        uncompressed += max(pages.uncompressed, chunk.uncompressed)
        fixed += max(pages.values, chunk.num_values) * footer.leaves[chunk.leaf].value_width
    if uncompressed > MAX_DECODED_BYTES:
        raise PayloadTooLarge(
            f"Parquet pages decompress to {uncompressed} bytes; the limit is {MAX_DECODED_BYTES}"
        )
    if fixed > MAX_DECODED_BYTES:
        raise PayloadTooLarge(
            f"Parquet values decode to {fixed} bytes; the limit is {MAX_DECODED_BYTES}"
        )
    return footer


def _chunks_of(table: pa.Table) -> Iterator[pa.Array]:
    for column in table.columns:
        yield from column.chunks


def _dense_bytes(array: pa.Array) -> int:
    """The size ``array`` takes once every dictionary index is replaced by its value (a nested
    array: its own slots, 8 bytes each, and its children's)."""
    if isinstance(array, pa.DictionaryArray):
        lengths = pc.binary_length(array.dictionary).fill_null(0)
        taken = pc.take(lengths, array.indices.fill_null(0))
        return int(pc.sum(taken).as_py() or 0) + 8 * len(array)
    children = _children(array)
    if children is None:
        return int(array.nbytes)
    return 8 * len(array) + sum(_dense_bytes(child) for child in children)


def _python_object_bytes(parts: list[pa.Table]) -> int:
    """What pandas adds for a nested column: a Python object per cell (an array or a dict, about
    ``_CELL_BYTES``) and up to one per value inside it (``_VALUE_BYTES``)."""
    cost = 0
    for part in parts:
        for column in part.columns:
            if pa.types.is_nested(column.type):
                for chunk in column.chunks:
                    cost += len(chunk) * _CELL_BYTES + _inner_values(chunk) * _VALUE_BYTES
    return cost


def _inner_values(array: pa.Array) -> int:
    children = _children(array)
    if children is None:
        return len(array)
    return sum(_inner_values(child) for child in children)


def _children(array: pa.Array) -> list[pa.Array] | None:
    """A nested array's child arrays (a map's: its entries); None for any other array."""
    if isinstance(array, pa.StructArray):
        return [array.field(i) for i in range(array.type.num_fields)]
    if isinstance(array, pa.ListArray | pa.LargeListArray | pa.FixedSizeListArray):
        return [array.values]
    return None


def _dense_field(field: pa.Field) -> pa.Field:
    return field.with_type(_dense_type(field.type))


def _dense_type(t: pa.DataType) -> pa.DataType:
    """``t`` with every dictionary replaced by its value type, at any depth."""
    if pa.types.is_dictionary(t):
        return t.value_type
    if pa.types.is_map(t):
        return pa.map_(_dense_field(t.key_field), _dense_field(t.item_field), t.keys_sorted)
    if pa.types.is_struct(t):
        return pa.struct([_dense_field(t.field(i)) for i in range(t.num_fields)])
    if pa.types.is_list(t):
        return pa.list_(_dense_field(t.value_field))
    if pa.types.is_large_list(t):
        return pa.large_list(_dense_field(t.value_field))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_dense_field(t.value_field), t.list_size)
    return t


def _check_names(names: Sequence[str]) -> None:
    """One column per name, as the rest of the router keys columns by name: in the file, and
    after pandas metadata (which may rename columns) was applied."""
    if len(set(names)) != len(names):
        duplicated = sorted({name for name in names if names.count(name) > 1})
        raise BadRequest(f"parquet names a column more than once: {names_text(duplicated)}")
