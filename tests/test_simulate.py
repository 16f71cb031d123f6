"""The decision rule under realistic traffic, by simulation through the CLI's judging code.

A smaller, seeded version of ``make simulate``: every A/A scenario must promote and reject at most
α of the time (plus three Monte-Carlo standard errors), and a real +6-point improvement must be
found, so the rule is neither too eager nor inert. The per-look summaries are built the way the
SQL aggregation builds them (checked against it below).
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from synthlog import summary_of_rows

from experiments import simulate
from experiments.stats import UnitMoments

ALPHA = 0.05
EXPERIMENTS = 40
LOOKS = 6
ROWS = 5_000  # also the planned N*: the last look is the final analysis
AA = [
    simulate.with_rows(s, ROWS)
    for s in simulate.AA_SCENARIOS
    if s.rows == simulate.PLANNED and s.looks is None
]


def _bound(rate: float, n: int) -> float:
    return rate + 3 * math.sqrt(rate * (1 - rate) / n)


def test_aa_scenarios_decide_at_most_alpha() -> None:
    # Each scenario within α plus three Monte-Carlo standard errors of its 40 experiments, and
    # all of them together within α plus three of their pooled standard error.
    decided = 0
    for i, scenario in enumerate(AA):
        rates = simulate.run(scenario, EXPERIMENTS, LOOKS, seed=7 + i, alpha=ALPHA, planned=ROWS)
        assert rates.promote <= _bound(ALPHA, EXPERIMENTS), rates
        assert rates.reject <= _bound(ALPHA, EXPERIMENTS), rates
        assert rates.promote + rates.reject <= _bound(ALPHA, EXPERIMENTS), rates
        decided += round((rates.promote + rates.reject) * EXPERIMENTS)
    total = EXPERIMENTS * len(AA)
    assert decided / total <= _bound(ALPHA, total), (decided, total)


def test_a_real_improvement_is_found() -> None:
    # +6 points at 10,000 rows: at 5,000 the 10% challenger arm holds about the 500 rows that
    # min_samples_per_arm asks for, so half the experiments could not decide at any look.
    rows = 2 * ROWS
    scenario = simulate.with_rows(simulate.power_scenarios()[-1], rows)
    rates = simulate.run(scenario, 40, LOOKS, seed=8, alpha=ALPHA, planned=rows)
    assert rates.promote > 0.5, rates
    assert rates.reject == 0.0, rates


def test_the_adjustment_is_unbiased_and_removes_variance() -> None:
    # A/A: the cross-fitted adjusted difference averages 0 (its spread at 5,000 rows is about
    # 0.02, so the mean of 60 is within ±0.008 with 3 standard errors), with the covariate on
    # in every experiment and about 14% of the variance removed.
    scenario = simulate.with_rows(simulate.AA_SCENARIOS[0], ROWS)
    rates = simulate.run(scenario, 60, 2, seed=9, alpha=ALPHA, planned=ROWS)
    assert rates.adjusted_estimate is not None
    assert abs(rates.adjusted_estimate) < 0.008, rates
    assert rates.adjusted_share == 1.0
    assert rates.variance_reduction is not None and 0.08 < rates.variance_reduction < 0.2


def test_inputs_shaped_by_earlier_answers_turn_the_adjustment_off() -> None:
    # Challenger users' later inputs are easier: a real (intent-to-treat) effect that the
    # covariate also carries. Adjusting would remove it; the balance check sees the covariate
    # differ between arms and keeps the raw estimate instead.
    scenario = replace(simulate.SHAPED, users=3_000, rows=9_000, shaped=0.05)
    rates = simulate.run(scenario, 20, 2, seed=10, alpha=ALPHA, planned=9_000)
    assert rates.true_effect > 0.02
    assert rates.adjusted_estimate is not None
    assert rates.adjusted_estimate < rates.true_effect / 2 < rates.raw_estimate
    assert rates.adjusted_share <= 0.2, rates


def test_the_planners_n_star_gives_the_planned_power() -> None:
    # The planner, on a pilot log, plans N* for +4 points with 80% power; experiments of that
    # size promote 80% of the time (30 experiments: ±0.2 at about three standard errors).
    rates = simulate.planner_check(0.04, 30, LOOKS, seed=11, alpha=ALPHA)
    assert abs(rates.promote - 0.8) < 0.2, rates
    assert rates.extra["planned"] < simulate.PLANNED


def test_the_simulated_summary_is_what_sql_returns(tmp_path: Path) -> None:
    # One simulated sticky-user experiment written as a log and read back by the SQL aggregation.
    scenario = simulate.with_rows(simulate.AA_SCENARIOS[1], 3_000)
    e = simulate.draw(scenario, np.random.default_rng(3))
    t = float(simulate.WINDOW_S + simulate.DURATION_S * 0.6)
    want = simulate.summary_at(e, t, scenario, None)
    preds, outs = [], []
    for i in range(int(np.searchsorted(e.ts, t, side="right"))):
        served_right = e.value[i] == 1.0
        preds.append(
            {
                "request_id": f"r{i}",
                "row_index": 0,
                "arm": "challenger" if e.challenger[i] else "champion",
                "experiment_id": "x",
                "model_name": "sim",
                "model_version": "1",
                "ts": float(e.ts[i]),
                "latency_s": 0.01,
                "status": "fallback" if e.fault[i] else "ok",
                "reason": "timeout" if e.fault[i] else None,
                "routing_key_hash": f"u{e.unit[i]}",
                "score": None,
                "predicted_class": "1",
                "output": None,
                # The champion's score of the input: its confidence (max(p, 1 - p) = p here).
                "champion_score": float(e.covariate[i]),
            }
        )
        outs.append(
            {
                "request_id": f"r{i}",
                "row_index": 0,
                "outcome": "1" if served_right else "0",
                "outcome_value": 1.0 if served_right else 0.0,
                "ts": float(e.arrived[i]),
            }
        )
    got = summary_of_rows(
        tmp_path / "log.db",
        preds,
        outs,
        cutoff=t - simulate.WINDOW_S,
        window_s=simulate.WINDOW_S,
        default_weight=0.1,
    )

    def close(a: UnitMoments, b: UnitMoments) -> bool:
        return bool(
            np.allclose(
                [a.n, a.sum_x, a.sum_y, a.sum_xx, a.sum_yy, a.sum_xy],
                [b.n, b.sum_x, b.sum_y, b.sum_xx, b.sum_yy, b.sum_xy],
            )
        )

    for arm in ("champion", "challenger"):
        g, w = getattr(got, arm), getattr(want, arm)
        assert close(g.metric, w.metric) and close(g.coverage, w.coverage)
        assert close(g.faults, w.faults)
        assert (g.requests, g.units, g.fallbacks) == (w.requests, w.units, w.fallbacks)
    assert got.covariate is not None and want.covariate is not None
    for arm in ("champion", "challenger"):
        for g_fold, w_fold in zip(
            getattr(got.covariate, arm), getattr(want.covariate, arm), strict=True
        ):
            assert g_fold.n > 0
            assert np.allclose(
                [getattr(g_fold, f.name) for f in fields(g_fold)],
                [getattr(w_fold, f.name) for f in fields(w_fold)],
            ), (arm, g_fold, w_fold)


def test_main_prints_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    aa, power = len(simulate.AA_SCENARIOS), len(simulate.POWER_EFFECTS)
    only = f"0,1,{aa},{aa + power}"  # two A/A, the first power row, the shaped inputs
    simulate.main(["--experiments", "2", "--looks", "3", "--only", only, "--jobs", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == (1 + 2) + (1 + 1) + (1 + 1)  # three tables: a header each, 2 + 1 + 1 rows
    assert "sticky users" in out and "fixed-horizon" in out and "0.70 -> 0.72" in out
    assert "confidence sequence" in out and "shaped by earlier answers" in out
