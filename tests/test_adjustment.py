"""experiments.adjustment: the covariate-adjusted difference is unbiased, its variance is right,
it reduces the variance as much as the covariate explains, and an imbalanced covariate shows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments.adjustment import (
    CovariateMoments,
    adjusted_difference,
    cross_fitted_difference,
)
from experiments.stats import UnitMoments


def _arm(
    rng: np.random.Generator, n: int, slope: float, effect: float, *, users: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit x (metric sum), y (rows), c (covariate sum): the covariate is pre-treatment (the
    same distribution in both arms), the metric follows it with an arm-specific slope."""
    rows = rng.geometric(0.3, n).astype(np.float64) if users else np.ones(n)
    c = rng.gamma(2.0, 0.5, n) * rows
    x = (0.3 + effect) * rows + slope * (c - rows) + rng.normal(0.0, 0.6, n) * np.sqrt(rows)
    return x, rows, c


def _simulate(
    experiments: int, n: int, share: float, effect: float, *, users: bool = False, seed: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    est, var, raw, folded = [], [], [], []
    for _ in range(experiments):
        n_t = rng.binomial(n, share)
        champion = CovariateMoments.from_units(*_arm(rng, n - n_t, 0.8, 0.0, users=users))
        challenger = CovariateMoments.from_units(*_arm(rng, n_t, 0.5, effect, users=users))
        a = adjusted_difference(champion, challenger)
        est.append(a.estimate)
        var.append(a.variance)
        raw.append(a.raw_estimate)
        folds = [
            (
                CovariateMoments.from_units(*_arm(rng, (n - n_t) // 2, 0.8, 0.0, users=users)),
                CovariateMoments.from_units(*_arm(rng, n_t // 2, 0.5, effect, users=users)),
            )
            for _ in range(2)
        ]
        folded.append(cross_fitted_difference(folds).estimate)
    return np.array(est), np.array(var), np.array(raw), np.array(folded)


@pytest.mark.parametrize("users", [False, True])
def test_unbiased_with_correct_variance_and_coverage(users: bool) -> None:
    effect = 0.05
    est, var, raw, folded = _simulate(1500, 1000, 0.1, effect, users=users)
    se = est.std() / math.sqrt(est.size)
    assert abs(est.mean() - effect) < 4 * se
    assert abs(folded.mean() - effect) < 4 * folded.std() / math.sqrt(folded.size)
    # The variance estimate matches the spread of the estimates, and the intervals cover.
    assert var.mean() == pytest.approx(est.var(), rel=0.12)
    covered = np.abs(est - effect) <= 1.959964 * np.sqrt(var)
    assert abs(covered.mean() - 0.95) < 0.02
    # The covariate explains part of the metric: the adjusted estimate is less noisy.
    assert est.var() < 0.8 * raw.var()  # the covariate explains a quarter or more


def test_reduction_matches_the_covariates_share_of_variance() -> None:
    rng = np.random.default_rng(3)
    n = 200_000
    c = rng.normal(0.0, 1.0, n)
    x = 0.7 * c + rng.normal(0.0, 0.5, n)  # R² = 0.49 / 0.74
    ones = np.ones(n)
    half = n // 2
    a = adjusted_difference(
        CovariateMoments.from_units(x[:half], ones[:half], c[:half]),
        CovariateMoments.from_units(x[half:], ones[half:], c[half:]),
    )
    assert a.variance_reduction == pytest.approx(0.49 / 0.74, abs=0.01)
    assert a.theta == pytest.approx(0.7, abs=0.01)


def test_unrelated_covariate_changes_almost_nothing() -> None:
    rng = np.random.default_rng(4)
    x, c, ones = rng.normal(size=4000), rng.normal(size=4000), np.ones(4000)
    a = adjusted_difference(
        CovariateMoments.from_units(x[:3600], ones[:3600], c[:3600]),
        CovariateMoments.from_units(x[3600:], ones[3600:], c[3600:]),
    )
    assert abs(a.variance_reduction) < 0.01


def test_covariate_shaped_by_treatment_shows_as_imbalance() -> None:
    """If the challenger's answers change its users' inputs, the covariate differs by arm."""
    rng = np.random.default_rng(5)
    xc, yc, cc = _arm(rng, 9000, 0.8, 0.0)
    xt, yt, ct = _arm(rng, 1000, 0.5, 0.0)
    ct = ct + 0.2  # post-treatment: the challenger's users now send harder inputs
    a = adjusted_difference(
        CovariateMoments.from_units(xc, yc, cc), CovariateMoments.from_units(xt, yt, ct)
    )
    assert abs(a.balance_z) > 3.3
    fine = adjusted_difference(
        CovariateMoments.from_units(xc, yc, cc),
        CovariateMoments.from_units(*_arm(rng, 1000, 0.5, 0.0)),
    )
    assert abs(fine.balance_z) < 3.3


def test_metric_part_matches_unit_moments() -> None:
    rng = np.random.default_rng(6)
    x, y, c = _arm(rng, 500, 0.8, 0.0, users=True)
    m = CovariateMoments.from_units(x, y, c)
    assert m.metric == UnitMoments.from_units(x, y)
    var_m, _, _ = m.covariance()
    assert var_m == pytest.approx(UnitMoments.from_units(x, y).mean_variance, rel=1e-12)
    half = CovariateMoments.from_units(x[:200], y[:200], c[:200]) + CovariateMoments.from_units(
        x[200:], y[200:], c[200:]
    )
    assert half.covariance() == pytest.approx(m.covariance(), rel=1e-9)


def test_edge_cases() -> None:
    one = CovariateMoments.from_units([1.0], [1.0], [1.0])
    with pytest.raises(ValueError, match="2 units"):
        adjusted_difference(one, one)
    with pytest.raises(ValueError, match="one value per unit"):
        CovariateMoments.from_units([1.0, 2.0], [1.0], [1.0])
    with pytest.raises(ValueError, match="two folds"):
        cross_fitted_difference([(one, one)])
    # A constant covariate cannot adjust: θ = 0, the raw difference.
    x = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    ones = np.ones(5)
    a = adjusted_difference(
        CovariateMoments.from_units(x, ones, ones), CovariateMoments.from_units(1 - x, ones, ones)
    )
    assert a.theta == 0.0
    assert a.estimate == a.raw_estimate
    assert a.variance_reduction == pytest.approx(0.0)
