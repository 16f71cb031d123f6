"""The decision rule at a look: the latency guardrail's absolute budget, the group-sequential
final analysis, the confidence sequence kept as it was, the intervals' labels, and what a fresh
experiment says about when it can decide."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from synthlog import T0, settings_for, sqlite_url, write_log

from experiments import stats
from experiments.aggregate import read_summary
from experiments.decision import (
    difference,
    latency_guardrail,
    raw_difference,
    split_difference,
)
from experiments.judge import AliasSnapshot, judge
from experiments.looks import LookHistory, RecordedLook, first_look, this_look
from experiments.report import html_report, text_table, to_dict
from experiments.sufficient import ArmData, LatencyHistogram, LogSummary
from router.logschema import RoutingMode

ALPHA_GUARD = 0.005


def _latencies(median_s: float, n: int, seed: int) -> LatencyHistogram:
    rng = np.random.default_rng(seed)
    return LatencyHistogram.from_values(list(rng.lognormal(math.log(median_s), 0.2, n)))


def test_a_latency_budget_passes_a_slower_model_within_it() -> None:
    # A random forest at ~70 ms against a linear model at ~0.9 ms: far beyond +10%.
    champion, challenger = _latencies(0.0009, 3000, 1), _latencies(0.070, 400, 2)
    look = first_look("group_sequential", 20_000, 20_000)  # the final analysis: a finite bound
    relative = latency_guardrail(champion, challenger, 0.10, look, ALPHA_GUARD)
    assert not relative.passed and "allowed +10%" in relative.detail
    within = latency_guardrail(champion, challenger, 0.10, look, ALPHA_GUARD, budget_s=0.250)
    assert within.passed and "or a p95 within 250 ms" in within.detail
    over = latency_guardrail(champion, challenger, 0.10, look, ALPHA_GUARD, budget_s=0.050)
    assert not over.passed and "challenger p95 at least" in over.detail


def test_a_guardrail_needs_no_bound_when_the_estimate_is_within_the_margin() -> None:
    champion, challenger = _latencies(0.010, 3000, 3), _latencies(0.0101, 400, 4)
    look = first_look("group_sequential", 100, 20_000)
    result = latency_guardrail(champion, challenger, 0.10, look, ALPHA_GUARD)
    assert result.passed and result.observed is None and "at least" not in result.detail


def test_the_confidence_sequence_is_unchanged() -> None:
    # experiment.method: confidence_sequence gives the intervals of stats, as before.
    champion = stats.UnitMoments.from_rows(np.r_[np.ones(700), np.zeros(300)])
    challenger = stats.UnitMoments.from_rows(np.r_[np.ones(80), np.zeros(20)])
    d = split_difference(champion, challenger, 20_000, 0.04, higher_is_better=True)
    want = stats.difference_absolute(champion, challenger, 20_000, 0.04)
    assert (d.absolute.lower, d.absolute.upper) == pytest.approx((want.lower, want.upper))
    assert d.label == "96% always-valid confidence sequence"


def test_intervals_are_labelled_with_their_level_and_look() -> None:
    champion = stats.UnitMoments.from_rows(np.r_[np.ones(700), np.zeros(300)])
    challenger = stats.UnitMoments.from_rows(np.r_[np.ones(80), np.zeros(20)])
    history = LookHistory((RecordedLook(1, 0.3, 6_000), RecordedLook(2, 0.6, 12_000)))
    look = this_look("group_sequential", history, 18_000, 20_000)
    d = difference(raw_difference(champion, challenger), look, 0.04, True)
    assert d.label == "96% repeated confidence interval (group-sequential, look 3)"
    assert d.critical == look.critical(0.04, 2, 0) and d.level == pytest.approx(0.96)
    half = d.critical * math.sqrt(champion.mean_variance + challenger.mean_variance)
    assert d.absolute.upper - d.absolute.estimate == pytest.approx(half)


def test_a_fresh_experiment_says_when_outcomes_close_and_decisions_become_possible(
    tmp_path: Path,
) -> None:
    # Predictions of the last hour, the default 7-day outcome window: nothing has closed yet.
    now, window = T0 + 3_600.0, 604_800.0
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id="e", n_requests=600, spacing_s=6.0)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        summary = read_summary(
            conn,
            "e",
            metric="accuracy",
            cutoff=now - window,
            window_s=window,
            cap_quantile=None,
            default_weight=0.5,  # write_log's split
        )
    engine.dispose()
    settings = settings_for("sqlite:///unused.db", url, experiment={"outcome_window_s": window})
    ev = judge(settings, AliasSnapshot("1", "2", None), "e", summary, now=now)
    assert ev.decision == "inconclusive"
    assert ev.reason.startswith("Only 0 rows with closed outcomes in the smaller arm")
    assert "7-day outcome window (experiment.outcome_window_s = 604800 s)" in ev.reason
    assert "the first ones (2023-11-14 22:13 UTC) close on 2023-11-21 22:13 UTC" in ev.reason
    # About 300 requests an hour per arm: 500 judged rows take the smaller arm about 1.7 hours
    # of predictions, whose windows close a week later.
    assert re.search(
        r"both arms have 500 judged rows around 2023-11-21 23:[45]\d UTC: the earliest a "
        "decision is possible",
        ev.reason,
    ), ev.reason


def test_nothing_logged_yet_names_no_date() -> None:
    empty = LogSummary(RoutingMode.SPLIT, False, ArmData(), ArmData())
    settings = settings_for("sqlite:///unused.db", "sqlite:///unused-log.db")
    ev = judge(settings, AliasSnapshot("1", "2", None), "e", empty, now=T0)
    assert ev.decision == "invalid" and ev.reason.startswith("No predictions are logged")


def test_the_report_names_the_method_the_look_the_levels_and_the_guardrails(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path / "predictions.db")
    write_log(url, experiment_id="e", n_requests=4000)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        summary = read_summary(
            conn,
            "e",
            metric="accuracy",
            cutoff=T0 + 10_000,
            window_s=600,
            cap_quantile=None,
            default_weight=0.5,  # write_log's split
        )
    engine.dispose()
    settings = settings_for(
        "sqlite:///unused.db",
        url,
        experiment={"guardrails": {"max_latency_p95_ms": 250}},
    )
    ev = judge(settings, AliasSnapshot("1", "2", None), "e", summary, now=T0 + 10_600)
    text = text_table(ev)
    assert "method: group-sequential, O'Brien-Fleming-type alpha spending" in text
    assert "look 1 at t = 0.200 (4000 of 20000 units)" in text
    assert "guardrails: error rate +1.00%; p95 latency +10% or within 250 ms" in text
    assert "intervals: 96% repeated confidence interval (group-sequential, look 1)" in text
    assert "covariate adjustment: off (the champion's score is missing" in text
    assert "95%" not in text  # nothing here is computed at 95%
    page = html_report(ev)
    assert "96% repeated confidence interval" in page and "95%" not in page
    document = to_dict(ev)
    assert document["look"]["number"] == 1 and document["method"] == "group_sequential"
    assert document["adjustment"]["on"] is False
    assert document["adjustment"]["variance_reduction"] is None
