"""Hostile Parquet bodies, crafted: a footer read with the router's own Thrift reader, changed, and
written back (the Thrift compact protocol's writing half, which the router never needs).

Used by ``bench.body_rss`` and by the tests that reproduce each hostile body of issue 20.
"""

from __future__ import annotations

import copy
import io
import struct
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from router.input.parquet_footer import MAGIC
from router.input.thrift_compact import (
    BINARY,
    BYTE,
    DOUBLE,
    FALSE,
    I16,
    I32,
    I64,
    LIST,
    SET,
    STRUCT,
    TRUE,
    List,
    Struct,
    read_struct,
)

# FileMetaData 2 schema, 3 num_rows, 4 row_groups; RowGroup 1 columns, 3 num_rows;
# ColumnChunk 3 meta_data; ColumnMetaData 16 size_statistics (SizeStatistics 2 and 3: the
# repetition and definition level histograms).
SCHEMA, NUM_ROWS, ROW_GROUPS, COLUMNS, META_DATA, SIZE_STATISTICS = 2, 3, 4, 1, 3, 16


def write(table: pa.Table, **options: Any) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def footer(body: bytes) -> tuple[Struct, int]:
    """The footer of a well-formed ``body`` and the offset where it starts."""
    length = int.from_bytes(body[-8:-4], "little")
    start = len(body) - 8 - length
    return read_struct(body, start, len(body) - 8)[0], start


def with_footer(data: bytes, meta: Struct) -> bytes:
    """``data`` (the leading magic and the column chunks) followed by ``meta`` as its footer."""
    encoded = encode(meta)
    return data + encoded + len(encoded).to_bytes(4, "little") + MAGIC


def refooted(body: bytes, change: Any) -> bytes:
    """``body`` with its footer replaced by ``change(footer)`` (which may change it in place)."""
    meta, start = footer(body)
    meta = copy.deepcopy(meta)
    changed = change(meta)
    return with_footer(body[:start], meta if changed is None else changed)


# --- the bodies of issue 20 -------------------------------------------------------------------


def chunks_beyond_schema() -> bytes:
    """71 bytes: a schema of no columns, a row group listing one column chunk (on ``main``: the
    footer walk called an accessor that threw in C++, and the process aborted)."""
    root = _struct({4: (BINARY, b"schema"), 5: (I32, 0)})
    meta = _struct(
        {
            1: (I32, 5),  # DOUBLE
            2: (LIST, _list(I32, [0])),
            3: (LIST, _list(BINARY, [b"x"])),
            4: (I32, 0),
            5: (I64, 0),
            6: (I64, 0),
            7: (I64, 0),
            9: (I64, 4),
        }
    )
    chunk = _struct({2: (I64, 4), 3: (STRUCT, meta)})
    group = _struct({1: (LIST, _list(STRUCT, [chunk])), 2: (I64, 0), 3: (I64, 0)})
    file_meta = _struct(
        {
            1: (I32, 2),
            2: (LIST, _list(STRUCT, [root])),
            3: (I64, 0),
            4: (LIST, _list(STRUCT, [group])),
        }
    )
    return with_footer(MAGIC, file_meta)


def mutated_level_histogram() -> bytes:
    """A real file whose first column's definition level histogram has one entry too many."""
    body = write(pa.table({"x": pa.array([1.0, None, 3.0])}), write_page_index=True)

    def change(meta: Struct) -> None:
        column = meta[ROW_GROUPS][0][COLUMNS][0][META_DATA]
        histogram = column[SIZE_STATISTICS][3]
        histogram.extend([7, 7])

    return refooted(body, change)


def overlapping_row_groups(groups: int, rows: int = 1000) -> bytes:
    """``groups`` row groups that all name the same column chunk, of ``rows`` pages of one value
    each (on ``main``: the chunk's pages were walked again for each, in Python)."""
    table = pa.table({"x": np.arange(rows, dtype=np.int64)})
    body = write(table, compression="none", data_page_size=1, write_batch_size=1)
    meta, start = footer(body)
    first = meta[ROW_GROUPS][0]
    again = copy.deepcopy(first)
    again[3] = 0  # the rows stay the file's: only the chunk is named again
    meta[ROW_GROUPS] = _list(STRUCT, [first] + [again] * (groups - 1))
    return with_footer(body[:start], meta)


