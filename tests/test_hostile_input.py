"""Hostile bodies against a real router: each is a named 4xx JSON error, never a 500, and the
server keeps answering. Bodies that decode to far more than they weigh are refused before (or
while) decoding: bounded decoding is in ``router/input/bodies.py``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.types import ColSpec, Schema

from router.errors import BadRequest, InvalidInput
from router.input.bodies import MAX_JSON_DEPTH, load_json
from router.input.payload import parse_invocation
from tests.conftest import MlflowRegistry, serve_router
from tests.live_router import RouterDir, split_body

MAX_ROWS = 100
CASES = Path(__file__).parent / "cases"
JSON = {"Content-Type": "application/json"}
PARQUET = {"Content-Type": "application/vnd.apache.parquet"}
CSV = {"Content-Type": "text/csv"}


@pytest.fixture(scope="module")
def client(
    mlflow_registry: MlflowRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    settings = RouterDir(tmp_path_factory.mktemp("hostile")).settings(
        mlflow_registry,
        limits={"max_rows": MAX_ROWS},
        feedback={"wait_for_prediction_s": 0},
    )
    with serve_router(settings) as client:
        yield client


def _parquet(table: pa.Table, **options: object) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def _broken_pandas_metadata(frame_columns: list[str]) -> bytes:
    table = pa.table({name: [1.0] for name in frame_columns})
    return _parquet(table.replace_schema_metadata({b"pandas": b'{"columns": 5}'}))


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"code", "message"}, body
    message: str = body["error"]["message"]
    assert "Traceback" not in message
    return message


def _good(client: httpx.Client, registry: MlflowRegistry) -> None:
    frame = registry.holdout.head(2)
    assert client.post("/invocations", json=split_body(frame)).status_code == 200


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "word"),
    [
        ("401-digit integer", b'{"inputs": [' + b"7" * 401 + b"]}", JSON, 400, ""),
        ("401-digit integer beside NaN", b'{"inputs": [' + b"7" * 401 + b", NaN]}", JSON, 400, ""),
        ("lone surrogate", b'{"inputs": ["\\ud800"]}', JSON, 400, "surrogate"),
        ("lone surrogate beside NaN", b'{"inputs": ["\\ud800", NaN]}', JSON, 400, "surrogate"),
        ("990 levels deep", b'{"inputs": ' + b"[" * 990 + b"]" * 990 + b"}", JSON, 400, "deep"),
        ("2000 levels deep", b'{"inputs": ' + b"[" * 2000 + b"]" * 2000 + b"}", JSON, 400, ""),
        (
            "1 MiB of empty objects (64 bytes each in memory)",
            b'{"dataframe_records": [' + b",".join([b"{}"] * 300_000) + b"]}",
            JSON,
            413,
            "objects and arrays",
        ),
        (
            "Parquet of 10M rows in 45 KB",
            _parquet(pa.table({"x": pa.array([0.0] * 10_000_000)}), compression="zstd"),
            PARQUET,
            413,
            "10000000 rows",
        ),
        (
            "Parquet of 100 strings of 1 MB in 1 KB",
            _parquet(pa.table({"x": pa.array(["a" * 1_000_000] * 100)}), compression="zstd"),
            PARQUET,
            413,
            "limit",
        ),
        (
            "Parquet with a dictionary string repeated past the decoded limit",
            _parquet(
                pa.table({"x": pa.array(["a" * 400_000] * 100)}),
                compression="zstd",
                dictionary_pagesize_limit=1 << 20,
            ),
            PARQUET,
            413,
            "decodes",
        ),
        (
            "Parquet with broken pandas metadata",
            _broken_pandas_metadata(["tenure_months"]),
            PARQUET,
            400,
            "pandas metadata",
        ),
        ("not Parquet", b"PAR1 garbage PAR1", PARQUET, 400, "malformed Parquet"),
        (
            "Parquet whose dictionary indices point past the dictionary (found by the fuzzer)",
            (CASES / "parquet_dictionary_index_out_of_range.parquet").read_bytes(),
            PARQUET,
            400,
            "malformed Parquet",
        ),
        (
            "CSV header of 100,000 columns",
            (",".join(f"c{i}" for i in range(100_000)) + "\n").encode(),
            CSV,
            413,
            "too many columns",
        ),
    ],
)
def test_hostile_body_is_a_named_4xx_and_the_server_stays_up(
    client: httpx.Client,
    mlflow_registry: MlflowRegistry,
    case: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    word: str,
) -> None:
    message = _error(client.post("/invocations", content=body, headers=headers), status)
    assert word.lower() in message.lower(), f"{case}: {message}"
    _good(client, mlflow_registry)


def test_deeply_nested_feedback_is_a_400(client: httpx.Client) -> None:
    outcome = b"[" * 990 + b"1" + b"]" * 990
    body = b'{"request_id": "r-1", "outcome": ' + outcome + b"}"
    assert "deep" in _error(client.post("/feedback", content=body, headers=JSON), 400)
    assert client.get("/healthz").status_code == 200


def test_feedback_batch_is_bounded(client: httpx.Client) -> None:
    batch = {"outcomes": [{"request_id": f"r{i}", "outcome": 1} for i in range(10_001)]}
    assert "10001 outcome values" in _error(client.post("/feedback", json=batch), 413)
    long_list = {"request_id": "r1", "outcome": [[1]] * 10_001}  # one value per row
    assert "10000" in _error(client.post("/feedback", json=long_list), 413)


def test_feedback_needs_json_content_type(client: httpx.Client) -> None:
    # text/plain is a "simple" request a browser sends cross-site without a CORS preflight.
    body = b'{"request_id": "r-1", "outcome": 1}'
    plain = {"Content-Type": "text/plain"}
    assert "application/json" in _error(client.post("/feedback", content=body, headers=plain), 415)
    assert "Content-Type" in _error(client.post("/feedback", content=body), 415)
    # JSON with a charset still reaches the lookup (an unknown id: 404, not 415).
    utf8 = {"Content-Type": "application/json; charset=utf-8"}
    assert "r-1" in _error(client.post("/feedback", content=body, headers=utf8), 404)


def test_huge_parquet_costs_no_memory_before_refusal(tmp_path: Path) -> None:
    """In process: the footer alone refuses it (no page is read: a truncated body still says so)."""
    from router.errors import PayloadTooLarge
    from router.input.bodies import read_parquet

    body = _parquet(pa.table({"x": pa.array([0.0] * 2_000_000)}), compression="zstd")
    footer_only = (
        body[:4]
        + bytes(len(body) - 4 - 8 - _footer_length(body))
        + body[-8 - _footer_length(body) :]
    )
    with pytest.raises(PayloadTooLarge, match="2000000 rows"):
        read_parquet(footer_only, MAX_ROWS)


def _footer_length(body: bytes) -> int:
    return int.from_bytes(body[-8:-4], "little")


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1])
def test_json_depth_is_bounded_exactly_at_the_limit(levels: int) -> None:
    """The walk that bounds the depth is skipped for bodies with too few containers to reach it:
    the limit itself holds either way."""
    body = b"[" * levels + b"]" * levels
    if levels <= MAX_JSON_DEPTH:
        assert load_json(body) is not None
    else:
        with pytest.raises(BadRequest, match="deeper than"):
            load_json(body)


def test_an_integer_past_any_double_is_a_400_naming_its_column(
    client: httpx.Client, mlflow_registry: MlflowRegistry
) -> None:
    body = split_body(mlflow_registry.holdout.head(1))
    columns = body["dataframe_split"]["columns"]
    row = body["dataframe_split"]["data"][0]
    row[columns.index("monthly_charges")] = "HUGE"
    text = json.dumps(body).replace('"HUGE"', "1" + "0" * 400)
    response = client.post("/invocations", content=text, headers=JSON)
    assert "monthly_charges" in _error(response, 400)
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("other", ["null", "1.5", '"x"', "2"])
@pytest.mark.parametrize("column_type", ["long", "integer", "double", "float"])
def test_an_integer_past_any_double_beside_any_value_is_a_client_error(
    column_type: str, other: str
) -> None:
    """Found by the thorough fuzz profile: such an integer beside a null or a fraction reached
    ``float()`` on the error path (a 500)."""
    schema = Schema([ColSpec(column_type, "a")])
    body = '{"dataframe_records": [{"a": 1' + "0" * 400 + '}, {"a": ' + other + "}]}"
    with pytest.raises((BadRequest, InvalidInput)):
        parse_invocation(body.encode(), "application/json", schema, MAX_ROWS)
