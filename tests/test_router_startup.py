"""Start-up never waits for a dependency: ``/healthz`` answers while the registry and the
prediction log's database are down, ``/readyz`` says why it is not ready, and the champion is
loaded in the background (retries with backoff, one log line per attempt) once the registry is up.

A database-backed registry used to block the lifespan for ~105 s (MLflow's engine retries) and a
PostgreSQL log that refused connections failed it outright (exit 3).
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import MlflowRegistry, copy_registry, free_port
from tests.live_router import http_client, split_body, wait_until
from tests.router_process import router_process


def test_healthz_answers_while_the_registry_and_log_databases_are_down(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens there
    registry_uri = f"postgresql+psycopg://router:secret@127.0.0.1:{closed}/mlflow"
    log_uri = f"postgresql+psycopg://router:secret@127.0.0.1:{closed}/predictions"
    with (
        router_process(
            mlflow_registry,
            tmp_path,
            log_url=log_uri,
            model={"tracking_uri": registry_uri, "startup_retry_interval_s": 1},
            wait_for="/healthz",
        ) as router,
        http_client(router.base_url) as client,
    ):
        ready = client.get("/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert "registry" in body["reason"] and str(closed) in body["reason"], body
        wait_until(
            lambda: client.get("/readyz").json()["prediction_log"]["healthy"] is False,
            "the log's failure to show",
        )
        assert client.get("/healthz").status_code == 200
        # Retried in the background, one line per attempt, and still not ready.
        wait_until(
            lambda: "champion not loaded yet (attempt 3" in router.output_text(),
            "three attempts",
        )
        assert client.get("/readyz").status_code == 503
        assert router.process.poll() is None


def test_a_database_registry_that_appears_later_is_loaded(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    """A SQLite registry file that does not exist yet is not created (MLflow would make an empty
    registry of it): the router waits for it and loads the champion once it is there."""
    root = tmp_path / "registry"
    database = root / "registry.db"
    with (
        router_process(
            mlflow_registry,
            tmp_path,
            model={"tracking_uri": f"sqlite:///{database}", "startup_retry_interval_s": 1},
            wait_for="/healthz",
        ) as router,
        http_client(router.base_url) as client,
    ):
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "no database file" in ready.json()["reason"]
        assert not database.exists()
        # The registry appears whole: copied beside, then renamed into place in one step.
        copy_registry(mlflow_registry, root)
        (root / "mlflow.db").rename(database)
        wait_until(lambda: client.get("/readyz").status_code == 200, "the champion to load")
        body = split_body(mlflow_registry.holdout.iloc[:2])
        assert client.post("/invocations", json=body).status_code == 200
