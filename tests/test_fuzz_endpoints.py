"""Property-based: whatever a client sends to any endpoint, in any body format, the answer is never
a 5xx, always JSON (an ``error`` object when 4xx), and the server keeps answering.

A real router on uvicorn serves the whole module. Examples per property come from a Hypothesis
profile: ``ci`` (default: few examples, derandomized, so the suite stays bounded and repeatable)
or ``thorough`` (``HYPOTHESIS_PROFILE=thorough``: many random examples, for a local hunt).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo.data import FEATURES
from tests.conftest import MlflowRegistry, copy_registry, serve_router
from tests.live_router import RouterDir

settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MAX_ROWS = 20
JSON_TYPE = "application/json"
CSV_TYPE = "text/csv"
PARQUET_TYPE = "application/vnd.apache.parquet"
COLUMNS = [*FEATURES, "extra"]
CATEGORIES = ["month-to-month", "fiber", "yes", "credit-card", "", "\x00"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-(10**400), max_value=10**400),  # past any double
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(CATEGORIES),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=16,
)
records = st.dictionaries(st.sampled_from(COLUMNS), scalars, max_size=len(COLUMNS))


@st.composite
def invocation_documents(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["records", "split", "instances", "inputs", "columns", "any"]))
    if kind == "records":
        document: Any = {"dataframe_records": draw(st.lists(records, max_size=4))}
    elif kind == "split":
        columns = draw(st.lists(st.sampled_from(COLUMNS), max_size=len(COLUMNS)))
        data = draw(st.lists(st.lists(scalars, max_size=len(COLUMNS)), max_size=4))
        document = {"dataframe_split": {"columns": columns, "data": data}}
        if draw(st.booleans()):
            document["dataframe_split"]["index"] = draw(st.lists(scalars, max_size=4))
    elif kind in ("instances", "inputs"):
        document = {kind: draw(st.lists(records, max_size=4) | values)}
    elif kind == "columns":
        column = st.lists(scalars, min_size=1, max_size=3)
        document = {"inputs": draw(st.dictionaries(st.sampled_from(COLUMNS), column, max_size=13))}
    else:
        document = draw(values)
    if isinstance(document, dict) and draw(st.booleans()):
        document["params"] = draw(values)
    return document


def _json_bytes(document: Any) -> bytes:
    return json.dumps(document, allow_nan=True).encode()  # NaN/Infinity literals, as Python sends


@st.composite
def mutated(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` with a few bytes replaced, cut short, or a lone surrogate spliced in."""
    how = draw(st.sampled_from(["same", "flip", "cut", "surrogate"]))
    if how == "same" or not body:
        return body
    if how == "cut":
        return body[: draw(st.integers(0, len(body) - 1))]
    if how == "surrogate":
        at = draw(st.integers(0, len(body)))
        return body[:at] + b'"\\ud800"' + body[at:]
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


column_values = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=4),
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=4),
    st.lists(st.text(max_size=8), min_size=1, max_size=4),
    st.lists(st.booleans(), min_size=1, max_size=4),
    st.lists(st.none() | st.floats(), min_size=1, max_size=4),
)


@st.composite
def frames(draw: st.DrawFn) -> pd.DataFrame:
    names = draw(st.lists(st.sampled_from(COLUMNS), unique=True, max_size=len(COLUMNS)))
    n_rows = draw(st.integers(1, 4))
    columns = {name: (draw(column_values) * n_rows)[:n_rows] for name in names}
    return pd.DataFrame(columns, index=pd.RangeIndex(n_rows))


def _parquet(frame: pd.DataFrame) -> bytes:
    sink = io.BytesIO()
    frame.to_parquet(sink)
    return sink.getvalue()


@st.composite
def csv_bodies(draw: st.DrawFn) -> bytes:
    cells = st.one_of(st.text(max_size=8), st.floats().map(str), st.integers().map(str))
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=len(COLUMNS)))
    rows = draw(st.lists(st.lists(cells, min_size=len(header), max_size=len(header)), max_size=4))
    text = "\n".join(",".join(row) for row in [header, *rows])
    return draw(mutated(text.encode("utf-8", errors="surrogatepass")))


@pytest.fixture(scope="module")
def client(
    mlflow_registry: MlflowRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    # A copy: PUT /admin/weights writes the split of record (and its audit run) to the registry.
    registry = copy_registry(mlflow_registry, tmp_path_factory.mktemp("fuzz-registry"))
    settings_ = RouterDir(tmp_path_factory.mktemp("fuzz")).settings(
        registry,
        routing={"challenger_weight": 0.5},
        limits={"max_rows": MAX_ROWS, "max_body_bytes": 256 * 1024},
        feedback={"wait_for_prediction_s": 0},
        env={"ROUTER_ADMIN_TOKEN": "admin-token"},
    )
    with serve_router(settings_) as client:
        yield client
        # After every property: the same server still answers.
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert response.headers["content-type"].startswith(JSON_TYPE), response.headers
    body = response.json()
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        assert isinstance(body["error"]["code"], str), body
        assert isinstance(body["error"]["message"], str), body


@given(document=invocation_documents(), data=st.data())
def test_invocations_json(client: httpx.Client, document: Any, data: st.DataObject) -> None:
    body = data.draw(mutated(_json_bytes(document)))
    key = data.draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126)))
    headers = {"Content-Type": JSON_TYPE, "X-Routing-Key": key}
    _check(client.post("/invocations", content=body, headers=headers))


@given(body=csv_bodies())
def test_invocations_csv(client: httpx.Client, body: bytes) -> None:
    _check(client.post("/invocations", content=body, headers={"Content-Type": CSV_TYPE}))


@given(frame=frames(), data=st.data())
def test_invocations_parquet(
    client: httpx.Client, frame: pd.DataFrame, data: st.DataObject
) -> None:
    body = data.draw(mutated(_parquet(frame)))
    _check(client.post("/invocations", content=body, headers={"Content-Type": PARQUET_TYPE}))


@given(
    content_type=st.one_of(
        st.sampled_from(["text/plain", "application/xml", "", "application/json; charset=latin-1"]),
        st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30),
    ),
    body=st.binary(max_size=64),
)
def test_invocations_any_content_type(client: httpx.Client, content_type: str, body: bytes) -> None:
    _check(client.post("/invocations", content=body, headers={"Content-Type": content_type}))


@given(
    document=st.one_of(
        st.fixed_dictionaries({"request_id": scalars | st.text(max_size=40), "outcome": values}),
        st.fixed_dictionaries({"outcomes": st.lists(values, max_size=3)}),
        values,
    ),
    data=st.data(),
)
def test_feedback(client: httpx.Client, document: Any, data: st.DataObject) -> None:
    body = data.draw(mutated(_json_bytes(document)))
    _check(client.post("/feedback", content=body, headers={"Content-Type": JSON_TYPE}))


@given(document=values, data=st.data())
def test_admin_weights(client: httpx.Client, document: Any, data: st.DataObject) -> None:
    body = data.draw(mutated(_json_bytes({"challenger_weight": document})))
    headers = {"Content-Type": JSON_TYPE, "Authorization": "Bearer admin-token"}
    _check(client.put("/admin/weights", content=body, headers=headers))
    client.put("/admin/weights", json={"challenger_weight": 0.5}, headers=headers)


@given(
    path=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
)
def test_any_path_and_method(client: httpx.Client, path: str, method: str) -> None:
    response = client.request(method, "/" + path.lstrip("/"))
    assert response.status_code < 500, response.text
