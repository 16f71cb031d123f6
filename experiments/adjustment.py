"""Regression adjustment (CUPED; CUPAC when the covariate is a model's prediction): pure functions
of per-unit sufficient statistics.

The router holds a covariate for every request that depends only on the input: the champion's own
prediction, whichever arm served it (for a classifier, its expected loss under its own predicted
probability tracks the metric best). Random assignment makes such a covariate equally distributed
in both arms, so subtracting θ × (the arms' covariate difference) from the metric's difference
removes the part of the noise the covariate explains and leaves the expectation alone:

    Δ̂_adj = (m_t − m_c) − θ·(k_t − k_c),    E[k_t − k_c] = 0 for any fixed θ.

θ is chosen to minimise the variance of Δ̂_adj: θ* = (C_t + C_c)/(K_t + K_c) with C = Cov(m̂, k̂),
K = Var(k̂) per arm. With the covariate's variance equal in both arms this is
θ* = (1 − p)·θ_t + p·θ_c (p the challenger's share of units, θ_arm its own slope): Lin's (2013)
regression with treatment × covariate interactions, written in sufficient statistics. Unlike a
slope pooled over both arms (p·θ_t + (1 − p)·θ_c), it weights each arm's slope by the *other* arm's
share, which is what a 90/10 split needs when the challenger's metric follows the champion's
prediction differently from the champion's own (it will: they are different models).

Bias. Estimating θ on the same units adds a bias of order 1/n (θ̂ and k_t − k_c are not exactly
independent), negligible beside the standard error of order 1/√n; the variance is estimated at θ̂
(asymptotically exact, Lin 2013). Cross-fitting removes even that: :func:`cross_fitted_difference`
takes sums per fold (e.g. the unit's hash mod 2, one more GROUP BY key) and applies to each fold
the θ estimated on the others, which is independent of that fold's covariate difference, so the
estimate is exactly unbiased when units are independent.

When the covariate is not pre-treatment. If earlier answers shape later inputs of the same user
(a user who was answered badly asks differently, or asks more), the covariate of the arms' rows
differs by arm and E[k_t − k_c] ≠ 0: the adjustment then moves the estimate by θ·(that difference),
a bias. It shows, at no cost, as an imbalance of the covariate between arms: ``balance_z`` is
(k_t − k_c)/SE, about N(0, 1) when the covariate is pre-treatment. The same holds for a ratio
metric whose rows per user differ by arm (the covariate's mean is over rows).

Ratio metrics (per-unit sums over rows) use the delta method over units as
:class:`experiments.stats.UnitMoments` does: per unit x = Σ metric, y = rows, c = Σ covariate over
the same rows; m = Σx/Σy, k = Σc/Σy, and the influence of a unit is (x − m·y)/ȳ, (c − k·y)/ȳ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import ArrayLike

from experiments.stats import UnitMoments

__all__ = ["Adjusted", "CovariateMoments", "adjusted_difference", "cross_fitted_difference"]


@dataclass(frozen=True)
class CovariateMoments:
    """Summable per-unit sums of one arm: x (metric), y (rows) and c (covariate), with every
    square and cross-product, so that the evaluator reads them in SQL and never loads rows."""

    n: int
    sum_x: float
    sum_y: float
    sum_c: float
    sum_xx: float
    sum_yy: float
    sum_cc: float
    sum_xy: float
    sum_xc: float
    sum_yc: float

    def __post_init__(self) -> None:
        if self.n < 0 or self.sum_y < 0:
            raise ValueError(f"CovariateMoments needs n >= 0 and sum_y >= 0, got {self}")

    @classmethod
    def zero(cls) -> CovariateMoments:
        return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    @classmethod
    def from_units(cls, x: ArrayLike, y: ArrayLike, c: ArrayLike) -> CovariateMoments:
        xs, ys, cs = (np.asarray(v, dtype=np.float64).ravel() for v in (x, y, c))
        if not xs.shape == ys.shape == cs.shape:
            raise ValueError("x, y and c need one value per unit each")
        return cls(
            int(xs.size),
            float(xs.sum()),
            float(ys.sum()),
            float(cs.sum()),
            float((xs * xs).sum()),
            float((ys * ys).sum()),
            float((cs * cs).sum()),
            float((xs * ys).sum()),
            float((xs * cs).sum()),
            float((ys * cs).sum()),
        )

    def __add__(self, other: CovariateMoments) -> CovariateMoments:
        n = self.n + other.n
        sums = (getattr(self, f.name) + getattr(other, f.name) for f in fields(self)[1:])
        return CovariateMoments(n, *sums)

    @property
    def metric(self) -> UnitMoments:
        """The metric alone, as the unadjusted judge sees it."""
        return UnitMoments(self.n, self.sum_x, self.sum_y, self.sum_xx, self.sum_yy, self.sum_xy)

    @property
    def covariate_mean(self) -> float:
        return self.sum_c / self.sum_y

    def covariance(self) -> tuple[float, float, float]:
        """(Var m̂, Var k̂, Cov(m̂, k̂)) of the arm's two means, delta method over units (ddof 1)."""
        n = self.n
        if n < 2 or self.sum_y <= 0:
            raise ValueError(f"each arm needs at least 2 units with rows (n={n})")
        y_bar = self.sum_y / n
        m, k = self.sum_x / self.sum_y, self.sum_c / self.sum_y

        def cov(total_ab: float, total_a: float, total_b: float) -> float:
            return (total_ab - total_a * total_b / n) / (n - 1)

        s_xx = cov(self.sum_xx, self.sum_x, self.sum_x)
        s_cc = cov(self.sum_cc, self.sum_c, self.sum_c)
        s_yy = cov(self.sum_yy, self.sum_y, self.sum_y)
        s_xy = cov(self.sum_xy, self.sum_x, self.sum_y)
        s_xc = cov(self.sum_xc, self.sum_x, self.sum_c)
        s_yc = cov(self.sum_yc, self.sum_y, self.sum_c)
        scale = n * y_bar * y_bar
        var_m = max(s_xx - 2.0 * m * s_xy + m * m * s_yy, 0.0) / scale
        var_k = max(s_cc - 2.0 * k * s_yc + k * k * s_yy, 0.0) / scale
        cov_mk = (s_xc - k * s_xy - m * s_yc + m * k * s_yy) / scale
        return var_m, var_k, cov_mk


