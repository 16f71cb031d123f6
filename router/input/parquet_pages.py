"""Parquet page headers read from the bytes themselves (the Thrift compact protocol), so the
decoded size is known from what the decoder will actually be told, not from the footer's claims.

A footer's ``total_uncompressed_size`` and ``num_values`` are the writer's word; each page header
says how many bytes its page decompresses to and how many values it holds, and that is what the
reader allocates and decodes. Every page (header and data) must lie within its column chunk: the
walk reads each byte of a chunk at most once, and chunks do not overlap (``parquet_footer``).
"""

from __future__ import annotations

from dataclasses import dataclass

from router.input.thrift_compact import Keep, ThriftError, read_struct

_MAX_PAGES = 100_000  # a chunk of more pages than this is not a scoring request
# PageHeader fields: 2 uncompressed_page_size, 3 compressed_page_size, 5 data_page_header,
# 8 data_page_header_v2 (field 1 of both: num_values).
_UNCOMPRESSED, _COMPRESSED, _DATA_V1, _DATA_V2 = 2, 3, 5, 8
_KEEP: Keep = {_UNCOMPRESSED: None, _COMPRESSED: None, _DATA_V1: {1: None}, _DATA_V2: {1: None}}


class MalformedPage(ValueError):
    """The bytes at a column chunk's offset are not a Parquet page header."""


@dataclass(frozen=True, slots=True)
class PageSizes:
    uncompressed: int  # bytes the pages decompress to, per their headers
    values: int  # values the data pages hold (levels included), per their headers
    pages: int


def chunk_pages(body: bytes, start: int, length: int) -> PageSizes:
    """Walk the pages of one column chunk (``length`` compressed bytes from ``start``)."""
    end = start + length
    if start < 0 or length < 0 or end > len(body):
        raise MalformedPage("a column chunk lies outside the body")
    pos, uncompressed, values = start, 0, 0
    for count in range(_MAX_PAGES):
        if pos >= end:
            return PageSizes(uncompressed, values, count)
        try:
            header, pos = read_struct(body, pos, end, _KEEP)
        except ThriftError as exc:
            raise MalformedPage(f"a page header: {exc}") from exc
        size, compressed = header.get(_UNCOMPRESSED), header.get(_COMPRESSED)
        if not isinstance(size, int) or not isinstance(compressed, int):
            raise MalformedPage("a page header has no sizes")
        if min(size, compressed) < 0:
            raise MalformedPage("a page header has no valid sizes")
        if compressed > end - pos:
            raise MalformedPage("a page runs past the end of its column chunk")
        uncompressed += size
        for data_header in (header.get(_DATA_V1), header.get(_DATA_V2)):
            if isinstance(data_header, dict) and isinstance(data_header.get(1), int):
                values += max(data_header[1], 0)
        pos += compressed
    raise MalformedPage(f"a column chunk has more than {_MAX_PAGES} pages")
