"""Group-sequential boundaries from an alpha-spending function: pure functions, no I/O.

An experiment judged at planned looks (each ``evaluate_and_promote`` run is one) against a planned
sample size N* needs a boundary per look such that, under the null, the probability of ever crossing
is at most α. Lan & DeMets (1983) spend α along the *information fraction* t = judged units / N*: a
spending function α(t) rises from 0 to α at t = 1, and the boundary at look k is the z such that the
probability of crossing at k, not having crossed before, is α(t_k) − α(t_{k−1}). The looks need not
be planned in advance, equally spaced or counted: each boundary is computed for the fractions
actually observed, so a run that came late or early costs nothing.

The z statistics of the looks are jointly normal with Cov(Z_i, Z_j) = √(t_i/t_j) (the canonical
joint distribution, Jennison & Turnbull 2000, ch. 3); the crossing probabilities come from the
recursive numerical integration of Armitage, McPherson & Rowe (1969) in
:mod:`experiments.scoredensity`, whose cost per look does not grow with the number of looks.

Conventions: ``alpha`` is the total error; two-sided boundaries are symmetric (±z) and both stop,
each side spending α(t; α/2) (the ``ldbounds``/``gsDesign`` convention); one-sided boundaries stop
above only and let paths continue below (no binding futility).

Looks past N*: the first look with t ≥ 1 spends all that is left (α(t) = α for t ≥ 1, computed
with that look's actual t, so an overrun is exact, not approximated); any later look has nothing
left to spend and an infinite boundary.

A look with no new information (t equal to the previous look's) has the same statistic as that look:
it spends nothing and repeats its boundary.

A missing record of earlier looks (see ``spent_through``): omitting a look that *was* taken makes
the recorded sequence look less crowded; the boundaries of the recorded looks are still valid (a
path that crossed at an unrecorded look stopped there, which only removes crossings later), but the
current look must not spend again what a missing look already spent. The conservative rule: pass
``spent_through`` = the largest fraction at which an unrecorded look may have been taken (at worst,
the current look's own fraction, which makes the current look spend nothing); the current look then
spends α(t_k) − α(max(t_{k−1}, spent_through)), and the total stays ≤ α. A lost fraction can
often be rebuilt instead: the judged units as of that run's cutoff are a count over the log.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import special as _sp
from scipy import stats as _sps

from experiments.scoredensity import GRID_STEP, ScoreDensity

FloatArray = NDArray[np.float64]
SpendingFamily = Literal["obrien_fleming", "pocock", "power"]

__all__ = [
    "Boundaries",
    "Crossings",
    "Spending",
    "boundaries_for_spending",
    "crossing_probabilities",
    "group_sequential_boundaries",
]

#: Fractions closer than this are one look (no new information).
SAME_LOOK = 1e-12
#: A spend below this is nothing: beneath the recursion's accuracy, and beneath any use.
_NOTHING = 1e-15
_Z_MAX = 40.0  # |z| beyond which a tail probability is 0 in double precision


@dataclass(frozen=True)
class Spending:
    """An alpha-spending function α(t; a): the error spent by information fraction t of a total a.

    * ``obrien_fleming`` (default): 2 − 2Φ(z_{1−a/2}/√t), Lan & DeMets' approximation of
      O'Brien–Fleming boundaries: almost nothing early, nearly the whole α at t = 1, so the final
      look is close to the fixed-horizon test (what Spotify's platform and most trials use).
    * ``pocock``: a·ln(1 + (e − 1)t), Lan & DeMets' approximation of Pocock's constant boundary:
      more power early, a stricter final look.
    * ``power``: a·t^ρ (Kim & DeMets 1987); ρ = 1 spends linearly, ρ ≈ 3 resembles
      O'Brien–Fleming, ρ ≈ 1 Pocock.
    """

    family: SpendingFamily = "obrien_fleming"
    rho: float = 3.0  # the exponent of the power family

    def __post_init__(self) -> None:
        if self.family not in ("obrien_fleming", "pocock", "power"):
            raise ValueError(f"unknown spending family {self.family!r}")
        if not (self.rho > 0 and math.isfinite(self.rho)):
            raise ValueError(f"the power family's rho must be > 0, got {self.rho}")

    def cumulative(self, a: float, t: float) -> float:
        """α(t; a), with α(t; a) = a for t ≥ 1 (the final look spends what is left)."""
        if t <= 0.0:
            return 0.0
        if t >= 1.0:
            return a
        if self.family == "obrien_fleming":
            z = float(_sps.norm.isf(a / 2.0))
            return float(2.0 * _sp.ndtr(-z / math.sqrt(t)))
        if self.family == "pocock":
            return a * math.log1p((math.e - 1.0) * t)
        return float(a * t**self.rho)


@dataclass(frozen=True)
class Boundaries:
    """The boundary of every look (z scale) and the error spent through it (both sides)."""

    fractions: tuple[float, ...]
    z: tuple[float, ...]  # inf: this look cannot reject (nothing to spend)
    spent: tuple[float, ...]  # cumulative type-I error through each look, both sides
    sides: int

    @property
    def current(self) -> float:
        """The boundary at the last look: reject when |Z| (two-sided) or Z (one-sided) ≥ it."""
        return self.z[-1]

    @property
    def nominal_alpha(self) -> float:
        """The boundary at the last look as a fixed-horizon significance level (one look's p)."""
        return float(self.sides * _sp.ndtr(-self.current))


@dataclass(frozen=True)
class Crossings:
    """Per look, the probability of stopping there: crossing above or below for the first time."""

    upper: tuple[float, ...]
    lower: tuple[float, ...]

    @property
    def total_upper(self) -> float:
        return math.fsum(self.upper)

    @property
    def total_lower(self) -> float:
        return math.fsum(self.lower)


def group_sequential_boundaries(
    fractions: Sequence[float],
    alpha: float,
    *,
    sides: int = 2,
    spending: Spending | None = None,
    spent_through: float | None = None,
    step: float = GRID_STEP,
) -> Boundaries:
    """Boundaries for the looks taken so far, at information fractions t_1 ≤ … ≤ t_k.

    ``alpha`` is the total type-I error (two-sided: split evenly, each side spending
    α(t; alpha/2)). ``spent_through`` applies the missing-record rule of the module docstring to
    the last look.
    """
    _check_alpha(alpha)
    _check_sides(sides)
    spending = spending or Spending()
    ts = _check_fractions(fractions)
    per_side = alpha / sides
    cumulative = [sides * spending.cumulative(per_side, t) for t in ts]
    if spent_through is not None:
        if not math.isfinite(spent_through) or spent_through < 0:
            raise ValueError(f"spent_through must be a fraction >= 0, got {spent_through}")
        previous = cumulative[-2] if len(ts) > 1 else 0.0
        already = sides * spending.cumulative(per_side, min(spent_through, ts[-1]))
        cumulative[-1] = max(previous, cumulative[-1] - max(already - previous, 0.0))
        if spent_through >= ts[-1]:
            cumulative[-1] = previous  # exactly: rounding must not leave a sliver to spend
    return boundaries_for_spending(ts, cumulative, sides=sides, step=step)


def boundaries_for_spending(
    fractions: Sequence[float],
    cumulative: Sequence[float],
    *,
    sides: int = 2,
    step: float = GRID_STEP,
) -> Boundaries:
    """Boundaries that spend exactly ``cumulative[k]`` (both sides together) by look k.

    The core of :func:`group_sequential_boundaries`, open to any spending (a user table, or the
    spending of another design to reproduce its boundaries).
    """
    _check_sides(sides)
    ts = _check_fractions(fractions)
    if len(cumulative) != len(ts):
        raise ValueError("one cumulative spending per look is needed")
    spent = [float(c) for c in cumulative]
    if any(not 0.0 <= c < 1.0 for c in spent) or any(b < a for a, b in itertools.pairwise(spent)):
        raise ValueError(f"cumulative spending must be non-decreasing in [0, 1), got {spent}")
    zs: list[float] = []
    state: ScoreDensity | None = None
    for k, t in enumerate(ts):
        if k and t - ts[k - 1] <= SAME_LOOK:
            # No new information: Z_k = Z_{k−1}, which did not cross; nothing more to spend.
            zs.append(zs[-1])
            spent[k] = spent[k - 1]
            continue
        target = spent[k] - (spent[k - 1] if k else 0.0)
        z = _solve_boundary(state, t, target, sides, 0.0)
        zs.append(z)
        state = _advance(state, t, z, sides, 0.0, step)
    return Boundaries(tuple(ts), tuple(zs), tuple(spent), sides)


def crossing_probabilities(
    fractions: Sequence[float],
    z: Sequence[float],
    *,
    drift: float = 0.0,
    sides: int = 2,
    step: float = GRID_STEP,
) -> Crossings:
    """Per look, the probability of a first crossing of the boundaries ``z`` under drift θ.

    θ is E[Z] at t = 1 (the effect over its standard error at N*): 0 gives the type-I error spent,
    θ > 0 the power. Any boundaries work (group-sequential, a confidence sequence's, constant).
    """
    _check_sides(sides)
    ts = _check_fractions(fractions)
    if len(z) != len(ts):
        raise ValueError("one boundary per look is needed")
    upper: list[float] = []
    lower: list[float] = []
    state: ScoreDensity | None = None
    for k, (t, c) in enumerate(zip(ts, z, strict=True)):
        if k and t - ts[k - 1] <= SAME_LOOK:
            # The same statistic as the last look: it can only cross a lower boundary than that
            # look's, which a monotone design never has; counted as no crossing.
            upper.append(0.0)
            lower.append(0.0)
            continue
        up, low = _crossing(state, t, float(c), sides, drift)
        upper.append(up)
        lower.append(low)
        state = _advance(state, t, float(c), sides, drift, step)
    return Crossings(tuple(upper), tuple(lower))


def _solve_boundary(
    state: ScoreDensity | None, t: float, target: float, sides: int, drift: float
) -> float:
    """The z at fraction t whose first-crossing probability (both sides) equals ``target``."""
    if target <= _NOTHING:
        return math.inf

    def excess(c: float) -> float:
        up, low = _crossing(state, t, c, sides, drift)
        return up + low - target

    # The first-crossing probability is at most the look's own tail, so the boundary lies at or
    # below the fixed-horizon z for the same spend; Newton's method from there (the slope is the
    # density at the boundary) takes a few steps, bisection-safe inside the bracket.
    low_end = 0.0 if sides == 2 else -_Z_MAX
    high = min(float(_sps.norm.isf(target / sides)), _Z_MAX)
    f_high = excess(high)
    if f_high >= 0.0:
        return high
    low = low_end
    c, f = high, f_high
    for _ in range(60):
        slope = -_density(state, t, c, sides, drift)
        if f < 0.0:
            high = c
        else:
            low = c
        step = f / slope if slope < 0.0 else math.inf
        candidate = c - step
        if not low < candidate < high:
            candidate = 0.5 * (low + high)
        # The probabilities are exact to ~1e-15, so a bracket of 1e-9 in z is as good as it gets.
        if abs(candidate - c) < 1e-11 or high - low < 1e-9:
            return candidate
        c, f = candidate, excess(candidate)
    return c


def _density(state: ScoreDensity | None, t: float, c: float, sides: int, drift: float) -> float:
    """−d/dc of the first-crossing probability (both sides) at boundary ±c."""
    root_t = math.sqrt(t)
    if state is None:
        shift = drift * root_t
        dens = float(_sps.norm.pdf(c - shift))
        return dens + (float(_sps.norm.pdf(-c - shift)) if sides == 2 else 0.0)
    dens = state.density_at(t, c, drift)
    if sides == 2:
        dens += state.density_at(t, -c, drift)
    return dens * root_t


def _crossing(
    state: ScoreDensity | None, t: float, c: float, sides: int, drift: float
) -> tuple[float, float]:
    """P(first crossing above, below) at fraction t with boundary ±c, from the previous look."""
    if math.isinf(c):
        return 0.0, 0.0
    if state is None:  # the first look: Z_1 ~ N(θ√t, 1)
        shift = drift * math.sqrt(t)
        up = float(_sp.ndtr(shift - c))
        low = float(_sp.ndtr(-c - shift)) if sides == 2 else 0.0
        return up, low
    return state.crossing(t, c, -c if sides == 2 else -math.inf, drift)


def _advance(
    state: ScoreDensity | None, t: float, c: float, sides: int, drift: float, step: float
) -> ScoreDensity:
    lower = -c if sides == 2 else -math.inf
    if state is None:
        return ScoreDensity.first(t, lower, c, drift, step)
    return state.advance(t, c, lower, drift, step)


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    ts = [float(t) for t in fractions]
    if not ts:
        raise ValueError("at least one look is needed")
    if any(not (t > 0 and math.isfinite(t)) for t in ts):
        raise ValueError(f"information fractions must be finite and > 0, got {ts}")
    if any(b < a for a, b in itertools.pairwise(ts)):
        raise ValueError(f"information fractions must not decrease, got {ts}")
    return ts


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _check_sides(sides: int) -> None:
    if sides not in (1, 2):
        raise ValueError(f"sides must be 1 or 2, got {sides}")
