"""The decision rule validated by simulation (DESIGN.md, Statistics, point 5).

2,000 A/A experiments × 50 interim looks at a 90/10 split: the confidence sequence must keep the
false promotion rate within α (+ 3 simulation SEs), and the naive z-interval must visibly fail
the same check, so the check itself is shown to have teeth.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import simulate
from experiments.stats import ArmStats, difference_absolute, fixed_horizon_interval

ALPHA = 0.05
N_EXPERIMENTS = 2000
LOOKS = 50
SE = math.sqrt(ALPHA * (1 - ALPHA) / N_EXPERIMENTS)


@pytest.fixture(
    scope="module",
    params=[simulate.CONFIG_PLANNED_SAMPLES, 163_000],
    ids=["config-N*", "powered-N*"],
)
def type_one(request: pytest.FixtureRequest) -> simulate.TypeOneResult:
    planned: int = request.param
    return simulate.simulate_type_one(
        n_experiments=N_EXPERIMENTS, looks=LOOKS, planned_samples=planned, alpha=ALPHA, seed=11
    )


def test_sequential_promotes_aa_experiments_at_most_alpha(
    type_one: simulate.TypeOneResult,
) -> None:
    assert type_one["n_experiments"] >= 2000 and type_one["looks"] >= 50
    assert type_one["sequential_promote_rate"] <= ALPHA + 3 * SE
    # The two-sided guarantee: promote OR reject, at any look, at most α.
    assert type_one["sequential_decision_rate"] <= ALPHA + 3 * SE
    # The one-sided non-inferiority bound spends all of α on its one side.
    assert type_one["sequential_one_sided_rate"] <= ALPHA + 3 * SE


def test_naive_interval_fails_the_same_check(type_one: simulate.TypeOneResult) -> None:
    assert type_one["naive_decision_rate"] > 0.20
    assert type_one["naive_promote_rate"] > ALPHA + 3 * SE


def test_power_at_the_designed_planned_samples() -> None:
    planned = simulate.planned_samples_for_power(0.10, 0.11, (0.9, 0.1), ALPHA, power=0.8)
    assert planned == 163_000
    result = simulate.simulate_power(n_experiments=N_EXPERIMENTS, looks=LOOKS, seed=12)
    assert result["planned_samples"] == planned
    power_se = math.sqrt(0.8 * 0.2 / N_EXPERIMENTS)
    assert result["sequential_power_at_end"] >= 0.8 - 3 * power_se
    assert result["sequential_power_any_look"] >= result["sequential_power_at_end"]


def test_simulation_is_deterministic() -> None:
    first = simulate.simulate_type_one(n_experiments=200, looks=10, seed=5)
    assert first == simulate.simulate_type_one(n_experiments=200, looks=10, seed=5)
    assert first != simulate.simulate_type_one(n_experiments=200, looks=10, seed=6)


def test_vectorised_bounds_equal_the_stats_functions() -> None:
    # The simulation re-derives per-look variances in bulk; check them against the real API.
    data = simulate._simulate(5, 4, 20_000, (0.9, 0.1), 0.10, 0.12, seed=1)
    seq_lo, seq_hi, naive_lo, naive_hi, _ = simulate._bounds(data, 20_000, ALPHA)
    for i in range(5):
        for j in range(4):
            control = ArmStats.from_counts(int(data.n_c[i, j]), int(data.x_c[i, j]))
            treatment = ArmStats.from_counts(int(data.n_t[i, j]), int(data.x_t[i, j]))
            seq = difference_absolute(control, treatment, 20_000, ALPHA)
            naive = fixed_horizon_interval(control, treatment, ALPHA)
            assert (seq_lo[i, j], seq_hi[i, j]) == pytest.approx((seq.lower, seq.upper))
            assert (naive_lo[i, j], naive_hi[i, j]) == pytest.approx((naive.lower, naive.upper))


def test_look_sizes() -> None:
    assert simulate.look_sizes(1000, 4).tolist() == [250, 500, 750, 1000]
    with pytest.raises(ValueError, match="looks"):
        simulate.look_sizes(10, 0)


def test_split_must_be_valid() -> None:
    with pytest.raises(ValueError, match="split"):
        simulate.simulate_type_one(n_experiments=10, looks=2, split=(0.5, 0.6))


def test_power_needs_a_positive_effect() -> None:
    with pytest.raises(ValueError, match="p_treatment > p_control"):
        simulate.planned_samples_for_power(0.10, 0.10, (0.9, 0.1), ALPHA)


def test_main_prints_a_markdown_table(capsys: pytest.CaptureFixture[str]) -> None:
    simulate.main(["--quick", "--experiments", "200", "--looks", "10"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | N* |")
    assert sum(row.startswith("| sequential CS") for row in rows) == 2
    assert sum(row.startswith("| naive z every look") for row in rows) == 2
    assert "163,000" in out and np.isfinite(float(rows[2].split("|")[3].split("±")[0]))
