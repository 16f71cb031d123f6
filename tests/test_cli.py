"""The console scripts end to end: exit codes, stdout table, report files, dry run, errors."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import sqlalchemy as sa
import yaml
from conftest import FreshRegistry, MlflowRegistry, free_port
from console import run_entry_point
from mlflow.tracking import MlflowClient
from synthlog import OUTCOME_WINDOW_S, Arm, sqlite_url, write_config, write_log

from experiments.cli import (
    EXIT_ADVANCED,
    EXIT_CODES,
    EXIT_NO_EXPERIMENT,
    NORMAL_EXIT_CODES,
    evaluate_and_promote_main,
    rollback_main,
)
from experiments.decision import Decision
from experiments.promote import TAG_PREFIX, tracking_experiment_name
from router import logschema

EID = logschema.experiment_id("churn-predictor", "1", "2")
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("cli_workdir")  # tests/conftest.py


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
    kwargs.setdefault("champion", Arm(0.70))
    write_log(url, experiment_id=EID, challenger=challenger, **kwargs)
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
    fresh_registry: FreshRegistry,
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
        "exit code 0 (promote)",
        "Promoted: @champion v1 -> v2",
    ):
        assert needle in out
    data = json.loads(doc.read_text())
    assert data["decision"] == "promote" and data["exit_code"] == 0
    assert data["action"]["action"] == "promoted" and data["dry_run"] is False
    assert data["action"]["aliases_after"] == {"champion": "2", "challenger": None, "rollback": "1"}
    assert data["experiment_id"] == EID
    assert data["difference"]["absolute"]["lower"] > 0
    assert len(data["series"]) > 10
    page = report.read_text()
    assert page.count("<svg") == 2 and "PROMOTE" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # no external assets
    assert _aliases(registry) == {"champion": "2", "rollback": "1"}
    client = registry.client()
    new, old = (client.get_model_version("churn-predictor", v).tags for v in ("2", "1"))
    assert new[f"{TAG_PREFIX}role"] == "champion" and old[f"{TAG_PREFIX}role"] == "rollback"
    run = client.get_run(data["action"]["run_id"])
    assert run.data.tags[f"{TAG_PREFIX}action"] == "promoted" and run.info.status == "FINISHED"


@pytest.mark.parametrize(
    ("challenger", "log_kwargs", "code", "word"),
    [
        (Arm(0.70), {}, 4, "INCONCLUSIVE"),
        (Arm(0.80), {"drop_challenger_every": 5}, 5, "INVALID"),
    ],
)
def test_exit_codes(
    fresh_registry: FreshRegistry,
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
    out = capsys.readouterr().out
    assert f"decision: {word}." in out and f"exit code {code} ({word.lower()})" in out
    assert _aliases(registry) == {"champion": "1", "challenger": "2"}  # the experiment goes on


@pytest.mark.parametrize(
    ("challenger", "code", "verb"),
    [(Arm(0.80), 0, "would promote"), (Arm(0.60), 3, "would reject (remove @challenger)")],
)
def test_dry_run_changes_nothing(
    fresh_registry: FreshRegistry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    challenger: Arm,
    code: int,
    verb: str,
) -> None:
    registry = fresh_registry()
    config = _config(registry, tmp_path, _log(tmp_path, challenger))
    client = registry.client()
    before = _registry_state(client)

    assert (
        evaluate_and_promote_main(
            ["--config", str(config), "--dry-run", "--json", str(tmp_path / "e.json")]
        )
        == code
    )

    assert f"dry run: {verb}; nothing written to MLflow." in capsys.readouterr().out
    assert _registry_state(client) == before
    assert not (tmp_path / "mlruns").exists()
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["exit_code"] == code and data["dry_run"] is True and data["action"] is None


def test_unreachable_database_is_one_line_exit_1(
    fresh_registry: FreshRegistry,
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


def test_bad_config_is_exit_2_and_missing_registry_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_config(tmp_path / "bad.yaml", {"model": {"name": "m"}, "experiment": {"alpha": 2}})
    assert evaluate_and_promote_main(["--config", str(bad)]) == 2
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
    fresh_registry: FreshRegistry,
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


def test_two_processes_at_once_promote_once(fresh_registry: FreshRegistry, tmp_path: Path) -> None:
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
    # promoted: then there is no @challenger any more, and no experiment to judge.
    assert codes[0] == 0 and codes[1] in (1, EXIT_NO_EXPERIMENT), results
    assert _aliases(registry) == {"champion": "2", "rollback": "1"}


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``evaluate_and_promote`` as a CronJob runs it: a process of its own."""
    return run_entry_point("experiments.cli:evaluate_and_promote_main", *args, cwd=cwd)


def _rejections(client: MlflowClient) -> list[Any]:
    exp = client.get_experiment_by_name(tracking_experiment_name("churn-predictor"))
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags[f"{TAG_PREFIX}action"] == "rejected"]


