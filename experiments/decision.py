"""Deciding, without I/O: differences, validity checks, guardrails and the decision rule.

Everything here is a pure function of sufficient statistics already read from the log, so the rule
can be tested case by case and ``--dry-run`` costs nothing: :mod:`experiments.aggregate` reads,
:mod:`experiments.judge` orders the steps, this module decides, :mod:`experiments.promote` acts.

The error budget. One A/A experiment may be looked at any number of times and must end in a
false promotion or rejection with probability at most α overall. Every test that can promote or
reject is an always-valid confidence sequence with its own share of α, and the shares add up to
α (a union bound over tests; each sequence already covers every look):

* the primary metric, two-sided, ``METRIC_SHARE`` of α (half of it can promote, half reject);
* the error-rate guardrail, one-sided, ``GUARDRAIL_SHARE`` of α;
* the latency guardrail, one-sided, ``GUARDRAIL_SHARE`` of α (split between the two arms).

The validity checks (sample ratio, requests per unit, feedback coverage) can only make a result
"invalid", never a decision; each is anytime-valid at ``VALIDITY_THRESHOLD``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from experiments import stats
from experiments.sufficient import LatencyHistogram
from router import logschema
from router.config import MetricName
from router.logschema import Arm

Decision = Literal["promote", "reject", "inconclusive", "invalid"]

#: Metrics where a larger per-row value is better; the others are losses.
HIGHER_IS_BETTER: dict[MetricName, bool] = {
    "accuracy": True,
    "outcome": True,
    "log_loss": False,
    "brier": False,
    "abs_error": False,
    "squared_error": False,
}
#: Per-row 0/1 metrics: their events and non-events are counted (see ``MIN_EVENTS``).
BINARY_METRICS: frozenset[MetricName] = frozenset({"accuracy"})
#: Heavy-tailed metrics, capped (winsorised) by default: one huge error must not decide.
CAPPED_BY_DEFAULT: frozenset[MetricName] = frozenset({"abs_error", "squared_error"})

METRIC_SHARE = 0.8
GUARDRAIL_SHARE = 0.1
VALIDITY_THRESHOLD = 0.001
#: Events and non-events each arm needs before a 0/1 metric may decide. The interval is a normal
#: approximation; with fewer than ~10 of the rarer outcome (the textbook n·p ≥ 10 rule) the
#: variance estimate is as noisy as the mean and moves with it, so a lucky streak of correct
#: answers looks both better and more certain.
MIN_EVENTS = 10
#: The latency quantile the guardrail watches.
LATENCY_Q = 0.95


@dataclass(frozen=True)
class ArmEstimate:
    """An arm's mean and the variance of that mean, after any floor (an ``stats.Estimate``)."""

    n: int
    mean: float
    mean_variance: float


@dataclass(frozen=True)
class Difference:
    """Challenger versus champion, oriented so that positive means the challenger is better.

    ``absolute`` is in the metric's units; ``relative`` is the fraction of the champion's mean
    (for a loss: the fraction of the champion's loss that the challenger removes).
    """

    absolute: stats.Interval
    relative: stats.Interval | None
    paired: bool
    n_champion: int
    n_challenger: int


@dataclass(frozen=True)
class GuardrailResult:
    name: Literal["error_rate", "latency_p95"]
    passed: bool
    champion: float | None
    challenger: float | None
    observed: float | None  # the bound compared with the threshold
    interval: stats.Interval | None
    threshold: float
    detail: str


@dataclass(frozen=True)
class Check:
    """A validity check: a failed one makes the experiment invalid, with ``detail`` as reason."""

    name: Literal["sample_ratio", "requests_per_unit", "feedback_coverage"]
    checked: bool
    passed: bool
    detail: str


_CHECK_TITLES = {
    "sample_ratio": "Sample-ratio mismatch",
    "requests_per_unit": "Requests-per-unit mismatch",
    "feedback_coverage": "Feedback coverage differs between arms",
}


def row_metric(
    metric: MetricName,
    score: float | None,
    predicted_class: str | None,
    outcome: str,
    outcome_value: float | None,
) -> float | None:
    """One row's metric in its natural units, or None when the row cannot carry it, from the
    stored outcome (JSON text): :func:`router.logschema.row_metric`, the definition the live
    metrics share. What :mod:`experiments.aggregate` computes in SQL (tests hold the two equal).
    """
    return logschema.row_metric(
        metric, score, predicted_class, logschema.decoded_outcome(outcome), outcome_value
    )