@dataclass(frozen=True)
class Adjusted:
    """The adjusted difference (challenger − champion) and what the adjustment did."""

    estimate: float
    variance: float  # of the estimate
    raw_estimate: float
    raw_variance: float
    theta: float
    balance_z: float  # (k_t − k_c)/SE: ~N(0, 1) when the covariate is pre-treatment
    champion_variance: float  # Var(m̂_c − θk̂_c): the adjusted variance of each arm's mean
    challenger_variance: float

    @property
    def variance_reduction(self) -> float:
        """1 − adjusted variance / raw variance: the share of the variance the covariate removed
        (the same share of units is saved for the same precision)."""
        return 1.0 - self.variance / self.raw_variance if self.raw_variance > 0 else 0.0


def adjusted_difference(champion: CovariateMoments, challenger: CovariateMoments) -> Adjusted:
    """Lin's interacted-regression estimator of m_challenger − m_champion, in sufficient statistics
    (the module docstring says why it is unbiased to order 1/n and how it fails)."""
    _, vk_c, c_c = champion.covariance()
    _, vk_t, c_t = challenger.covariance()
    vk = vk_c + vk_t
    theta = (c_c + c_t) / vk if vk > 0 else 0.0
    return _adjusted(champion, challenger, theta)


def cross_fitted_difference(
    folds: Sequence[tuple[CovariateMoments, CovariateMoments]],
) -> Adjusted:
    """Cross-fitting: each fold (champion, challenger) adjusted with θ from the other folds.

    The folds must split units at random independently of everything else (a hash of the unit).
    The estimate averages the folds by their units; its variance adds theirs (independent folds).
    """
    if len(folds) < 2:
        raise ValueError("cross-fitting needs at least two folds")
    total_c = sum((c for c, _ in folds), CovariateMoments.zero())
    total_t = sum((t for _, t in folds), CovariateMoments.zero())
    units = total_c.n + total_t.n
    estimate = variance = raw = raw_var = 0.0
    for i, (c, t) in enumerate(folds):
        others = [pair for j, pair in enumerate(folds) if j != i]
        rest_c = sum((oc for oc, _ in others), CovariateMoments.zero())
        rest_t = sum((ot for _, ot in others), CovariateMoments.zero())
        fold = _adjusted(c, t, adjusted_difference(rest_c, rest_t).theta)
        w = (c.n + t.n) / units
        estimate += w * fold.estimate
        variance += w * w * fold.variance
        raw += w * fold.raw_estimate
        raw_var += w * w * fold.raw_variance
    whole = adjusted_difference(total_c, total_t)
    return Adjusted(
        estimate,
        variance,
        raw,
        raw_var,
        whole.theta,
        whole.balance_z,
        whole.champion_variance,
        whole.challenger_variance,
    )


def _adjusted(champion: CovariateMoments, challenger: CovariateMoments, theta: float) -> Adjusted:
    vm_c, vk_c, c_c = champion.covariance()
    vm_t, vk_t, c_t = challenger.covariance()
    m_c, m_t = champion.sum_x / champion.sum_y, challenger.sum_x / challenger.sum_y
    k_c, k_t = champion.covariate_mean, challenger.covariate_mean
    arm_c = max(vm_c - 2.0 * theta * c_c + theta * theta * vk_c, 0.0)
    arm_t = max(vm_t - 2.0 * theta * c_t + theta * theta * vk_t, 0.0)
    vk = vk_c + vk_t
    balance = (k_t - k_c) / math.sqrt(vk) if vk > 0 else 0.0
    return Adjusted(
        estimate=(m_t - m_c) - theta * (k_t - k_c),
        variance=arm_c + arm_t,
        raw_estimate=m_t - m_c,
        raw_variance=vm_c + vm_t,
        theta=theta,
        balance_z=balance,
        champion_variance=arm_c,
        challenger_variance=arm_t,
    )
