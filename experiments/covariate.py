"""Regression adjustment with the champion's prediction as covariate (CUPAC): the covariate, its
sums as the log returns them, and the rule that turns the adjustment on or off. Pure.

The covariate. Every judged row carries the champion's score for its input (the log's
``champion_score``): on champion rows and fallback rows the answer served, on challenger rows the
champion's prediction computed after the response (``router/service.py``). It depends only on the
input, not on the arm, so it is balanced between arms while inputs are not shaped by the arm. It
enters as a function that tracks the metric (:func:`row_covariate`): the champion's own expected
accuracy, log loss or Brier score under its predicted probability (max(p, 1 − p), the binary
entropy, p(1 − p)); its prediction itself for error metrics and rewards.

The estimate. :func:`experiments.adjustment.cross_fitted_difference` over two folds of units
(the parity of the time slice of each unit's first judged prediction, a split independent of
arm and outcome): each fold is adjusted with the slope estimated on the other, so the adjustment
adds no bias when units are independent (the module docstring of :mod:`experiments.adjustment`).

Missing covariates. A challenger row whose champion scoring was skipped (under load) has none.
Its covariate is imputed with the pooled mean of the rows that have one (the same constant for
both arms); with at most ``MAX_MISSING`` of an arm's judged rows imputed the bias this could add
(the arms' missing shares differ) is negligible. More than that, and the adjustment is off, with
the reason.

When inputs are shaped by earlier answers (a user answered badly asks differently), the covariate
is no longer pre-treatment: the arms' covariate means differ, and the adjustment would remove a
real part of the effect (it estimates the effect net of the input shift). ``balance_z`` shows it;
beyond ``MAX_BALANCE_Z`` the adjustment is off, with the reason (``experiments.simulate`` runs
that case).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from experiments import stats
from experiments.adjustment import CovariateMoments, cross_fitted_difference
from router.config import MetricName

__all__ = [
    "MAX_BALANCE_Z",
    "MAX_MISSING",
    "AdjustmentResult",
    "CovariateFolds",
    "CovariateSums",
    "adjust",
    "row_covariate",
]

#: The largest share of an arm's judged rows whose covariate may be imputed.
MAX_MISSING = 0.05
#: |balance z| beyond this (two-sided p < 0.001): the covariate differs by arm; adjustment off.
MAX_BALANCE_Z = 3.29
_EPS = 1e-15


def row_covariate(metric: MetricName, champion_score: float | None) -> float | None:
    """One row's covariate from the champion's score for its input, or None (missing).

    The Python definition of what :mod:`experiments.aggregate` computes in SQL (tests hold the
    two equal).
    """
    s = champion_score
    if s is None or not math.isfinite(s):
        return None
    if metric in ("accuracy", "log_loss", "brier"):
        if not 0.0 <= s <= 1.0:
            return None
        if metric == "accuracy":
            return max(s, 1.0 - s)
        if metric == "brier":
            return s * (1.0 - s)
        p = min(max(s, _EPS), 1.0 - _EPS)
        return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))
    return s


@dataclass(frozen=True)
class CovariateSums:
    """One arm's (and fold's) per-unit sums: x metric, y judged rows, c covariate over the rows
    that have one, m judged rows without one; every square and cross-product needed to impute
    the missing ones with a constant afterwards (:meth:`imputed`)."""

    n: int = 0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_c: float = 0.0
    sum_m: float = 0.0
    sum_xx: float = 0.0
    sum_yy: float = 0.0
    sum_xy: float = 0.0
    sum_cc: float = 0.0
    sum_mm: float = 0.0
    sum_cm: float = 0.0
    sum_xc: float = 0.0
    sum_xm: float = 0.0
    sum_yc: float = 0.0
    sum_ym: float = 0.0

    def __add__(self, other: CovariateSums) -> CovariateSums:
        sums = (getattr(self, f.name) + getattr(other, f.name) for f in fields(self))
        return CovariateSums(*sums)

    @property
    def present(self) -> float:
        """Judged rows with a covariate."""
        return self.sum_y - self.sum_m

    def imputed(self, value: float) -> CovariateMoments:
        """The sums with every missing covariate set to ``value``: per unit c' = c + value·m."""
        v = value
        return CovariateMoments(
            n=self.n,
            sum_x=self.sum_x,
            sum_y=self.sum_y,
            sum_c=self.sum_c + v * self.sum_m,
            sum_xx=self.sum_xx,
            sum_yy=self.sum_yy,
            sum_cc=self.sum_cc + 2.0 * v * self.sum_cm + v * v * self.sum_mm,
            sum_xy=self.sum_xy,
            sum_xc=self.sum_xc + v * self.sum_xm,
            sum_yc=self.sum_yc + v * self.sum_ym,
        )


