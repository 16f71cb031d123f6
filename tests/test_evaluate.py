"""Evaluation over a real SQLite prediction log and a real MLflow registry: every decision path."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from conftest import MlflowRegistry
from fixed_sample import ArmStats
from synthlog import OUTCOME_WINDOW_S, T0, Arm, settings_for, sqlite_url, write_log

from experiments import stats
from experiments.decision import (
    Check,
    Difference,
    decide,
    paired_difference,
    row_metric,
    split_difference,
)
from experiments.evaluate import (
    AliasSnapshot,
    Evaluation,
    PredictionLogUnavailable,
    RegistryUnavailable,
    evaluate,
)
from experiments.looks import LookHistory, RecordedLook, first_look, this_look
from experiments.promquery import read_guardrails
from experiments.report import text_table
from router import logschema
from router.config import Settings

EID = logschema.experiment_id("churn-predictor", "1", "2")
NOW = T0 + 100_000.0


def _evaluate(
    registry: MlflowRegistry, tmp_path: Path, *, settings: Settings | None = None, **log: object
) -> Evaluation:
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id=EID, **log)  # type: ignore[arg-type]
    settings = settings or settings_for(registry.tracking_uri, url)
    return evaluate(settings, client=registry.client(), now=NOW)


def test_better_challenger_is_promoted(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    ev = _evaluate(mlflow_registry, tmp_path, champion=Arm(0.70), challenger=Arm(0.80))
    assert ev.decision == "promote"
    assert ev.aliases == AliasSnapshot("1", "2", None)
    assert ev.experiment_id == EID
    assert ev.difference is not None and ev.difference.absolute.lower > 0
    assert 0.05 < ev.difference.absolute.estimate < 0.15
    assert ev.srm is not None and ev.srm.checked and not ev.srm.mismatch
    assert all(g.passed for g in ev.guardrails)
    assert ev.champion.n + ev.challenger.n == 4000
    # The series ends where the final interval is; it narrows as outcomes accumulate.
    last = ev.series[-1]
    assert last.estimate == pytest.approx(ev.difference.absolute.estimate)
    assert last.upper - last.lower < ev.series[0].upper - ev.series[0].lower


def test_worse_challenger_is_rejected(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    ev = _evaluate(mlflow_registry, tmp_path, champion=Arm(0.80), challenger=Arm(0.68))
    assert ev.decision == "reject"
    assert ev.difference is not None and ev.difference.absolute.upper < 0
    assert "worse" in ev.reason


def test_slow_challenger_fails_the_latency_guardrail(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    # Better on the metric, but three times slower: the guardrail rejects it anyway.
    ev = _evaluate(
        mlflow_registry,
        tmp_path,
        champion=Arm(0.70, latency_s=0.010),
        challenger=Arm(0.80, latency_s=0.030),
    )
    assert ev.decision == "reject"
    latency = next(g for g in ev.guardrails if g.name == "latency_p95")
    assert not latency.passed and latency.interval is not None
    assert latency.interval.lower > 0.10
    assert "latency_p95" in ev.reason


def test_a_slow_challenger_within_the_latency_budget_is_promoted(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    # Three times slower, but well within a 250 ms p95 budget: acceptable whatever the champion
    # does (experiment.guardrails.max_latency_p95_ms), so the better metric decides.
    url = sqlite_url(tmp_path / "predictions.db")
    settings = settings_for(
        mlflow_registry.tracking_uri,
        url,
        experiment={"guardrails": {"max_latency_p95_ms": 250}},
    )
    ev = _evaluate(
        mlflow_registry,
        tmp_path,
        settings=settings,
        champion=Arm(0.70, latency_s=0.010),
        challenger=Arm(0.80, latency_s=0.030),
    )
    assert ev.decision == "promote", ev.reason
    latency = next(g for g in ev.guardrails if g.name == "latency_p95")
    assert latency.passed and "or a p95 within 250 ms" in latency.detail
    assert ev.guardrail_settings.max_latency_p95_ms == 250


def test_failing_challenger_fails_the_error_guardrail(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    ev = _evaluate(
        mlflow_registry, tmp_path, champion=Arm(0.70), challenger=Arm(0.80, error_rate=0.05)
    )
    assert ev.decision == "reject"
    errors = next(g for g in ev.guardrails if g.name == "error_rate")
    assert not errors.passed and errors.challenger is not None
    assert errors.challenger == pytest.approx(0.05, abs=0.015)
    # The champion's fallback answers belong to the challenger's requests, not to the champion.
    assert ev.champion.errors == 0
    assert ev.champion.requests + ev.challenger.requests == 4000


def test_equal_arms_are_inconclusive(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    ev = _evaluate(mlflow_registry, tmp_path, champion=Arm(0.75), challenger=Arm(0.75), seed=3)
    assert ev.decision == "inconclusive"
    assert ev.difference is not None
    assert ev.difference.absolute.lower <= 0 <= ev.difference.absolute.upper


def test_too_few_outcomes_are_inconclusive(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    ev = _evaluate(
        mlflow_registry, tmp_path, n_requests=600, champion=Arm(0.6), challenger=Arm(0.9)
    )
    assert ev.decision == "inconclusive"
    assert "500 per arm" in ev.reason


def test_sample_ratio_mismatch_is_invalid(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    # Every fifth challenger request never reaches the log: a broken pipeline, not a better model.
    ev = _evaluate(
        mlflow_registry,
        tmp_path,
        champion=Arm(0.70),
        challenger=Arm(0.80),
        drop_challenger_every=5,
    )
    assert ev.decision == "invalid"
    assert ev.srm is not None and ev.srm.mismatch and ev.srm.p_value < 0.001
    assert "Sample-ratio mismatch" in ev.reason


def test_sample_ratio_counts_sticky_users_not_requests(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    # 300 sticky users, a few of them sending most requests: the test counts users (the unit
    # sticky assignment randomises), else one heavy user would decide the chi-square alone.
    ev = _evaluate(
        mlflow_registry, tmp_path, champion=Arm(0.70), challenger=Arm(0.80), users=300, seed=11
    )
    assert ev.srm is not None and ev.srm.checked and not ev.srm.mismatch
    assert ev.champion.requests + ev.challenger.requests == 4000
    assert 250 < sum(ev.srm.observed.values()) <= 300


def test_empty_log_is_invalid(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    ev = _evaluate(mlflow_registry, tmp_path, n_requests=0)
    assert ev.decision == "invalid"
    assert "No predictions" in ev.reason


def test_an_empty_split_experiment_says_its_sample_ratio_is_not_checked_yet(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    """Issue 19, item 4: an empty split-mode experiment read "not applicable (shadow mode...)"."""
    ev = _evaluate(mlflow_registry, tmp_path, n_requests=0)
    table = text_table(ev)
    assert ev.mode == "split" and ev.srm is None
    assert "shadow" not in table
    assert "sample ratio: not checked (no units logged for this experiment yet)" in table


def test_rows_of_another_experiment_do_not_count(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id=logschema.experiment_id("churn-predictor", "1", "3"))
    ev = evaluate(
        settings_for(mlflow_registry.tracking_uri, url), client=mlflow_registry.client(), now=NOW
    )
    assert ev.decision == "invalid" and ev.champion.requests == 0


def test_no_challenger_alias_is_invalid(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id=logschema.experiment_id("churn-predictor", "1", None))
    settings = settings_for(mlflow_registry.tracking_uri, url)
    client = mlflow_registry.client()
    ev = evaluate(settings, client=client, now=NOW, aliases=AliasSnapshot("1", None, None))
    assert ev.decision == "invalid"
    assert "@challenger" in ev.reason


def test_challenger_on_the_champions_version_is_no_experiment(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    # The router serves v1 alone and logs it as such: the evaluator applies the same rule.
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id=logschema.experiment_id("churn-predictor", "1", None))
    settings = settings_for(mlflow_registry.tracking_uri, url)
    client = mlflow_registry.client()
    ev = evaluate(settings, client=client, now=NOW, aliases=AliasSnapshot("1", "1", None))
    assert ev.decision == "invalid"
    assert ev.reason.startswith("No experiment running") and "distinct from @champion" in ev.reason
    assert ev.experiment_id == logschema.experiment_id("churn-predictor", "1", None)


def test_only_closed_outcome_windows_count(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id=EID, n_requests=4000, spacing_s=1.0)
    settings = settings_for(
        mlflow_registry.tracking_uri, url, experiment={"outcome_window_s": 1000.0}
    )
    # Predictions span T0 .. T0+3999; at T0+3000 the window has closed for those before T0+2000.
    ev = evaluate(settings, client=mlflow_registry.client(), now=T0 + 3000.0)
    assert ev.champion.n + ev.challenger.n == 2001
    assert ev.cutoff == T0 + 2000.0
    # Every request is an assignment, closed or not.
    assert ev.champion.requests + ev.challenger.requests == 4000


def test_shadow_mode_is_judged_on_pairs(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    ev = _evaluate(
        mlflow_registry,
        tmp_path,
        mode="shadow",
        n_requests=3000,
        champion=Arm(0.70),
        challenger=Arm(0.80),
    )
    assert ev.mode == "shadow" and ev.challenger.arm == "shadow"
    assert ev.srm is None  # every request is scored by both: no ratio to check
    assert ev.difference is not None and ev.difference.paired
    assert ev.difference.n_champion == ev.difference.n_challenger == 3000
    assert ev.decision == "promote"


def test_unreachable_prediction_log_is_an_error(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    settings = settings_for(mlflow_registry.tracking_uri, sqlite_url(tmp_path / "nope" / "p.db"))
    with pytest.raises(PredictionLogUnavailable, match="no database file"):
        evaluate(settings, client=mlflow_registry.client(), now=NOW)
    closed = settings_for(
        mlflow_registry.tracking_uri, "postgresql+psycopg://u:p@127.0.0.1:9/none?connect_timeout=2"
    )
    with pytest.raises(PredictionLogUnavailable, match="prediction log"):
        evaluate(closed, client=mlflow_registry.client(), now=NOW)


def test_missing_registry_is_an_error(tmp_path: Path) -> None:
    settings = settings_for(sqlite_url(tmp_path / "no-mlflow.db"), sqlite_url(tmp_path / "p.db"))
    with pytest.raises(RegistryUnavailable, match="no database file"):
        evaluate(settings, now=NOW)


def test_unknown_model_is_an_error(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    settings = settings_for(
        mlflow_registry.tracking_uri, sqlite_url(tmp_path / "p.db"), model_name="no-such-model"
    )
    with pytest.raises(RegistryUnavailable, match="not found"):
        evaluate(settings, client=mlflow_registry.client(), now=NOW)


def test_unreachable_prometheus_is_reported_not_fatal(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id=EID, champion=Arm(0.70), challenger=Arm(0.80))
    settings = settings_for(mlflow_registry.tracking_uri, url, prometheus_url="http://127.0.0.1:9")
    ev = evaluate(settings, client=mlflow_registry.client(), now=NOW)
    assert ev.decision == "promote"
    assert ev.prometheus is not None and ev.prometheus.error is not None
    assert "127.0.0.1:9" in ev.prometheus.error


# --- Prometheus queries (a fake Prometheus: its HTTP API is not our seam) ----------------------


def test_prometheus_guardrails_are_read_per_arm() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        query = request.url.params["query"]
        seen.append(query)
        if "histogram_quantile" in query:
            values = {"champion": "0.012", "challenger": "0.030"}
        elif 'status="error"' in query:
            values = {"champion": "1", "challenger": "4"}
        else:
            values = {"champion": "900", "challenger": "100"}
        result = [{"metric": {"arm": a}, "value": [T0, v]} for a, v in values.items()]
        return httpx.Response(200, json={"status": "success", "data": {"result": result}})

    prom = read_guardrails(
        "http://prom:9090/",
        ("champion", "challenger"),
        7200.4,
        T0,
        transport=httpx.MockTransport(handler),
    )
    assert prom.error is None and prom.window_s == 7201
    assert prom.error_rate == pytest.approx({"champion": 1 / 900, "challenger": 0.04})
    assert prom.latency_p95 == {"champion": 0.012, "challenger": 0.030}
    assert all("[7201s]" in q for q in seen)


def test_prometheus_query_error_is_reported() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"status": "error", "error": "parse error"})

    prom = read_guardrails(
        "http://prom:9090",
        ("champion", "challenger"),
        10,
        T0,
        transport=httpx.MockTransport(handler),
    )
    assert prom.error is not None and prom.window_s == 60


# --- the pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "score", "cls", "outcome", "value", "expected"),
    [
        ("accuracy", 0.9, "1", "1", 1.0, 1.0),
        ("accuracy", 0.9, "1", "0", 0.0, 0.0),
        ("accuracy", None, "churn", '"churn"', None, 1.0),
        ("accuracy", None, "1", "true", 1.0, 1.0),
        ("log_loss", 0.8, "1", "1", 1.0, -math.log(0.8)),
        ("log_loss", 1.0, "1", "0", 0.0, -math.log(1.0 - (1.0 - 1e-15))),  # clipped
        ("log_loss", 0.8, "1", "2", 2.0, None),
        ("brier", 0.8, "1", "0", 0.0, 0.64),
        ("abs_error", 2.5, None, "4", 4.0, 1.5),
        ("squared_error", 2.5, None, "4", 4.0, 2.25),
        ("outcome", None, None, "3.5", 3.5, 3.5),
        ("brier", None, "1", "1", 1.0, None),
    ],
)
def test_row_metric(
    metric: str,
    score: float | None,
    cls: str | None,
    outcome: str,
    value: float | None,
    expected: float | None,
) -> None:
    got = row_metric(metric, score, cls, outcome, value)  # type: ignore[arg-type]
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_losses_are_oriented_so_positive_means_challenger_better() -> None:
    champion = ArmStats.from_values([0.5, 0.6, 0.7, 0.6] * 100)
    challenger = ArmStats.from_values([0.3, 0.4, 0.5, 0.4] * 100)  # lower loss: better
    d = split_difference(champion, challenger, 20_000, 0.05, higher_is_better=False)
    assert d.absolute.estimate == pytest.approx(0.2)
    assert d.absolute.lower > 0
    assert d.relative is not None and d.relative.estimate == pytest.approx(0.2 / 0.6)


def test_paired_difference_uses_the_pairs() -> None:
    # Row difficulty varies a lot; the challenger is better by 0.1 on every row. Pairing sees it.
    base = [float(i % 10) for i in range(400)]
    challenger = [b + 0.1 for b in base]
    diffs = stats.UnitMoments.from_rows([t - c for c, t in zip(base, challenger, strict=True)])
    paired = paired_difference(diffs, 4.5, 20_000, 0.05, higher_is_better=True)
    unpaired = split_difference(
        ArmStats.from_values(base),
        ArmStats.from_values(challenger),
        20_000,
        0.05,
        higher_is_better=True,
    )
    assert paired.absolute.estimate == pytest.approx(0.1)
    assert paired.absolute.lower > 0 > unpaired.absolute.lower


def _decide(difference: Difference, **override: object) -> tuple[str, str]:
    kwargs: dict[str, object] = dict(
        no_data_reason=None,
        checks=(),
        n_champion=1000,
        n_challenger=1000,
        min_samples_per_arm=500,
        too_few_events=None,
        guardrails=(),
        difference=difference,
        min_effect=0.0,
        units_total=2000,
        max_samples=100_000,
        metric="accuracy",
    )
    kwargs.update(override)
    return decide(**kwargs)  # type: ignore[arg-type]


def _diff(lower: float, upper: float) -> Difference:
    return Difference(stats.Interval((lower + upper) / 2, lower, upper), None, False, 1000, 1000)


def test_decision_order() -> None:
    ok = _diff(0.05, 0.25)
    assert _decide(ok)[0] == "promote"
    assert _decide(ok, min_effect=0.5)[0] == "inconclusive"
    assert _decide(ok, n_challenger=10)[0] == "inconclusive"
    assert _decide(ok, no_data_reason="none")[0] == "invalid"
    assert _decide(ok, too_few_events="few")[0] == "inconclusive"
    bad = Check("feedback_coverage", True, False, "differs")
    assert _decide(ok, checks=(bad,)) == (
        "invalid",
        "Feedback coverage differs between arms: differs.",
    )
    assert _decide(_diff(-0.3, -0.1))[0] == "reject"


def test_futility_stops_with_no_worthwhile_difference() -> None:
    # The interval rules out the smallest effect worth having: stop, whatever more data would say.
    decision, reason = _decide(_diff(-0.01, 0.015), min_effect=0.02)
    assert decision == "inconclusive" and reason.startswith("No worthwhile difference")
    # Past the stated maximum of units, an interval still covering 0 stops too.
    decision, reason = _decide(_diff(-0.01, 0.01), units_total=100_000)
    assert decision == "inconclusive" and reason.startswith("No worthwhile difference")
    decision, reason = _decide(_diff(-0.01, 0.01))
    assert reason.startswith("No decision yet")


def test_the_final_analysis_ends_the_experiment() -> None:
    history = LookHistory((RecordedLook(1, 0.5, 10_000),))
    final = this_look("group_sequential", history, 20_500, 20_000)
    decision, reason = _decide(_diff(-0.01, 0.02), look=final)
    assert decision == "inconclusive"
    assert reason.startswith("No worthwhile difference: at the final analysis (look 2")
    # A crossing at the final analysis still decides.
    assert _decide(_diff(0.001, 0.02), look=final)[0] == "promote"
    later = this_look(
        "group_sequential",
        LookHistory((*history.looks, RecordedLook(2, 1.025, 20_500))),
        21_000,
        20_000,
    )
    decision, reason = _decide(_diff(0.001, 0.02), look=later)
    assert decision == "inconclusive" and "no error is left to spend at look 3" in reason
    # Before N*, keep collecting; the confidence sequence's own end is max_samples.
    early = this_look("group_sequential", LookHistory(), 5_000, 20_000)
    assert _decide(_diff(-0.01, 0.02), look=early)[1].startswith("No decision yet")
    sequence = first_look("confidence_sequence", 5_000, 20_000)
    assert _decide(_diff(-0.01, 0.02), look=sequence, units_total=100_000)[1].startswith(
        "No worthwhile difference: 100000 units passed the maximum"
    )


def test_all_correct_arms_decide_nothing(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    # Both arms right on every row: zero variance. Without a floor the interval would be a point.
    ev = _evaluate(mlflow_registry, tmp_path, champion=Arm(0.995), challenger=Arm(1.0))
    assert ev.decision == "inconclusive"
    assert "wrong rows" in ev.reason and "challenger" in ev.reason


def test_late_champion_positives_make_the_experiment_invalid(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    # The champion's positive outcomes arrive after the window: its arm would be judged on its
    # negatives only. The coverage check sees the arms' outcomes arrive differently.
    ev = _evaluate(
        mlflow_registry,
        tmp_path,
        champion=Arm(0.75),
        challenger=Arm(0.75),
        champion_positive_delay_s=10 * OUTCOME_WINDOW_S,
    )
    assert ev.decision == "invalid"
    assert "Feedback coverage differs" in ev.reason
    assert ev.champion.coverage is not None and ev.champion.coverage < 0.6


def test_fallbacks_count_in_the_challenger_arm(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    # Intent-to-treat: a challenger request served by the champion's fallback stays the
    # challenger's, judged on the answer served; client errors are nobody's fault.
    ev = _evaluate(
        mlflow_registry,
        tmp_path,
        champion=Arm(0.70),
        challenger=Arm(0.80, error_rate=0.2),
        client_error_rate=0.05,
    )
    assert ev.challenger.fallbacks > 0 and ev.challenger.errors == ev.challenger.fallbacks
    assert ev.champion.errors == 0
    assert ev.champion.client_errors + ev.challenger.client_errors > 100
    assert ev.challenger.n > ev.challenger.requests - ev.challenger.fallbacks


def test_an_overflowing_metric_is_a_clear_invalid(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id=EID, champion=Arm(0.70), challenger=Arm(0.80))
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.update(logschema.predictions).values(score=1e300))
    engine.dispose()
    settings = settings_for(
        mlflow_registry.tracking_uri,
        url,
        experiment={"metric": "squared_error", "capping": "off"},
    )
    ev = evaluate(settings, client=mlflow_registry.client(), now=NOW)
    assert ev.decision == "invalid" and "overflows" in ev.reason


def test_sticky_users_are_the_units(mlflow_registry: MlflowRegistry, tmp_path: Path) -> None:
    ev = _evaluate(
        mlflow_registry, tmp_path, champion=Arm(0.70), challenger=Arm(0.80), users=300, seed=11
    )
    assert ev.unit == "user (routing key)"
    assert ev.difference is not None
    assert ev.champion.units + ev.challenger.units <= 300
