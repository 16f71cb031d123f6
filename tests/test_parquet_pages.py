"""Page headers read from Parquet bytes agree with what pyarrow wrote, whatever the page kind."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from router.input.parquet_pages import MalformedPage, chunk_pages

TABLE = pa.table(
    {
        "f": pa.array([1.5, None, 3.0] * 700),
        "s": pa.array(["ab", "c", None] * 700),
        "l": pa.array([[1, 2], [3], None] * 700),
        "b": pa.array([True, False, None] * 700),
    }
)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"compression": "zstd", "data_page_size": 1024},
        {"compression": "gzip", "data_page_version": "2.0", "use_dictionary": False},
        {"write_statistics": True, "write_page_index": True, "write_page_checksum": True},
    ],
)
def test_pages_hold_what_the_footer_says(options: dict[str, object]) -> None:
    sink = io.BytesIO()
    pq.write_table(TABLE, sink, **options)
    body = sink.getvalue()
    metadata = pq.ParquetFile(io.BytesIO(body)).metadata
    for g in range(metadata.num_row_groups):
        for c in range(metadata.num_columns):
            chunk = metadata.row_group(g).column(c)
            start = chunk.data_page_offset
            if chunk.has_dictionary_page and chunk.dictionary_page_offset:
                start = chunk.dictionary_page_offset
            pages = chunk_pages(body, start, chunk.total_compressed_size)
            assert pages.values == chunk.num_values
            # The footer also counts the page headers themselves.
            assert 0 < pages.uncompressed <= chunk.total_uncompressed_size


def test_garbage_where_a_page_should_be_is_malformed() -> None:
    with pytest.raises(MalformedPage):
        chunk_pages(b"\x15" * 64, 0, 64)  # fields with no end
    with pytest.raises(MalformedPage):
        chunk_pages(b"PAR1", 0, 100)  # past the end of the body