@dataclass(frozen=True)
class CovariateFolds:
    """Per fold (two), each arm's :class:`CovariateSums`."""

    champion: tuple[CovariateSums, CovariateSums]
    challenger: tuple[CovariateSums, CovariateSums]

    def total(self, arm: str) -> CovariateSums:
        a, b = self.champion if arm == "champion" else self.challenger
        return a + b


@dataclass(frozen=True)
class AdjustmentResult:
    """Whether the adjustment is used, why, and what it does to the difference."""

    on: bool
    reason: str
    estimate: float | None = None  # challenger − champion, adjusted (metric units)
    variance: float | None = None  # of the estimate, after the 0/1 metrics' floor
    raw_variance: float | None = None  # of the unadjusted difference, after the floor
    theta: float | None = None
    balance_z: float | None = None
    missing_champion: float | None = None  # share of judged rows whose covariate was imputed
    missing_challenger: float | None = None
    champion_unit_variance: float | None = None  # per-unit variances, adjusted (the planner's)
    challenger_unit_variance: float | None = None

    @property
    def variance_reduction(self) -> float | None:
        if self.variance is None or not self.raw_variance:
            return None
        return 1.0 - self.variance / self.raw_variance


def adjust(
    folds: CovariateFolds | None,
    champion: stats.UnitMoments,
    challenger: stats.UnitMoments,
    *,
    binary: bool,
) -> AdjustmentResult:
    """The cross-fitted adjusted difference, or why there is none (see the module docstring).

    ``champion``/``challenger`` are the unadjusted metric moments the judge would otherwise use;
    the 0/1 metrics' variance floor (``stats.binary_variance_floor``) applies to the adjusted
    variance in proportion: an arm whose raw variance is floored keeps the share of it that the
    covariate removed, never less than the floor allows.
    """
    if folds is None:
        return AdjustmentResult(False, "the log has no champion scores for this experiment")
    c_total, t_total = folds.total("champion"), folds.total("challenger")
    shares = []
    for sums in (c_total, t_total):
        shares.append(sums.sum_m / sums.sum_y if sums.sum_y > 0 else 1.0)
    miss_c, miss_t = shares
    worst = max(shares)
    if worst > MAX_MISSING:
        return AdjustmentResult(
            False,
            f"the champion's score is missing for {miss_c:.1%} of the champion's and "
            f"{miss_t:.1%} of the challenger's judged rows (more than {MAX_MISSING:.0%}: "
            "covariate scoring skipped under load, or an older router)",
            missing_champion=miss_c,
            missing_challenger=miss_t,
        )
    present = c_total.present + t_total.present
    pooled = (c_total.sum_c + t_total.sum_c) / present
    pairs = [
        (c.imputed(pooled), t.imputed(pooled))
        for c, t in zip(folds.champion, folds.challenger, strict=True)
    ]
    if any(m.n < 2 or m.sum_y <= 0 for pair in pairs for m in pair):
        return AdjustmentResult(
            False,
            "too few units in a fold of the cross-fitting (each arm needs 2 with rows in each)",
            missing_champion=miss_c,
            missing_challenger=miss_t,
        )
    fit = cross_fitted_difference(pairs)
    if abs(fit.balance_z) > MAX_BALANCE_Z:
        return AdjustmentResult(
            False,
            f"the covariate differs between arms (balance z = {fit.balance_z:+.2f}, beyond "
            f"±{MAX_BALANCE_Z}): the inputs look shaped by the arm that answered, so the "
            "covariate is not pre-treatment",
            theta=fit.theta,
            balance_z=fit.balance_z,
            missing_champion=miss_c,
            missing_challenger=miss_t,
        )
    raw = champion.mean_variance + challenger.mean_variance
    floored = raw
    if binary:
        floored = sum(
            max(m.mean_variance, stats.binary_variance_floor(m.sum_x, m.rows))
            for m in (champion, challenger)
        )
    variance = fit.variance * (floored / raw) if raw > 0 else floored
    scale_c = champion.n * (floored / raw if raw > 0 else 1.0)
    scale_t = challenger.n * (floored / raw if raw > 0 else 1.0)
    return AdjustmentResult(
        True,
        "on",
        estimate=fit.estimate,
        variance=variance,
        raw_variance=floored,
        theta=fit.theta,
        balance_z=fit.balance_z,
        missing_champion=miss_c,
        missing_challenger=miss_t,
        champion_unit_variance=fit.champion_variance * scale_c,
        challenger_unit_variance=fit.challenger_variance * scale_t,
    )
