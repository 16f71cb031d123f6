"""A Parquet footer read and checked from the bytes, before any native decoder sees the body.

What a body must prove here (each a 400 naming the problem, or a 413 for a limit):

* the schema is one tree: every group's children are there, no element is left over, nesting is
  at most ``MAX_NESTING`` deep, every leaf column (nested ones included) has a physical type, at
  most ``max_columns`` leaves, and no top-level name twice;
* every row group has exactly one column chunk per leaf, of that leaf's path and type, in this
  file, unencrypted; the row groups' rows add up to the file's;
* every column chunk lies inside the body, before the footer, and no two overlap: the page walk
  (``parquet_pages``) and the decoder then read each byte at most once, whatever the footer
  claims (thousands of row groups naming the same megabyte cost minutes of CPU before);
* at most ``MAX_ROW_GROUPS`` row groups and ``MAX_CHUNKS`` column chunks.

Column statistics, size statistics (level histograms) and page indexes are never read: the
router needs none of them, and the accessors that read them are where pyarrow aborted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from router.errors import BadRequest, PayloadTooLarge
from router.input.thrift_compact import Keep, Struct, ThriftError, read_struct

MAGIC = b"PAR1"
MAX_NESTING = 32
MAX_ROW_GROUPS = 1024
MAX_CHUNKS = 16_384
# Physical types (parquet.thrift ``Type``) and the bytes one decoded value takes (a string: its
# offset; its text is bounded apart, by the dictionary read).
BOOLEAN, INT32, INT64, INT96, FLOAT, DOUBLE, BYTE_ARRAY, FIXED_LEN_BYTE_ARRAY = range(8)
_WIDTHS = {BOOLEAN: 1, INT32: 4, INT64: 8, INT96: 12, FLOAT: 4, DOUBLE: 8, BYTE_ARRAY: 8}
_NESTED_WIDTH = 8  # a nested value also takes levels and list offsets
_REPEATED = 2
# parquet-mr before 1.2.9 left the dictionary page header out of a chunk's size, and readers pad
# the chunk to compensate (PARQUET-816): its pages would be read past the range checked here.
_OLD_PARQUET_MR = re.compile(rb"parquet-mr version (\d+)\.(\d+)\.(\d+)")
# The fields read (parquet.thrift): FileMetaData 2 schema, 3 num_rows, 4 row_groups, 6 created_by;
# SchemaElement 1 type, 2 type_length, 3 repetition_type, 4 name, 5 num_children; RowGroup
# 1 columns, 3 num_rows; ColumnChunk 1 file_path, 3 meta_data, 8-9 encryption; ColumnMetaData
# 1 type, 3 path_in_schema, 5 num_values, 6-7 sizes, 9 data_page_offset, 11 dictionary_page_offset.
# Everything else (statistics, histograms, indexes, unknown fields) is skipped, never built.
_SCHEMA_ELEMENT: Keep = dict.fromkeys((1, 2, 3, 4, 5))
_COLUMN_META: Keep = dict.fromkeys((1, 3, 5, 6, 7, 9, 11))
_COLUMN_CHUNK: Keep = {1: None, 3: _COLUMN_META, 8: {}, 9: None}
_KEEP: Keep = {2: _SCHEMA_ELEMENT, 3: None, 4: {1: _COLUMN_CHUNK, 3: None}, 6: None}


@dataclass(frozen=True, slots=True)
class Leaf:
    """One leaf column of the schema."""

    path: tuple[str, ...]
    physical: int
    type_length: int
    nested: bool  # inside a group or repeated: read as lists or structs

    @property
    def value_width(self) -> int:
        """Bytes one decoded value of this column takes, at least."""
        width = max(self.type_length, 1) if self.physical == FIXED_LEN_BYTE_ARRAY else 0
        width = width or _WIDTHS.get(self.physical, 8)
        return width + _NESTED_WIDTH if self.nested else width


@dataclass(frozen=True, slots=True)
class Chunk:
    """One column chunk: its byte range and what the footer says of it."""

    leaf: int
    start: int
    length: int
    num_values: int
    uncompressed: int


@dataclass(frozen=True, slots=True)
class Footer:
    num_rows: int
    row_groups: int
    columns: tuple[str, ...]  # the top-level column names
    leaves: tuple[Leaf, ...]
    chunks: tuple[Chunk, ...]  # in file order


def read_footer(body: bytes, max_columns: int) -> Footer:
    """The footer of ``body``, checked as the module says; ``BadRequest``/``PayloadTooLarge``."""
    if len(body) < 12 or body[-4:] != MAGIC:
        if body[-4:] == b"PARE":
            raise BadRequest("encrypted Parquet is not supported")
        raise _malformed("no Parquet footer at the end of the body")
    length = int.from_bytes(body[-8:-4], "little")
    footer_start = len(body) - 8 - length
    if footer_start < len(MAGIC):
        raise _malformed("its footer length is larger than the body")
    try:
        meta, _ = read_struct(body, footer_start, len(body) - 8, _KEEP)
    except ThriftError as exc:
        raise _malformed(f"its footer: {exc}") from exc
    created_by = meta.get(6)
    if isinstance(created_by, bytes):
        old = _OLD_PARQUET_MR.match(created_by)
        if old and tuple(map(int, old.groups())) < (1, 2, 9):
            raise _malformed("written by parquet-mr before 1.2.9 (chunk sizes are unreliable)")
    columns, leaves = _schema(meta.get(2), max_columns)
    num_rows = _count(meta.get(3), "num_rows")
    groups = meta.get(4, [])
    chunks = _chunks(groups, leaves, num_rows)
    _check_ranges(chunks, footer_start)
    return Footer(num_rows, len(groups), columns, leaves, chunks)


def _malformed(why: str) -> BadRequest:
    return BadRequest(f"malformed Parquet: {why}")


def _count(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _malformed(f"{name} is missing or negative")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, bytes):
        raise _malformed(f"{what} has no name")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(f"{what} has a name that is not UTF-8") from exc


def _schema(elements: Any, max_columns: int) -> tuple[tuple[str, ...], tuple[Leaf, ...]]:
    """The top-level names and the leaves of the flattened schema tree (depth first)."""
    if not isinstance(elements, list) or not elements or not isinstance(elements[0], Struct):
        raise _malformed("it has no schema")
    columns: list[str] = []
    leaves: list[Leaf] = []
    # (path, children still to come, repeated on the way): the groups open above the next element
    stack: list[tuple[tuple[str, ...], int, bool]] = [((), _children(elements[0]), False)]
    index = 1
    while stack:
        path, remaining, repeated = stack.pop()
        if not remaining:
            continue
        stack.append((path, remaining - 1, repeated))
        if index >= len(elements):
            raise _malformed("its schema has fewer elements than its groups claim")
        element = elements[index]
        index += 1
        if not isinstance(element, Struct):
            raise _malformed("a schema element is not a struct")
        name = _text(element.get(4), "a schema element")
        if not path:
            columns.append(name)
        is_repeated = repeated or element.get(3) == _REPEATED
        children = _children(element)
        if children:
            if len(stack) > MAX_NESTING:
                raise _malformed(f"its schema is nested deeper than {MAX_NESTING} levels")
            stack.append(((*path, name), children, is_repeated))
            continue
        leaves.append(_leaf(element, (*path, name), nested=bool(path) or is_repeated))
        if len(leaves) > max_columns:
            raise PayloadTooLarge(
                f"too many columns: parquet has more than {max_columns}; the limit is {max_columns}"
            )
    if index != len(elements):
        raise _malformed("its schema has elements outside the tree")
    return tuple(columns), tuple(leaves)


def _children(element: Struct) -> int:
    children = element.get(5, 0)
    if not isinstance(children, int) or isinstance(children, bool) or children < 0:
        raise _malformed("a schema element has a negative number of children")
    return children


def _leaf(element: Struct, path: tuple[str, ...], *, nested: bool) -> Leaf:
    physical = element.get(1)
    if not isinstance(physical, int) or not BOOLEAN <= physical <= FIXED_LEN_BYTE_ARRAY:
        raise _malformed(f"column '{'.'.join(path)}' has no physical type")
    type_length = element.get(2, 0)
    if physical == FIXED_LEN_BYTE_ARRAY and (not isinstance(type_length, int) or type_length < 1):
        raise _malformed(f"column '{'.'.join(path)}' has no valid fixed length")
    return Leaf(path, physical, type_length if isinstance(type_length, int) else 0, nested)


def _chunks(groups: Any, leaves: tuple[Leaf, ...], num_rows: int) -> tuple[Chunk, ...]:
    if not isinstance(groups, list):
        raise _malformed("its row groups are not a list")
    if len(groups) > MAX_ROW_GROUPS:
        raise PayloadTooLarge(
            f"Parquet body has {len(groups)} row groups; the limit is {MAX_ROW_GROUPS}"
        )
    if len(groups) * len(leaves) > MAX_CHUNKS:
        raise PayloadTooLarge(
            f"Parquet body has {len(groups) * len(leaves)} column chunks; the limit is {MAX_CHUNKS}"
        )
    chunks: list[Chunk] = []
    rows = 0
    for g, group in enumerate(groups):
        if not isinstance(group, Struct):
            raise _malformed(f"row group {g} is not a struct")
        rows += _count(group.get(3), f"row group {g}'s num_rows")
        columns = group.get(1)
        if not isinstance(columns, list) or len(columns) != len(leaves):
            found = len(columns) if isinstance(columns, list) else 0
            raise _malformed(
                f"row group {g} has {found} column chunks; the schema has {len(leaves)} columns"
            )
        for c, (column, leaf) in enumerate(zip(columns, leaves, strict=True)):
            chunks.append(_chunk(column, c, leaf, g))
    if rows != num_rows:
        raise _malformed(f"its row groups hold {rows} rows; its footer says {num_rows}")
    return tuple(chunks)


def _chunk(column: Any, c: int, leaf: Leaf, g: int) -> Chunk:
    where = f"column chunk {c} of row group {g}"
    if not isinstance(column, Struct):
        raise _malformed(f"{where} is not a struct")
    if 8 in column or 9 in column:
        raise BadRequest("encrypted Parquet is not supported")
    if 1 in column:
        raise _malformed(f"{where} is in another file")
    meta = column.get(3)
    if not isinstance(meta, Struct):
        raise _malformed(f"{where} has no metadata")
    if meta.get(1) != leaf.physical:
        raise _malformed(f"{where} is not of its column's type")
    path = meta.get(3)
    if not isinstance(path, list) or [_text(p, where) for p in path] != list(leaf.path):
        raise _malformed(f"{where} names another column than '{'.'.join(leaf.path)}'")
    start = _count(meta.get(9), f"{where}'s data_page_offset")
    if 11 in meta:  # as readers do: a dictionary page before the data pages starts the chunk
        dictionary = _count(meta.get(11), f"{where}'s dictionary_page_offset")
        if 0 < dictionary < start:
            start = dictionary
    return Chunk(
        leaf=c,
        start=start,
        length=_count(meta.get(7), f"{where}'s total_compressed_size"),
        num_values=_count(meta.get(5), f"{where}'s num_values"),
        uncompressed=_count(meta.get(6), f"{where}'s total_uncompressed_size"),
    )


def _check_ranges(chunks: tuple[Chunk, ...], footer_start: int) -> None:
    """Every chunk inside the body, after the leading magic and before the footer; none overlap."""
    previous_end = len(MAGIC)
    for chunk in sorted(chunks, key=lambda chunk: chunk.start):
        if chunk.length < 1:
            raise _malformed(f"a column chunk at byte {chunk.start} is empty")
        if chunk.start < previous_end:
            other = "the leading magic" if chunk.start < len(MAGIC) else "another column chunk"
            raise _malformed(f"a column chunk at byte {chunk.start} overlaps {other}")
        previous_end = chunk.start + chunk.length
        if previous_end > footer_start:
            raise _malformed(f"a column chunk at byte {chunk.start} runs past the footer")