def nested_strings(kind: str, rows: int, size: int) -> bytes:
    """``rows`` rows of one ``struct<s: string>`` or ``list<string>`` column, each the same string
    of ``size`` bytes: a few hundred bytes on the wire, ``rows * size`` once decoded densely."""
    strings = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(rows, dtype=np.int32)), pa.array(["a" * size])
    )
    if kind == "struct":
        column: pa.Array = pa.StructArray.from_arrays([strings], ["s"])
    else:
        column = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), strings)
    return write(pa.table({"x": column}), compression="zstd")


def many_lists(columns: int, rows: int) -> bytes:
    """``columns`` columns of ``rows`` one-element lists: small values, but pandas makes an array
    object of each cell (1000 x 1000 cells: 416 KB on the wire, 160 MiB of objects)."""
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(np.zeros(rows)))
    return write(pa.table({f"c{i}": column for i in range(columns)}), compression="zstd")


def padded_footer(structs: int) -> bytes:
    """A valid file whose footer also holds an unknown field: a list of ``structs`` empty structs
    (one byte each; built as objects, 1M of them took 140 MiB)."""
    body = write(pa.table({"x": [1.0]}))
    meta, start = footer(body)
    meta[100], meta.types[100] = _list(STRUCT, [Struct() for _ in range(structs)]), LIST
    return with_footer(body[:start], meta)


def duplicate_names() -> bytes:
    columns = [pa.array([1.0, 2.0]), pa.array([3.0, 4.0])]
    return write(pa.Table.from_arrays(columns, names=["a", "a"]))


# --- writing the compact protocol -------------------------------------------------------------


def encode(value: Struct) -> bytes:
    out = bytearray()
    _write_struct(out, value)
    return bytes(out)


def _struct(fields: dict[int, tuple[int, Any]]) -> Struct:
    result = Struct()
    for field_id, (kind, value) in fields.items():
        result[field_id], result.types[field_id] = value, kind
    return result


def _list(element: int, values: list[Any]) -> List:
    result = List(element)
    result.extend(values)
    return result


def _varint(out: bytearray, value: int) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _zigzag(out: bytearray, value: int) -> None:
    _varint(out, (value << 1) ^ (value >> 63) if value < 0 else value << 1)


def _write_struct(out: bytearray, fields: Struct) -> None:
    last = 0
    for field_id in sorted(fields):
        kind, value = fields.types[field_id], fields[field_id]
        if kind == TRUE:
            kind = TRUE if value else FALSE
        delta = field_id - last
        if 0 < delta <= 15:
            out.append(delta << 4 | kind)
        else:
            out.append(kind)
            _zigzag(out, field_id)
        if kind not in (TRUE, FALSE):
            _write_value(out, kind, value)
        last = field_id
    out.append(0)


def _write_value(out: bytearray, kind: int, value: Any) -> None:
    if kind in (I16, I32, I64):
        _zigzag(out, int(value))
    elif kind == BINARY:
        _varint(out, len(value))
        out += value
    elif kind == STRUCT:
        _write_struct(out, value)
    elif kind in (LIST, SET):
        element = value.element
        if len(value) < 15:
            out.append(len(value) << 4 | element)
        else:
            out.append(0xF0 | element)
            _varint(out, len(value))
        for item in value:
            _write_value(out, element, item)
    elif kind == TRUE:  # a bool inside a list
        out.append(TRUE if value else FALSE)
    elif kind == BYTE:
        out.append(value & 0xFF)
    elif kind == DOUBLE:
        out += struct.pack("<d", value)
    else:
        raise ValueError(f"cannot write Thrift type {kind}")