def arm_estimate(moments: stats.UnitMoments, binary: bool) -> ArmEstimate:
    """The arm's mean with its cluster-robust variance, floored for 0/1 metrics."""
    variance = moments.mean_variance
    if binary:
        variance = max(variance, stats.binary_variance_floor(moments.sum_x, moments.rows))
    return ArmEstimate(moments.n, moments.mean, variance)


def _negate(interval: stats.Interval) -> stats.Interval:
    return stats.Interval(-interval.estimate, -interval.upper, -interval.lower)


def arm_interval(arm: stats.Estimate, planned_samples: int, alpha: float) -> stats.Interval:
    """An always-valid interval for one arm's mean (the same confidence sequence, one sample)."""
    if arm.n < 2:
        return stats.Interval(arm.mean, -math.inf, math.inf)
    half = stats.cs_halfwidth(arm.mean_variance, arm.n, planned_samples, alpha)
    return stats.Interval(arm.mean, arm.mean - half, arm.mean + half)


def split_difference(
    champion: stats.Estimate,
    challenger: stats.Estimate,
    planned_samples: int,
    alpha: float,
    higher_is_better: bool,
) -> Difference:
    """Two independent samples of units: the Welch confidence sequence of :mod:`stats`."""
    absolute = stats.difference_absolute(champion, challenger, planned_samples, alpha)
    relative: stats.Interval | None = None
    if champion.mean != 0.0:
        relative = stats.difference_relative(champion, challenger, planned_samples, alpha)
    if not higher_is_better:
        absolute = _negate(absolute)
        relative = None if relative is None else _negate(relative)
    return Difference(absolute, relative, False, champion.n, challenger.n)


def paired_difference(
    differences: stats.UnitMoments,
    champion_mean: float,
    planned_samples: int,
    alpha: float,
    higher_is_better: bool,
) -> Difference:
    """Shadow mode: per unit, the challenger's metric minus the champion's on the same rows.

    Pairing removes the between-row variance both models share. ``relative`` is the mean
    difference over the champion's mean (its interval scaled alike; the champion's own noise is
    ignored, which the pairing makes small).
    """
    sign = 1.0 if higher_is_better else -1.0
    n = differences.n
    mean = sign * differences.mean
    half = (
        stats.cs_halfwidth(differences.mean_variance, n, planned_samples, alpha)
        if n >= 2
        else math.inf
    )
    absolute = stats.Interval(mean, mean - half, mean + half)
    relative = None
    if champion_mean != 0.0 and math.isfinite(half):
        scale = abs(champion_mean)
        relative = stats.Interval(mean / scale, (mean - half) / scale, (mean + half) / scale)
    return Difference(absolute, relative, True, n, n)


def error_rate_guardrail(
    champion: stats.UnitMoments,
    challenger: stats.UnitMoments,
    max_increase: float,
    planned_samples: int,
    alpha: float,
) -> GuardrailResult:
    """Fails when the challenger's error rate exceeds the champion's by more than the margin,
    beyond doubt: the one-sided always-valid lower bound of the increase is above it.

    Per unit x = model faults, y = requests: the rate is a ratio over units (users retry, and a
    user whose input breaks a model breaks it again). A re-read point estimate would reject
    healthy challengers by chance at some hourly look; the sequence does not.
    """
    if champion.n < 2 or challenger.n < 2 or champion.sum_y <= 0 or challenger.sum_y <= 0:
        return GuardrailResult(
            "error_rate", True, None, None, None, None, max_increase, "too few requests"
        )
    c = ArmEstimate(champion.n, champion.mean, champion.mean_variance)
    t = ArmEstimate(challenger.n, challenger.mean, challenger.mean_variance)
    lower = stats.noninferiority_lower_bound(c, t, planned_samples, alpha)  # of t − c
    increase = t.mean - c.mean
    passed = not lower > max_increase
    detail = (
        f"challenger {t.mean:.2%} vs champion {c.mean:.2%} ({increase:+.2%}, at least "
        f"{lower:+.2%} with {1 - alpha:.1%} confidence; allowed +{max_increase:.2%})"
    )
    interval = stats.Interval(increase, lower, math.inf)
    return GuardrailResult(
        "error_rate", passed, c.mean, t.mean, lower, interval, max_increase, detail
    )


