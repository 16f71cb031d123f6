"""Checked rows: joined per model call exactly as the requests' own frames would concatenate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.types import ColSpec, Schema

from router.input.payload import parse_invocation
from router.input.rows import Rows

SCHEMA = Schema([ColSpec("double", "a"), ColSpec("long", "b"), ColSpec("string", "c")])


def _rows(body: str) -> Rows:
    parsed = parse_invocation(body.encode(), "application/json", SCHEMA, 100)
    assert isinstance(parsed.model_input, Rows)
    return parsed.model_input


def test_a_conformed_json_input_is_rows_and_its_frame_is_the_typed_frame() -> None:
    rows = _rows(
        '{"dataframe_records": [{"c": "x", "b": 2, "a": 1}, {"a": 0.5, "b": 3, "c": "y"}]}'
    )
    assert rows.names == ("a", "b", "c") and rows.n_rows == 2
    frame = rows.frame()
    assert list(frame.columns) == ["a", "b", "c"]
    assert [str(t) for t in frame.dtypes] == ["float64", "int64", "str"]
    assert frame["a"].tolist() == [1.0, 0.5]


def test_joined_rows_equal_the_concatenated_frames_with_client_labels_kept() -> None:
    parts = [
        _rows('{"dataframe_split": {"columns": ["a", "b", "c"], "data": [[1, 2, "x"]]}}'),
        _rows(
            '{"dataframe_split": {"columns": ["a", "b", "c"], "index": ["p", "q"],'
            ' "data": [[3.5, 4, "y"], [5, 6, "z"]]}}'
        ),
        _rows('{"dataframe_records": [{"a": 7, "b": 8, "c": "w"}]}'),
    ]
    joined = Rows.join(parts).frame()
    expected = pd.concat([part.frame() for part in parts])
    pd.testing.assert_frame_equal(joined, expected, check_index_type=False)
    assert list(joined.index) == [0, "p", "q", 0]


def test_rows_without_client_labels_join_under_a_fresh_index() -> None:
    parts = [_rows('{"dataframe_records": [{"a": 1, "b": 2, "c": "x"}]}')] * 3
    joined = Rows.join(parts)
    assert joined.index is None and joined.n_rows == 3
    assert isinstance(joined.frame().index, pd.RangeIndex)


def test_the_key_tells_dtypes_apart() -> None:
    as_float = Rows(("x",), (np.array([1.0]),), 1)
    as_int = Rows(("x",), (np.array([1]),), 1)
    assert as_float.key != as_int.key
    assert as_float.key == Rows(("x",), (np.array([2.0, 3.0]),), 2).key


@pytest.mark.parametrize("n_rows", [1, 7])
def test_the_matrix_is_the_frames_array_in_its_memory_order(n_rows: int) -> None:
    rng = np.random.default_rng(3)
    rows = Rows(
        ("a", "b", "c"),
        (rng.normal(size=n_rows), rng.integers(0, 9, size=n_rows), rng.normal(size=n_rows)),
        n_rows,
    )
    expected = rows.frame().to_numpy()
    matrix = rows.matrix()
    assert matrix.dtype == expected.dtype and np.array_equal(matrix, expected)
    assert matrix.flags.f_contiguous == expected.flags.f_contiguous


def test_extension_arrays_join_too() -> None:
    dates = pd.array(pd.to_datetime(["2024-01-01", "2024-01-02"]))
    parts = [Rows(("d",), (dates[:1],), 1), Rows(("d",), (dates[1:],), 1)]
    assert Rows.join(parts).frame()["d"].tolist() == list(pd.to_datetime(dates))


def test_all_double_inputs_carry_one_block_and_join_and_stack_as_the_columns_do() -> None:
    schema = Schema([ColSpec("double", "a"), ColSpec("double", "b")])
    bodies = ['{"dataframe_split": {"columns": ["b", "a"], "data": [[1, 2.5], [3, 4]]}}'] * 2
    bodies.append('{"dataframe_records": [{"a": null, "b": 7}]}')  # a null: no block
    parts = [
        parse_invocation(body.encode(), "application/json", schema, 10).model_input
        for body in bodies
    ]
    assert all(isinstance(part, Rows) for part in parts)
    assert [part.block is not None for part in parts] == [True, True, False]
    by_block = Rows.join(parts[:2])
    by_columns = Rows.join([Rows(p.names, p.arrays, p.n_rows) for p in parts[:2]])
    assert by_block.block is not None and by_columns.block is None
    for joined in (by_block, by_columns):
        assert joined.matrix().tolist() == [[2.5, 1.0], [4.0, 3.0], [2.5, 1.0], [4.0, 3.0]]
        assert joined.matrix().flags.f_contiguous
    mixed = Rows.join(parts)
    assert mixed.block is None
    assert np.array_equal(mixed.matrix()[-1], [np.nan, 7.0], equal_nan=True)
