"""Untrusted Parquet cannot kill, bloat or spin the process (issue 20, items 1-4): each hostile body
of the issue, decoded in a forked process so that an abort is seen, is a named 4xx at little cost;
real nested files still decode; and a fuzzer over mutated real files finds no input that does
otherwise (``tests/parquet_fuzz.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import parquet_craft as craft
from router.input.bodies import read_parquet
from tests.parquet_fuzz import MAX_ROWS, run_case
from tests.router_process import REPO_ROOT, clean_env

MIB = 1_048_576
# A decoded body may take 16 MiB (MAX_DECODED_BYTES) in up to a few copies (dictionary, dense,
# pandas); the bodies of the issue took 1 GB to 16 GB before.
MAX_GROWTH_MIB = 128
FUZZ_CASES = int(
    os.environ.get(
        "ROUTER_PARQUET_FUZZ_CASES",
        20_000 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 2_000,
    )
)


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        pytest.param(
            craft.chunks_beyond_schema,
            400,
            "row group 0 has 1 column chunks; the schema has 0 columns",
            id="item 1: more column chunks than leaf columns (SIGABRT before)",
        ),
        pytest.param(
            craft.mutated_level_histogram,
            400,
            "malformed Parquet",
            id="item 1: a mutated level histogram (SIGABRT before)",
        ),
        pytest.param(
            lambda: craft.nested_strings("struct", 1000, MIB),
            413,
            "Parquet body decodes to",
            id="item 2: struct<s: string> of 1 GB in 600 bytes",
        ),
        pytest.param(
            lambda: craft.nested_strings("list", 1000, MIB),
            413,
            "Parquet body decodes to",
            id="item 2: list<string> of 1 GB in 600 bytes",
        ),
        pytest.param(
            lambda: craft.many_lists(1000, 1000),
            413,
            "Parquet body decodes to",
            id="item 2: a million list cells, one pandas object each (160 MiB before)",
        ),
        pytest.param(
            lambda: craft.overlapping_row_groups(1000),
            400,
            "overlaps another column chunk",
            id="item 3: 1000 row groups naming one chunk of 1000 pages (7 s of CPU before)",
        ),
        pytest.param(
            craft.duplicate_names,
            400,
            "parquet names a column more than once: 'a'",
            id="item 4: a duplicate column name (a 500 before)",
        ),
        pytest.param(
            lambda: craft.write(pa.table({"x": np.arange(1025.0)}), row_group_size=1),
            413,
            "1025 row groups; the limit is 1024",
            id="row groups beyond the limit",
        ),
    ],
)
def test_each_hostile_body_is_a_named_4xx_at_little_cost(
    make: Callable[[], bytes], status: int, words: str
) -> None:
    outcome, growth_mib, _cpu_s = run_case(make())
    assert outcome.startswith(f"{status}: ") and words in outcome, outcome
    assert growth_mib < MAX_GROWTH_MIB


def test_overlapping_row_groups_did_not_even_claim_more_rows() -> None:
    """On ``main`` 50 such row groups decoded to 50,000 rows past ``max_rows`` = 1000 (each row
    group's chunk was read again); the rows the row groups claim must add up to the file's."""
    body = craft.overlapping_row_groups(50)
    assert "overlaps another column chunk" in run_case(body)[0]
    meta, start = craft.footer(body)
    meta[craft.NUM_ROWS] = 50_000
    assert (
        "row groups hold 1000 rows; its footer says 50000"
        in run_case(craft.with_footer(body[:start], meta))[0]
    )


def test_unknown_footer_fields_are_skipped_not_built() -> None:
    outcome, growth_mib, _cpu_s = run_case(craft.padded_footer(1_000_000))
    assert outcome == "ok"
    assert growth_mib < 64  # 140 MiB when every value of the footer was built


@pytest.mark.parametrize("row_group_size", [None, 3])
def test_nested_columns_still_decode_as_pyarrow_reads_them(row_group_size: int | None) -> None:
    """Strings inside structs, lists and maps are read dictionary-encoded (one row group at a
    time: a nested column's dictionaries cannot span them) and expanded once sized."""
    table = pa.table(
        {
            "st": pa.array([{"a": "x", "b": 1.0}, None, {"a": None, "b": 2.0}] * 3),
            "ls": pa.array([["u", "v"], None, []] * 3),
            "m": pa.array([[("k", "v")], [], None] * 3, pa.map_(pa.string(), pa.string())),
            "s": pa.array(["p", None, "q"] * 3),
            "f": pa.array([0.5, 1.5, None] * 3),
        }
    )
    body = craft.write(table, row_group_size=row_group_size)
    expected = pq.read_table(pa.BufferReader(body)).to_pandas()
    frame = read_parquet(body, MAX_ROWS)
    assert list(frame.columns) == list(expected.columns)
    assert frame.dtypes.to_dict() == expected.dtypes.to_dict()
    assert frame.astype(str).to_dict("list") == expected.astype(str).to_dict("list")


def test_a_fuzzer_over_mutated_real_files_finds_no_abort_hang_or_blow_up() -> None:
    """Thousands of cases (``ROUTER_PARQUET_FUZZ_CASES``; 20,000 with ``HYPOTHESIS_PROFILE=
    thorough``), each forked. On ``main`` about 2% of the same cases killed their process."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.parquet_fuzz", "--cases", str(FUZZ_CASES)],
        cwd=REPO_ROOT,
        env=clean_env({}),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    print(summary)  # the worst growth and CPU time, for the record
    assert summary["failures"] == [], summary["failures"][:20]
    assert result.returncode == 0, result.stderr[-3000:]
    # The mutations reach every stage: some bodies still decode, some break, some are too big.
    assert {"ok", "400", "413"} <= set(summary["outcomes"]), summary["outcomes"]
    assert summary["worst_rss_growth_mib"] < MAX_GROWTH_MIB, summary
