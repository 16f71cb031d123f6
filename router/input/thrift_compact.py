"""The Thrift compact protocol read from untrusted bytes: Parquet's footer and page headers.

Why not pyarrow's own metadata accessors: several of them call C++ code that throws where the
Cython layer does not expect it (a row group listing more column chunks than the schema has
columns, a mutated level histogram), and an exception there is ``std::terminate``: the process
dies with SIGABRT. Reading the few fields the router checks from the bytes themselves means a
malformed footer is a ``ThriftError`` (a 400), never a native call.

Every read is bounded by ``end``: a length or a count can never point past it, a container cannot
claim more elements than it has bytes (every element takes at least one), and nesting stops at
``MAX_DEPTH``. The work is therefore linear in the bytes read. Values are kept with their compact
type (``Struct.types``, ``List.element``) so that tests and benchmarks can write them back.
"""

from __future__ import annotations

import struct as _struct
from collections.abc import Mapping
from typing import Any

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)
MAX_DEPTH = 32
_INTEGERS = (I16, I32, I64)
_FIXED_WIDTHS = {TRUE: 1, FALSE: 1, BYTE: 1, DOUBLE: 8}  # bytes per element inside a list


class ThriftError(ValueError):
    """The bytes are not the Thrift compact encoding they should be."""


class Struct(dict[int, Any]):
    """A struct's fields by id; ``types`` holds each field's compact type (``TRUE`` for a bool)."""

    __slots__ = ("types",)

    def __init__(self) -> None:
        super().__init__()
        self.types: dict[int, int] = {}


class List(list[Any]):
    """A list's (or set's) elements; ``element`` is their compact type."""

    __slots__ = ("element",)

    def __init__(self, element: int) -> None:
        super().__init__()
        self.element = element


Keep = Mapping[int, "Keep | None"]


def read_struct(buf: bytes, pos: int, end: int, keep: Keep | None = None) -> tuple[Struct, int]:
    """The struct that starts at ``pos`` (no byte at or past ``end`` is read) and where it ends.

    ``keep`` names the fields to keep, by id: ``None`` for a whole value, a mapping for a struct
    (or the structs of a list) to keep only those of; every other field is skipped without being
    built, so that a footer padded with unknown values costs no memory. ``keep=None``: every field.
    Maps are always skipped (Parquet's structures have none).
    """
    if not 0 <= pos <= end <= len(buf):
        raise ThriftError("a Thrift struct lies outside the bytes")
    return _Reader(buf, end).struct(pos, 0, keep)


