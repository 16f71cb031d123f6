"""The ramp under simulation, smaller and seeded (``make simulate`` runs the full table): an A/A
ramp whose outcome rate drifts decides at most α of the time through the periods, where pooling
every row would not; the simulated sums are what the SQL aggregation returns for the same log."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from synthlog import summary_of_rows

from experiments import simulate_ramp as sr

ALPHA = 0.05
EXPERIMENTS = 50
BOUND = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / EXPERIMENTS)
# Stronger drift than the table's +5 points, on fewer rows: the trap still shows at this size.
DRIFTING = replace(sr.SCENARIOS[1], drift=0.15, users=6_000, rows=30_000)


def test_an_aa_ramp_with_drift_decides_at_most_alpha_where_pooling_would_not() -> None:
    rates = sr.run(DRIFTING, EXPERIMENTS, looks=21, seed=5, alpha=ALPHA)
    assert rates.reached_last > 0.9, rates  # the ramp did ramp
    assert rates.promote + rates.reject <= BOUND, rates
    # The same experiments pooled, as if the split had never changed: the challenger's rows are
    # mostly late, when outcomes are better, and it looks better than the same model.
    assert rates.pooled_excludes_zero > 2 * BOUND, rates


def test_a_better_challenger_is_promoted_through_the_ramp() -> None:
    scenario = replace(sr.SCENARIOS[2], effect=0.08, users=6_000, rows=30_000)
    rates = sr.run(scenario, 20, looks=21, seed=6, alpha=ALPHA)
    assert rates.promote > 0.5, rates
    assert rates.reject == 0.0, rates


def _weights_at(ts: np.ndarray) -> np.ndarray:
    day = sr.DAY
    return np.where(ts < 6 * day, 0.05, np.where(ts < 12 * day, 0.2, 0.5))


def test_the_simulated_ramp_summary_is_what_sql_returns(tmp_path: Path) -> None:
    scenario = replace(sr.SCENARIOS[1], users=400, rows=4_000)
    t = sr._draw(scenario, np.random.default_rng(3))
    now = 15 * sr.DAY
    logged = t.ts <= now
    t.weight[logged] = _weights_at(t.ts[logged])
    want = sr.summary_at(t, now, 0.5)
    challenger = t.bucket[t.unit] < t.weight
    right = t.draw < np.where(challenger, t.p_challenger, t.p_champion)
    preds, outs = [], []
    for i in np.flatnonzero(logged):
        preds.append(
            {
                "request_id": f"r{i}",
                "row_index": 0,
                "arm": "challenger" if challenger[i] else "champion",
                "experiment_id": "x",
                "model_name": "sim",
                "model_version": "2" if challenger[i] else "1",
                "ts": float(t.ts[i]),
                "latency_s": 0.01,
                "status": "ok",
                "reason": None,
                "routing_key_hash": f"u{t.unit[i]}",
                "score": None,
                "predicted_class": "1",
                "output": None,
                "challenger_weight": float(t.weight[i]),
            }
        )
        outs.append(
            {
                "request_id": f"r{i}",
                "row_index": 0,
                "outcome": "1" if right[i] else "0",
                "outcome_value": 1.0 if right[i] else 0.0,
                "ts": float(t.arrived[i]),
            }
        )
    got = summary_of_rows(
        tmp_path / "log.db",
        preds,
        outs,
        cutoff=now - sr.WINDOW_S,
        window_s=sr.WINDOW_S,
        default_weight=0.05,
        current_weight=0.5,
    )

    assert [p.weight for p in got.periods] == [p.weight for p in want.periods] == [0.05, 0.2, 0.5]
    assert got.current == want.current == 2
    for g, w in zip(got.periods, want.periods, strict=True):
        for arm in ("champion", "challenger"):
            ga, wa = getattr(g, arm), getattr(w, arm)
            assert (ga.requests, ga.units) == (wa.requests, wa.units)
            for field in ("metric", "coverage"):
                gm, wm = getattr(ga, field), getattr(wa, field)
                assert gm.n == wm.n
                assert (gm.sum_x, gm.sum_y, gm.sum_xx, gm.sum_yy, gm.sum_xy) == pytest.approx(
                    (wm.sum_x, wm.sum_y, wm.sum_xx, wm.sum_yy, wm.sum_xy)
                )
    assert got.champion.units == int(np.unique(t.unit[logged & ~challenger]).size)
    assert got.stratified is not None and want.stratified is not None
    for field in (
        "champion_mean",
        "challenger_mean",
        "champion_variance",
        "challenger_variance",
        "covariance",
    ):
        assert getattr(got.stratified, field) == pytest.approx(getattr(want.stratified, field))
    assert got.stratified.weights == pytest.approx(want.stratified.weights)
    assert (got.stratified.champion_units, got.stratified.challenger_units) == (
        want.stratified.champion_units,
        want.stratified.challenger_units,
    )
    # Moved users are in both arms: their rows' covariance is part of the difference's variance.
    assert got.stratified.covariance > 0
