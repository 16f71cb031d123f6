"""Periods of one challenger weight, judged on their own and combined (experiments/strata.py), and
the ramp's stage rule (experiments/ramp.py): pure functions over hand-made sums."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import ramp, strata
from experiments.decision import arm_estimate, raw_difference
from experiments.judge import AliasSnapshot, Evaluation, judge
from experiments.stats import UnitMoments
from experiments.sufficient import ArmData, LatencyHistogram, LogSummary, Period
from router.config import Settings, settings_from_mapping
from router.logschema import RoutingMode
from router.splitrecord import Split

NOW = 1_000_000.0


def _arm(rng: np.random.Generator, units: int, accuracy: float, faults: float = 0.0) -> ArmData:
    rows = rng.integers(1, 4, units).astype(np.float64)
    right = rng.binomial(rows.astype(np.int64), accuracy).astype(np.float64)
    failed = rng.binomial(rows.astype(np.int64), faults).astype(np.float64)
    latency = rng.lognormal(math.log(0.01), 0.2, int(rows.sum()))
    return ArmData(
        requests=int(rows.sum()),
        units=units,
        faults=UnitMoments.from_units(failed, rows),
        coverage=UnitMoments.from_units(rows, rows),
        metric=UnitMoments.from_units(right, rows),
        latency=LatencyHistogram.from_values(latency.tolist()),
    )


def _sums(periods: list[Period], plan: strata.Plan, x: list[list[np.ndarray]]) -> strata.Sums:
    """The influence sums when every unit is in one period and one arm (no unit shared)."""
    z_t, z_c = [], []
    for k, (p, w) in enumerate(zip(periods, plan.weights, strict=True)):
        for arm, out in (("champion", z_c), ("challenger", z_t)):
            m = getattr(p, arm).metric
            right, rows = x[k][0 if arm == "champion" else 1]
            out.extend(w / m.sum_y * (right - m.mean * rows))
    tt, cc = float(np.dot(z_t, z_t)), float(np.dot(z_c, z_c))
    return strata.Sums(tt, cc, 0.0, len(z_t), len(z_c), len(z_t) + len(z_c))


def test_one_period_is_exactly_the_welch_difference() -> None:
    rng = np.random.default_rng(1)
    rows_c, rows_t = rng.integers(1, 5, 900).astype(float), rng.integers(1, 5, 100).astype(float)
    right_c, right_t = rng.binomial(rows_c.astype(int), 0.7), rng.binomial(rows_t.astype(int), 0.75)
    c = ArmData(units=900, metric=UnitMoments.from_units(right_c, rows_c))
    t = ArmData(units=100, metric=UnitMoments.from_units(right_t, rows_t))
    period = Period(0.1, c, t)
    plan = strata.plan([period])
    assert plan is not None and plan.weights == (1.0,)
    combined = strata.combine(plan, _sums([period], plan, [[(right_c, rows_c), (right_t, rows_t)]]))
    assert combined.champion_variance == pytest.approx(c.metric.mean_variance)
    assert combined.challenger_variance == pytest.approx(t.metric.mean_variance)
    summary = LogSummary(RoutingMode.SPLIT, True, c, t, periods=(period,), stratified=combined)
    got = strata.stratified_estimate(summary, False)
    want = raw_difference(arm_estimate(c.metric, False), arm_estimate(t.metric, False))
    assert (got.estimate, got.variance) == pytest.approx((want.estimate, want.variance))
    assert got.relative == pytest.approx(want.relative)


def test_both_arms_are_standardised_to_the_same_period_weights() -> None:
    # A/A with a trend: 0.60 in the first period, 0.80 in the second; the challenger has most of
    # its rows in the second. Pooled, it looks 10 points better; combined, the same.
    c1 = ArmData(units=950, metric=UnitMoments.from_rows([1.0] * 570 + [0.0] * 380))
    t1 = ArmData(units=50, metric=UnitMoments.from_rows([1.0] * 30 + [0.0] * 20))
    c2 = ArmData(units=500, metric=UnitMoments.from_rows([1.0] * 400 + [0.0] * 100))
    t2 = ArmData(units=500, metric=UnitMoments.from_rows([1.0] * 400 + [0.0] * 100))
    periods = [Period(0.05, c1, t1), Period(0.5, c2, t2)]
    plan = strata.plan(periods)
    assert plan is not None

    def rows(right: int, wrong: int) -> tuple[np.ndarray, np.ndarray]:
        return np.repeat([1.0, 0.0], [right, wrong]), np.ones(right + wrong)

    x = [[rows(570, 380), rows(30, 20)], [rows(400, 100), rows(400, 100)]]
    combined = strata.combine(plan, _sums(periods, plan, x))
    assert combined.challenger_mean - combined.champion_mean == pytest.approx(0.0, abs=1e-12)
    pooled_c = (570 + 400) / (950 + 500)
    pooled_t = (30 + 400) / (50 + 500)
    assert pooled_t - pooled_c > 0.1  # what pooling would have said


def test_each_period_is_checked_against_its_own_weight() -> None:
    rng = np.random.default_rng(2)
    early = Period(0.1, _arm(rng, 9_000, 0.7), _arm(rng, 1_000, 0.7))
    late = Period(0.5, _arm(rng, 5_000, 0.7), _arm(rng, 5_000, 0.7))
    summary = LogSummary(RoutingMode.SPLIT, True, ArmData(), ArmData(), periods=(early, late))
    checks, srm = strata.period_checks(summary, 20_000)
    assert all(c.passed for c in checks), checks
    assert srm is not None and not srm.mismatch
    # Pooled, 14,000 champion units and 6,000 challenger ones match neither 0.1 nor 0.5.
    broken = Period(0.5, _arm(rng, 7_000, 0.7), _arm(rng, 3_000, 0.7))
    summary = LogSummary(RoutingMode.SPLIT, True, ArmData(), ArmData(), periods=(early, broken))
    checks, srm = strata.period_checks(summary, 20_000)
    failed = [c for c in checks if not c.passed]
    assert [c.name for c in failed] == ["sample_ratio"]
    assert failed[0].detail.startswith("at challenger weight 0.5:")


# --- the ramp's stage rule -------------------------------------------------------------------


def _settings(**experiment: object) -> Settings:
    return settings_from_mapping(
        {
            "model": {"name": "m"},
            "experiment": {
                "ramp": [0.05, 0.2, 0.5],
                "ramp_stage_min_s": 3600,
                "min_samples_per_arm": 200,
                **experiment,
            },
        },
        env={},
    )


def _step(
    weight: float,
    *,
    since: float = NOW - 7200,
    challenger_faults: float = 0.0,
    challenger_accuracy: float = 0.7,
    units: int = 4_000,
    settings: Settings | None = None,
) -> Evaluation:
    settings = settings or _settings()
    rng = np.random.default_rng(3)
    n_t = max(int(units * weight), 2)
    period = Period(
        weight,
        _arm(rng, units - n_t, 0.7),
        _arm(rng, n_t, challenger_accuracy, challenger_faults),
        NOW - 7200,
        NOW,
    )
    summary = LogSummary(
        RoutingMode.SPLIT,
        True,
        period.champion,
        period.challenger,
        first_ts=NOW - 7200,
        periods=(period,),
        current=0,
    )
    split = Split(weight, "registry", 1, since, "tester")
    evaluation = judge(settings, AliasSnapshot("1", "2", None), "m:v1-vs-v2", summary, now=NOW)
    return ramp.step(settings, split, evaluation, summary, NOW)


def test_a_stage_with_clear_guardrails_and_enough_units_moves_on() -> None:
    ev = _step(0.05)
    assert ev.ramp is not None and ev.ramp.action == "advance"
    assert (ev.ramp.stage, ev.ramp.next_weight) == (1, 0.2)
    assert ev.decision == "inconclusive" and "the split moves to 0.2" in ev.reason


def test_a_stage_holds_until_its_time_and_its_units() -> None:
    young = _step(0.05, since=NOW - 60)
    assert young.ramp is not None and young.ramp.action == "hold"
    assert "experiment.ramp_stage_min_s" in young.reason
    few = _step(0.05, units=1_000)  # 50 challenger units at 5%
    assert few.ramp is not None and few.ramp.action == "hold"
    assert "experiment.min_samples_per_arm" in few.reason


def test_a_failed_guardrail_rejects_at_any_stage_however_few_outcomes() -> None:
    ev = _step(0.05, challenger_faults=0.3, units=1_000)
    assert ev.decision == "reject" and "error_rate" in ev.reason
    assert ev.ramp is not None and ev.ramp.stage == 1


def test_a_better_challenger_moves_on_but_only_the_last_stage_promotes() -> None:
    middle = _step(0.2, challenger_accuracy=0.9)
    assert middle.ramp is not None and middle.ramp.action == "advance"
    assert middle.decision == "inconclusive"
    last = _step(0.5, challenger_accuracy=0.9)
    assert last.ramp is not None and last.ramp.action == "decide" and last.ramp.last
    assert last.decision == "promote"


def test_stage_of_a_weight_off_the_ramp() -> None:
    stages = (0.05, 0.2, 0.5)
    assert ramp.stage_of(stages, 0.05) == (1, 0.2)
    assert ramp.stage_of(stages, 0.3) == (2, 0.5)  # set by hand between stages
    assert ramp.stage_of(stages, 0.01) == (0, 0.05)
    assert ramp.stage_of(stages, 0.5) == (3, None)
    assert ramp.stage_of(stages, 0.8) == (3, None)
