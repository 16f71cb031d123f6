"""Bounded decoding of request bodies: no body within ``limits.max_body_bytes`` decodes into more
than a stated amount of memory, and every malformed body is a 4xx naming the problem.

Why each bound exists (a few hundred bytes can otherwise become gigabytes):

* **Parquet** is refused before any page is decoded: at most ``max_rows`` rows and
  ``MAX_COLUMNS`` columns (footer), and at most ``MAX_DECODED_BYTES`` once decompressed and once
  decoded to fixed-width values, as every page header says (``router/input/parquet_pages.py``: a
  footer's sizes are only the writer's word). Run-length and dictionary encoding let one small
  page stand for millions of values, so string and binary columns are read dictionary-encoded (a
  dictionary plus indices, never a string per row) and their dense size is computed before they
  are expanded.
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
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from router.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from router.input.parquet_pages import MalformedPage, chunk_pages
from router.input.rowcount import check_row_limit

MAX_JSON_DEPTH = 64
MAX_COLUMNS = 4096
MAX_DECODED_BYTES = 16 * 1_048_576
# Objects and arrays per JSON body: an empty object is 2 bytes on the wire and ~64 in memory.
MAX_JSON_CONTAINERS = 100_000
_LONG_DIGITS = re.compile(rb"\d{19,}")  # an integer that may not fit 64 bits
_WIDTHS = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12}
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
    """Refused from the footer when too large; decoded with strings kept dictionary-encoded
    until their dense size is known to fit ``MAX_DECODED_BYTES``."""
    try:
        footer = pq.ParquetFile(pa.BufferReader(body))
        _check_footer(body, footer.metadata, max_rows)
        strings = [f.name for f in footer.schema_arrow if _is_variable_width(f.type)]
        parquet = pq.ParquetFile(pa.BufferReader(body), read_dictionary=strings or None)
        table = parquet.read()
        # Indices a corrupt page points past its dictionary with fail here, as malformed.
        decoded = sum(_dense_bytes(column) for column in table.columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise BadRequest(f"malformed Parquet: {exc}") from exc
    if decoded > MAX_DECODED_BYTES:
        raise PayloadTooLarge(
            f"Parquet body decodes to {decoded} bytes; the limit is {MAX_DECODED_BYTES}"
        )
    try:
        table = table.cast(_dense_schema(table.schema))
        return table.to_pandas()
    except _PANDAS_METADATA_ERRORS as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise BadRequest(f"malformed Parquet (its pandas metadata): {why}") from exc


def _check_footer(body: bytes, metadata: pq.FileMetaData, max_rows: int) -> None:
    """Rows and columns from the footer; sizes from every page header (the footer's own sizes are
    only the writer's word, while a page header's is what the reader allocates and decodes)."""
    check_row_limit(metadata.num_rows, max_rows, "parquet")
    if metadata.num_columns > MAX_COLUMNS:
        raise PayloadTooLarge(
            f"too many columns: parquet has {metadata.num_columns}; the limit is {MAX_COLUMNS}"
        )
    widths = [_value_width(metadata.schema.column(c)) for c in range(metadata.num_columns)]
    uncompressed = 0
    fixed = 0  # bytes of the decoded values of every column, strings aside (dictionaries are)
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            start = chunk.data_page_offset
            if chunk.has_dictionary_page and chunk.dictionary_page_offset:
                start = chunk.dictionary_page_offset
            try:
                pages = chunk_pages(body, start, chunk.total_compressed_size)
            except MalformedPage as exc:
                raise BadRequest(f"malformed Parquet: {exc}") from exc
            uncompressed += max(pages.uncompressed, chunk.total_uncompressed_size)
            fixed += max(pages.values, chunk.num_values) * widths[c]
    if uncompressed > MAX_DECODED_BYTES:
        raise PayloadTooLarge(
            f"Parquet pages decompress to {uncompressed} bytes; the limit is {MAX_DECODED_BYTES}"
        )
    if fixed > MAX_DECODED_BYTES:
        raise PayloadTooLarge(
            f"Parquet values decode to {fixed} bytes; the limit is {MAX_DECODED_BYTES}"
        )


def _value_width(column: pq.ColumnSchema) -> int:
    """Bytes one decoded value takes (strings: their offset; their text is bounded apart)."""
    if column.physical_type == "FIXED_LEN_BYTE_ARRAY":
        return max(int(column.length or 0), 1)
    return _WIDTHS.get(column.physical_type, 8)


def _is_variable_width(t: pa.DataType) -> bool:
    kinds = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary)
    return any(kind(t) for kind in kinds) or bool(pa.types.is_large_binary(t))


def _dense_bytes(column: pa.ChunkedArray) -> int:
    """The size ``column`` takes once every dictionary index is replaced by its value."""
    total = 0
    for chunk in column.chunks:
        if isinstance(chunk, pa.DictionaryArray):
            lengths = pc.binary_length(chunk.dictionary).fill_null(0)
            taken = pc.take(lengths, chunk.indices.fill_null(0))
            total += int(pc.sum(taken).as_py() or 0) + 8 * len(chunk)
        else:
            total += chunk.nbytes
    return total


def _dense_schema(schema: pa.Schema) -> pa.Schema:
    fields = [
        f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema
    ]
    return pa.schema(fields, metadata=schema.metadata)