class _Reader:
    __slots__ = ("buf", "end")

    def __init__(self, buf: bytes, end: int) -> None:
        self.buf = buf
        self.end = end

    def varint(self, pos: int) -> tuple[int, int]:
        buf, end = self.buf, self.end
        result = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ThriftError("truncated or overlong Thrift integer")
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result, pos
            shift += 7

    def zigzag(self, pos: int) -> tuple[int, int]:
        raw, pos = self.varint(pos)
        return (raw >> 1) ^ -(raw & 1), pos

    def field(self, pos: int, field_id: int) -> tuple[int, int, int]:
        """The next field header: (compact type, field id, position after it); STOP ends."""
        if pos >= self.end:
            raise ThriftError("truncated Thrift struct")
        header = self.buf[pos]
        kind, delta = header & 0x0F, header >> 4
        if kind == STOP or delta:
            return kind, field_id + delta, pos + 1
        field_id, pos = self.zigzag(pos + 1)
        return kind, field_id, pos

    def struct(self, pos: int, depth: int, keep: Keep | None) -> tuple[Struct, int]:
        if depth > MAX_DEPTH:
            raise ThriftError(f"Thrift structures nested deeper than {MAX_DEPTH}")
        buf, end = self.buf, self.end
        fields = Struct()
        types = fields.types
        field_id = 0
        while True:
            kind, field_id, pos = self.field(pos, field_id)
            if kind == STOP:
                return fields, pos
            # Integers of one byte (most field values here) are read in line: the hot path.
            small = kind in _INTEGERS and pos < end and buf[pos] < 0x80
            if keep is not None and field_id not in keep:
                if small:
                    pos += 1
                elif kind not in (TRUE, FALSE):
                    pos = self.skip(pos, kind, depth)
            elif kind in (TRUE, FALSE):
                fields[field_id], types[field_id] = kind == TRUE, TRUE
            elif kind == MAP:
                pos = self.skip(pos, kind, depth)
            elif small:
                raw = buf[pos]
                fields[field_id], types[field_id] = (raw >> 1) ^ -(raw & 1), kind
                pos += 1
            else:
                inner = None if keep is None else keep[field_id]
                fields[field_id], pos = self.value(pos, kind, depth, inner)
                types[field_id] = kind

    def value(self, pos: int, kind: int, depth: int, keep: Keep | None) -> tuple[Any, int]:
        if kind in _INTEGERS:
            return self.zigzag(pos)
        if kind == BINARY:
            size, pos = self.varint(pos)
            if size > self.end - pos:
                raise ThriftError("a Thrift string runs past the end")
            return self.buf[pos : pos + size], pos + size
        if kind == STRUCT:
            return self.struct(pos, depth + 1, keep)
        if kind in (LIST, SET):
            return self.list(pos, depth + 1, keep)
        if kind in (BYTE, TRUE, FALSE):  # a bool inside a container is one byte
            if pos >= self.end:
                raise ThriftError("truncated Thrift value")
            byte = self.buf[pos]
            value = byte == TRUE if kind != BYTE else byte - 256 * (byte > 127)
            return value, pos + 1
        if kind == DOUBLE:
            if pos + 8 > self.end:
                raise ThriftError("truncated Thrift double")
            return _struct.unpack_from("<d", self.buf, pos)[0], pos + 8
        raise ThriftError(f"unknown Thrift type {kind}")

    def list_header(self, pos: int, depth: int) -> tuple[int, int, int]:
        """A list's (or set's) element type, size and first element's position."""
        if depth > MAX_DEPTH:
            raise ThriftError(f"Thrift structures nested deeper than {MAX_DEPTH}")
        if pos >= self.end:
            raise ThriftError("truncated Thrift list")
        size, element = self.buf[pos] >> 4, self.buf[pos] & 0x0F
        pos += 1
        if size == 15:
            size, pos = self.varint(pos)
        if size > self.end - pos:  # every element takes at least one byte
            raise ThriftError("a Thrift list claims more elements than it has bytes")
        if element == MAP:
            raise ThriftError("a Thrift list of maps")
        return element, size, pos

    def list(self, pos: int, depth: int, keep: Keep | None) -> tuple[List, int]:
        element, size, pos = self.list_header(pos, depth)
        values = List(TRUE if element == FALSE else element)
        for _ in range(size):
            value, pos = self.value(pos, element, depth, keep)
            values.append(value)
        return values, pos

    def skip(self, pos: int, kind: int, depth: int) -> int:
        """Past one value of type ``kind``, building nothing."""
        if kind in _INTEGERS:
            return self.varint(pos)[1]
        if kind == STRUCT:
            if depth >= MAX_DEPTH:
                raise ThriftError(f"Thrift structures nested deeper than {MAX_DEPTH}")
            buf, end = self.buf, self.end
            field_id = 0
            while True:
                kind, field_id, pos = self.field(pos, field_id)
                if kind == STOP:
                    return pos
                if kind in _INTEGERS and pos < end and buf[pos] < 0x80:
                    pos += 1
                elif kind not in (TRUE, FALSE):
                    pos = self.skip(pos, kind, depth + 1)
        if kind in (LIST, SET):
            element, size, pos = self.list_header(pos, depth + 1)
            width = _FIXED_WIDTHS.get(element)
            if width is not None:
                end = pos + width * size
                if end > self.end:
                    raise ThriftError("truncated Thrift list")
                return end
            for _ in range(size):
                pos = self.skip(pos, element, depth + 1)
            return pos
        if kind == MAP:
            return self.skip_map(pos, depth)
        if kind == BINARY:
            size, pos = self.varint(pos)
        else:
            size = _FIXED_WIDTHS.get(kind, -1)
            if size < 0:
                raise ThriftError(f"unknown Thrift type {kind}")
        if size > self.end - pos:
            raise ThriftError("a Thrift value runs past the end")
        return pos + size

    def skip_map(self, pos: int, depth: int) -> int:
        size, pos = self.varint(pos)
        if not size:
            return pos
        if 2 * size > self.end - pos:
            raise ThriftError("a Thrift map claims more entries than it has bytes")
        if pos >= self.end:
            raise ThriftError("truncated Thrift map")
        key, value = self.buf[pos] >> 4, self.buf[pos] & 0x0F
        pos += 1
        if MAP in (key, value):
            raise ThriftError("a Thrift map of maps")
        for _ in range(size):
            pos = self.skip(pos, key, depth + 1)
            pos = self.skip(pos, value, depth + 1)
        return pos
