"""The /invocations body parser against MLflow's scoring-server semantics and a real signature."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import infer_signature
from mlflow.pyfunc import scoring_server
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from demo.train import using_tracking_uri
from router.errors import (
    BadRequest,
    InvalidInput,
    PayloadTooLarge,
    RouterError,
    UnsupportedMediaType,
)
from router.input.payload import (
    FORMAT_KEYS,
    ParsedInput,
    conform,
    decode_invocation,
    parse_invocation,
)

JSON = "application/json"
COLUMNS = ["tenure_months", "monthly_charges", "contract", "support_calls"]


def _churn_frame(n_rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "tenure_months": rng.integers(0, 72, n_rows).astype(np.int64),
            "monthly_charges": rng.uniform(20, 120, n_rows).round(2),
            "contract": rng.choice(["month-to-month", "one-year", "two-year"], n_rows).astype(
                object
            ),
            "support_calls": rng.poisson(1.5, n_rows).astype(np.int64),
        }
    )


def _infer_signature(frame: pd.DataFrame, labels: Any = None) -> Any:
    with warnings.catch_warnings():
        # MLflow hints that integer columns cannot hold missing values; the hint is the point of
        # the null checks tested here, and the columns are integers on purpose.
        warnings.filterwarnings(
            "ignore", message="Hint: Inferred schema contains integer", category=UserWarning
        )
        return infer_signature(frame, labels)


FRAME = _churn_frame(5)
SCHEMA: Schema = _infer_signature(FRAME).inputs
ROWS: list[dict[str, Any]] = json.loads(FRAME.to_json(orient="records"))


def _bodies(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The same rows in each of the four JSON formats, as clients of `mlflow models serve` send."""
    records = json.loads(frame.to_json(orient="records"))
    split = json.loads(frame.to_json(orient="split", index=False))
    columns = {name: [row[name] for row in records] for name in frame.columns}
    return {
        "dataframe_split": {"dataframe_split": split},
        "dataframe_records": {"dataframe_records": records},
        "instances": {"instances": records},
        "inputs": {"inputs": columns},
    }


def _parse(document: Any, schema: Schema | None = SCHEMA, **kwargs: Any) -> ParsedInput:
    return parse_invocation(json.dumps(document).encode(), JSON, schema, 1000, **kwargs)


def _frame(parsed: ParsedInput) -> pd.DataFrame:
    assert isinstance(parsed.data, pd.DataFrame)
    return parsed.data


# MLflow's own parser, the reference (untyped; it takes schema=None although annotated Schema).
infer_and_parse_data: Any = scoring_server.infer_and_parse_data


def _mlflow_frame(document: dict[str, Any], schema: Schema | None = SCHEMA) -> pd.DataFrame:
    """What MLflow's scoring server parses, made a DataFrame the way pyfunc.predict makes it."""
    data = infer_and_parse_data(document, schema)
    return data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)


def test_signature_is_column_based_with_long_double_string() -> None:
    assert SCHEMA.input_names() == COLUMNS
    assert SCHEMA.input_types() == [DataType.long, DataType.double, DataType.string, DataType.long]


@pytest.mark.parametrize("fmt", FORMAT_KEYS)
def test_every_format_gives_the_frame_mlflow_gives(fmt: str) -> None:
    document = _bodies(FRAME)[fmt]
    parsed = _parse(document)
    assert (parsed.format, parsed.n_rows, parsed.params) == (fmt, 5, None)
    assert isinstance(parsed.data, pd.DataFrame)
    assert list(_frame(parsed).columns) == COLUMNS
    assert [str(dtype) for dtype in parsed.data.dtypes] == ["int64", "float64", "str", "int64"]
    pd.testing.assert_frame_equal(parsed.data, FRAME, check_dtype=False)
    pd.testing.assert_frame_equal(
        parsed.data, _mlflow_frame(document)[COLUMNS], check_dtype=fmt.startswith("dataframe")
    )


