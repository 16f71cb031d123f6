"""The console scripts end to end: exit codes, stdout table, report files, dry run, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MlflowRegistry
from mlflow.tracking import MlflowClient
from synthlog import Arm, sqlite_url, write_config, write_log

from experiments.cli import evaluate_and_promote_main, rollback_main
from router import logschema

EID = logschema.experiment_id("churn-predictor", "1", "2")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in ("MLFLOW_TRACKING_URI", "ROUTER_PREDICTION_LOG_URL", "ROUTER_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow writes new experiments' artifacts under ./mlruns
    yield


def _config(registry: MlflowRegistry, tmp_path: Path, log_url: str, **extra: Any) -> Path:
    raw: dict[str, Any] = {
        "model": {"name": "churn-predictor", "tracking_uri": registry.tracking_uri},
        "prediction_log": {"url": log_url},
        "routing": {"challenger_weight": 0.5},
        **extra,
    }
    return write_config(tmp_path / "config.yaml", raw)


def _log(tmp_path: Path, challenger: Arm, **kwargs: Any) -> str:
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id=EID, champion=Arm(0.70), challenger=challenger, **kwargs)
    return url


def _aliases(registry: MlflowRegistry) -> dict[str, str]:
    aliases = registry.client().get_registered_model("churn-predictor").aliases
    return {k: str(v) for k, v in aliases.items()}


def _registry_state(client: MlflowClient) -> dict[str, Any]:
    """Everything an evaluation could write: aliases, models, version tags, experiments, runs."""
    models = client.search_registered_models()
    versions = client.search_model_versions("name = 'churn-predictor'")
    experiments = client.search_experiments()
    return {
        "models": sorted(
            (m.name, sorted(m.aliases.items()), sorted(m.tags.items())) for m in models
        ),
        "versions": sorted((v.version, sorted(v.tags.items())) for v in versions),
        "experiments": sorted(e.name for e in experiments),
        "runs": sorted(
            r.info.run_id for r in client.search_runs([e.experiment_id for e in experiments])
        ),
    }


def test_promote_prints_the_table_and_writes_reports(
    fresh_registry: Callable[[], MlflowRegistry],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = fresh_registry()
    config = _config(registry, tmp_path, _log(tmp_path, Arm(0.80)))
    report, doc = tmp_path / "report.html", tmp_path / "evaluation.json"

    code = evaluate_and_promote_main(
        ["--config", str(config), "--json", str(doc), "--report", str(report)]
    )

    out = capsys.readouterr().out
    assert code == 0
    for needle in (
        "champion",
        "challenger",
        "difference",
        "sample ratio",
        "guardrail error_rate",
        "guardrail latency_p95",
        "decision: PROMOTE",
        "Promoted: @champion v1 -> v2",
    ):
        assert needle in out
    data = json.loads(doc.read_text())
    assert data["decision"] == "promote" and data["exit_code"] == 0
    assert data["experiment_id"] == EID
    assert data["difference"]["absolute"]["lower"] > 0
    assert len(data["series"]) > 10
    page = report.read_text()
    assert page.count("<svg") == 2 and "PROMOTE" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # no external assets
    assert _aliases(registry) == {"champion": "2", "rollback": "1"}


@pytest.mark.parametrize(
    ("challenger", "log_kwargs", "code", "word"),
    [
        (Arm(0.60), {}, 3, "REJECT"),
        (Arm(0.70), {}, 4, "INCONCLUSIVE"),
        (Arm(0.80), {"drop_challenger_every": 5}, 5, "INVALID"),
    ],
)
def test_exit_codes(
    fresh_registry: Callable[[], MlflowRegistry],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    challenger: Arm,
    log_kwargs: dict[str, Any],
    code: int,
    word: str,
) -> None:
    registry = fresh_registry()
    config = _config(registry, tmp_path, _log(tmp_path, challenger, **log_kwargs))
    assert evaluate_and_promote_main(["--config", str(config)]) == code
    assert f"decision: {word} (exit {code})" in capsys.readouterr().out
    assert _aliases(registry) == {"champion": "1", "challenger": "2"}


def test_dry_run_changes_nothing(
    fresh_registry: Callable[[], MlflowRegistry],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = fresh_registry()
    config = _config(registry, tmp_path, _log(tmp_path, Arm(0.80)))
    client = registry.client()
    before = _registry_state(client)

    code = evaluate_and_promote_main(
        ["--config", str(config), "--dry-run", "--json", str(tmp_path / "e.json")]
    )

    assert code == 0  # would promote
    assert "dry run: would promote; nothing written to MLflow." in capsys.readouterr().out
    assert _registry_state(client) == before
    assert not (tmp_path / "mlruns").exists()
    assert json.loads((tmp_path / "e.json").read_text())["decision"] == "promote"


def test_unreachable_database_is_one_line_exit_1(
    fresh_registry: Callable[[], MlflowRegistry],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = fresh_registry()
    config = _config(
        registry, tmp_path, "postgresql+psycopg://u:p@127.0.0.1:9/db?connect_timeout=2"
    )
    assert evaluate_and_promote_main(["--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate_and_promote: error: prediction log")
    assert "Traceback" not in captured.err


def test_bad_config_and_missing_registry_are_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_config(tmp_path / "bad.yaml", {"model": {"name": "m"}, "experiment": {"alpha": 2}})
    assert evaluate_and_promote_main(["--config", str(bad)]) == 1
    assert "experiment.alpha" in capsys.readouterr().err
    missing = write_config(
        tmp_path / "missing.yaml",
        {"model": {"name": "m", "tracking_uri": sqlite_url(tmp_path / "none.db")}},
    )
    assert rollback_main(["--config", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no database file" in err
    assert not (tmp_path / "none.db").exists()


def test_rollback_cli(
    fresh_registry: Callable[[], MlflowRegistry],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = fresh_registry()
    config = _config(registry, tmp_path, _log(tmp_path, Arm(0.80)))
    assert rollback_main(["--config", str(config)]) == 1
    assert "no @rollback alias" in capsys.readouterr().err
    assert evaluate_and_promote_main(["--config", str(config)]) == 0
    assert rollback_main(["--config", str(config)]) == 0
    assert "Rolled back: @champion v2 -> v1." in capsys.readouterr().out
    assert _aliases(registry) == {"champion": "1"}


def test_two_processes_at_once_promote_once(
    fresh_registry: Callable[[], MlflowRegistry], tmp_path: Path
) -> None:
    registry = fresh_registry()
    config = _config(registry, tmp_path, _log(tmp_path, Arm(0.80)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = (
        "import sys; from experiments.cli import evaluate_and_promote_main as m; "
        f"sys.exit(m(['--config', {str(config)!r}]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    # The loser either lost the race for the lock/aliases (1) or evaluated after the winner had
    # promoted: then there is no @challenger any more, and nothing to judge (5).
    assert codes[0] == 0 and codes[1] in (1, 5), results
    assert _aliases(registry) == {"champion": "2", "rollback": "1"}
