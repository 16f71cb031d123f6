"""The HTTP contract end to end: a real uvicorn server over a real SQLite MLflow registry.

Every input format, equality with ``pyfunc.predict``, each class of bad input, feedback, the
metrics text, and the JSON error body. One server serves the whole module (read-only registry).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from demo.data import LABEL
from demo.train import using_tracking_uri
from router.assignment import bucket_of, threshold_of
from router.config import settings_from_mapping
from tests.conftest import MlflowRegistry, serve_router
from tests.live_router import RouterDir

MAX_ROWS = 50
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Server:
    base_url: str
    registry: MlflowRegistry
    log_path: Path


@pytest.fixture(scope="module")
def server(
    mlflow_registry: MlflowRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    router_dir = RouterDir(tmp_path_factory.mktemp("api-log"))
    settings = settings_from_mapping(
        {
            "model": {
                "name": mlflow_registry.model_name,
                "tracking_uri": mlflow_registry.tracking_uri,
            },
            "routing": {"challenger_weight": 0.5, "salt": "api-tests"},
            "limits": {"max_rows": MAX_ROWS, "max_body_bytes": MAX_BODY},
            "prediction_log": {"url": router_dir.log_url},
        },
        env={},
    )
    with serve_router(settings) as client:
        yield Server(str(client.base_url), mlflow_registry, router_dir.log_path)


def _features(registry: MlflowRegistry, n: int) -> pd.DataFrame:
    return registry.holdout.drop(columns=[LABEL]).head(n).reset_index(drop=True)


def _split_body(frame: pd.DataFrame) -> dict[str, Any]:
    return {"dataframe_split": {"columns": list(frame.columns), "data": frame.to_numpy().tolist()}}


def _post(base_url: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(f"{base_url}/invocations", json=body, headers=headers)


@pytest.fixture(scope="module")
def pyfunc_models(mlflow_registry: MlflowRegistry) -> dict[str, Any]:
    with using_tracking_uri(mlflow_registry.tracking_uri):
        return {
            version: mlflow.pyfunc.load_model(f"models:/{mlflow_registry.model_name}/{version}")
            for version in mlflow_registry.versions.values()
        }


def _bodies(frame: pd.DataFrame) -> dict[str, Any]:
    records = frame.to_dict(orient="records")
    return {
        "dataframe_split": _split_body(frame),
        "dataframe_records": {"dataframe_records": records},
        "instances": {"instances": records},
        "inputs": {"inputs": {c: frame[c].tolist() for c in frame.columns}},
    }


@pytest.mark.parametrize("fmt", ["dataframe_split", "dataframe_records", "instances", "inputs"])
def test_every_format_answers_what_pyfunc_predict_gives(
    server: Server, pyfunc_models: dict[str, Any], fmt: str
) -> None:
    base_url, registry = server.base_url, server.registry
    frame = _features(registry, 7)
    for key in ("alice", "bob", "carol", "dave"):
        response = _post(base_url, _bodies(frame)[fmt], **{"X-Routing-Key": key})
        assert response.status_code == 200, response.text
        body = response.json()
        expected = pyfunc_models[body["model_version"]].predict(frame)
        np.testing.assert_allclose(np.asarray(body["predictions"]), expected, rtol=0, atol=1e-12)
        assert body["arm"] in {"champion", "challenger"}
        assert response.headers["X-Arm"] == body["arm"]
        assert response.headers["X-Model-Version"] == body["model_version"]
        assert response.headers["X-Request-Id"] == body["request_id"]


def test_client_request_id_is_kept(server: Server) -> None:
    base_url, registry = server.base_url, server.registry
    response = _post(base_url, _split_body(_features(registry, 1)), **{"X-Request-Id": "req-abc-1"})
    assert response.status_code == 200
    assert response.json()["request_id"] == "req-abc-1"
    assert response.headers["X-Request-Id"] == "req-abc-1"


def test_csv_body_is_accepted(server: Server) -> None:
    base_url, registry = server.base_url, server.registry
    buffer = io.StringIO()
    _features(registry, 3).to_csv(buffer, index=False)
    response = httpx.post(
        f"{base_url}/invocations",
        content=buffer.getvalue().encode(),
        headers={"Content-Type": "text/csv"},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 3


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"]
    assert set(error) == {"code", "message"}
    assert "Traceback" not in error["message"]
    # MLflow's error body (error_code, message) with the router's own beside it.
    assert body["message"] == error["message"]
    assert isinstance(body["error_code"], str) and body["error_code"].isupper()
    message: str = error["message"]
    return message


def _bad_bodies(frame: pd.DataFrame) -> list[tuple[str, bytes, str, int, str]]:
    """(case, body, content type, status, a word the message must contain)."""
    import orjson

    def js(value: Any) -> bytes:
        return orjson.dumps(value)

    split = _split_body(frame)
    columns, data = split["dataframe_split"]["columns"], split["dataframe_split"]["data"]
    wrong_type = [list(row) for row in data]
    wrong_type[0][columns.index("monthly_charges")] = "lots"
    nan_row = [list(row) for row in data]
    nan_row[0][columns.index("monthly_charges")] = None
    return [
        ("malformed JSON", b'{"dataframe_split": ', "application/json", 400, "malformed JSON"),
        ("not an object", js([1, 2]), "application/json", 400, "exactly one"),
        ("unknown format key", js({"rows": data}), "application/json", 400, "rows"),
        ("two format keys", js({**split, "instances": []}), "application/json", 400, "exactly one"),
        (
            "missing column",
            js({"dataframe_split": {"columns": columns[1:], "data": [r[1:] for r in data]}}),
            "application/json",
            400,
            columns[0],
        ),
        (
            "wrong type",
            js({"dataframe_split": {"columns": columns, "data": wrong_type}}),
            "application/json",
            400,
            "monthly_charges",
        ),
        (
            "NaN the model cannot take",  # the model raised on it: 400, as MLflow answers
            js({"dataframe_split": {"columns": columns, "data": nan_row}}),
            "application/json",
            400,
            "monthly_charges",
        ),
        (
            "empty data",
            js({"dataframe_split": {"columns": columns, "data": []}}),
            "application/json",
            400,
            "no rows",
        ),
        (
            "too many rows",
            js({"dataframe_split": {"columns": columns, "data": data * (MAX_ROWS + 1)}}),
            "application/json",
            413,
            str(MAX_ROWS),
        ),
        ("unsupported content type", b"<xml/>", "application/xml", 415, "Content-Type"),
    ]


def test_each_class_of_bad_input_is_a_named_4xx_and_the_server_stays_up(
    server: Server,
) -> None:
    base_url, registry = server.base_url, server.registry
    frame = _features(registry, 2)
    # The champion (logistic regression) cannot take NaN; the challenger (gradient boosting) can:
    # route every case to the champion with a sticky key.
    key = next(
        f"user-{i}" for i in range(1000) if bucket_of("api-tests", f"user-{i}") >= threshold_of(0.5)
    )
    for case, body, content_type, status, word in _bad_bodies(frame):
        headers = {"Content-Type": content_type, "X-Routing-Key": key}
        response = httpx.post(f"{base_url}/invocations", content=body, headers=headers)
        message = _error(response, status)
        assert word.lower() in message.lower(), f"{case}: {message}"
    assert _post(base_url, _split_body(frame)).status_code == 200


def test_oversized_body_is_refused_before_parsing(server: Server) -> None:
    base_url = server.base_url
    body = b'{"instances": [' + b"1," * MAX_BODY + b"1]}"
    message = _error(
        httpx.post(
            f"{base_url}/invocations", content=body, headers={"Content-Type": "application/json"}
        ),
        413,
    )
    assert str(MAX_BODY) in message

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        for _ in range(3):
            yield b" " * MAX_BODY

    message = _error(
        httpx.post(
            f"{base_url}/invocations",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        ),
        413,
    )
    assert str(MAX_BODY) in message


def test_unknown_route_and_method_are_json_errors(server: Server) -> None:
    base_url = server.base_url
    assert "/nope" in _error(httpx.get(f"{base_url}/nope"), 404)
    _error(httpx.get(f"{base_url}/invocations"), 405)


def test_health_readiness_and_experiment(server: Server) -> None:
    base_url, registry = server.base_url, server.registry
    assert httpx.get(f"{base_url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{base_url}/readyz").status_code == 200
    experiment = httpx.get(f"{base_url}/experiment").json()
    assert experiment["model"] == registry.model_name
    assert experiment["mode"] == "split"
    arms = {a["arm"]: a for a in experiment["arms"]}
    assert arms["champion"]["version"] == registry.versions["champion"]
    assert arms["challenger"]["version"] == registry.versions["challenger"]
    assert arms["champion"]["alias"] == "champion"
    assert arms["champion"]["run_id"] == registry.run_ids["champion"]
    assert math.isclose(arms["challenger"]["weight"], 0.5)
    assert experiment["experiment_id"] == (
        f"{registry.model_name}:v{registry.versions['champion']}-vs-v{registry.versions['challenger']}"
    )


def _served(base_url: str, registry: MlflowRegistry, n_rows: int, key: str) -> dict[str, Any]:
    response = _post(base_url, _split_body(_features(registry, n_rows)), **{"X-Routing-Key": key})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _feedback(base_url: str, body: Any) -> httpx.Response:
    return httpx.post(f"{base_url}/feedback", json=body)


def test_feedback_accepted_idempotent_conflict_unknown(server: Server) -> None:
    base_url, registry = server.base_url, server.registry
    served = _served(base_url, registry, 2, "feedback-user")
    request_id = served["request_id"]

    first = _feedback(base_url, {"request_id": request_id, "outcome": [1, 0]})
    assert first.status_code == 200, first.text
    assert first.json()["accepted"] == [{"request_id": request_id, "rows": 2, "created": 2}]

    again = _feedback(base_url, {"request_id": request_id, "outcome": [1, 0]})
    assert again.status_code == 200
    assert again.json()["accepted"][0]["created"] == 0

    assert request_id in _error(
        _feedback(base_url, {"request_id": request_id, "outcome": [0, 0]}), 409
    )
    assert "no-such-request" in _error(
        _feedback(base_url, {"request_id": "no-such-request", "outcome": 1}), 404
    )
    _error(_feedback(base_url, {"outcome": 1}), 400)
    json_type = {"Content-Type": "application/json"}
    _error(httpx.post(f"{base_url}/feedback", content=b"{oops", headers=json_type), 400)


def test_feedback_batch(server: Server) -> None:
    base_url, registry = server.base_url, server.registry
    ids = [_served(base_url, registry, 1, f"batch-{i}")["request_id"] for i in range(3)]
    response = _feedback(
        base_url, {"outcomes": [{"request_id": rid, "outcome": i % 2} for i, rid in enumerate(ids)]}
    )
    assert response.status_code == 200, response.text
    assert [a["created"] for a in response.json()["accepted"]] == [1, 1, 1]


def _samples(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{base_url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and labels.items() <= dict(sample_labels).items()
    )


def test_metrics_count_requests_per_arm_and_feedback(server: Server) -> None:
    base_url, registry = server.base_url, server.registry
    before = _samples(base_url)
    served = [_served(base_url, registry, 1, f"metrics-user-{i}") for i in range(20)]
    by_arm: dict[str, int] = {}
    for body in served:
        by_arm[body["arm"]] = by_arm.get(body["arm"], 0) + 1
    label = int(registry.holdout[LABEL].iloc[0])
    for body in served:
        assert (
            _feedback(base_url, {"request_id": body["request_id"], "outcome": label}).status_code
            == 200
        )
    after = _samples(base_url)

    for arm, count in by_arm.items():
        version = registry.versions[arm]
        for name in ("router_requests_total", "router_predict_latency_seconds_count"):
            delta = _total(after, name, arm=arm, model_version=version) - _total(
                before, name, arm=arm, model_version=version
            )
            assert delta == count, name
        fed = _total(after, "router_feedback_total", arm=arm) - _total(
            before, "router_feedback_total", arm=arm
        )
        assert fed == count
        assert _total(after, "router_model_info", arm=arm, model_version=version) == 1
    assert _total(after, "router_ready") == 1
    assert math.isclose(_total(after, "router_arm_weight", arm="challenger"), 0.5)
    assert _total(after, "router_request_latency_seconds_count", route="/invocations") >= 20
    assert _total(after, "router_prediction_value_count") >= 20
    assert _total(after, "router_predicted_class_total") >= 20


def test_admin_endpoints_are_disabled_without_a_token(server: Server) -> None:
    base_url = server.base_url
    assert "ROUTER_ADMIN_TOKEN" in _error(httpx.post(f"{base_url}/admin/reload"), 401)
    _error(httpx.put(f"{base_url}/admin/weights", json={"challenger_weight": 0.2}), 401)


def test_prediction_log_has_every_served_row(server: Server) -> None:
    """Rows reach the log off the request path; a read after a short wait sees them all."""
    import sqlalchemy as sa

    from router.logschema import predictions

    base_url, registry = server.base_url, server.registry
    body = _served(base_url, registry, 4, "log-user")
    engine = sa.create_engine(f"sqlite:///{server.log_path}")
    query = sa.select(predictions).where(predictions.c.request_id == body["request_id"])
    rows: list[Any] = []
    for _ in range(100):
        with engine.connect() as conn:
            rows = list(conn.execute(query))
        if len(rows) == 4:
            break
        time.sleep(0.05)
    engine.dispose()
    assert sorted(r.row_index for r in rows) == [0, 1, 2, 3]
    assert {r.arm for r in rows} == {body["arm"]}
    assert {r.model_version for r in rows} == {body["model_version"]}
    assert all(r.routing_key_hash and "log-user" not in r.routing_key_hash for r in rows)
    assert all(r.status == "ok" and r.score is not None for r in rows)