@pytest.mark.parametrize(
    "document",
    [
        {"inputs": ROWS[0]},  # one row as column -> value
        {"inputs": ROWS[:1]},  # rows as objects
        {"instances": {name: [value] for name, value in ROWS[0].items()}},  # columns
        {"dataframe_split": {"columns": COLUMNS, "data": [[ROWS[0][c] for c in COLUMNS]]}},
    ],
)
def test_other_shapes_mlflow_accepts(document: dict[str, Any]) -> None:
    parsed = _parse(document)
    assert parsed.n_rows == 1
    pd.testing.assert_frame_equal(parsed.data, FRAME.head(1), check_dtype=False)


def test_column_order_in_the_body_does_not_matter() -> None:
    reordered = [{name: row[name] for name in reversed(COLUMNS)} for row in ROWS]
    parsed = _parse({"dataframe_records": reordered})
    assert list(_frame(parsed).columns) == COLUMNS


def test_split_index_is_kept_like_pandas() -> None:
    split = json.loads(FRAME.to_json(orient="split"))
    split["index"] = [10, 11, 12, 13, 14]
    parsed = _parse({"dataframe_split": split})
    assert list(_frame(parsed).index) == [10, 11, 12, 13, 14]


def test_params_pass_through() -> None:
    params = {"threshold": 0.3, "explain": True, "tags": ["a"]}
    for fmt, document in _bodies(FRAME.head(2)).items():
        assert _parse({**document, "params": params}).params == params, fmt
    assert _parse({**_bodies(FRAME)["inputs"], "params": None}).params is None


def test_widening_conversions_are_accepted() -> None:
    # ints in a double column and integral floats (3.0) in a long column, as MLflow accepts them.
    parsed = _parse(
        {"dataframe_records": [{**ROWS[0], "monthly_charges": 70, "tenure_months": 3.0}]}
    )
    assert _frame(parsed)["monthly_charges"].dtype == np.float64
    assert _frame(parsed)["tenure_months"].dtype == np.int64
    assert _frame(parsed)["tenure_months"].iloc[0] == 3


def test_null_in_double_and_string_columns_is_a_missing_value() -> None:
    parsed = _parse({"dataframe_records": [{**ROWS[0], "monthly_charges": None, "contract": None}]})
    assert np.isnan(_frame(parsed)["monthly_charges"].iloc[0])
    assert pd.isna(_frame(parsed)["contract"].iloc[0])


def test_nan_literal_from_python_clients_is_accepted() -> None:
    # json.dumps writes NaN for float("nan"); MLflow's json.loads takes it, so must the router.
    body = json.dumps({"dataframe_records": [{**ROWS[0], "monthly_charges": float("nan")}]})
    assert "NaN" in body
    parsed = parse_invocation(body.encode(), JSON, SCHEMA, 10)
    assert np.isnan(_frame(parsed)["monthly_charges"].iloc[0])


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"],
)
def test_json_content_types(content_type: str) -> None:
    body = json.dumps(_bodies(FRAME)["inputs"]).encode()
    assert parse_invocation(body, content_type, SCHEMA, 10).n_rows == 5


def test_csv_like_mlflow() -> None:
    body = FRAME.to_csv(index=False).encode()
    parsed = parse_invocation(body, "text/csv", SCHEMA, 10)
    assert (parsed.format, parsed.n_rows, parsed.params) == ("csv", 5, None)
    pd.testing.assert_frame_equal(parsed.data, FRAME, check_dtype=False)
    # A string column keeps strings that look like numbers, as MLflow's dtype-driven read does.
    odd = b"tenure_months,monthly_charges,contract,support_calls\n1,2.5,007,0\n"
    assert _frame(parse_invocation(odd, "text/csv", SCHEMA, 10))["contract"].iloc[0] == "007"