def latency_guardrail(
    champion: LatencyHistogram,
    challenger: LatencyHistogram,
    max_increase: float,
    planned_samples: int,
    alpha: float,
) -> GuardrailResult:
    """Fails when even the lower bound of the relative p95 increase is above the margin.

    Each arm's p95 gets a one-sided always-valid bound at α/2 (``stats.quantile_cs_ranks``): the
    challenger's from below, the champion's from above, read off the histogram's bucket edges
    (conservative by at most one 1% bucket). Both hold at once with probability 1 − α, so the
    ratio of the bounds bounds the ratio of the quantiles at every look.
    """
    n_c, n_t = champion.n, challenger.n
    if n_c < 2 or n_t < 2:
        return GuardrailResult(
            "latency_p95", True, None, None, None, None, max_increase, "too few latencies"
        )
    _, upper_rank_c = stats.quantile_cs_ranks(
        n_c, LATENCY_Q, planned_samples, alpha / 2, one_sided=True
    )
    lower_rank_t, _ = stats.quantile_cs_ranks(
        n_t, LATENCY_Q, planned_samples, alpha / 2, one_sided=True
    )
    champ_upper = champion.order_statistic_bounds(upper_rank_c)[1]
    chall_lower = challenger.order_statistic_bounds(lower_rank_t)[0]
    champ, chall = champion.quantile(LATENCY_Q), challenger.quantile(LATENCY_Q)
    assert champ is not None and chall is not None  # n >= 2
    lower = chall_lower / champ_upper - 1.0 if math.isfinite(champ_upper) else -1.0
    estimate = chall / champ - 1.0
    passed = not lower > max_increase
    detail = (
        f"p95 {chall * 1e3:.2f} ms vs {champ * 1e3:.2f} ms: {estimate:+.1%}, at least "
        f"{lower:+.1%}; allowed +{max_increase:.0%}"
    )
    return GuardrailResult(
        "latency_p95",
        passed,
        champ,
        chall,
        lower,
        stats.Interval(estimate, lower, math.inf),
        max_increase,
        detail,
    )


def sample_ratio_check(srm: stats.SrmResult) -> Check:
    """Units per arm against the configured split, anytime-valid (``stats.sequential_srm``)."""
    observed = ", ".join(f"{arm} {count}" for arm, count in srm.observed.items())
    expected = ", ".join(f"{arm} {count:.0f}" for arm, count in srm.expected.items())
    detail = f"units per arm {observed} (expected {expected}), p = {srm.p_value:.2g}" + (
        f" < {VALIDITY_THRESHOLD}: assignment or logging is broken" if srm.mismatch else ""
    )
    return Check("sample_ratio", srm.checked, not srm.mismatch, detail)


def _two_sided_check(
    name: Literal["requests_per_unit", "feedback_coverage"],
    champion: stats.Estimate,
    challenger: stats.Estimate,
    planned_samples: int,
    what: str,
    meaning: str,
    spec: str,
) -> Check:
    if champion.n < 2 or challenger.n < 2:
        return Check(name, False, True, f"{what}: too few units to compare")
    d = stats.difference_absolute(champion, challenger, planned_samples, VALIDITY_THRESHOLD)
    differs = d.lower > 0 or d.upper < 0
    detail = (
        f"{what} champion {format(champion.mean, spec)} vs challenger "
        f"{format(challenger.mean, spec)} (difference {d.estimate:+.3g} "
        f"[{d.lower:+.3g}, {d.upper:+.3g}] at {1 - VALIDITY_THRESHOLD:.1%})"
        + (f": {meaning}" if differs else "")
    )
    return Check(name, True, not differs, detail)


