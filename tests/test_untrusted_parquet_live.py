"""Untrusted Parquet against real routers (issue 20, items 1, 3 and 4; the operator switch): the
bodies that killed a worker are named 400s while every worker lives and serves; a duplicate column
name is a 400 counted and logged like any client error, on a connection that stays usable;
SIGTERM ends the process while such bodies are in flight; ``limits.parquet: false`` refuses
Parquet with a 415 naming the key.
"""

from __future__ import annotations

import re
import signal
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

from bench import parquet_craft as craft
from demo.data import FEATURES
from router.config import ConfigError, settings_from_mapping
from router.server.app import create_app
from tests.conftest import MlflowRegistry, serve_in_thread
from tests.live_router import http_client, query_log, router_settings, split_body, wait_ready
from tests.metrics_text import Scrape
from tests.router_process import EXIT_DEADLINE_S, router_process

PARQUET = {"Content-Type": "application/vnd.apache.parquet"}
JSON = {"Content-Type": "application/json"}
HOSTILE = 20  # of each kind, concurrently with normal traffic


def _json_body(registry: MlflowRegistry) -> bytes:
    return httpx.Request("POST", "/", json=split_body(registry.holdout.head(2))).read()


def test_bodies_that_aborted_a_worker_are_400s_and_every_worker_lives(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    bodies = [craft.chunks_beyond_schema(), craft.mutated_level_histogram()] * HOSTILE
    good = _json_body(mlflow_registry)
    with (
        router_process(mlflow_registry, tmp_path, workers=2) as router,
        ThreadPoolExecutor(8) as pool,
    ):

        def post(body: bytes, headers: dict[str, str]) -> httpx.Response:
            with httpx.Client(base_url=router.base_url, timeout=60) as client:
                return client.post("/invocations", content=body, headers=headers)

        hostile = [pool.submit(post, body, PARQUET) for body in bodies]
        normal = [pool.submit(post, good, JSON) for _ in range(len(bodies))]
        for future in hostile:
            answer = future.result()
            assert answer.status_code == 400, answer.text
            assert "malformed Parquet" in answer.json()["message"]
        assert [future.result().status_code for future in normal] == [200] * len(normal)
        output = router.output_text(None)
        assert len(re.findall(r"worker \d+ started", output)) == 2, output[-3000:]
        assert "died" not in output and "terminate called" not in output, output[-3000:]


def test_a_duplicate_column_name_is_a_counted_logged_400_on_a_usable_connection(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    """A 500 with a traceback before, uncounted and unlogged, and the connection was reset."""
    settings = router_settings(mlflow_registry, tmp_path / "log.db")
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with (
        serve_in_thread(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=60, limits=one_connection) as client,
    ):
        wait_ready(client)
        headers = {**PARQUET, "X-Request-Id": "duplicate-names"}
        answer = client.post("/invocations", content=craft.duplicate_names(), headers=headers)
        assert answer.status_code == 400, answer.text
        assert answer.json()["message"] == "parquet names a column more than once: 'a'"
        good = client.post("/invocations", content=_json_body(mlflow_registry), headers=JSON)
        assert good.status_code == 200  # on the same keep-alive connection
        scrape = Scrape.parse(client.get("/metrics").text)
        assert scrape.total("router_requests_total", status="client_error") == 1
    rows = query_log(
        f"sqlite:///{tmp_path / 'log.db'}",
        "SELECT status FROM predictions WHERE request_id = 'duplicate-names'",
    )
    assert rows == [("client_error",)]


def test_parquet_can_be_turned_off(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    settings = router_settings(mlflow_registry, tmp_path / "log.db", limits={"parquet": False})
    parquet = craft.write(pa.Table.from_pandas(mlflow_registry.holdout.head(2)[FEATURES]))
    with serve_in_thread(create_app(settings)) as base_url, http_client(base_url) as client:
        wait_ready(client)
        answer = client.post(
            "/invocations", content=parquet, headers={"Content-Type": PARQUET["Content-Type"]}
        )
        assert answer.status_code == 415, answer.text
        assert "limits.parquet: false" in answer.json()["message"]
        good = client.post("/invocations", content=_json_body(mlflow_registry), headers=JSON)
        assert good.status_code == 200
        scrape = Scrape.parse(client.get("/metrics").text)
        assert scrape.total("router_requests_total", status="client_error") == 1
    with pytest.raises(ConfigError, match=r"limits\.parquet: expected true or false"):
        settings_from_mapping({"model": {"name": "m"}, "limits": {"parquet": "no"}}, env={})


def test_sigterm_ends_the_process_while_hostile_parquet_is_in_flight(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    """Item 3's tail: forty bodies of a thousand row groups over one chunk cost ~7 s of CPU each
    on ``main``, and after SIGTERM the process kept burning CPU for minutes for its decode threads.
    Now each is refused from its footer; the process exits within its grace period."""
    body = craft.overlapping_row_groups(1000)
    with router_process(mlflow_registry, tmp_path) as router, ThreadPoolExecutor(40) as pool:

        def post() -> int | None:
            try:
                with httpx.Client(base_url=router.base_url, timeout=120) as client:
                    return client.post("/invocations", content=body, headers=PARQUET).status_code
            except httpx.TransportError:
                return None  # the server went away: what SIGTERM is for

        sent = [pool.submit(post) for _ in range(40)]
        wait(sent, return_when=FIRST_COMPLETED)  # the bodies have reached the router
        router.process.send_signal(signal.SIGTERM)
        exit_code = router.process.wait(timeout=EXIT_DEADLINE_S)
        assert exit_code in (0, -signal.SIGTERM), router.output_text()
        assert "Application shutdown complete." in router.output_text()
        assert {future.result() for future in sent} <= {400, 503, None}
