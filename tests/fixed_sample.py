"""Fixed-sample statistics the evaluator does not use, kept as references for the tests.

``ArmStats`` is the plainest :class:`experiments.stats.Estimate` (count, sum, sum of squares of
independent rows), the form GrowthBook's published examples and ``gbstats`` grids are given in.
The two order-statistic quantile intervals are fixed-horizon, distribution-free intervals that
the tests check as such; the evaluator bounds latency quantiles with confidence sequences
(:func:`experiments.stats.quantile_cs_ranks`) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as _sps

from experiments.stats import Interval


@dataclass(frozen=True)
class ArmStats:
    """Summable sufficient statistics of one arm: count, sum and sum of squares.

    Summable so that per-batch or per-replica aggregates combine with `+` without revisiting
    rows. The sum-of-squares form loses precision when |mean| ≫ stddev (cancellation); the
    primary metrics here (accuracy, losses, errors) are O(1), where it is exact enough.
    """

    n: int
    total: float
    total_sq: float

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"ArmStats.n must be >= 0, got {self.n}")
        if self.total_sq < 0:
            raise ValueError(f"ArmStats.total_sq must be >= 0, got {self.total_sq}")

    @property
    def mean(self) -> float:
        if self.n == 0:
            raise ValueError("the mean of an arm with no units is undefined")
        return self.total / self.n

    @property
    def variance(self) -> float:
        """Sample variance (ddof=1); 0 when n < 2, clipped at 0 against rounding."""
        if self.n < 2:
            return 0.0
        return max((self.total_sq - self.total * self.total / self.n) / (self.n - 1), 0.0)

    @property
    def mean_variance(self) -> float:
        """Variance of the mean: s²/n (0 below two units)."""
        return self.variance / self.n if self.n >= 2 else 0.0

    def __add__(self, other: ArmStats) -> ArmStats:
        return ArmStats(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @classmethod
    def from_values(cls, values: ArrayLike) -> ArmStats:
        arr = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(arr)):
            raise ValueError("ArmStats.from_values: values must be finite (no NaN or inf)")
        return cls(int(arr.size), float(arr.sum()), float(np.dot(arr, arr)))

    @classmethod
    def from_counts(cls, n: int, successes: int) -> ArmStats:
        """A 0/1 metric (accuracy, conversion): sum and sum of squares are both `successes`."""
        if not 0 <= successes <= n:
            raise ValueError(f"successes must be in [0, n={n}], got {successes}")
        return cls(n, float(successes), float(successes))


def quantile_interval(values: ArrayLike, q: float, alpha: float) -> Interval:
    """Distribution-free (1−α) interval for the q-quantile from order statistics.

    With B = #{x_i ≤ ξ_q} ~ Binomial(n, q), the interval [x_(l), x_(u)] (1-based order
    statistics) covers ξ_q with probability F(u−1) − F(l−1) for continuous data. l is the
    largest index with F(l−1) ≤ α/2 and u the smallest with F(u−1) ≥ 1 − α/2, so each side
    errs at most α/2. No normality: latency distributions are skewed and heavy-tailed. When
    n is too small for a side (l < 1 or u > n) that side is −inf/+inf rather than a bound that
    would not hold. The estimate is the sample quantile (linear interpolation).

    This is a fixed-horizon interval: checked repeatedly, its error grows with every look.
    """
    _check_alpha(alpha)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    arr = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = int(arr.size)
    if n == 0:
        raise ValueError("quantile_interval needs at least one value")
    if not np.all(np.isfinite(arr)):
        raise ValueError("quantile_interval: values must be finite")
    dist = _sps.binom(n, q)
    k_lo = int(dist.ppf(alpha / 2.0))  # smallest k with F(k) >= α/2
    if dist.cdf(k_lo) > alpha / 2.0:
        k_lo -= 1  # largest k with F(k) <= α/2 (may be -1: no lower bound)
    lower_index = k_lo + 1  # l, 1-based
    upper_index = int(dist.ppf(1.0 - alpha / 2.0)) + 1  # u, 1-based
    lower = float(arr[lower_index - 1]) if lower_index >= 1 else -math.inf
    upper = float(arr[upper_index - 1]) if upper_index <= n else math.inf
    return Interval(float(np.quantile(arr, q)), lower, upper)


def quantile_ratio_interval(
    control_values: ArrayLike, treatment_values: ArrayLike, q: float, alpha: float
) -> Interval:
    """Relative difference of q-quantiles, ξ_t/ξ_c − 1, with a (1−α) interval.

    Bonferroni: each arm's quantile gets a distribution-free (1 − α/2) interval
    (`quantile_interval`); when both cover, [L_t/U_c − 1, U_t/L_c − 1] covers the ratio, so the
    joint coverage is ≥ 1 − α with no assumption on the shape of either distribution or on
    independence between them. Conservative (wider than a bootstrap), but exact in the worst
    case and cheap. Values must be positive (latencies): a ratio of quantiles needs ξ_c > 0,
    and positivity lets an undeterminable lower bound fall back to 0 instead of −inf.
    """
    _check_alpha(alpha)
    control = np.asarray(control_values, dtype=np.float64).ravel()
    treatment = np.asarray(treatment_values, dtype=np.float64).ravel()
    if control.size == 0 or treatment.size == 0:
        raise ValueError("quantile_ratio_interval needs values in both arms")
    if np.any(control <= 0) or np.any(treatment <= 0):
        raise ValueError("quantile_ratio_interval needs strictly positive values in both arms")
    ci_c = quantile_interval(control, q, alpha / 2.0)
    ci_t = quantile_interval(treatment, q, alpha / 2.0)
    # Values are positive, so a missing lower bound is 0 at worst.
    lower_c, lower_t = max(ci_c.lower, 0.0), max(ci_t.lower, 0.0)
    lower = lower_t / ci_c.upper - 1.0  # inf upper -> -1.0
    upper = ci_t.upper / lower_c - 1.0 if lower_c > 0 else math.inf
    return Interval(ci_t.estimate / ci_c.estimate - 1.0, lower, upper)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
