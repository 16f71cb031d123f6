"""Acting on evaluations against a real SQLite MLflow registry: alias moves, audit trail, races."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FreshRegistry, MlflowRegistry
from mlflow.tracking import MlflowClient
from synthlog import T0, Arm, settings_for, sqlite_url, write_log

from experiments.evaluate import AliasSnapshot, Evaluation, evaluate, read_aliases
from experiments.promote import (
    TAG_PREFIX,
    ActionResult,
    PromotionConflict,
    PromotionError,
    apply,
    lock_name,
    prior_rejection,
    rollback,
    sticky_rejection,
    tracking_experiment_name,
)
from experiments.report import write_html, write_json
from router import logschema
from router.config import Settings
from router.splitrecord import SPLIT_TAG

EID = logschema.experiment_id("churn-predictor", "1", "2")
NOW = T0 + 100_000.0
BY = "tester@test-host"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # MLflow puts the artifacts of experiments it creates under ./mlruns of the working directory.
    monkeypatch.chdir(tmp_path)
    yield


def _setup(
    fresh_registry: FreshRegistry, tmp_path: Path, challenger: Arm
) -> tuple[MlflowRegistry, Settings]:
    registry = fresh_registry()
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id=EID, champion=Arm(0.70), challenger=challenger)
    return registry, settings_for(registry.tracking_uri, url)


def _artifacts(evaluation: Evaluation, tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "evaluation.json", tmp_path / "report.html"]
    write_json(evaluation, paths[0])
    write_html(evaluation, paths[1])
    return paths


def _runs(client: MlflowClient, model_name: str) -> list[object]:
    exp = client.get_experiment_by_name(tracking_experiment_name(model_name))
    return [] if exp is None else list(client.search_runs([exp.experiment_id]))


def test_promotion_moves_aliases_and_leaves_an_audit_trail(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry, settings = _setup(fresh_registry, tmp_path, Arm(0.80))
    client = registry.client()
    evaluation = evaluate(settings, client=client, now=NOW)
    assert evaluation.decision == "promote"

    result = apply(client, settings, evaluation, artifacts=_artifacts(evaluation, tmp_path), by=BY)

    assert result.action == "promoted"
    assert read_aliases(client, settings) == AliasSnapshot("2", None, "1")
    assert result.aliases_after == AliasSnapshot("2", None, "1")
    new, old = (client.get_model_version("churn-predictor", v).tags for v in ("2", "1"))
    for tags, role in ((new, "champion"), (old, "rollback")):
        assert tags[f"{TAG_PREFIX}role"] == role
        assert tags[f"{TAG_PREFIX}promoted_by"] == BY
        assert tags[f"{TAG_PREFIX}evaluation_run_id"] == result.run_id
        assert tags[f"{TAG_PREFIX}decision"] == "promote"
        assert tags[f"{TAG_PREFIX}promoted_at"].endswith("+00:00")
        assert tags[f"{TAG_PREFIX}difference"].startswith("+")
    run = client.get_run(str(result.run_id))
    assert run.info.status == "FINISHED"
    assert run.data.tags[f"{TAG_PREFIX}decision"] == "promote"
    assert run.data.tags[f"{TAG_PREFIX}action"] == "promoted"
    assert run.data.params["alpha"] == "0.05"
    assert run.data.params["planned_samples"] == "20000"
    assert run.data.params["experiment_id"] == EID
    assert run.data.params["champion_version"] == "1"
    assert run.data.metrics["difference_lower"] > 0
    assert {"champion_n", "challenger_n", "challenger_metric_mean"} <= set(run.data.metrics)
    artifacts = {f.path for f in client.list_artifacts(str(result.run_id))}
    assert artifacts == {"evaluation.json", "report.html"}
    # The lock is gone: the next promotion can take it.
    assert not client.search_registered_models(f"name = '{lock_name('churn-predictor')}'")


def test_rejection_ends_the_experiment_and_is_recorded(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry, settings = _setup(fresh_registry, tmp_path, Arm(0.60))
    client = registry.client()
    evaluation = evaluate(settings, client=client, now=NOW)
    assert evaluation.decision == "reject"

    result = apply(client, settings, evaluation, by=BY)

    assert result.action == "rejected"
    assert read_aliases(client, settings) == AliasSnapshot("1", None, None)
    assert result.aliases_after == AliasSnapshot("1", None, None)
    assert "@challenger removed" in result.message
    tags = client.get_model_version("churn-predictor", "2").tags
    assert tags[f"{TAG_PREFIX}role"] == "rejected"
    assert tags[f"{TAG_PREFIX}decision"] == "reject"
    assert tags[f"{TAG_PREFIX}evaluation_run_id"] == result.run_id
    assert tags[f"{TAG_PREFIX}experiment_id"] == EID
    assert tags[f"{TAG_PREFIX}rejected_by"] == BY
    assert tags[f"{TAG_PREFIX}rejected_at"].endswith("+00:00")
    assert f"{TAG_PREFIX}decision" not in client.get_model_version("churn-predictor", "1").tags
    runs = _runs(client, "churn-predictor")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags[f"{TAG_PREFIX}decision"] == "reject"  # type: ignore[attr-defined]
    assert run.data.tags[f"{TAG_PREFIX}action"] == "rejected"  # type: ignore[attr-defined]
    assert run.info.status == "FINISHED"  # type: ignore[attr-defined]
    assert prior_rejection(client, "churn-predictor", EID) == result.run_id
    assert not client.search_registered_models(f"name = '{lock_name('churn-predictor')}'")


def test_a_rejected_version_is_never_promoted_in_the_same_experiment(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry, settings = _setup(fresh_registry, tmp_path, Arm(0.60))
    client = registry.client()
    rejected = apply(client, settings, evaluate(settings, client=client, now=NOW), by=BY)
    # Someone points @challenger at v2 again, and this time the log says it is better.
    client.set_registered_model_alias("churn-predictor", "challenger", "2")
    better_url = sqlite_url(tmp_path / "better.db")
    # More units than the look that rejected (a look that adds none cannot decide).
    write_log(
        better_url, experiment_id=EID, n_requests=6000, champion=Arm(0.70), challenger=Arm(0.80)
    )
    better = settings_for(registry.tracking_uri, better_url)
    evaluation = evaluate(better, client=client, now=NOW)
    assert evaluation.decision == "promote"

    sticky = sticky_rejection(client, better, evaluation)
    result = apply(client, better, evaluation, by=BY)

    assert sticky.decision == "reject"
    assert str(rejected.run_id) in sticky.reason and "already rejected" in sticky.reason
    assert "This evaluation alone: promote" in sticky.reason
    assert result.action == "rejected"
    assert read_aliases(client, settings) == AliasSnapshot("1", None, None)
    assert client.get_model_version("churn-predictor", "2").tags[f"{TAG_PREFIX}role"] == "rejected"


def test_a_ramp_never_advances_a_version_already_rejected(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry, settings = _setup(fresh_registry, tmp_path, Arm(0.60))
    client = registry.client()
    apply(client, settings, evaluate(settings, client=client, now=NOW), by=BY)
    client.set_registered_model_alias("churn-predictor", "challenger", "2")
    better_url = sqlite_url(tmp_path / "better.db")
    write_log(better_url, experiment_id=EID, champion=Arm(0.70), challenger=Arm(0.80))
    # The log's rows were assigned at 0.5 (routing.challenger_weight): the ramp's first stage.
    ramped = settings_for(
        registry.tracking_uri,
        better_url,
        experiment={"ramp": [0.5, 0.8], "ramp_stage_min_s": 0, "min_samples_per_arm": 100},
    )
    evaluation = evaluate(ramped, client=client, now=NOW)
    assert evaluation.ramp is not None and evaluation.ramp.action == "advance"

    result = apply(client, ramped, evaluation, by=BY)

    assert result.action == "rejected"
    assert read_aliases(client, settings) == AliasSnapshot("1", None, None)
    assert SPLIT_TAG not in client.get_model_version("churn-predictor", "2").tags


def test_a_rejection_holds_only_in_its_own_experiment(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry, settings = _setup(fresh_registry, tmp_path, Arm(0.60))
    client = registry.client()
    apply(client, settings, evaluate(settings, client=client, now=NOW), by=BY)
    # v2 against a different champion (v3) is a new experiment: the old rejection says nothing.
    other = logschema.experiment_id("churn-predictor", "3", "2")
    assert prior_rejection(client, "churn-predictor", other) is None
    assert prior_rejection(client, "other-model", EID) is None


def test_inconclusive_keeps_everything_and_is_recorded(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry, settings = _setup(fresh_registry, tmp_path, Arm(0.70))
    client = registry.client()
    evaluation = evaluate(settings, client=client, now=NOW)
    assert evaluation.decision == "inconclusive"

    result = apply(client, settings, evaluation, by=BY)

    assert result.action == "kept"
    assert read_aliases(client, settings) == AliasSnapshot("1", "2", None)
    assert f"{TAG_PREFIX}role" not in client.get_model_version("churn-predictor", "2").tags
    runs = _runs(client, "churn-predictor")
    assert [r.data.tags[f"{TAG_PREFIX}action"] for r in runs] == ["kept"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("challenger", [Arm(0.80), Arm(0.60)], ids=["promote", "reject"])
def test_aliases_moved_since_the_evaluation_abort_the_action(
    fresh_registry: FreshRegistry, tmp_path: Path, challenger: Arm
) -> None:
    registry, settings = _setup(fresh_registry, tmp_path, challenger)
    client = registry.client()
    evaluation = evaluate(settings, client=client, now=NOW)
    assert evaluation.decision in ("promote", "reject")
    client.set_registered_model_alias("churn-predictor", "challenger", "1")  # someone else

    with pytest.raises(PromotionConflict, match="aliases moved since the evaluation began"):
        apply(client, settings, evaluation, by=BY)

    assert read_aliases(client, settings) == AliasSnapshot("1", "1", None)
    assert f"{TAG_PREFIX}role" not in client.get_model_version("churn-predictor", "2").tags
    runs = _runs(client, "churn-predictor")
    assert [r.data.tags[f"{TAG_PREFIX}action"] for r in runs] == ["aborted"]  # type: ignore[attr-defined]
    # An aborted rejection is no rejection: it does not stick.
    assert prior_rejection(client, "churn-predictor", EID) is None


def test_an_evaluation_that_read_a_racing_promotions_look_records_no_kept(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    # The interleaving CI once hit with two CLI processes: A reads the aliases, B promotes (its
    # look is on record before its alias move), then A reads the looks and finds B's, at the
    # same units: a look with nothing new cannot decide, so A says "inconclusive".
    registry, settings = _setup(fresh_registry, tmp_path, Arm(0.80))
    client = registry.client()
    seen_by_a = read_aliases(client, settings)
    assert apply(client, settings, evaluate(settings, client=client, now=NOW), by="b@host")
    late = evaluate(settings, client=client, now=NOW, aliases=seen_by_a)
    assert late.decision == "inconclusive"

    # Recording "champion kept" now would contradict the move: it is a conflict, like an action.
    with pytest.raises(PromotionConflict, match="aliases moved since the evaluation began"):
        apply(client, settings, late, by="a@host")

    assert read_aliases(client, settings) == AliasSnapshot("2", None, "1")
    actions = sorted(r.data.tags[f"{TAG_PREFIX}action"] for r in _runs(client, "churn-predictor"))  # type: ignore[attr-defined]
    assert actions == ["aborted", "promoted"]


def test_a_held_lock_blocks_a_second_promotion(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry, settings = _setup(fresh_registry, tmp_path, Arm(0.80))
    client = registry.client()
    evaluation = evaluate(settings, client=client, now=NOW)
    client.create_registered_model(
        lock_name("churn-predictor"), tags={"holder": "other@host", "token": "x"}
    )

    with pytest.raises(PromotionConflict, match="other@host"):
        apply(client, settings, evaluation, by=BY)

    assert read_aliases(client, settings) == AliasSnapshot("1", "2", None)
    # Someone else's lock is never released by us.
    assert client.get_registered_model(lock_name("churn-predictor")).tags["token"] == "x"


def test_two_evaluators_at_once_exactly_one_promotes(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry, settings = _setup(fresh_registry, tmp_path, Arm(0.80))
    # Both evaluate the same snapshot, then both try to act at the same moment.
    evaluations = [evaluate(settings, client=registry.client(), now=NOW) for _ in range(2)]
    assert all(e.decision == "promote" for e in evaluations)
    barrier = threading.Barrier(2)
    outcomes: list[ActionResult | PromotionError] = []
    lock = threading.Lock()

    def act(evaluation: Evaluation, who: str) -> None:
        client = registry.client()
        barrier.wait()
        try:
            result: ActionResult | PromotionError = apply(client, settings, evaluation, by=who)
        except PromotionError as exc:
            result = exc
        with lock:
            outcomes.append(result)

    threads = [
        threading.Thread(target=act, args=(e, f"evaluator-{i}@host"))
        for i, e in enumerate(evaluations)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    promoted = [o for o in outcomes if isinstance(o, ActionResult) and o.action == "promoted"]
    refused = [o for o in outcomes if isinstance(o, PromotionConflict)]
    assert len(promoted) == 1 and len(refused) == 1, outcomes
    client = registry.client()
    assert read_aliases(client, settings) == AliasSnapshot("2", None, "1")
    # Version 1 is @rollback exactly once: the loser never set rollback = 2.
    assert client.get_model_version("churn-predictor", "1").tags[f"{TAG_PREFIX}role"] == "rollback"


def test_rollback_restores_the_previous_champion(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry, settings = _setup(fresh_registry, tmp_path, Arm(0.80))
    client = registry.client()
    apply(client, settings, evaluate(settings, client=client, now=NOW), by=BY)
    assert read_aliases(client, settings) == AliasSnapshot("2", None, "1")

    result = rollback(client, settings, by=BY)

    assert result.action == "rolled_back"
    assert read_aliases(client, settings) == AliasSnapshot("1", None, None)
    restored = client.get_model_version("churn-predictor", "1").tags
    demoted = client.get_model_version("churn-predictor", "2").tags
    assert restored[f"{TAG_PREFIX}role"] == "champion"
    assert demoted[f"{TAG_PREFIX}role"] == "rolled_back"
    assert restored[f"{TAG_PREFIX}rolled_back_by"] == BY
    assert restored[f"{TAG_PREFIX}rollback_run_id"] == result.run_id
    run = client.get_run(str(result.run_id))
    assert run.data.tags[f"{TAG_PREFIX}decision"] == "rollback"
    assert run.data.params["rollback_version"] == "1"
    assert run.info.status == "FINISHED"

    with pytest.raises(PromotionError, match="no @rollback alias"):
        rollback(client, settings, by=BY)
