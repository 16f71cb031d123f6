"""This project's intervals against GrowthBook's ``gbstats`` (its sequential two-sided t-test).

The grid (tests/cases/gbstats.json, written by tests/gbstats_golden.py from gbstats 0.8.0) covers
50/50 and 90/10 splits, small n, proportions near 0 and 1, continuous means, and user-level ratio
metrics with gbstats' delta method (``RatioStatistic``). gbstats 0.8.0 needs numpy < 2 and
pandas < 2, which cannot sit beside this project's numpy 2: its figures are recorded from a
separate environment (see the generator's docstring), not installed as a dev dependency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fixed_sample import ArmStats

from experiments.decision import ArmEstimate
from experiments.stats import (
    Estimate,
    UnitMoments,
    difference_absolute,
    difference_relative,
)

CASES = json.loads((Path(__file__).parent / "cases" / "gbstats.json").read_text())


def _estimate(kind: str, v: list[float]) -> Estimate:
    if kind == "proportion":
        # gbstats' proportions use p(1 − p) (ddof 0); ours, as sums of 0/1 units, ddof 1. The
        # same formulas fed the same variance must agree to rounding; the convention is below.
        n, x = int(v[0]), v[1]
        p = x / n
        return ArmEstimate(n, p, p * (1 - p) / n)
    if kind == "mean":
        return ArmStats(int(v[0]), v[1], v[2])
    n, sum_x, sum_xx, sum_y, sum_yy, sum_xy = v
    return UnitMoments(int(n), sum_x, sum_y, sum_xx, sum_yy, sum_xy)


@pytest.mark.parametrize(
    "case",
    CASES["cases"],
    ids=lambda c: (
        f"{c['kind']}-{c['control'][0]}v{c['treatment'][0]}-{c['difference']}-N{c['planned']}"
    ),
)
def test_interval_matches_gbstats(case: dict[str, Any]) -> None:
    control = _estimate(case["kind"], case["control"])
    treatment = _estimate(case["kind"], case["treatment"])
    fn = difference_relative if case["difference"] == "relative" else difference_absolute
    ours = fn(control, treatment, case["planned"], CASES["alpha"])
    want = (case["estimate"], case["lower"], case["upper"])
    assert (ours.estimate, ours.lower, ours.upper) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_the_ddof_convention_moves_proportions_by_n_over_n_minus_1() -> None:
    # Our 0/1 units carry the ddof-1 variance: the half-width is √(n/(n−1)) of gbstats' at most.
    case = next(
        c
        for c in CASES["cases"]
        if c["kind"] == "proportion" and c["control"][0] == 1000 and c["difference"] == "absolute"
    )
    (n_c, x_c), (n_t, x_t) = case["control"], case["treatment"]
    ours = difference_absolute(
        ArmStats.from_counts(n_c, x_c), ArmStats.from_counts(n_t, x_t), case["planned"], 0.05
    )
    ratio = (ours.upper - ours.lower) / (case["upper"] - case["lower"])
    assert 1.0 < ratio <= (1000 / 999) ** 0.5 + 1e-12
