"""experiments.planning: units needed per method, against rpact and against simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments.planning import cs_boundaries, plan, power_at, unit_variance
from experiments.sequential import Spending, group_sequential_boundaries
from experiments.stats import UnitMoments, cs_halfwidth


def test_inflation_factor_matches_rpact() -> None:
    # rpact getDesignCharacteristics of a one-sided linear-spending design (α 0.03, β 0.14,
    # looks at 0.2, 0.4, 1): inflation factor 1.0788327, shift (θ²) 9.4594101.
    p = plan(
        1.0,
        1.0,
        1.0,
        challenger_share=0.5,
        alpha=0.03,
        power=0.86,
        sides=1,
        looks=[0.2, 0.4, 1.0],
        spending=Spending("power", 1.0),
    )
    assert p.inflation == pytest.approx(1.0788327, abs=1e-6)
    assert p.drift**2 == pytest.approx(9.4594101, abs=1e-5)


def test_fixed_horizon_is_the_textbook_formula() -> None:
    p = plan(0.02, 0.21, 0.21, challenger_share=0.5, alpha=0.05, power=0.8, method="fixed")
    # n per arm = 2σ²(z_.975 + z_.8)²/δ²
    assert p.champion_units == pytest.approx(
        2 * 0.21 * (1.959964 + 0.841621) ** 2 / 0.0004, rel=1e-5
    )
    assert p.units == pytest.approx(4 * 0.21 * (1.959964 + 0.841621) ** 2 / 0.0004, rel=1e-5)


def test_methods_order_and_split() -> None:
    args = {"challenger_share": 0.1, "alpha": 0.04, "power": 0.8, "looks": 20}
    fixed = plan(0.02, 0.21, 0.2, method="fixed", **args)  # type: ignore[arg-type]
    gs = plan(0.02, 0.21, 0.2, method="group_sequential", **args)  # type: ignore[arg-type]
    cs = plan(0.02, 0.21, 0.2, method="confidence_sequence", **args)  # type: ignore[arg-type]
    assert fixed.units < gs.units < cs.units
    assert 1.0 < gs.inflation < 1.1
    assert cs.inflation > 1.4
    assert gs.challenger_units == pytest.approx(0.1 * gs.units)
    # Halving the variance (a covariate explaining half of it) halves the units.
    half = plan(0.02, 0.105, 0.1, method="group_sequential", **args)  # type: ignore[arg-type]
    assert half.units == pytest.approx(gs.units / 2, rel=1e-6)


def _simulated_power(drift: float, z: tuple[float, ...], looks: int, paths: int) -> float:
    rng = np.random.default_rng(11)
    t = np.arange(1, looks + 1) / looks
    inc = rng.standard_normal((paths, looks)) * math.sqrt(1 / looks) + drift / looks
    stat = np.cumsum(inc, axis=1) / np.sqrt(t)
    upper = np.any(stat >= np.array(z), axis=1)
    lower = np.any(stat <= -np.array(z), axis=1)
    # A path that crossed below first has stopped; at this drift that is ~never.
    return float((upper & ~lower).mean())


@pytest.mark.parametrize("method", ["group_sequential", "confidence_sequence"])
def test_planned_power_is_achieved_in_simulation(method: str) -> None:
    looks = 20
    p = plan(0.03, 0.2, 0.2, challenger_share=0.2, alpha=0.05, method=method, looks=looks)  # type: ignore[arg-type]
    t = [k / looks for k in range(1, looks + 1)]
    z = (
        group_sequential_boundaries(t, 0.05).z
        if method == "group_sequential"
        else cs_boundaries(t, 0.05)
    )
    assert _simulated_power(p.drift, z, looks, 20_000) == pytest.approx(0.8, abs=0.012)


def test_cs_boundaries_are_the_confidence_sequence() -> None:
    # At N* = 20,000 total units, after 5,000: the sequence's half-width over its standard error.
    assert cs_boundaries([0.25], 0.04)[0] == pytest.approx(cs_halfwidth(1.0, 5000, 20_000, 0.04))


def test_power_at_fixed() -> None:
    assert power_at(2.801585, "fixed", 0.05) == pytest.approx(0.8, abs=1e-5)


def test_unit_variance_of_a_proportion() -> None:
    m = UnitMoments.from_rows(np.r_[np.ones(700), np.zeros(300)])
    assert unit_variance(m) == pytest.approx(0.21 * 1000 / 999)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"challenger_share": 0.0},
        {"challenger_share": 0.1, "alpha": 1.5},
        {"challenger_share": 0.1, "margin": 0.05},
    ],
)
def test_invalid_arguments(kwargs: dict[str, float]) -> None:
    args = {"alpha": 0.05, **kwargs}
    with pytest.raises(ValueError, match=r"must|need"):
        plan(0.02, 0.2, 0.2, **args)  # type: ignore[arg-type]
