"""Group-sequential looks end to end, through ``evaluate_and_promote`` on a real registry and log:
each run that writes to MLflow is a look recorded in its audit run, the next run rebuilds the
sequence from those records, a dry run is no look, a deleted record is reported; and the planner
(``--plan EFFECT``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import FreshRegistry, MlflowRegistry
from synthlog import T0, Arm, sqlite_url, write_config, write_log

from experiments.cli import EXIT_CODES, evaluate_and_promote_main
from experiments.promote import tracking_experiment_name
from experiments.sequential import group_sequential_boundaries
from router import logschema

EID = logschema.experiment_id("churn-predictor", "1", "2")

pytestmark = pytest.mark.usefixtures("cli_workdir")  # tests/conftest.py


def _config(registry: MlflowRegistry, tmp_path: Path, url: str) -> Path:
    raw: dict[str, Any] = {
        "model": {"name": "churn-predictor", "tracking_uri": registry.tracking_uri},
        "prediction_log": {"url": url},
        "routing": {"challenger_weight": 0.5},
        "experiment": {"outcome_window_s": 600, "planned_samples": 20_000},
    }
    return write_config(tmp_path / "config.yaml", raw)


def _append(url: str, seed: int, n: int = 2000) -> None:
    # Equal arms: every look is inconclusive, so the experiment keeps running.
    write_log(url, experiment_id=EID, n_requests=n, seed=seed, t0=T0 + seed * 10 * n)


def _run(config: Path, tmp_path: Path, *extra: str) -> dict[str, Any]:
    doc = tmp_path / "evaluation.json"
    code = evaluate_and_promote_main(["--config", str(config), "--json", str(doc), *extra])
    data: dict[str, Any] = json.loads(doc.read_text())
    assert code == EXIT_CODES["inconclusive"], data["reason"]
    return data


def _recorded(registry: MlflowRegistry) -> list[dict[str, str]]:
    client = registry.client()
    found = client.get_experiment_by_name(tracking_experiment_name("churn-predictor"))
    assert found is not None
    runs = client.search_runs([found.experiment_id])
    return sorted((dict(r.data.params) for r in runs), key=lambda p: int(p["look"]))


def test_each_run_is_a_recorded_look_and_a_dry_run_is_none(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry = fresh_registry()
    url = sqlite_url(tmp_path / "predictions.db")
    config = _config(registry, tmp_path, url)
    _append(url, seed=1)

    first = _run(config, tmp_path)
    assert first["method"] == "group_sequential"
    assert first["look"]["number"] == 1 and first["look"]["units"] == 2000
    assert first["look"]["fractions"] == [0.1]
    assert "repeated confidence interval (group-sequential, look 1)" in first["interval_label"]
    assert "96%" in first["interval_label"]  # 0.8 of alpha 0.05: the level it was computed at

    dry = _run(config, tmp_path, "--dry-run")
    assert dry["look"]["number"] == 2  # what a real run now would be; nothing recorded
    assert len(_recorded(registry)) == 1

    _append(url, seed=2)
    second = _run(config, tmp_path)
    assert second["look"]["number"] == 2 and second["look"]["fractions"] == [0.1, 0.2]
    # The spending function's boundaries for the looks taken, at the metric's 0.04 of alpha:
    # O'Brien-Fleming-type spending saves its alpha for later (|z| >= 7.26 at t = 0.1).
    want = group_sequential_boundaries([0.1, 0.2], 0.04).z
    assert first["look"]["boundary"] == pytest.approx(want[0], abs=1e-9)
    assert second["look"]["boundary"] == pytest.approx(want[1], abs=1e-9)
    assert want[1] < want[0]
    records = _recorded(registry)
    assert [(r["look"], r["judged_units"], r["method"]) for r in records] == [
        ("1", "2000", "group_sequential"),
        ("2", "4000", "group_sequential"),
    ]
    assert float(records[1]["information_fraction"]) == pytest.approx(0.2)

    # Nothing new judged: the third look spends nothing and says so.
    third = _run(config, tmp_path)
    assert third["look"]["number"] == 3 and third["look"]["boundary"] is None  # infinite
    assert third["reason"].startswith("No decision at this look: no judged unit was added")


def test_a_deleted_look_record_is_reported(fresh_registry: FreshRegistry, tmp_path: Path) -> None:
    registry = fresh_registry()
    url = sqlite_url(tmp_path / "predictions.db")
    config = _config(registry, tmp_path, url)
    _append(url, seed=1)
    _run(config, tmp_path)
    _append(url, seed=2)
    _run(config, tmp_path)
    client = registry.client()
    found = client.get_experiment_by_name(tracking_experiment_name("churn-predictor"))
    assert found is not None
    first = [r for r in client.search_runs([found.experiment_id]) if r.data.params["look"] == "1"]
    client.delete_run(first[0].info.run_id)
    _append(url, seed=3)

    data = _run(config, tmp_path)
    assert data["look"]["number"] == 3 and data["look"]["fractions"] == [0.2, 0.3]
    assert any("no record of look(s) 1" in note for note in data["look"]["notes"])
    assert "no record of look(s) 1" in (tmp_path / "evaluation.json").read_text()


def test_the_planner_prints_n_star_and_json(
    fresh_registry: FreshRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = fresh_registry()
    url = sqlite_url(tmp_path / "predictions.db")
    config = _config(registry, tmp_path, url)
    write_log(url, experiment_id=EID, n_requests=3000, champion=Arm(0.7), challenger=Arm(0.7))

    code = evaluate_and_promote_main(["--config", str(config), "--plan", "0.05", "--json", "-"])
    captured = capsys.readouterr()
    assert code == 0
    plan = json.loads(captured.out)
    # Accuracy ~0.7 (variance ~0.21 per unit), 50/50, +5 points at 80% power and alpha 0.04:
    # about 4 x 0.21 x (2.05 + 0.84)^2 / 0.05^2 = 2,800 units before the sequential inflation.
    assert 2_500 < plan["units_needed"] < 4_000
    assert plan["method"] == "group_sequential" and plan["effect"] == 0.05
    assert plan["champion"]["units_per_day"] > 0 and plan["challenger"]["variance"] > 0.15
    assert plan["adjusted"] is False and "missing" in plan["adjustment"]
    assert plan["expected_date"].endswith("UTC")
    assert "N* to promote a true improvement of +0.05" in captured.err
    assert "expected: N* units judged around" in captured.err
    # Nothing was written to MLflow.
    found = registry.client().get_experiment_by_name(tracking_experiment_name("churn-predictor"))
    assert found is None


def test_the_planner_says_why_it_cannot_plan(
    fresh_registry: FreshRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = fresh_registry()
    url = sqlite_url(tmp_path / "predictions.db")
    config = _config(registry, tmp_path, url)
    write_log(url, experiment_id=EID, n_requests=500)
    assert evaluate_and_promote_main(["--config", str(config), "--plan", "-0.01"]) == 0
    assert "no plan: the effect to find (-0.01) must exceed experiment.min_effect" in (
        capsys.readouterr().out
    )
