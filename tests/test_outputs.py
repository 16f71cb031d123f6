"""What the router keeps per row of a prediction: score, class and JSON, for every output shape."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from router.scoring.outputs import OutputReading, Unread, row_facts, to_jsonable

CASES: list[tuple[str, Any, list[float | None], list[str | None]]] = [
    (
        "binary probabilities: positive-class score, argmax class",
        np.array([[0.8, 0.2], [0.3, 0.7]]),
        [0.2, 0.7],
        ["0", "1"],
    ),
    (
        "three classes: top probability, argmax class",
        np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]),
        [0.6, 0.5],
        ["1", "0"],
    ),
    ("integer labels", np.array([1, 0]), [1.0, 0.0], ["1", "0"]),
    ("boolean labels", np.array([True, False]), [1.0, 0.0], ["1", "0"]),
    ("string labels", np.array(["churn", "stay"], dtype=object), [None, None], ["churn", "stay"]),
    ("regression", np.array([12.5, np.nan]), [12.5, None], [None, None]),
    ("a Series", pd.Series([0.25, 0.75]), [0.25, 0.75], [None, None]),
    ("a one-column DataFrame", pd.DataFrame({"y": [3, 4]}), [3.0, 4.0], ["3", "4"]),
    (
        "a probability DataFrame",
        pd.DataFrame({"stay": [0.9, 0.4], "churn": [0.1, 0.6]}),
        [0.1, 0.6],
        ["0", "1"],
    ),
    ("a list of floats", [0.5, 1.5], [0.5, 1.5], [None, None]),
]


@pytest.mark.parametrize(
    ("case", "prediction", "scores", "classes"), CASES, ids=[c[0] for c in CASES]
)
def test_row_facts(
    case: str, prediction: Any, scores: list[float | None], classes: list[str | None]
) -> None:
    jsonable = to_jsonable(prediction)
    facts = row_facts(prediction, jsonable, 2)
    assert [s is None for s in facts.scores] == [s is None for s in scores]
    assert [s for s in facts.scores if s is not None] == pytest.approx(
        [s for s in scores if s is not None]
    )
    assert facts.classes == classes
    assert len(facts.outputs) == 2
    assert [orjson.loads(o) for o in facts.outputs] == [
        orjson.loads(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY)) for row in jsonable
    ]


# (case, prediction, reading, scores, classes, unread): the rules beyond one value per row.
LABEL_PROBA = pd.DataFrame({"label": [1, 0], "proba": [0.9, 0.2]})
READ_CASES: list[tuple[str, Any, OutputReading, list[Any], list[Any], Unread | None]] = [
    ("label and proba by name", LABEL_PROBA, OutputReading(), [0.9, 0.2], ["1", "0"], None),
    (
        "a list of per-row dicts",
        [{"class": "churn", "score": 0.7}, {"class": "stay", "score": 0.1}],
        OutputReading(),
        [0.7, 0.1],
        ["churn", "stay"],
        None,
    ),
    (
        "declared columns win over names",
        pd.DataFrame({"label": [1, 0], "p": [0.6, 0.4], "c": ["a", "b"]}),
        OutputReading(score_column="p", class_column="c"),
        [0.6, 0.4],
        ["a", "b"],
        None,
    ),
    (
        "a declared score, the class by name",
        pd.DataFrame({"label": [1, 0], "p": [0.6, 0.4]}),
        OutputReading(score_column="p"),
        [0.6, 0.4],
        ["1", "0"],
        None,
    ),
    (
        "an unnamed array named by the output signature",
        np.array([[1.0, 0.9], [0.0, 0.2]]),
        OutputReading(column_names=("label", "proba")),
        [0.9, 0.2],
        ["1", "0"],
        None,
    ),
    (
        "two numbers that are no probabilities",
        np.array([[90.0, 110.0], [95.0, 105.0]]),
        OutputReading(),
        [None, None],
        [None, None],
        Unread.COLUMNS,
    ),
    (
        "rows not summing to one",
        np.array([[0.5, 0.2], [0.3, 0.3]]),
        OutputReading(),
        [None, None],
        [None, None],
        Unread.COLUMNS,
    ),
    (
        "a declared column missing",
        LABEL_PROBA,
        OutputReading(class_column="decision"),
        [None, None],
        [None, None],
        Unread.DECLARED,
    ),
    (
        "one row per input column",
        [["a", "int64"]] * 3,
        OutputReading(),
        [None] * 2,
        [None] * 2,
        Unread.ROWS,
    ),
    ("a scalar", 7.5, OutputReading(), [None, None], [None, None], Unread.ROWS),
]


@pytest.mark.parametrize(
    ("case", "prediction", "reading", "scores", "classes", "unread"),
    READ_CASES,
    ids=[c[0] for c in READ_CASES],
)
def test_named_outputs_are_read_by_declaration_name_or_probabilities(
    case: str,
    prediction: Any,
    reading: OutputReading,
    scores: list[Any],
    classes: list[Any],
    unread: Unread | None,
) -> None:
    facts = row_facts(prediction, to_jsonable(prediction), 2, reading)
    assert facts.scores == pytest.approx(scores)
    assert facts.classes == classes
    assert facts.unread == unread


def test_an_output_not_shaped_one_per_row_is_kept_whole_on_row_zero() -> None:
    prediction = {"summary": np.array([1, 2, 3])}
    facts = row_facts(prediction, to_jsonable(prediction), 2)
    assert orjson.loads(facts.outputs[0]) == {"summary": [1, 2, 3]}
    assert facts.outputs[1] == "null"
    assert facts.scores == [None, None]
    assert facts.classes == [None, None]


def test_json_form_matches_the_scoring_server() -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    assert to_jsonable(frame) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert to_jsonable(np.array([[1.0, 2.0]])) == [[1.0, 2.0]]
    assert to_jsonable(np.float32(0.5)) == 0.5


def test_series_and_odd_values_are_encoded_as_the_scoring_server_encodes_them() -> None:
    from io import StringIO

    from mlflow.pyfunc.scoring_server import predictions_to_json

    outputs: list[Any] = [
        pd.Series([0.25, 0.75]),
        pd.Series([1, 0], name="label", index=[10, 11]),
        pd.DataFrame({"when": pd.to_datetime(["2024-01-01", "2024-01-02"]), "v": [1.5, 2]}),
        np.array([b"ab", b"c"], dtype=object),
        [np.int64(3), {"nested": np.array([1, 2])}],
    ]
    for prediction in outputs:
        text = StringIO()
        predictions_to_json(prediction, text)
        assert to_jsonable(prediction) == orjson.loads(text.getvalue())["predictions"]
    assert to_jsonable(pd.Series([0.25])) == [{"0": 0.25}]