def test_parquet_like_mlflow() -> None:
    buffer = io.BytesIO()
    FRAME.to_parquet(buffer)
    parsed = parse_invocation(buffer.getvalue(), "application/vnd.apache.parquet", SCHEMA, 10)
    assert (parsed.format, parsed.n_rows) == ("parquet", 5)
    pd.testing.assert_frame_equal(parsed.data, FRAME, check_dtype=False)


def test_extra_columns_are_ignored_like_mlflow_or_refused() -> None:
    document = {"dataframe_records": [{**row, "customer_id": "c-1"} for row in ROWS]}
    assert list(_frame(_parse(document)).columns) == COLUMNS
    with pytest.raises(InvalidInput, match=r"unknown column.*'customer_id'") as caught:
        _parse(document, extra_columns="reject")
    assert (caught.value.status_code, caught.value.error_code) == (400, "INVALID_PARAMETER_VALUE")


@pytest.mark.parametrize("content_type", [JSON, "text/csv"])
def test_during_a_schema_change_a_column_is_unknown_only_to_both_arms(content_type: str) -> None:
    # The other arm takes "customer_id": clients send the union, so this arm drops it.
    frame = FRAME.assign(customer_id="c-1")
    if content_type == JSON:
        body = json.dumps({"dataframe_records": json.loads(frame.to_json(orient="records"))})
    else:
        body = frame.to_csv(index=False)
    raw = decode_invocation(body.encode(), content_type, 10)
    union = frozenset([*COLUMNS, "customer_id"])
    parsed = conform(raw, SCHEMA, extra_columns="reject", known_columns=union)
    assert list(_frame(parsed).columns) == COLUMNS
    with pytest.raises(InvalidInput, match=r"not in the model signature: 'customer_id'"):
        conform(raw, SCHEMA, extra_columns="reject")
    with pytest.raises(InvalidInput, match=r"in neither arm's model signature: 'customer_id'"):
        conform(raw, SCHEMA, extra_columns="reject", known_columns=frozenset(COLUMNS))
    # extra_columns: ignore drops whatever neither arm takes.
    ignored = conform(raw, SCHEMA, known_columns=frozenset(COLUMNS))
    assert list(_frame(ignored).columns) == COLUMNS


def test_optional_columns_may_be_missing() -> None:
    schema = Schema([ColSpec("double", "x"), ColSpec("string", "note", required=False)])
    parsed = _parse({"inputs": {"x": [1.0, 2.0]}}, schema)
    assert list(_frame(parsed).columns) == ["x"]
    assert parsed.n_rows == 2


ROW = ROWS[0]
SPLIT_ROW = [ROW[c] for c in COLUMNS]

