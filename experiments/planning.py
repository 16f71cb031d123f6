"""The planner's arithmetic: how many units an experiment needs to find an effect, per method.

The three methods the judge can use, compared on one scale. With a share w of units on the
challenger and per-unit variances σ²_c, σ²_t (of the metric's per-unit influence, adjusted or not),
the difference measured on N units in all has variance v/N, v = σ²_c/(1 − w) + σ²_t/w, so its z
statistic has drift θ = (effect − margin)·√(N/v) at N. A method needs the θ at which it finds the
effect with the wanted power; N* = v·θ²/(effect − margin)².

* ``fixed``: one test at N*: θ = z_{1−α/sides} + z_{power} (power counts the upper side only).
* ``group_sequential``: boundaries from :mod:`experiments.sequential` at the planned looks; θ by
  the same recursion, with drift. θ²/θ²_fixed is the design's inflation factor (~1.02–1.10 for
  O'Brien–Fleming-type spending).
* ``confidence_sequence``: the always-valid sequence of :mod:`experiments.stats`, read at the same
  looks: its half-width is a z boundary that depends on the information fraction only (nρ² = t·ρ²N*
  with ρ tuned at N*), so the same recursion gives its power exactly, no simulation needed. Many
  looks approximate continuous monitoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import optimize as _opt
from scipy import stats as _sps

from experiments.sequential import Spending, crossing_probabilities, group_sequential_boundaries
from experiments.stats import UnitMoments, cs_halfwidth, cs_halfwidth_one_sided

Method = Literal["fixed", "group_sequential", "confidence_sequence"]

__all__ = ["Method", "Plan", "cs_boundaries", "plan", "power_at", "unit_variance"]

#: The planned sample size used to express the confidence sequence on the fraction scale; any
#: value gives the same boundaries (only n/N* matters).
_SCALE = 1_000_000


@dataclass(frozen=True)
class Plan:
    method: Method
    units: float  # N* over both arms
    champion_units: float
    challenger_units: float
    drift: float  # θ: the effect over its standard error at N*
    inflation: float  # N* over the fixed-horizon N*


def unit_variance(moments: UnitMoments) -> float:
    """Per-unit variance of an arm's ratio metric (the delta method's, × units): what
    :func:`plan` needs from data observed so far."""
    return moments.n * moments.mean_variance


def cs_boundaries(fractions: Sequence[float], alpha: float, sides: int = 2) -> tuple[float, ...]:
    """The confidence sequence's half-width, in standard errors, at each information fraction."""
    n = np.asarray(fractions, dtype=np.float64) * _SCALE
    if sides == 2:
        z = cs_halfwidth(np.ones_like(n), n, _SCALE, alpha)
    else:
        z = cs_halfwidth_one_sided(np.ones_like(n), n, _SCALE, alpha)
    return tuple(float(v) for v in z)


def power_at(
    drift: float,
    method: Method,
    alpha: float,
    *,
    sides: int = 2,
    fractions: Sequence[float] = (1.0,),
    spending: Spending | None = None,
) -> float:
    """Probability of finding the effect (crossing above) by the last look, at drift θ."""
    if method == "fixed":
        return float(_sps.norm.sf(_sps.norm.isf(alpha / sides) - drift))
    z = _boundaries(method, fractions, alpha, sides, spending)
    return crossing_probabilities(fractions, z, drift=drift, sides=sides).total_upper


def _boundaries(
    method: Method, fractions: Sequence[float], alpha: float, sides: int, spending: Spending | None
) -> tuple[float, ...]:
    if method == "group_sequential":
        return group_sequential_boundaries(fractions, alpha, sides=sides, spending=spending).z
    return cs_boundaries(fractions, alpha, sides)


def plan(
    effect: float,
    champion_variance: float,
    challenger_variance: float,
    *,
    challenger_share: float,
    alpha: float,
    power: float = 0.8,
    method: Method = "group_sequential",
    sides: int = 2,
    looks: int | Sequence[float] = 10,
    spending: Spending | None = None,
    margin: float = 0.0,
) -> Plan:
    """Units needed to find ``effect`` (beyond ``margin``) with ``power``; ``looks`` is a number
    of equally spaced looks up to N* or their fractions."""
    if not 0.0 < challenger_share < 1.0:
        raise ValueError(f"challenger_share must be in (0, 1), got {challenger_share}")
    if not 0.0 < power < 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    delta = effect - margin
    if delta <= 0 or champion_variance < 0 or challenger_variance < 0:
        raise ValueError(
            f"need effect > margin and variances >= 0, got {effect}, {margin}, "
            f"{champion_variance}, {challenger_variance}"
        )
    fractions = [k / looks for k in range(1, looks + 1)] if isinstance(looks, int) else list(looks)
    fixed = float(_sps.norm.isf(alpha / sides) + _sps.norm.isf(1.0 - power))
    if method == "fixed":
        drift = fixed
    else:
        z = _boundaries(method, fractions, alpha, sides, spending)  # under the null: once

        def shortfall(theta: float) -> float:
            crossings = crossing_probabilities(fractions, z, drift=theta, sides=sides)
            return crossings.total_upper - power

        high = 2.0 * fixed
        while shortfall(high) < 0.0:
            high *= 2.0
        drift = float(_opt.brentq(shortfall, fixed * 0.5, high, xtol=1e-7))
    v = champion_variance / (1.0 - challenger_share) + challenger_variance / challenger_share
    units = v * drift * drift / (delta * delta)
    return Plan(
        method=method,
        units=units,
        champion_units=units * (1.0 - challenger_share),
        challenger_units=units * challenger_share,
        drift=drift,
        inflation=(drift / fixed) ** 2,
    )