def requests_per_unit_check(
    champion: stats.UnitMoments, challenger: stats.UnitMoments, planned_samples: int
) -> Check:
    """With sticky users, a challenger that loses some of its requests keeps its users: the
    units check passes, but its users show fewer requests each."""
    return _two_sided_check(
        "requests_per_unit",
        champion,
        challenger,
        planned_samples,
        "requests per unit",
        "one arm's requests go missing (or are duplicated) in the log",
        ".3f",
    )


def coverage_check(
    champion: stats.UnitMoments, challenger: stats.UnitMoments, planned_samples: int
) -> Check:
    """Share of matured predictions with an outcome inside the window, per arm: if it differs,
    the arms are judged on different kinds of rows (e.g. one arm's positives arrive late)."""
    if champion.sum_y <= 0 or challenger.sum_y <= 0:
        return Check("feedback_coverage", False, True, "feedback coverage: no matured predictions")
    return _two_sided_check(
        "feedback_coverage",
        champion,
        challenger,
        planned_samples,
        "feedback coverage",
        "the arms' outcomes arrive differently, so their metrics are not comparable",
        ".2%",
    )


def decide(
    *,
    no_data_reason: str | None,
    checks: Sequence[Check],
    n_champion: int,
    n_challenger: int,
    min_samples_per_arm: int,
    too_few_events: str | None,
    guardrails: Sequence[GuardrailResult],
    difference: Difference | None,
    min_effect: float,
    units_total: int,
    max_samples: int,
    metric: MetricName,
) -> tuple[Decision, str]:
    """The decision rule, step by step, with the one-sentence reason for it."""
    if no_data_reason is not None:
        return "invalid", no_data_reason
    failed = [c for c in checks if not c.passed]
    if failed:
        return "invalid", "; ".join(f"{_CHECK_TITLES[c.name]}: {c.detail}" for c in failed) + "."
    short = min(n_champion, n_challenger)
    if short < min_samples_per_arm:
        return "inconclusive", (
            f"Only {short} rows with closed outcomes in the smaller arm "
            f"(champion {n_champion}, challenger {n_challenger}); "
            f"{min_samples_per_arm} per arm are needed before deciding."
        )
    if too_few_events is not None:
        return "inconclusive", too_few_events
    bad = [g for g in guardrails if not g.passed]
    if bad:
        names = "; ".join(f"{g.name}: {g.detail}" for g in bad)
        return "reject", f"Guardrail failed ({names})."
    if difference is None:
        return "inconclusive", "No difference could be computed."
    d = difference.absolute
    text = f"{metric} difference {d.estimate:+.4g} [{d.lower:+.4g}, {d.upper:+.4g}]"
    if d.lower > min_effect:
        margin = f"min_effect {min_effect:g}" if min_effect else "0"
        return "promote", f"The challenger is better: {text} lies wholly above {margin}."
    if d.upper < 0.0:
        return "reject", f"The challenger is worse: {text} lies wholly below 0."
    if min_effect > 0 and d.upper < min_effect:
        return "inconclusive", (
            f"No worthwhile difference: {text} rules out an improvement of min_effect "
            f"{min_effect:g} or more; stop the experiment."
        )
    if units_total >= max_samples:
        return "inconclusive", (
            f"No worthwhile difference: {units_total} units passed the maximum of {max_samples} "
            f"and {text} still covers {'0' if d.lower <= 0.0 else f'min_effect {min_effect:g}'}; "
            "stop the experiment."
        )
    return "inconclusive", (
        f"No decision yet: {text} still covers "
        f"{'0' if d.lower <= 0.0 <= d.upper else f'min_effect {min_effect:g}'}; keep collecting."
    )


def events_shortfall(
    champion: stats.UnitMoments, challenger: stats.UnitMoments, metric: MetricName
) -> str | None:
    """For a 0/1 metric: a sentence when an arm has fewer than MIN_EVENTS of either outcome."""
    if metric not in BINARY_METRICS:
        return None
    for arm, m in ((Arm.CHAMPION, champion), (Arm.CHALLENGER, challenger)):
        events, non_events = m.sum_x, m.sum_y - m.sum_x
        if min(events, non_events) < MIN_EVENTS:
            return (
                f"The {arm} has {events:.0f} correct and {non_events:.0f} wrong rows: at least "
                f"{MIN_EVENTS} of each are needed before a 0/1 metric can be judged (its variance "
                "is not yet estimable)."
            )
    return None
