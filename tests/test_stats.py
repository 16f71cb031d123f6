"""Unit tests for experiments.stats (and the reference statistics in fixed_sample.py): golden
numbers, tables of cases, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fixed_sample import ArmStats, quantile_interval, quantile_ratio_interval
from scipy import stats as sps

from experiments.stats import (
    Interval,
    cs_halfwidth,
    cs_halfwidth_one_sided,
    cs_rho_squared,
    difference_absolute,
    difference_relative,
    fixed_horizon_interval,
    noninferiority_lower_bound,
    sample_ratio_test,
    welch_variance,
)

# GrowthBook's published sequential example: 1396/3000 vs 2422/3461, N* = 5000, α = 0.05.
GOLDEN_CONTROL = ArmStats.from_counts(3000, 1396)
GOLDEN_TREATMENT = ArmStats.from_counts(3461, 2422)


class TestGolden:
    def test_relative_difference_matches_growthbook_to_four_decimals(self) -> None:
        ci = difference_relative(GOLDEN_CONTROL, GOLDEN_TREATMENT, 5000, 0.05)
        assert ci.estimate == pytest.approx(0.50386, abs=5e-6)
        # ArmStats uses the ddof=1 variance; GrowthBook's proportions use p(1 − p) (ddof=0),
        # which moves the bounds by ~2e-5: equal to 4 decimals, exact below.
        assert ci.lower == pytest.approx(0.40098, abs=1e-4)
        assert ci.upper == pytest.approx(0.60675, abs=1e-4)

    def test_halfwidth_and_delta_method_reproduce_growthbook_to_five_decimals(self) -> None:
        # Same formulas fed GrowthBook's p(1 − p) variance: its numbers to 5 decimals.
        m_c, m_t = 1396 / 3000, 2422 / 3461
        v_c, v_t = m_c * (1 - m_c), m_t * (1 - m_t)
        variance = v_t / (3461 * m_c**2) + v_c * m_t**2 / (3000 * m_c**4)
        hw = cs_halfwidth(variance, 3000 + 3461, 5000, 0.05)
        estimate = m_t / m_c - 1
        assert estimate - hw == pytest.approx(0.40098, abs=5e-6)
        assert estimate + hw == pytest.approx(0.60675, abs=5e-6)

    def test_rho_squared(self) -> None:
        expected = (-2 * math.log(0.05) + math.log(1 - 2 * math.log(0.05))) / 5000
        assert cs_rho_squared(5000, 0.05) == pytest.approx(expected, rel=1e-12)
        assert cs_rho_squared(5000, 0.05) * 5000 == pytest.approx(7.93615, abs=1e-5)


class TestArmStats:
    def test_from_values_matches_numpy(self) -> None:
        values = np.array([0.2, 1.5, 3.0, -0.7, 2.2])
        arm = ArmStats.from_values(values)
        assert arm.n == 5
        assert arm.mean == pytest.approx(values.mean())
        assert arm.variance == pytest.approx(values.var(ddof=1))

    def test_sum_equals_concatenation(self) -> None:
        a, b = [1.0, 2.0, 4.0], [0.5, 0.25]
        combined = ArmStats.from_values(a) + ArmStats.from_values(b)
        assert combined == ArmStats.from_values(a + b)

    def test_from_counts_is_a_zero_one_sample(self) -> None:
        assert ArmStats.from_counts(5, 2) == ArmStats.from_values([1, 1, 0, 0, 0])

    @pytest.mark.parametrize("values", [[], [3.0]])
    def test_variance_is_zero_below_two_units(self, values: list[float]) -> None:
        assert ArmStats.from_values(values).variance == 0.0

    def test_empty_mean_raises(self) -> None:
        with pytest.raises(ValueError, match="no units"):
            _ = ArmStats(0, 0.0, 0.0).mean

    @pytest.mark.parametrize(
        ("args", "match"), [((-1, 0.0, 0.0), "n must be"), ((2, 1.0, -1.0), "total_sq")]
    )
    def test_invalid_fields_raise(self, args: tuple[int, float, float], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            ArmStats(*args)

    def test_non_finite_values_raise(self) -> None:
        with pytest.raises(ValueError, match="finite"):
            ArmStats.from_values([1.0, float("nan")])

    def test_from_counts_rejects_impossible_counts(self) -> None:
        with pytest.raises(ValueError, match="successes"):
            ArmStats.from_counts(3, 4)


SRM_CASES = [
    # (counts, weights, checked, mismatch)
    ({"champion": 1000, "challenger": 1000}, {"champion": 0.5, "challenger": 0.5}, True, False),
    ({"champion": 821, "challenger": 179}, {"champion": 0.9, "challenger": 0.1}, True, True),
    ({"champion": 905, "challenger": 95}, {"champion": 0.9, "challenger": 0.1}, True, False),
    # The small arm expects fewer than min_count units: not checked, so never a mismatch yet.
    ({"champion": 50, "challenger": 0}, {"champion": 0.9, "challenger": 0.1}, False, False),
    ({"champion": 50, "challenger": 7}, {"champion": 0.9, "challenger": 0.1}, False, False),
    # A missing arm counts as 0; it expects 100, so a dead challenger is caught.
    ({"champion": 1000}, {"champion": 0.9, "challenger": 0.1}, True, True),
    # Weight 0 with units logged to it is a mismatch by definition.
    ({"champion": 100, "challenger": 3}, {"champion": 1.0, "challenger": 0.0}, True, True),
    ({"champion": 100, "challenger": 0}, {"champion": 1.0, "challenger": 0.0}, True, False),
    # Three arms, weights that do not sum to 1 are normalised.
    ({"a": 100, "b": 100, "c": 200}, {"a": 1, "b": 1, "c": 2}, True, False),
]


class TestSampleRatio:
    @pytest.mark.parametrize(("counts", "weights", "checked", "mismatch"), SRM_CASES)
    def test_table(
        self,
        counts: dict[str, int],
        weights: dict[str, float],
        checked: bool,
        mismatch: bool,
    ) -> None:
        result = sample_ratio_test(counts, weights)
        assert (result.checked, result.mismatch) == (checked, mismatch)
        assert sum(result.observed.values()) == sum(counts.values())
        assert sum(result.expected.values()) == pytest.approx(sum(counts.values()))

    def test_values_match_scipy(self) -> None:
        result = sample_ratio_test({"a": 821, "b": 179}, {"a": 0.9, "b": 0.1})
        chi2, p = sps.chisquare([821, 179], [900, 100])
        assert result.chi2 == pytest.approx(chi2)
        assert result.p_value == pytest.approx(p)
        assert result.expected == {"a": 900.0, "b": 100.0}

    def test_threshold_is_respected(self) -> None:
        counts, weights = {"a": 530, "b": 470}, {"a": 0.5, "b": 0.5}  # p ≈ 0.058
        assert not sample_ratio_test(counts, weights).mismatch
        assert sample_ratio_test(counts, weights, threshold=0.1).mismatch

    @pytest.mark.parametrize(
        ("counts", "weights", "match"),
        [
            ({"x": 1}, {"a": 1.0}, "without a weight"),
            ({"a": 1}, {"a": -1.0}, "weights must be"),
            ({"a": -1}, {"a": 1.0}, "counts must be"),
            ({"a": 1}, {"a": 0.0}, "positive weight"),
        ],
    )
    def test_invalid_input_raises(
        self, counts: dict[str, int], weights: dict[str, float], match: str
    ) -> None:
        with pytest.raises(ValueError, match=match):
            sample_ratio_test(counts, weights)


class TestDifferences:
    def test_welch_variance_is_not_pooled(self) -> None:
        a = ArmStats.from_values([0.0, 1.0, 0.0, 1.0])
        b = ArmStats.from_values([5.0, 5.0, 5.0, 6.0, 4.0, 5.0])
        assert welch_variance(a, b) == pytest.approx(a.variance / 4 + b.variance / 6)

    @pytest.mark.parametrize("n_small", [0, 1])
    def test_fewer_than_two_units_raises(self, n_small: int) -> None:
        small = ArmStats.from_values([1.0] * n_small)
        big = ArmStats.from_values([1.0, 2.0, 3.0])
        for fn in (difference_absolute, difference_relative):
            with pytest.raises(ValueError, match="at least 2 units"):
                fn(small, big, 1000, 0.05)

    def test_zero_variance_gives_a_point_interval(self) -> None:
        control = ArmStats.from_counts(100, 100)
        treatment = ArmStats.from_counts(100, 100)
        assert difference_absolute(control, treatment, 1000, 0.05) == Interval(0.0, 0.0, 0.0)

    def test_zero_control_mean_for_relative_raises(self) -> None:
        control = ArmStats.from_counts(100, 0)
        treatment = ArmStats.from_counts(100, 10)
        with pytest.raises(ValueError, match=r"control .* mean is 0"):
            difference_relative(control, treatment, 1000, 0.05)
        with pytest.raises(ValueError, match=r"control .* mean is 0"):
            noninferiority_lower_bound(control, treatment, 1000, 0.05, relative=True)

    def test_absolute_interval_is_symmetric_and_wider_than_fixed_horizon(self) -> None:
        seq = difference_absolute(GOLDEN_CONTROL, GOLDEN_TREATMENT, 5000, 0.05)
        naive = fixed_horizon_interval(GOLDEN_CONTROL, GOLDEN_TREATMENT, 0.05)
        assert seq.estimate == pytest.approx(2422 / 3461 - 1396 / 3000)
        assert seq.upper - seq.estimate == pytest.approx(seq.estimate - seq.lower)
        assert naive.estimate == seq.estimate
        assert naive.lower > seq.lower and naive.upper < seq.upper

    def test_fixed_horizon_is_the_z_interval(self) -> None:
        ci = fixed_horizon_interval(GOLDEN_CONTROL, GOLDEN_TREATMENT, 0.05)
        se = math.sqrt(welch_variance(GOLDEN_CONTROL, GOLDEN_TREATMENT))
        assert ci.upper - ci.estimate == pytest.approx(1.959964 * se, rel=1e-6)

    def test_halfwidth_accepts_arrays(self) -> None:
        variances = np.array([1e-4, 2e-4])
        ns = np.array([1000, 8000])
        widths = cs_halfwidth(variances, ns, 5000, 0.05)
        assert isinstance(widths, np.ndarray)
        for v, n, w in zip(variances, ns, widths, strict=True):
            assert cs_halfwidth(float(v), int(n), 5000, 0.05) == pytest.approx(w)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"planned_samples": 0}, "planned_samples"),
            ({"alpha": 0.0}, "alpha"),
            ({"alpha": 1.0}, "alpha"),
            ({"n_total": 0}, "n_total"),
        ],
    )
    def test_halfwidth_rejects_bad_parameters(self, kwargs: dict[str, float], match: str) -> None:
        args = {"n_total": 100, "planned_samples": 1000, "alpha": 0.05, **kwargs}
        with pytest.raises(ValueError, match=match):
            cs_halfwidth(
                1.0, int(args["n_total"]), int(args["planned_samples"]), float(args["alpha"])
            )


class TestNonInferiority:
    def test_one_sided_bound_is_tighter_than_the_two_sided_lower_bound(self) -> None:
        two_sided = difference_absolute(GOLDEN_CONTROL, GOLDEN_TREATMENT, 5000, 0.05)
        bound = noninferiority_lower_bound(GOLDEN_CONTROL, GOLDEN_TREATMENT, 5000, 0.05)
        assert two_sided.lower < bound < two_sided.estimate
        # ... but it is not the two-sided sequence at 2α either: that would be too narrow.
        two_sided_2a = difference_absolute(GOLDEN_CONTROL, GOLDEN_TREATMENT, 5000, 0.10)
        assert bound < two_sided_2a.lower

    def test_relative_bound(self) -> None:
        two_sided = difference_relative(GOLDEN_CONTROL, GOLDEN_TREATMENT, 5000, 0.05)
        bound = noninferiority_lower_bound(
            GOLDEN_CONTROL, GOLDEN_TREATMENT, 5000, 0.05, relative=True
        )
        assert two_sided.lower < bound < two_sided.estimate

    def test_lower_is_better_flips_the_improvement(self) -> None:
        # A loss: the challenger's lower mean is the improvement.
        control = ArmStats.from_values([0.5, 0.7, 0.6, 0.8, 0.4] * 40)
        treatment = ArmStats.from_values([0.3, 0.5, 0.4, 0.6, 0.2] * 40)
        bound = noninferiority_lower_bound(control, treatment, 1000, 0.05, higher_is_better=False)
        hw = cs_halfwidth_one_sided(welch_variance(control, treatment), 400, 1000, 0.05)
        assert bound == pytest.approx(0.2 - hw)
        assert bound > 0

    def test_one_sided_alpha_must_be_below_half(self) -> None:
        with pytest.raises(ValueError, match="one-sided alpha"):
            cs_halfwidth_one_sided(1.0, 100, 1000, 0.5)


class TestQuantiles:
    def test_textbook_median_indices(self) -> None:
        # n = 100, median, 95%: the classic order statistics x_(40) and x_(61).
        values = np.arange(1.0, 101.0)
        ci = quantile_interval(values, 0.5, 0.05)
        assert (ci.lower, ci.upper) == (40.0, 61.0)
        assert ci.estimate == pytest.approx(50.5)

    def test_too_few_values_leave_a_side_unbounded(self) -> None:
        ci = quantile_interval([1.0, 2.0, 3.0, 4.0, 5.0], 0.95, 0.05)
        assert ci.upper == math.inf
        assert math.isfinite(ci.lower)

    def test_coverage_by_simulation(self) -> None:
        rng = np.random.default_rng(7)
        true_p95 = float(np.exp(sps.norm.ppf(0.95)))  # lognormal(0, 1)
        samples = rng.lognormal(size=(400, 300))
        covered = []
        for row in samples:
            ci = quantile_interval(row, 0.95, 0.10)
            covered.append(ci.lower <= true_p95 <= ci.upper)
        # Guaranteed >= 90%; order-statistic intervals are conservative.
        assert np.mean(covered) >= 0.90 - 3 * math.sqrt(0.09 / 400)

    def test_ratio_interval_contains_the_true_ratio(self) -> None:
        rng = np.random.default_rng(3)
        control = rng.lognormal(size=2000)
        treatment = 1.2 * rng.lognormal(size=2000)
        ci = quantile_ratio_interval(control, treatment, 0.95, 0.05)
        assert ci.lower < 0.2 < ci.upper
        assert ci.lower < ci.estimate < ci.upper

    def test_ratio_interval_is_exact_for_identical_scaled_samples(self) -> None:
        values = np.linspace(1.0, 10.0, 500)
        ci = quantile_ratio_interval(values, 1.5 * values, 0.5, 0.05)
        assert ci.estimate == pytest.approx(0.5)

    def test_ratio_with_unbounded_side(self) -> None:
        ci = quantile_ratio_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 0.95, 0.05)
        assert ci.upper == math.inf
        assert ci.lower >= -1.0

    @pytest.mark.parametrize(
        ("control", "treatment", "match"),
        [
            ([0.0, 1.0], [1.0, 2.0], "strictly positive"),
            ([], [1.0], "both arms"),
        ],
    )
    def test_ratio_rejects_bad_values(
        self, control: list[float], treatment: list[float], match: str
    ) -> None:
        with pytest.raises(ValueError, match=match):
            quantile_ratio_interval(control, treatment, 0.5, 0.05)

    @pytest.mark.parametrize(("q", "match"), [(0.0, "q must be"), (1.0, "q must be")])
    def test_quantile_rejects_bad_q(self, q: float, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            quantile_interval([1.0, 2.0], q, 0.05)

    def test_quantile_rejects_empty(self) -> None:
        with pytest.raises(ValueError, match="at least one"):
            quantile_interval([], 0.5, 0.05)
