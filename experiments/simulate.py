"""Validate the decision rule by simulation (DESIGN.md, Statistics, point 5).

An A/A experiment (both arms convert at p) checked at many interim looks must promote the
challenger in at most α of runs with the confidence sequence; the naive fixed-horizon z-interval
checked at the same looks promotes far more often. A real 0.10 → 0.11 change at a 90/10 split
must be found with the stated power at the planned N*.

The per-look statistics are drawn directly, not per unit: between two looks the challenger gets
Binomial(Δn, w) of the Δn new units (the router assigns each unit independently with weight w)
and each arm converts Binomial(units, p) of its own. Cumulative sums over the looks then have
exactly the distribution of the (n, conversions) sufficient statistics per arm at every look,
for (experiments × looks) numbers instead of (experiments × units): 2,000 × 50 runs in
milliseconds. Every seed is fixed, so a run reproduces to the digit.

    python -m experiments.simulate [--quick] [--seed S] [--experiments N] [--looks K]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
from numpy.typing import NDArray
from scipy import stats as _sps

from experiments.stats import cs_halfwidth, cs_halfwidth_one_sided, cs_rho_squared

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

CONFIG_PLANNED_SAMPLES = 20_000  # experiment.planned_samples default in config.yaml
DEFAULT_SEED = 20_240_601


class TypeOneResult(TypedDict):
    sequential_promote_rate: float  # share of A/A runs whose CS was wholly above 0 at any look
    sequential_decision_rate: float  # ... wholly above OR wholly below 0 at any look
    sequential_one_sided_rate: (
        float  # non-inferiority bound (one-sided CS at α) above 0 at any look
    )
    naive_promote_rate: float
    naive_decision_rate: float
    standard_error: float  # √(α(1−α)/n): the binomial SE of a rate equal to α
    planned_samples: int
    n_experiments: int
    looks: int
    seed: int


class PowerResult(TypedDict):
    sequential_power_any_look: float  # promoted at some look up to N*
    sequential_power_at_end: float  # promoted when checked once, at N*
    naive_power_any_look: float
    naive_power_at_end: float
    planned_samples: int
    n_experiments: int
    looks: int
    seed: int


@dataclass(frozen=True)
class _Looks:
    """Cumulative per-arm counts at each look: arrays of shape (experiments, looks)."""

    n_c: IntArray
    x_c: IntArray
    n_t: IntArray
    x_t: IntArray


def look_sizes(max_samples: int, looks: int) -> IntArray:
    """Total units at each of `looks` evenly spaced interim analyses, the last at max_samples."""
    if looks < 1 or max_samples < looks:
        raise ValueError(f"need 1 <= looks <= max_samples, got looks={looks}, {max_samples=}")
    sizes = np.round(np.arange(1, looks + 1) * (max_samples / looks)).astype(np.int64)
    return sizes


def planned_samples_for_power(
    p_control: float,
    p_treatment: float,
    split: tuple[float, float],
    alpha: float,
    power: float = 0.8,
) -> int:
    """N* at which a single check at N* promotes with probability `power` (normal approx.).

    At n = N* the CS half-width is m·√(V₁/N*) with m = √((c+1)/c · (2 ln(1/α) + ln(c+1))),
    c = N*ρ² (a constant of α alone), and V₁ = Σ p(1−p)/w over the arms. Promotion needs the
    lower bound above 0, so effect = (m + z_power)·√(V₁/N*). Rounded up to a thousand.
    """
    effect = p_treatment - p_control
    if effect <= 0:
        raise ValueError("planned_samples_for_power needs p_treatment > p_control")
    c = cs_rho_squared(1, alpha)  # ρ²·N* does not depend on N*
    m = math.sqrt((c + 1) / c * (2 * math.log(1 / alpha) + math.log(c + 1)))
    z_power = float(_sps.norm.ppf(power))
    v1 = p_control * (1 - p_control) / split[0] + p_treatment * (1 - p_treatment) / split[1]
    n = v1 * ((m + z_power) / effect) ** 2
    return int(math.ceil(n / 1000.0) * 1000)


def simulate_type_one(
    n_experiments: int = 2000,
    looks: int = 50,
    planned_samples: int = CONFIG_PLANNED_SAMPLES,
    split: tuple[float, float] = (0.9, 0.1),
    p: float = 0.10,
    alpha: float = 0.05,
    seed: int = DEFAULT_SEED,
) -> TypeOneResult:
    """Share of A/A experiments that would ever be promoted when checked at every look.

    Looks are evenly spaced up to N* total units. "Promote" is the evaluator's rule: the
    two-sided interval of treatment − control wholly above 0. The sequential rate must stay
    ≤ α (within simulation error); the naive one grows with the number of looks.
    """
    data = _simulate(n_experiments, looks, planned_samples, split, p, p, seed)
    seq_lo, seq_hi, naive_lo, naive_hi, one_sided_lo = _bounds(data, planned_samples, alpha)
    return TypeOneResult(
        sequential_promote_rate=_share_ever(seq_lo > 0),
        sequential_decision_rate=_share_ever((seq_lo > 0) | (seq_hi < 0)),
        sequential_one_sided_rate=_share_ever(one_sided_lo > 0),
        naive_promote_rate=_share_ever(naive_lo > 0),
        naive_decision_rate=_share_ever((naive_lo > 0) | (naive_hi < 0)),
        standard_error=math.sqrt(alpha * (1 - alpha) / n_experiments),
        planned_samples=planned_samples,
        n_experiments=n_experiments,
        looks=looks,
        seed=seed,
    )


def simulate_power(
    n_experiments: int = 2000,
    looks: int = 50,
    planned_samples: int | None = None,
    split: tuple[float, float] = (0.9, 0.1),
    p_control: float = 0.10,
    p_treatment: float = 0.11,
    alpha: float = 0.05,
    seed: int = DEFAULT_SEED + 1,
) -> PowerResult:
    """Share of experiments with a real 0.10 → 0.11 change promoted, at any look or at N* only.

    N* defaults to `planned_samples_for_power(..., power=0.8)` for a single check at N*; the
    any-look power is higher because an early crossing also counts.
    """
    if planned_samples is None:
        planned_samples = planned_samples_for_power(p_control, p_treatment, split, alpha)
    data = _simulate(n_experiments, looks, planned_samples, split, p_control, p_treatment, seed)
    seq_lo, _, naive_lo, _, _ = _bounds(data, planned_samples, alpha)
    return PowerResult(
        sequential_power_any_look=_share_ever(seq_lo > 0),
        sequential_power_at_end=float(np.mean(seq_lo[:, -1] > 0)),
        naive_power_any_look=_share_ever(naive_lo > 0),
        naive_power_at_end=float(np.mean(naive_lo[:, -1] > 0)),
        planned_samples=planned_samples,
        n_experiments=n_experiments,
        looks=looks,
        seed=seed,
    )


def _simulate(
    n_experiments: int,
    looks: int,
    max_samples: int,
    split: tuple[float, float],
    p_control: float,
    p_treatment: float,
    seed: int,
) -> _Looks:
    if not math.isclose(sum(split), 1.0) or min(split) <= 0:
        raise ValueError(f"split must be two positive weights summing to 1, got {split}")
    rng = np.random.default_rng(seed)
    increments = np.diff(look_sizes(max_samples, looks), prepend=0)
    shape = (n_experiments, looks)
    new_t = rng.binomial(np.broadcast_to(increments, shape), split[1])
    new_c = increments - new_t
    conv_c = rng.binomial(new_c, p_control)
    conv_t = rng.binomial(new_t, p_treatment)
    return _Looks(
        n_c=np.cumsum(new_c, axis=1, dtype=np.int64),
        x_c=np.cumsum(conv_c, axis=1, dtype=np.int64),
        n_t=np.cumsum(new_t, axis=1, dtype=np.int64),
        x_t=np.cumsum(conv_t, axis=1, dtype=np.int64),
    )


def _bounds(
    data: _Looks, planned_samples: int, alpha: float
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    """Sequential, naive and one-sided bounds at every look, the way `stats` computes them.

    Mirrors ArmStats.variance (ddof=1) and `welch_variance`; `cs_halfwidth` itself is the
    production function. A look where an arm has < 2 units has no variance estimate: its
    bounds are ±inf, i.e. no decision, as the evaluator (which raises there) would make none.
    """
    var_c, ok_c = _sample_variance(data.n_c, data.x_c)
    var_t, ok_t = _sample_variance(data.n_t, data.x_t)
    ok = ok_c & ok_t
    n_c = np.maximum(data.n_c, 1).astype(np.float64)
    n_t = np.maximum(data.n_t, 1).astype(np.float64)
    estimate = data.x_t / n_t - data.x_c / n_c
    variance = var_c / n_c + var_t / n_t
    n_total = data.n_c + data.n_t
    seq_hw = cs_halfwidth(variance, n_total, planned_samples, alpha)
    one_hw = cs_halfwidth_one_sided(variance, n_total, planned_samples, alpha)
    naive_hw = float(_sps.norm.ppf(1 - alpha / 2)) * np.sqrt(variance)

    def lo(hw: FloatArray) -> FloatArray:
        return np.where(ok, estimate - hw, -np.inf)

    def hi(hw: FloatArray) -> FloatArray:
        return np.where(ok, estimate + hw, np.inf)

    return lo(seq_hw), hi(seq_hw), lo(naive_hw), hi(naive_hw), lo(one_hw)


def _sample_variance(n: IntArray, x: IntArray) -> tuple[FloatArray, BoolArray]:
    # 0/1 outcomes: sum of squares == sum, so s² = (x − x²/n)/(n − 1).
    ok = n >= 2
    nf = np.maximum(n, 2).astype(np.float64)
    var = np.maximum((x - x.astype(np.float64) ** 2 / nf) / (nf - 1), 0.0)
    return np.where(ok, var, 0.0), ok


def _share_ever(hit: BoolArray) -> float:
    return float(np.mean(np.any(hit, axis=1)))


def markdown_table(rows: Sequence[tuple[TypeOneResult, PowerResult]], alpha: float) -> str:
    """Rows = sequential / naive for each N*; type-I as rate ± SE, power as any-look / at-N*.

    "Promote" is the evaluator's rule (two-sided interval wholly above 0), whose nominal error at
    a single look is α/2; "any decision" (wholly above or wholly below 0) is the two-sided error
    the sequence bounds by α. The one-sided column is `noninferiority_lower_bound` > 0 (error α).
    """
    lines = [
        f"| method | N* | type-I: A/A promote rate ± SE (α = {alpha}) | A/A any decision "
        "(promote or reject) | A/A one-sided bound > 0 | power 0.10→0.11: any look / at N* | "
        "experiments | looks | seed (A/A, power) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t1, pw in rows:
        common = f"{t1['n_experiments']:,} | {t1['looks']} | {t1['seed']}, {pw['seed']} |"
        se = t1["standard_error"]
        lines.append(
            f"| sequential CS | {t1['planned_samples']:,} | "
            f"{t1['sequential_promote_rate']:.4f} ± {se:.4f} | "
            f"{t1['sequential_decision_rate']:.4f} | "
            f"{t1['sequential_one_sided_rate']:.4f} | "
            f"{pw['sequential_power_any_look']:.3f} / {pw['sequential_power_at_end']:.3f} | "
            + common
        )
        lines.append(
            f"| naive z every look | {t1['planned_samples']:,} | "
            f"{t1['naive_promote_rate']:.4f} ± {se:.4f} | "
            f"{t1['naive_decision_rate']:.4f} | — | "
            f"{pw['naive_power_any_look']:.3f} / {pw['naive_power_at_end']:.3f} | " + common
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.simulate", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 experiments instead of 20,000")
    parser.add_argument("--experiments", type=int, default=None)
    parser.add_argument("--looks", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    n_exp = args.experiments or (2_000 if args.quick else 20_000)
    designed = planned_samples_for_power(0.10, 0.11, (0.9, 0.1), args.alpha)

    rows = []
    for planned in (CONFIG_PLANNED_SAMPLES, designed):
        t1 = simulate_type_one(n_exp, args.looks, planned, alpha=args.alpha, seed=args.seed)
        pw = simulate_power(n_exp, args.looks, planned, alpha=args.alpha, seed=args.seed + 1)
        rows.append((t1, pw))
    print(markdown_table(rows, args.alpha))
    print()
    print(
        f"A/A at p = 0.10, split 90/10, {args.looks} evenly spaced looks up to N*. "
        f"N* = {designed:,} is planned_samples_for_power(0.10, 0.11, 90/10, α, power 0.8); "
        f"{CONFIG_PLANNED_SAMPLES:,} is config.yaml's default."
    )


if __name__ == "__main__":
    main()
