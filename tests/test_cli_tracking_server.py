"""The console scripts against a real ``mlflow server`` (HTTP tracking, served artifacts).

Over HTTP MLflow's client writes "View run ... / View experiment at: ..." to stdout when a run
ends; the CLI's stdout must still be exactly its own output: one JSON document with ``--json -``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import FreshRegistry
from console import run_entry_point
from mlflow_server import mlflow_server
from synthlog import Arm, sqlite_url, write_config, write_log

from router import logschema

EID = logschema.experiment_id("churn-predictor", "1", "2")
EVALUATE = "experiments.cli:evaluate_and_promote_main"
ROLLBACK = "experiments.cli:rollback_main"

pytestmark = pytest.mark.usefixtures("cli_workdir")  # tests/conftest.py


def test_json_stdout_and_rollback_stdout_hold_only_the_cli_output(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry = fresh_registry()
    log_url = sqlite_url(tmp_path / "predictions.db")
    write_log(log_url, experiment_id=EID, champion=Arm(0.70), challenger=Arm(0.80))
    with mlflow_server(tmp_path / "server", backend_db=registry.db_path) as url:
        raw: dict[str, Any] = {
            "model": {"name": "churn-predictor", "tracking_uri": url},
            "prediction_log": {"url": log_url},
            "routing": {"challenger_weight": 0.5},
        }
        config = str(write_config(tmp_path / "config.yaml", raw))

        done = run_entry_point(EVALUATE, "--config", config, "--json", "-", cwd=tmp_path)

        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)  # the whole of stdout: one document
        assert data["decision"] == "promote" and data["action"]["action"] == "promoted"
        run_id = data["action"]["run_id"]
        assert "Promoted: @champion v1 -> v2" in done.stderr
        # The audit run and its reports went through the server's artifact store.
        assert (tmp_path / "server" / "mlartifacts").is_dir()
        artifacts = list((tmp_path / "server" / "mlartifacts").rglob("evaluation.json"))
        assert [p for p in artifacts if run_id in p.parts], artifacts

        done = run_entry_point(ROLLBACK, "--config", config, cwd=tmp_path)

        assert done.returncode == 0, done.stderr
        assert done.stdout == "Rolled back: @champion v2 -> v1.\n"


def test_a_wrong_tracking_uri_is_one_short_line_naming_the_cause(tmp_path: Path) -> None:
    with mlflow_server(tmp_path / "server") as url:
        host = url.removeprefix("http://")
        for uri, cause in (
            (f"{url}/mlflow", "HTTP 404: no MLflow REST API at this URI (check its path)"),
            (f"https://{host}", "TLS failed (WRONG_VERSION_NUMBER): is the server https"),
        ):
            raw = {"model": {"name": "churn-predictor", "tracking_uri": uri}}
            config = str(write_config(tmp_path / "config.yaml", raw))

            done = run_entry_point(EVALUATE, "--config", config, cwd=tmp_path)

            assert done.returncode == 1 and done.stdout == ""
            (line,) = done.stderr.strip().splitlines()
            assert line.startswith(
                f"evaluate_and_promote: error: MLflow registry at {uri}: {cause}"
            )
            assert len(line) < 200, line  # not urllib3's reprs