BAD_INPUTS: list[tuple[str, bytes, str | None, type[RouterError], str]] = [
    ("not json", b"{'a': 1}", JSON, BadRequest, "malformed JSON"),
    ("truncated json", b'{"inputs": [', JSON, BadRequest, "malformed JSON"),
    ("not utf-8", b'{"inputs": "\xff"}', JSON, BadRequest, "malformed JSON"),
    ("body is a list", b"[1, 2]", JSON, BadRequest, "JSON object with exactly one of"),
    ("no format key", b'{"params": {}}', JSON, BadRequest, "got none"),
    (
        "two format keys",
        json.dumps({"inputs": [ROW], "instances": [ROW]}).encode(),
        JSON,
        BadRequest,
        "got 'instances', 'inputs'",
    ),
    ("unknown key", b'{"data": [[1]]}', JSON, BadRequest, "unknown key(s) 'data'"),
    (
        "params not an object",
        json.dumps({"inputs": [ROW], "params": [1]}).encode(),
        JSON,
        BadRequest,
        "'params' must be a JSON object",
    ),
    ("split not an object", b'{"dataframe_split": [[1]]}', JSON, BadRequest, "'columns' and"),
    (
        "ragged split rows",
        json.dumps({"dataframe_split": {"columns": COLUMNS, "data": [SPLIT_ROW[:2]]}}).encode(),
        JSON,
        BadRequest,
        "must be a list of 4 values",
    ),
    ("records not rows", b'{"dataframe_records": [1, 2]}', JSON, BadRequest, "list of objects"),
    ("empty records", b'{"dataframe_records": []}', JSON, BadRequest, "no rows"),
    (
        "empty split",
        json.dumps({"dataframe_split": {"columns": COLUMNS, "data": []}}).encode(),
        JSON,
        BadRequest,
        "no rows",
    ),
    ("empty inputs", b'{"inputs": {}}', JSON, BadRequest, "no rows"),
    (
        "too many rows",
        json.dumps({"dataframe_records": [ROW] * 4}).encode(),
        JSON,
        PayloadTooLarge,
        "has 4 rows; the limit is 3",
    ),
    (
        "missing columns",
        json.dumps({"dataframe_records": [{"tenure_months": 1}]}).encode(),
        JSON,
        InvalidInput,
        "missing column(s) required by the model signature: 'monthly_charges', 'contract', "
        "'support_calls'",
    ),
    (
        "unknown column",
        json.dumps({"inputs": [{**ROW, "zip": "12345"}]}).encode(),
        JSON,
        InvalidInput,
        "unknown column(s) not in the model signature: 'zip'",
    ),
    (
        "split without columns",
        json.dumps({"dataframe_split": {"data": [SPLIT_ROW]}}).encode(),
        JSON,
        InvalidInput,
        "needs 'columns'",
    ),
    (
        "string in a double column",
        json.dumps({"dataframe_records": [{**ROW, "monthly_charges": "70.5"}]}).encode(),
        JSON,
        InvalidInput,
        "column 'monthly_charges' expects double (a number), but row 0 has the string '70.5'",
    ),
    (
        "fraction in a long column",
        json.dumps({"dataframe_records": [ROW, {**ROW, "tenure_months": 1.5}]}).encode(),
        JSON,
        InvalidInput,
        "column 'tenure_months' expects long (an integer), but row 1 has the number 1.5",
    ),
    (
        "boolean in a long column",
        json.dumps({"inputs": [{**ROW, "support_calls": True}]}).encode(),
        JSON,
        InvalidInput,
        "column 'support_calls' expects long (an integer), but row 0 has the boolean true",
    ),
    (
        "number in a string column",
        json.dumps({"instances": [{**ROW, "contract": 12}]}).encode(),
        JSON,
        InvalidInput,
        "column 'contract' expects string, but row 0 has the number 12",
    ),
    (
        "object in a double column",
        json.dumps({"inputs": [{**ROW, "monthly_charges": {"v": 1}}]}).encode(),
        JSON,
        InvalidInput,
        "column 'monthly_charges' expects double (a number), but row 0 has a JSON object",
    ),
    (
        "null in a long column",
        json.dumps({"dataframe_records": [ROW, {**ROW, "support_calls": None}]}).encode(),
        JSON,
        InvalidInput,
        "column 'support_calls' is long (an integer type), which cannot hold null or NaN, "
        "but row 1 is null or missing",
    ),
    (
        "key missing in one record",
        json.dumps(
            {"dataframe_records": [ROW, {k: v for k, v in ROW.items() if k != "support_calls"}]}
        ).encode(),
        JSON,
        InvalidInput,
        "column 'support_calls' is long (an integer type), which cannot hold null or NaN",
    ),
    (
        "NaN in a long column",
        b'{"inputs": {"tenure_months": [NaN], "monthly_charges": [1.0], "contract": ["a"], '
        b'"support_calls": [1]}}',
        JSON,
        InvalidInput,
        "column 'tenure_months' is long (an integer type), which cannot hold null or NaN",
    ),
    (
        "integer out of range",
        json.dumps({"dataframe_records": [{**ROW, "tenure_months": 2**70}]}).encode(),
        JSON,
        InvalidInput,
        "column 'tenure_months' is long: a value is outside",
    ),
    ("no content type", b"{}", None, UnsupportedMediaType, "missing Content-Type"),
    ("form post", b"a=1", "application/x-www-form-urlencoded", UnsupportedMediaType, "send"),
    ("latin-1", b"{}", "application/json; charset=latin-1", UnsupportedMediaType, "utf-8"),
    ("csv garbage", b"", "text/csv", BadRequest, "malformed CSV"),
    (
        "csv text in a long column",
        b"tenure_months,monthly_charges,contract,support_calls\nten,2.5,x,0\n",
        "text/csv",
        InvalidInput,
        "column 'tenure_months' expects long (an integer), but row 0 has the string 'ten'",
    ),
    (
        "csv empty cell in a long column",
        b"tenure_months,monthly_charges,contract,support_calls\n1,2.5,x,\n",
        "text/csv",
        InvalidInput,
        "column 'support_calls' is long (an integer type), which cannot hold null or NaN",
    ),
    (
        "csv too many rows",
        FRAME.to_csv(index=False).encode(),
        "text/csv",
        PayloadTooLarge,
        "has more than 3 rows; the limit is 3",
    ),
    ("parquet garbage", b"PAR1 nope", "application/vnd.apache.parquet", BadRequest, "Parquet"),
]