def test_reject_ends_the_experiment_and_sticks(
    fresh_registry: FreshRegistry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = fresh_registry()
    client = registry.client()
    config = _config(registry, tmp_path, _log(tmp_path, Arm(0.60)))

    assert evaluate_and_promote_main(["--config", str(config)]) == 3
    out = capsys.readouterr().out
    assert "decision: REJECT." in out and "exit code 3 (reject)" in out
    assert "Rejected: v2 tagged rejected, @challenger removed" in out
    assert _aliases(registry) == {"champion": "1"}
    (rejection,) = _rejections(client)
    tags = client.get_model_version("churn-predictor", "2").tags
    assert tags[f"{TAG_PREFIX}role"] == "rejected"
    assert tags[f"{TAG_PREFIX}evaluation_run_id"] == rejection.info.run_id
    assert tags[f"{TAG_PREFIX}experiment_id"] == EID

    # The next scheduled run: no experiment (not "invalid"), and nothing written.
    before = _registry_state(client)
    assert evaluate_and_promote_main(["--config", str(config)]) == EXIT_NO_EXPERIMENT
    assert "No experiment running" in capsys.readouterr().out
    assert _registry_state(client) == before

    # Someone points @challenger at v2 again, and now the log says it is better: still rejected.
    client.set_registered_model_alias("churn-predictor", "challenger", "2")
    better = sqlite_url(tmp_path / "better.db")
    # More units than the look that rejected (a look that adds none cannot decide).
    write_log(better, experiment_id=EID, n_requests=6000, champion=Arm(0.70), challenger=Arm(0.80))
    config = _config(registry, tmp_path, better)
    dry = _run_cli("--config", str(config), "--dry-run", "--json", "-", cwd=tmp_path)
    assert dry.returncode == 3, dry.stderr
    assert json.loads(dry.stdout)["decision"] == "reject"
    assert evaluate_and_promote_main(["--config", str(config)]) == 3
    out = capsys.readouterr().out
    assert f"already rejected in this experiment (evaluation run {rejection.info.run_id})" in out
    assert "This evaluation alone: promote" in out
    assert _aliases(registry) == {"champion": "1"}
    assert len(_rejections(client)) == 2


def test_no_experiment_after_a_promotion(
    fresh_registry: FreshRegistry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = fresh_registry()
    client = registry.client()
    config = _config(registry, tmp_path, _log(tmp_path, Arm(0.80)))
    assert evaluate_and_promote_main(["--config", str(config)]) == 0
    capsys.readouterr()
    before = _registry_state(client)

    for _ in range(2):  # every later scheduled run, not just the first
        assert evaluate_and_promote_main(["--config", str(config), "--json", "-"]) == 6
        captured = capsys.readouterr()
        data = json.loads(captured.out)
        assert data["exit_code"] == EXIT_NO_EXPERIMENT and data["decision"] is None
        assert data["aliases"] == {"champion": "2", "challenger": None, "rollback": "1"}
        assert "No experiment running" in captured.err and "(v2)" in captured.err
    assert _registry_state(client) == before

    # @challenger on the champion's own version is no experiment either (the router serves one arm).
    client.set_registered_model_alias("churn-predictor", "challenger", "2")
    assert evaluate_and_promote_main(["--config", str(config)]) == EXIT_NO_EXPERIMENT
    # Nor is a model with no aliases at all (the router serves its latest version).
    for alias in ("champion", "challenger", "rollback"):
        client.delete_registered_model_alias("churn-predictor", alias)
    assert evaluate_and_promote_main(["--config", str(config)]) == EXIT_NO_EXPERIMENT
    assert "@champion (unset)" in capsys.readouterr().out


def test_json_to_stdout_is_the_only_stdout(fresh_registry: FreshRegistry, tmp_path: Path) -> None:
    registry = fresh_registry()
    config = _config(registry, tmp_path, _log(tmp_path, Arm(0.80)))

    done = _run_cli("--config", str(config), "--json", "-", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["decision"] == "promote" and data["exit_code"] == 0
    assert data["action"]["action"] == "promoted" and data["action"]["run_id"]
    assert "decision: PROMOTE." in done.stderr and "Promoted: @champion v1 -> v2" in done.stderr
    assert not (tmp_path / "-").exists()
    # Any other path is a file, even one that merely ends in "-".
    done = _run_cli("--config", str(config), "--json", "./-", cwd=tmp_path)
    assert done.returncode == EXIT_NO_EXPERIMENT, done.stderr
    assert json.loads((tmp_path / "-").read_text())["exit_code"] == EXIT_NO_EXPERIMENT
    assert "No experiment running" in done.stdout


def test_registry_down_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the refusal is the point
    port = free_port()  # nothing listens there
    config = write_config(
        tmp_path / "config.yaml",
        {"model": {"name": "churn-predictor", "tracking_uri": f"http://127.0.0.1:{port}"}},
    )
    assert evaluate_and_promote_main(["--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("evaluate_and_promote: error: MLflow registry at http://127.0.0.1:")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("model: [unclosed\n", "invalid YAML"),
        ("model: {name: m}\nrouting: {challenger_weight: 2}\n", "routing.challenger_weight"),
        (None, "No such file"),
    ],
)
def test_bad_config_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, needle: str
) -> None:
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert evaluate_and_promote_main(["--config", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("evaluate_and_promote: configuration error: ") and needle in line


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        ("not-a-database", "prediction log"),
        ("bad-timestamp", ""),
    ],
)
def test_unreadable_log_is_one_line_exit_1(
    fresh_registry: FreshRegistry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    corrupt: str,
    needle: str,
) -> None:
    registry = fresh_registry()
    db = tmp_path / "predictions.db"
    if corrupt == "not-a-database":
        db.write_bytes(b"this is no SQLite file, just bytes" * 100)
    else:  # a real log with a row no router writes: the evaluator must not crash on it
        write_log(sqlite_url(db), experiment_id=EID, champion=Arm(0.7), challenger=Arm(0.7))
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE predictions SET ts = 'yesterday' WHERE rowid = 1")
    config = _config(registry, tmp_path, sqlite_url(db))

    assert evaluate_and_promote_main(["--config", str(config)]) == 1

    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("evaluate_and_promote: error:") and needle in line
    assert _aliases(registry) == {"champion": "1", "challenger": "2"}


def test_exit_codes_table_covers_every_decision() -> None:
    assert set(EXIT_CODES) == set(get_args(Decision))
    # 1 error, 2 argparse usage, 6 no experiment, 7 a ramp advanced
    codes = [*EXIT_CODES.values(), EXIT_NO_EXPERIMENT, EXIT_ADVANCED, 1, 2]
    assert len(codes) == len(set(codes))  # each outcome its own code


def test_cronjob_treats_exactly_the_normal_codes_as_success() -> None:
    cron = yaml.safe_load((REPO / "deploy/k8s/cronjob.yaml").read_text(encoding="utf-8"))
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    script = container["command"][-1]
    match = re.search(r"^\s*([0-9|]+)\) exit 0 ;;", script, re.MULTILINE)
    assert match is not None, script
    assert {int(c) for c in match.group(1).split("|")} == NORMAL_EXIT_CODES
    assert EXIT_CODES["invalid"] not in NORMAL_EXIT_CODES and 1 not in NORMAL_EXIT_CODES


def _overflowing(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.update(logschema.predictions).values(score=1e300))
    engine.dispose()


@pytest.mark.parametrize(
    ("log_kwargs", "experiment", "code", "reason"),
    [
        # An arm right on (almost) every row: no confident interval from a degenerate variance.
        ({"champion": Arm(0.995), "challenger": Arm(1.0)}, {}, 4, "wrong rows"),
        # A/A with sticky users: users are the units, nothing is decided.
        ({"challenger": Arm(0.70), "users": 300, "seed": 11}, {}, 4, "No decision yet"),
        # Client faults (4xx) are nobody's: an A/A stays undecided.
        ({"challenger": Arm(0.70), "client_error_rate": 0.05}, {}, 4, "No decision yet"),
        # The interval rules out the smallest effect worth having: stop (futility), exit 4.
        ({"challenger": Arm(0.70)}, {"min_effect": 0.15}, 4, "No worthwhile difference"),
        # The challenger fails a fifth of its requests (fallbacks): the error guardrail rejects.
        ({"challenger": Arm(0.80, error_rate=0.2)}, {}, 3, "error_rate"),
        # The champion's positives arrive after the window: feedback coverage differs.
        (
            {"challenger": Arm(0.70), "champion_positive_delay_s": 10 * OUTCOME_WINDOW_S},
            {"outcome_window_s": OUTCOME_WINDOW_S},
            5,
            "Feedback coverage differs",
        ),
        # A metric whose mean overflows: a clear invalid, not a traceback.
        (
            {"challenger": Arm(0.80), "then": _overflowing},
            {"metric": "squared_error", "capping": "off"},
            5,
            "overflows",
        ),
    ],
    ids=["all-correct", "sticky-aa", "client-errors", "futility", "fallbacks", "late", "overflow"],
)
def test_scenarios_exit_codes(
    fresh_registry: FreshRegistry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    log_kwargs: dict[str, Any],
    experiment: dict[str, Any],
    code: int,
    reason: str,
) -> None:
    registry = fresh_registry()
    then = log_kwargs.pop("then", None)
    url = _log(tmp_path, **log_kwargs)
    if then is not None:
        then(url)
    config = _config(registry, tmp_path, url, experiment=experiment)

    assert evaluate_and_promote_main(["--config", str(config), "--json", "-"]) == code

    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["exit_code"] == code and EXIT_CODES[data["decision"]] == code
    assert reason in data["reason"] and reason in captured.err
    # Only a rejection ends the experiment here; nothing is promoted.
    expected = {"champion": "1"} if code == 3 else {"champion": "1", "challenger": "2"}
    assert _aliases(registry) == expected
