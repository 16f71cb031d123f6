"""Parquet page headers read from the bytes themselves (the Thrift compact protocol), so the
decoded size is known from what the decoder will actually be told, not from the footer's claims.

A footer's ``total_uncompressed_size`` and ``num_values`` are the writer's word; each page header
says how many bytes its page decompresses to and how many values it holds, and that is what the
reader allocates and decodes. Only the handful of fields needed are read; the rest are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY = range(9)
_LIST, _SET, _MAP, _STRUCT = 9, 10, 11, 12
_MAX_PAGES = 100_000  # a chunk of more pages than this is not a scoring request
_MAX_NESTING = 32


class MalformedPage(ValueError):
    """The bytes at a column chunk's offset are not a Parquet page header."""


@dataclass(frozen=True, slots=True)
class PageSizes:
    uncompressed: int  # bytes the pages decompress to, per their headers
    values: int  # values the data pages hold, per their headers


def chunk_pages(body: bytes, start: int, length: int) -> PageSizes:
    """Walk the pages of one column chunk (``length`` compressed bytes from ``start``)."""
    end = start + length
    if start < 0 or length < 0 or end > len(body):
        raise MalformedPage("a column chunk lies outside the body")
    pos, uncompressed, values = start, 0, 0
    for _ in range(_MAX_PAGES):
        if pos >= end:
            return PageSizes(uncompressed, values)
        header, pos = _struct(body, pos, 0)
        size, compressed = header.get(2, 0), header.get(3, 0)
        if (
            not isinstance(size, int)
            or not isinstance(compressed, int)
            or min(size, compressed) < 0
        ):
            raise MalformedPage("a page header has no valid sizes")
        uncompressed += size
        for data_header in (header.get(5), header.get(8)):  # DataPageHeader, DataPageHeaderV2
            if isinstance(data_header, dict) and isinstance(data_header.get(1), int):
                values += max(data_header[1], 0)
        pos += compressed
    raise MalformedPage(f"a column chunk has more than {_MAX_PAGES} pages")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise MalformedPage("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _zigzag(buf: bytes, pos: int) -> tuple[int, int]:
    raw, pos = _varint(buf, pos)
    return (raw >> 1) ^ -(raw & 1), pos


def _struct(buf: bytes, pos: int, depth: int) -> tuple[dict[int, object], int]:
    """A struct's integer and struct fields by id (others skipped)."""
    if depth > _MAX_NESTING:
        raise MalformedPage("page header nested too deep")
    fields: dict[int, object] = {}
    field_id = 0
    while True:
        if pos >= len(buf):
            raise MalformedPage("truncated page header")
        byte = buf[pos]
        pos += 1
        kind = byte & 0x0F
        if kind == _STOP:
            return fields, pos
        delta = byte >> 4
        if delta:
            field_id += delta
        else:
            field_id, pos = _zigzag(buf, pos)
        if kind in (_I16, _I32, _I64):
            fields[field_id], pos = _zigzag(buf, pos)
        elif kind == _STRUCT:
            fields[field_id], pos = _struct(buf, pos, depth + 1)
        else:
            pos = _skip(buf, pos, kind, depth)


def _skip(buf: bytes, pos: int, kind: int, depth: int, *, in_container: bool = False) -> int:
    if depth > _MAX_NESTING:
        raise MalformedPage("page header nested too deep")
    if kind in (_TRUE, _FALSE):
        return pos + 1 if in_container else pos  # a field's boolean lives in its header
    if kind == _BYTE:
        return pos + 1
    if kind in (_I16, _I32, _I64):
        return _varint(buf, pos)[1]
    if kind == _DOUBLE:
        return pos + 8
    if kind == _BINARY:
        size, pos = _varint(buf, pos)
        return pos + size
    if kind in (_LIST, _SET):
        if pos >= len(buf):
            raise MalformedPage("truncated page header")
        size, element = buf[pos] >> 4, buf[pos] & 0x0F
        pos += 1
        if size == 15:
            size, pos = _varint(buf, pos)
        for _ in range(size):
            pos = _skip(buf, pos, element, depth + 1, in_container=True)
            if pos > len(buf):
                raise MalformedPage("truncated page header")
        return pos
    if kind == _MAP:
        size, pos = _varint(buf, pos)
        if size:
            if pos >= len(buf):
                raise MalformedPage("truncated page header")
            key, value = buf[pos] >> 4, buf[pos] & 0x0F
            pos += 1
            for _ in range(size):
                pos = _skip(buf, pos, key, depth + 1, in_container=True)
                pos = _skip(buf, pos, value, depth + 1, in_container=True)
                if pos > len(buf):
                    raise MalformedPage("truncated page header")
        return pos
    if kind == _STRUCT:
        return _struct(buf, pos, depth + 1)[1]
    raise MalformedPage(f"unknown Thrift type {kind} in a page header")