@pytest.mark.parametrize(
    ("body", "content_type", "error", "message"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_a_4xx_naming_the_problem(
    body: bytes, content_type: str | None, error: type[RouterError], message: str
) -> None:
    # The strict rules: MLflow's casts off, unknown columns refused (validation.* switches).
    with pytest.raises(error) as caught:
        parse_invocation(body, content_type, SCHEMA, 3, casting="strict", extra_columns="reject")
    assert 400 <= caught.value.status_code < 500
    assert message in caught.value.message, caught.value.message


TENSOR = Schema([TensorSpec(np.dtype(np.float64), (-1, 3))])


def test_tensor_signature_rows_as_arrays() -> None:
    parsed = _parse({"inputs": [[1, 2, 3], [4, 5, 6]]}, TENSOR)
    assert isinstance(parsed.data, np.ndarray)
    assert parsed.data.shape == (2, 3)
    assert parsed.data.dtype == np.float64
    assert parsed.n_rows == 2
    assert _parse({"dataframe_split": {"data": [[1, 2, 3]]}}, TENSOR).n_rows == 1


@pytest.mark.parametrize(
    "document",
    [{"instances": [[1, 2]]}, {"inputs": [[1, 2, 3, 4]]}, {"dataframe_split": {"data": [[1, 2]]}}],
)
def test_tensor_signature_checks_the_feature_count(document: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="must have 3 features"):
        _parse(document, TENSOR)


def test_tensor_signature_csv_feature_count() -> None:
    assert parse_invocation(b"a,b,c\n1,2,3\n", "text/csv", TENSOR, 10).n_rows == 1
    with pytest.raises(InvalidInput, match="must have 3 features"):
        parse_invocation(b"a,b\n1,2\n", "text/csv", TENSOR, 10)


def test_tensor_signature_ragged_rows() -> None:
    with pytest.raises(BadRequest, match="inhomogeneous"):
        _parse({"inputs": [[1, 2, 3], [4, 5]]}, TENSOR)


@pytest.mark.parametrize("fmt", FORMAT_KEYS)
def test_without_a_signature_mlflow_parses(fmt: str) -> None:
    document = _bodies(FRAME)[fmt]
    parsed = _parse(document, None)
    assert parsed.n_rows == 5
    expected = infer_and_parse_data(document, None)
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(parsed.data, expected)
    else:
        assert isinstance(parsed.data, dict)
        assert parsed.data.keys() == expected.keys()
        for name, values in expected.items():
            np.testing.assert_array_equal(parsed.data[name], values)


@pytest.fixture(scope="module")
def sklearn_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real pipeline logged to a SQLite tracking store and loaded back as pyfunc."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    tmp_path: Path = tmp_path_factory.mktemp("mlflow")
    train = _churn_frame(400, seed=1)
    labels = (train["support_calls"] + (train["contract"] == "month-to-month") * 2 > 2).astype(int)
    pipeline = Pipeline(
        [
            (
                "features",
                ColumnTransformer(
                    [
                        ("categorical", OneHotEncoder(handle_unknown="ignore"), ["contract"]),
                        (
                            "numeric",
                            Pipeline([("impute", SimpleImputer()), ("scale", StandardScaler())]),
                            ["tenure_months", "monthly_charges", "support_calls"],
                        ),
                    ]
                ),
            ),
            ("model", LogisticRegression()),
        ]
    ).fit(train, labels)
    # Module-scoped, so beyond the per-test isolation of conftest: restore the URIs here (a bare
    # set_tracking_uri(previous) left MLFLOW_TRACKING_URI set for every later test module).
    with using_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db"):
        # Artifacts in tmp_path too (the default ./mlruns would land in the working directory).
        experiment = mlflow.create_experiment("payload", artifact_location=str(tmp_path / "art"))
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.sklearn.log_model(
                pipeline,
                name="model",
                signature=_infer_signature(train, labels),
                pyfunc_predict_fn="predict_proba",
                serialization_format="cloudpickle",
            )
        yield mlflow.pyfunc.load_model(info.model_uri)


@pytest.mark.parametrize("fmt", [*FORMAT_KEYS, "csv"])
def test_predictions_equal_mlflow_scoring(sklearn_model: Any, fmt: str) -> None:
    frame = _churn_frame(7, seed=2)
    frame.loc[3, "monthly_charges"] = np.nan  # a missing value both pass to the imputer
    schema = sklearn_model.metadata.get_input_schema()
    if fmt == "csv":
        body, content_type = frame.to_csv(index=False).encode(), "text/csv"
        reference = scoring_server.parse_csv_input(io.StringIO(body.decode()), schema)
    else:
        document = _bodies(frame)[fmt]  # NaN is sent as null
        body, content_type = json.dumps(document).encode(), JSON
        reference = infer_and_parse_data(document, schema)
    parsed = parse_invocation(body, content_type, schema, 100)
    ours = sklearn_model.predict(parsed.data, params=parsed.params)
    theirs = sklearn_model.predict(reference)
    assert ours.shape == (7, 2)
    np.testing.assert_array_equal(ours, theirs)


def test_one_decoded_body_conforms_to_each_models_signature() -> None:
    # A challenger that adds a column: clients send the union; each model gets its own columns.
    challenger = Schema([*SCHEMA.inputs, ColSpec(DataType.double, "discount")])
    rows = [{**row, "discount": 0.1} for row in ROWS]
    raw = decode_invocation(json.dumps({"dataframe_records": rows}).encode(), JSON, 10)
    assert (raw.format, raw.n_rows) == ("dataframe_records", 5)
    champion_view = conform(raw, SCHEMA, extra_columns="ignore")
    challenger_view = conform(raw, challenger)
    assert list(_frame(champion_view).columns) == COLUMNS
    assert list(_frame(challenger_view).columns) == [*COLUMNS, "discount"]
    with pytest.raises(InvalidInput, match=r"missing column.*'discount'"):
        conform(
            decode_invocation(json.dumps({"dataframe_records": ROWS}).encode(), JSON, 10),
            challenger,
        )


def test_decoding_does_not_need_a_signature() -> None:
    split = json.loads(FRAME.to_json(orient="split"))
    split["index"] = [10, 11, 12, 13, 14]
    raw = decode_invocation(json.dumps({"dataframe_split": split}).encode(), JSON, 10)
    assert raw.index == [10, 11, 12, 13, 14]
    assert raw.columns is not None and list(raw.columns) == COLUMNS
    # A shape only some models take is decoded; the error comes with a model that cannot take it.
    raw = decode_invocation(b'{"inputs": [[1, 2, 3]]}', JSON, 10)
    assert raw.columns is None
    assert conform(raw, TENSOR).n_rows == 1
    with pytest.raises(InvalidInput, match="list of values needs one object per row"):
        conform(raw, SCHEMA)


# MLflow's casts, as `mlflow models serve` applies them (validation.casting: mlflow, the default).
MLFLOW_CASTS: list[tuple[str, dict[str, Any], str, Any]] = [
    ("a numeric string in a long column", {"tenure_months": "3"}, "tenure_months", 3),
    ("a fraction in a long column is truncated", {"tenure_months": 1.5}, "tenure_months", 1),
    ("a boolean in a long column", {"support_calls": True}, "support_calls", 1),
    ("a numeric string in a double column", {"monthly_charges": "70.5"}, "monthly_charges", 70.5),
]


@pytest.mark.parametrize(
    ("change", "column", "expected"),
    [case[1:] for case in MLFLOW_CASTS],
    ids=[case[0] for case in MLFLOW_CASTS],
)
def test_mlflow_casts_are_applied_with_mlflow_values(
    change: dict[str, Any], column: str, expected: Any
) -> None:
    for fmt in ("dataframe_records", "inputs"):
        document = {fmt: [{**ROWS[0], **change}]}
        parsed = _frame(_parse(document))
        assert parsed[column].iloc[0] == expected, fmt
        reference = scoring_server.infer_and_parse_data(document, SCHEMA)
        enforced = mlflow.models.utils._enforce_schema(reference, SCHEMA)
        pd.testing.assert_frame_equal(parsed, enforced, check_dtype=False)
        with pytest.raises(InvalidInput, match=column):
            _parse(document, casting="strict")


def test_a_number_in_a_string_column_is_given_as_mlflow_gives_it() -> None:
    # MLflow keeps 7 a number for the DataFrame formats and makes it "7" for inputs/instances.
    assert _frame(_parse({"dataframe_records": [{**ROWS[0], "contract": 7}]}))["contract"][0] == 7
    assert _frame(_parse({"inputs": [{**ROWS[0], "contract": 7}]}))["contract"][0] == "7"


@pytest.mark.parametrize(
    ("change", "column"),
    [({"monthly_charges": "lots"}, "monthly_charges"), ({"tenure_months": None}, "tenure_months")],
)
def test_what_mlflow_cannot_cast_is_a_400_naming_the_column(
    change: dict[str, Any], column: str
) -> None:
    with pytest.raises(BadRequest, match=column) as caught:
        _parse({"dataframe_records": [{**ROWS[0], **change}]})
    assert (caught.value.status_code, caught.value.error_code) == (400, "BAD_REQUEST")


@pytest.mark.parametrize("literal", [b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_are_refused_before_predicting(literal: bytes) -> None:
    row = json.dumps({**ROWS[0], "monthly_charges": 0.5}).encode().replace(b"0.5", literal)
    body = b'{"dataframe_records": [' + row + b"]}"
    with pytest.raises(InvalidInput, match="column 'monthly_charges' has a non-finite number"):
        parse_invocation(body, JSON, SCHEMA, 10)
    passed = parse_invocation(body, JSON, SCHEMA, 10, non_finite="pass")
    assert np.isinf(_frame(passed)["monthly_charges"].iloc[0])
    with pytest.raises(InvalidInput, match="the input has a non-finite number"):
        parse_invocation(b'{"inputs": [[1, ' + literal + b", 3]]}", JSON, TENSOR, 10)


def test_params_are_checked_against_the_models_params_schema() -> None:
    from mlflow.types import ParamSchema, ParamSpec

    params_schema = ParamSchema([ParamSpec("threshold", DataType.double, 0.5)])
    raw = decode_invocation(
        json.dumps({"dataframe_records": ROWS, "params": {"threshold": "high"}}).encode(), JSON, 10
    )
    with pytest.raises(InvalidInput, match="threshold") as caught:
        conform(raw, SCHEMA, params_schema=params_schema)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
