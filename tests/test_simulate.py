"""The decision rule under realistic traffic, by simulation through the CLI's judging code.

A smaller, seeded version of ``make simulate``: every A/A scenario must promote and reject at most
α of the time (plus three Monte-Carlo standard errors), and a real +6-point improvement must be
found, so the rule is neither too eager nor inert. The per-look summaries are built the way the
SQL aggregation builds them (checked against it below).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from synthlog import insert_rows

from experiments import simulate
from experiments.aggregate import read_summary
from experiments.stats import UnitMoments

ALPHA = 0.05
EXPERIMENTS = 100
LOOKS = 10
ROWS = 10_000
BOUND = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / EXPERIMENTS)


@pytest.mark.parametrize(
    "scenario",
    [simulate.with_rows(s, ROWS) for s in simulate.AA_SCENARIOS if s.rows == simulate.PLANNED],
    ids=lambda s: s.name,
)
def test_aa_scenarios_decide_at_most_alpha(scenario: simulate.Scenario) -> None:
    rates = simulate.run(scenario, EXPERIMENTS, LOOKS, seed=7, alpha=ALPHA)
    assert rates.promote <= BOUND, rates
    assert rates.reject <= BOUND, rates
    assert rates.promote + rates.reject <= BOUND, rates


def test_a_real_improvement_is_found() -> None:
    scenario = simulate.with_rows(simulate.power_scenarios()[-1], ROWS)  # +6 points
    rates = simulate.run(scenario, 60, LOOKS, seed=8, alpha=ALPHA)
    assert rates.promote > 0.5, rates
    assert rates.reject == 0.0, rates


def test_the_simulated_summary_is_what_sql_returns(tmp_path: Path) -> None:
    # One simulated sticky-user experiment written as a log and read back by the SQL aggregation.
    scenario = simulate.with_rows(simulate.AA_SCENARIOS[1], 3_000)
    e = simulate._draw(scenario, np.random.default_rng(3))
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
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'log.db'}")
    insert_rows(engine, preds, outs)
    with engine.connect() as conn:
        got = read_summary(
            conn,
            "x",
            metric="accuracy",
            cutoff=t - simulate.WINDOW_S,
            window_s=simulate.WINDOW_S,
            cap_quantile=None,
        )
    engine.dispose()

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


def test_main_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    power = len(simulate.AA_SCENARIOS)  # the first power scenario's number
    simulate.main(["--experiments", "2", "--looks", "3", "--only", f"0,1,{power}"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 + 1 + 1  # two tables: a header each, 2 + 1 scenario rows
    assert "sticky users" in out and "fixed-horizon" in out and "0.70 -> 0.72" in out
