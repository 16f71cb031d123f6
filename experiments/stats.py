"""Statistics for judging a champion/challenger experiment: pure functions, no I/O.

The primary comparison is a difference in means with an *asymptotic confidence sequence*
(Waudby-Smith et al. 2023, "Time-uniform central limit theory and asymptotic confidence
sequences", arXiv:2103.06476, eq. 161), parameterised the way GrowthBook's stats engine does it:
the mixing parameter ρ is tuned so that the sequence is tightest near a planned total sample size
N*. The interval is valid *uniformly over time*, so `evaluate_and_promote` may run every hour
without inflating the false promotion rate; a fixed-horizon z-interval checked that often would
(see `experiments.simulate`).

Conventions: "control" is the champion, "treatment" the challenger; differences are
treatment − control; `alpha` is the total error of the two-sided sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as _sps

FloatArray = NDArray[np.float64]

__all__ = [
    "Estimate",
    "Interval",
    "SrmResult",
    "UnitMoments",
    "binary_variance_floor",
    "cs_halfwidth",
    "cs_halfwidth_one_sided",
    "cs_rho_squared",
    "difference_absolute",
    "difference_relative",
    "fixed_horizon_interval",
    "noninferiority_lower_bound",
    "quantile_cs_ranks",
    "quantile_ranks",
    "sample_ratio_test",
    "sequential_srm",
    "welch_variance",
]


class Estimate(Protocol):
    """What the interval functions need of an arm: units, a mean and the variance of that mean."""

    @property
    def n(self) -> int: ...
    @property
    def mean(self) -> float: ...
    @property
    def mean_variance(self) -> float: ...


@dataclass(frozen=True)
class UnitMoments:
    """Summable sufficient statistics of a ratio metric over randomisation units.

    Each unit u (a user under sticky assignment, else a request) contributes x_u (the metric
    summed over its rows) and y_u (its number of rows). The arm's metric is Σx/Σy, the mean per
    row; its variance is the delta method over units (cluster-robust), as GrowthBook's
    ``RatioStatistic`` and Statsig compute user-level ratio metrics:

        V = (s²_x/m_y² − 2·c_xy·m_x/m_y³ + s²_y·m_x²/m_y⁴) / n

    with m, s², c the per-unit means, variances and covariance (ddof=1). When every unit is one
    row (y ≡ 1) this is s²_x/n, the ordinary variance of a mean: one formula for both cases.
    Rows of one user are correlated (a user the model gets wrong keeps being got wrong), so a
    variance over rows would be too small and promote too often.
    """

    n: int  # units
    sum_x: float
    sum_y: float
    sum_xx: float
    sum_yy: float
    sum_xy: float

    def __post_init__(self) -> None:
        if self.n < 0 or self.sum_y < 0:
            raise ValueError(f"UnitMoments needs n >= 0 and sum_y >= 0, got {self}")

    @classmethod
    def zero(cls) -> UnitMoments:
        return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)

    @classmethod
    def from_units(cls, x: ArrayLike, y: ArrayLike) -> UnitMoments:
        xs = np.asarray(x, dtype=np.float64).ravel()
        ys = np.asarray(y, dtype=np.float64).ravel()
        if xs.shape != ys.shape:
            raise ValueError("x and y need one value per unit each")
        # Elementwise products, not np.dot: BLAS threads cost more than they save at this size.
        return cls(
            int(xs.size),
            float(xs.sum()),
            float(ys.sum()),
            float((xs * xs).sum()),
            float((ys * ys).sum()),
            float((xs * ys).sum()),
        )

    @classmethod
    def from_rows(cls, values: ArrayLike) -> UnitMoments:
        """Every row its own unit."""
        xs = np.asarray(values, dtype=np.float64).ravel()
        return cls.from_units(xs, np.ones_like(xs))

    def __add__(self, other: UnitMoments) -> UnitMoments:
        return UnitMoments(
            self.n + other.n,
            self.sum_x + other.sum_x,
            self.sum_y + other.sum_y,
            self.sum_xx + other.sum_xx,
            self.sum_yy + other.sum_yy,
            self.sum_xy + other.sum_xy,
        )

    @property
    def rows(self) -> int:
        return round(self.sum_y)

    @property
    def finite(self) -> bool:
        return all(
            math.isfinite(v)
            for v in (self.sum_x, self.sum_y, self.sum_xx, self.sum_yy, self.sum_xy)
        )

    @property
    def mean(self) -> float:
        if self.sum_y <= 0:
            raise ValueError("the mean of an arm with no rows is undefined")
        return self.sum_x / self.sum_y

    def _var(self, total: float, total_sq: float) -> float:
        return max((total_sq - total * total / self.n) / (self.n - 1), 0.0)

    @property
    def mean_variance(self) -> float:
        """Delta-method variance of Σx/Σy over units (0 below two units)."""
        if self.n < 2 or self.sum_y <= 0:
            return 0.0
        n = self.n
        m_x, m_y = self.sum_x / n, self.sum_y / n
        var_x, var_y = self._var(self.sum_x, self.sum_xx), self._var(self.sum_y, self.sum_yy)
        cov = (self.sum_xy - self.sum_x * self.sum_y / n) / (n - 1)
        v = var_x / m_y**2 - 2.0 * cov * m_x / m_y**3 + var_y * m_x**2 / m_y**4
        return max(v, 0.0) / n


def binary_variance_floor(events: float, rows: int) -> float:
    """The smallest credible variance of a 0/1 mean: p̃(1 − p̃)/rows, p̃ = (events + 1)/(rows + 2).

    An arm that got every row right (or wrong) has a sample variance of 0, and an interval of
    width 0 around its mean: a confident decision from no information about its error rate.
    One pseudo-event and one pseudo-non-event per arm (Agresti & Caffo 2000, whose adjusted Wald
    interval this is) keep the variance at what a rate that small can honestly claim. The
    cluster-robust variance of a user-level ratio is floored at this independent-rows value.
    """
    if rows <= 0:
        return math.inf
    p = (events + 1.0) / (rows + 2.0)
    return p * (1.0 - p) / rows


@dataclass(frozen=True)
class Interval:
    estimate: float
    lower: float
    upper: float


@dataclass(frozen=True)
class SrmResult:
    p_value: float
    chi2: float
    observed: dict[str, int]
    expected: dict[str, float]
    checked: bool
    mismatch: bool  # checked and p_value < threshold


def sample_ratio_test(
    counts: Mapping[str, int],
    weights: Mapping[str, float],
    threshold: float = 0.001,
    min_count: int = 8,
) -> SrmResult:
    """Chi-square goodness of fit of assignment counts against the configured weights.

    A sample-ratio mismatch means assignment or logging is broken (lost records, a crashing arm,
    bots), so no comparison of the arms can be trusted. Only arms with weight > 0 enter the test
    (df = their number − 1); the result is `checked` once each of them *expects* `min_count`
    units, the validity condition of the chi-square approximation. Expected, not observed: an
    arm that logs nothing at all (a challenger crashing before its records are written) is the
    clearest mismatch there is and must not hold the test back. Units logged to an arm whose weight
    is 0 are a mismatch by definition (p = 0). An arm in `counts` that is missing from `weights`
    is a caller error (ValueError), never silently ignored.
    """
    unknown = sorted(set(counts) - set(weights))
    if unknown:
        raise ValueError(f"counts for arms without a weight: {unknown}")
    if any(w < 0 or not math.isfinite(w) for w in weights.values()):
        raise ValueError(f"weights must be finite and >= 0, got {dict(weights)}")
    if any(c < 0 for c in counts.values()):
        raise ValueError(f"counts must be >= 0, got {dict(counts)}")
    weight_sum = sum(weights.values())
    if weight_sum <= 0:
        raise ValueError("at least one arm needs a positive weight")

    observed = {arm: int(counts.get(arm, 0)) for arm in weights}
    total = sum(observed.values())
    expected = {arm: total * w / weight_sum for arm, w in weights.items()}
    active = [arm for arm, w in weights.items() if w > 0]
    stray = sum(observed[arm] for arm, w in weights.items() if w == 0)

    if stray > 0:
        chi2, p_value = math.inf, 0.0
    elif len(active) < 2 or total == 0:
        chi2, p_value = 0.0, 1.0
    else:
        obs = np.array([observed[a] for a in active], dtype=np.float64)
        exp = np.array([expected[a] for a in active], dtype=np.float64)
        chi2 = float(np.sum((obs - exp) ** 2 / exp))
        p_value = float(_sps.chi2.sf(chi2, df=len(active) - 1))

    checked = stray > 0 or (total > 0 and all(expected[a] >= min_count for a in active))
    return SrmResult(
        p_value=p_value,
        chi2=chi2,
        observed=observed,
        expected=expected,
        checked=checked,
        mismatch=checked and p_value < threshold,
    )


def welch_variance(a: Estimate, b: Estimate) -> float:
    """Variance of mean_b − mean_a: s²_A/n_A + s²_B/n_B, never pooled.

    Pooling assumes equal variances; at a 90/10 split with unequal variances it mis-states the
    error of the small arm, in either direction.
    """
    _require_two_units(a, b)
    return a.mean_variance + b.mean_variance


def cs_rho_squared(planned_samples: int, alpha: float) -> float:
    """ρ² = (−2 ln α + ln(1 − 2 ln α)) / N*  (Waudby-Smith et al. 2023, eq. 161).

    The choice of ρ that makes the two-sided sequence tightest at N* total units. N* only tunes
    where the width is smallest; the sequence stays valid before and after N*.
    """
    _check_alpha(alpha)
    if planned_samples <= 0:
        raise ValueError(f"planned_samples must be > 0, got {planned_samples}")
    log_alpha = math.log(alpha)
    return (-2.0 * log_alpha + math.log(1.0 - 2.0 * log_alpha)) / planned_samples


@overload
def cs_halfwidth(
    variance_of_estimate: float, n_total: int, planned_samples: int, alpha: float
) -> float: ...
@overload
def cs_halfwidth(
    variance_of_estimate: FloatArray,
    n_total: int | NDArray[Any],
    planned_samples: int,
    alpha: float,
) -> FloatArray: ...
def cs_halfwidth(
    variance_of_estimate: float | FloatArray,
    n_total: int | NDArray[Any],
    planned_samples: int,
    alpha: float,
) -> float | FloatArray:
    """Half-width of the two-sided asymptotic confidence sequence at n_total units.

    √V · √( (nρ²+1)/(nρ²) · (2 ln(1/α) + ln(nρ²+1)) ), with V the variance of the estimate
    (e.g. `welch_variance`) and n the total units over both arms, as GrowthBook computes it
    (its `s2 = V·n`, so the n's cancel into this form). Compared with the fixed-horizon z
    half-width √V·z, the factor is ≈ 3.0 instead of 1.96 at n = N*, α = 0.05: the price of
    being allowed to look any number of times. Accepts arrays (the simulation uses them).
    """
    rho2 = cs_rho_squared(planned_samples, alpha)  # checks alpha first

    def factor(nr2: FloatArray) -> FloatArray:
        return (nr2 + 1.0) / nr2 * (2.0 * math.log(1.0 / alpha) + np.log(nr2 + 1.0))

    return _cs_width(variance_of_estimate, n_total, rho2, factor)


@overload
def cs_halfwidth_one_sided(
    variance_of_estimate: float, n_total: int, planned_samples: int, alpha: float
) -> float: ...
@overload
def cs_halfwidth_one_sided(
    variance_of_estimate: FloatArray,
    n_total: int | NDArray[Any],
    planned_samples: int,
    alpha: float,
) -> FloatArray: ...
def cs_halfwidth_one_sided(
    variance_of_estimate: float | FloatArray,
    n_total: int | NDArray[Any],
    planned_samples: int,
    alpha: float,
) -> float | FloatArray:
    """Half-width of a one-sided confidence sequence with error α on its one side.

    GrowthBook's one-sided form: ρ is tuned with 2α in place of α, and the width is
    √( V · 2(nρ²+1)/(nρ²) · ln(1 + √(nρ²+1)/(2α)) ). Narrower than the two-sided half-width at
    the same α (which spends α over two sides), wider than the two-sided one at 2α.
    """
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"one-sided alpha must be in (0, 0.5), got {alpha}")

    rho2 = cs_rho_squared(planned_samples, 2.0 * alpha)

    def factor(nr2: FloatArray) -> FloatArray:
        return 2.0 * (nr2 + 1.0) / nr2 * np.log1p(np.sqrt(nr2 + 1.0) / (2.0 * alpha))

    return _cs_width(variance_of_estimate, n_total, rho2, factor)


def _cs_width(
    variance_of_estimate: float | FloatArray,
    n_total: int | NDArray[Any],
    rho2: float,
    factor: Callable[[FloatArray], FloatArray],
) -> float | FloatArray:
    """√(V · factor(nρ²)), a float for scalar arguments, else an array (the simulation's)."""
    n = np.asarray(n_total, dtype=np.float64)
    if np.any(n <= 0):
        raise ValueError("n_total must be > 0")
    width = np.sqrt(np.asarray(variance_of_estimate, dtype=np.float64) * factor(n * rho2))
    if isinstance(variance_of_estimate, np.ndarray) or isinstance(n_total, np.ndarray):
        return np.asarray(width, dtype=np.float64)
    return float(width)


def difference_absolute(
    control: Estimate, treatment: Estimate, planned_samples: int, alpha: float
) -> Interval:
    """mean_t − mean_c with its two-sided (1−α) confidence sequence (Welch variance)."""
    estimate, variance = _absolute_moments(control, treatment)
    hw = cs_halfwidth(variance, control.n + treatment.n, planned_samples, alpha)
    return Interval(estimate, estimate - hw, estimate + hw)


def difference_relative(
    control: Estimate, treatment: Estimate, planned_samples: int, alpha: float
) -> Interval:
    """mean_t/mean_c − 1 with its two-sided (1−α) confidence sequence.

    Delta-method variance of the ratio of two independent means (GrowthBook's form):
    V = s²_t/(n_t·m_c²) + s²_c·m_t²/(n_c·m_c⁴). A zero control mean makes the ratio undefined
    (ValueError). With a negative control mean the sign of "better" flips; use the absolute
    difference for metrics that can be negative.
    """
    estimate, variance = _relative_moments(control, treatment)
    hw = cs_halfwidth(variance, control.n + treatment.n, planned_samples, alpha)
    return Interval(estimate, estimate - hw, estimate + hw)


def noninferiority_lower_bound(
    control: Estimate,
    treatment: Estimate,
    planned_samples: int,
    alpha: float,
    relative: bool = False,
    *,
    higher_is_better: bool = True,
) -> float:
    """Always-valid lower confidence bound on the challenger's improvement, one-sided at α.

    Improvement is treatment − control (or mean_t/mean_c − 1 with `relative`), negated when
    `higher_is_better` is False (losses, errors), so that the caller's check is always
    "bound > −margin". Non-inferiority is a one-sided question, so the whole α goes to the
    one side (the one-sided sequence of `cs_halfwidth_one_sided`), not α/2.
    """
    if relative:
        estimate, variance = _relative_moments(control, treatment)
    else:
        estimate, variance = _absolute_moments(control, treatment)
    hw = cs_halfwidth_one_sided(variance, control.n + treatment.n, planned_samples, alpha)
    improvement = estimate if higher_is_better else -estimate
    return improvement - hw


def fixed_horizon_interval(control: Estimate, treatment: Estimate, alpha: float) -> Interval:
    """Naive two-sided z-interval of mean_t − mean_c, valid for ONE look at a fixed n.

    The contrast in `experiments.simulate` (the power of one look at N*): checked repeatedly it
    promotes A/A experiments far more often than α.
    """
    _check_alpha(alpha)
    estimate, variance = _absolute_moments(control, treatment)
    hw = float(_sps.norm.ppf(1.0 - alpha / 2.0)) * math.sqrt(variance)
    return Interval(estimate, estimate - hw, estimate + hw)


def sequential_srm(
    counts: Mapping[str, int],
    weights: Mapping[str, float],
    threshold: float = 0.001,
    concentration: float = 1000.0,
) -> SrmResult:
    """Anytime-valid sample-ratio test (Lindon & Malek 2022, "Anytime-valid inference for
    multinomial count data", NeurIPS): a Dirichlet-multinomial mixture martingale.

    Under the configured weights p₀, M = B(α + x)/B(α) / Π p₀ᵢ^xᵢ (α = concentration·p₀) is a
    non-negative martingale with mean 1, so P(ever M ≥ 1/threshold) ≤ threshold (Ville): the
    check may run after every batch of traffic without inflating its false alarms, unlike a
    chi-square p-value re-read every hour. ``p_value`` is min(1, 1/M). The concentration centres
    the prior on the configured split (about 1/√1000 ≈ 3% of spread), where SRM bugs live.
    ``chi2`` carries the Pearson statistic for the report.
    """
    if any(c < 0 for c in counts.values()) or set(counts) - set(weights):
        return sample_ratio_test(counts, weights, threshold)  # raises, naming the problem
    active = [a for a, w in weights.items() if w > 0]
    observed = {arm: int(counts.get(arm, 0)) for arm in weights}
    total = sum(observed.values())
    if len(active) < 2 or any(observed[a] for a, w in weights.items() if w <= 0):
        return sample_ratio_test(counts, weights, threshold)  # degenerate: certain or no test
    total_w = sum(weights[a] for a in active)
    p0 = [weights[a] / total_w for a in active]
    x = [float(observed[a]) for a in active]
    expected = {arm: total * w / total_w for arm, w in weights.items()}
    prior = [concentration * p for p in p0]
    log_m = (
        math.lgamma(sum(prior))
        - math.lgamma(sum(prior) + total)
        + math.fsum(math.lgamma(a + k) - math.lgamma(a) for a, k in zip(prior, x, strict=True))
        - math.fsum(k * math.log(p) for k, p in zip(x, p0, strict=True))
    )
    p_value = 1.0 if log_m <= 0 else math.exp(-log_m)
    chi2 = math.fsum((observed[a] - expected[a]) ** 2 / expected[a] for a in active if total)
    return SrmResult(
        p_value=p_value,
        chi2=chi2,
        observed=observed,
        expected=expected,
        checked=total > 0,
        mismatch=total > 0 and p_value < threshold,
    )


def quantile_cs_ranks(
    n: int, q: float, planned_samples: int, alpha: float, *, one_sided: bool
) -> tuple[int, int]:
    """1-based ranks (l, u) of order statistics that bound the q-quantile at every n at once.

    For the true quantile ξ, the indicators 1{xᵢ ≤ ξ} are Bernoulli(q) with the known variance
    q(1 − q), so the confidence sequence of a mean (``cs_halfwidth``, or its one-sided form at
    α per side) bounds their running share: |B_n/n − q| ≤ h_n for all n with probability 1 − α.
    Then x_(l) ≤ ξ ≤ x_(u) with l = ⌈n(q − h_n)⌉ and u = ⌊n(q + h_n)⌋ + 1 (Howard & Ramdas
    2022, "Sequential estimation of quantiles", the same construction with this boundary).
    l < 1 means no lower bound yet, u > n no upper bound.
    """
    if n < 1:
        return 0, n + 1
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if one_sided:
        critical = cs_halfwidth_one_sided(1.0, n, planned_samples, alpha)
    else:
        critical = cs_halfwidth(1.0, n, planned_samples, alpha)
    return quantile_ranks(n, q, critical)


def quantile_ranks(n: int, q: float, critical: float) -> tuple[int, int]:
    """1-based ranks (l, u) of the order statistics that bound the q-quantile when the share of
    values below it is bounded by ``critical`` standard errors: |B_n/n − q| ≤ critical·√(q(1−q)/n).

    The construction of :func:`quantile_cs_ranks` for any boundary (a confidence sequence's, or a
    group-sequential look's). l < 1: no lower bound; u > n: no upper bound.
    """
    if n < 1:
        return 0, n + 1
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if math.isinf(critical):
        return 0, n + 1
    h = critical * math.sqrt(q * (1.0 - q) / n)
    return math.ceil(n * (q - h)), math.floor(n * (q + h)) + 1


def _absolute_moments(control: Estimate, treatment: Estimate) -> tuple[float, float]:
    variance = welch_variance(control, treatment)
    return treatment.mean - control.mean, variance


def _relative_moments(control: Estimate, treatment: Estimate) -> tuple[float, float]:
    _require_two_units(control, treatment)
    m_c, m_t = control.mean, treatment.mean
    if m_c == 0:
        raise ValueError("relative difference is undefined: the control (champion) mean is 0")
    variance = treatment.mean_variance / m_c**2 + control.mean_variance * m_t**2 / m_c**4
    return m_t / m_c - 1.0, variance


def _require_two_units(a: Estimate, b: Estimate) -> None:
    # With n < 2 there is no variance estimate; a zero-width interval would look decisive.
    if a.n < 2 or b.n < 2:
        raise ValueError(f"each arm needs at least 2 units to estimate a variance (n={a.n}, {b.n})")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
