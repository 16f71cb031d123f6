"""Deciding, without I/O: differences, validity checks, guardrails and the decision rule.

Everything here is a pure function of sufficient statistics already read from the log, so the rule
can be tested case by case and ``--dry-run`` costs nothing: :mod:`experiments.aggregate` reads,
:mod:`experiments.judge` orders the steps, this module decides, :mod:`experiments.promote` acts.

One shape for every comparison. An analysis (raw, covariate-adjusted, paired, or a stratified one)
hands the rule a :class:`DifferenceEstimate`: challenger minus champion with its variance and the
units behind it. The look (:class:`experiments.looks.Look`) says how many standard errors a test at
a given α must clear: the group-sequential boundary of this look, or the always-valid confidence
sequence's half-width. Every interval is the estimate ± that many standard errors, labelled with
the level and the method it was computed with.

The error budget. One A/A experiment, looked at as often as it is evaluated, must end in a false
promotion or rejection with probability at most α overall. Each test that can promote or reject
has its own share of α, and the shares add up to α (a union bound over tests; each test already
covers every look, by its spending function or by the sequence):

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
from experiments.looks import Look
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
class DifferenceEstimate:
    """Challenger − champion in the metric's units (not yet oriented), with its variance.

    What every analysis hands the decision rule: the raw Welch difference of two arms, the
    covariate-adjusted one, the paired one of shadow mode, or a stratified one (per-period
    estimates combined, with their variances added). ``relative`` (estimate, variance) is the
    difference as a fraction of the champion's mean, when defined.
    """

    estimate: float
    variance: float
    n_champion: int
    n_challenger: int
    paired: bool = False
    adjusted: bool = False
    relative: tuple[float, float] | None = None

    @property
    def units(self) -> int:
        """The units behind the estimate (the confidence sequence's n)."""
        return self.n_champion if self.paired else self.n_champion + self.n_challenger


@dataclass(frozen=True)
class Difference:
    """Challenger versus champion, oriented so that positive means the challenger is better.

    ``absolute`` is in the metric's units; ``relative`` is the fraction of the champion's mean
    (for a loss: the fraction of the champion's loss that the challenger removes). Both are the
    estimate ± ``critical`` standard errors, an interval at ``level`` (``label`` says how).
    """

    absolute: stats.Interval
    relative: stats.Interval | None
    paired: bool
    n_champion: int
    n_challenger: int
    level: float | None = None
    label: str = ""
    critical: float | None = None  # the standard errors the interval spans each way
    adjusted: bool = False
    z: float | None = None  # the oriented estimate over its standard error


@dataclass(frozen=True)
class GuardrailResult:
    name: Literal["error_rate", "latency_p95"]
    passed: bool
    champion: float | None
    challenger: float | None
    observed: float | None  # the bound compared with the threshold (None: not needed)
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


def interval_label(look: Look, alpha: float) -> str:
    """How an interval at two-sided ``alpha`` was computed at this look, in words."""
    level = _confidence(alpha)
    if look.method == "confidence_sequence":
        return f"{level} always-valid confidence sequence"
    return f"{level} repeated confidence interval (group-sequential, look {look.number})"


def _interval(estimate: float, variance: float, critical: float) -> stats.Interval:
    half = critical * math.sqrt(variance) if variance > 0 or math.isinf(critical) else 0.0
    if math.isnan(half):  # an infinite boundary times a zero variance
        half = math.inf
    return stats.Interval(estimate, estimate - half, estimate + half)


def _negate(interval: stats.Interval) -> stats.Interval:
    return stats.Interval(-interval.estimate, -interval.upper, -interval.lower)


def raw_difference(champion: stats.Estimate, challenger: stats.Estimate) -> DifferenceEstimate:
    """Two independent samples of units: the Welch difference (``stats.welch_variance``) and the
    delta-method relative difference (``stats.difference_relative``'s variance)."""
    variance = stats.welch_variance(champion, challenger)
    relative = None
    m_c, m_t = champion.mean, challenger.mean
    if m_c != 0.0:
        rel_var = challenger.mean_variance / m_c**2 + champion.mean_variance * m_t**2 / m_c**4
        relative = (m_t / m_c - 1.0, rel_var)
    return DifferenceEstimate(m_t - m_c, variance, champion.n, challenger.n, relative=relative)


def paired_estimate(differences: stats.UnitMoments, champion_mean: float) -> DifferenceEstimate:
    """Shadow mode: per unit, the challenger's metric minus the champion's on the same rows.

    Pairing removes the between-row variance both models share. The relative difference is the
    mean difference over the champion's mean (the champion's own noise is ignored, which the
    pairing makes small).
    """
    n = differences.n
    variance = differences.mean_variance if n >= 2 else math.inf
    relative = None
    if champion_mean != 0.0 and math.isfinite(variance):
        scale = abs(champion_mean)
        relative = (differences.mean / scale, variance / scale**2)
    return DifferenceEstimate(differences.mean, variance, n, n, paired=True, relative=relative)


def adjusted_estimate(
    raw: DifferenceEstimate, estimate: float, variance: float, champion_mean: float
) -> DifferenceEstimate:
    """The covariate-adjusted difference in place of ``raw`` (relative: over the champion's mean,
    its noise ignored as for pairs)."""
    relative = None
    if champion_mean != 0.0:
        scale = abs(champion_mean)
        relative = (estimate / scale, variance / scale**2)
    return DifferenceEstimate(
        estimate,
        variance,
        raw.n_champion,
        raw.n_challenger,
        paired=raw.paired,
        adjusted=True,
        relative=relative,
    )


def difference(
    d: DifferenceEstimate, look: Look, alpha: float, higher_is_better: bool
) -> Difference:
    """The two-sided interval of ``d`` at ``alpha`` at this look, oriented (positive = better)."""
    critical = look.critical(alpha, 2, d.units)
    absolute = _interval(d.estimate, d.variance, critical)
    relative = None if d.relative is None else _interval(*d.relative, critical)
    if not higher_is_better:
        absolute = _negate(absolute)
        relative = None if relative is None else _negate(relative)
    z = absolute.estimate / math.sqrt(d.variance) if d.variance > 0 else None
    return Difference(
        absolute,
        relative,
        d.paired,
        d.n_champion,
        d.n_challenger,
        level=1.0 - alpha,
        label=interval_label(look, alpha),
        critical=critical,
        adjusted=d.adjusted,
        z=z,
    )


def always_valid_look(planned_samples: int) -> Look:
    return Look("confidence_sequence", 1, 0, planned_samples)


def arm_interval(arm: stats.Estimate, planned_samples: int, alpha: float) -> stats.Interval:
    """An always-valid interval for one arm's mean (the same confidence sequence, one sample)."""
    return arm_interval_at(arm, always_valid_look(planned_samples), alpha)


def arm_interval_at(arm: stats.Estimate, look: Look, alpha: float) -> stats.Interval:
    """One arm's mean ± the look's two-sided critical value at ``alpha``, in standard errors."""
    if arm.n < 2:
        return stats.Interval(arm.mean, -math.inf, math.inf)
    return _interval(arm.mean, arm.mean_variance, look.critical(alpha, 2, arm.n))


def split_difference(
    champion: stats.Estimate,
    challenger: stats.Estimate,
    planned_samples: int,
    alpha: float,
    higher_is_better: bool,
) -> Difference:
    """Two independent samples of units, with the always-valid confidence sequence."""
    d = raw_difference(champion, challenger)
    return difference(d, always_valid_look(planned_samples), alpha, higher_is_better)


def paired_difference(
    differences: stats.UnitMoments,
    champion_mean: float,
    planned_samples: int,
    alpha: float,
    higher_is_better: bool,
) -> Difference:
    """Shadow mode's paired difference (:func:`paired_estimate`), with the confidence sequence."""
    d = paired_estimate(differences, champion_mean)
    return difference(d, always_valid_look(planned_samples), alpha, higher_is_better)


def _confidence(alpha: float) -> str:
    return f"{(1 - alpha) * 100:.4g}%"


def error_rate_guardrail(
    champion: stats.UnitMoments,
    challenger: stats.UnitMoments,
    max_increase: float,
    look: Look,
    alpha: float,
) -> GuardrailResult:
    """Fails when the challenger's error rate exceeds the champion's by more than the margin,
    beyond doubt: the one-sided lower bound of the increase at this look is above it.

    Per unit x = model faults, y = requests: the rate is a ratio over units (users retry, and a
    user whose input breaks a model breaks it again). A re-read point estimate would reject
    healthy challengers by chance at some hourly look; a bound at the look's critical value does
    not. The bound is computed only when the increase itself exceeds the margin: below it, no
    bound can.
    """
    if champion.n < 2 or challenger.n < 2 or champion.sum_y <= 0 or challenger.sum_y <= 0:
        return GuardrailResult(
            "error_rate", True, None, None, None, None, max_increase, "too few requests"
        )
    c, t = champion.mean, challenger.mean
    increase = t - c
    head = f"challenger {t:.2%} vs champion {c:.2%} ({increase:+.2%}"
    if not increase > max_increase:
        detail = f"{head}; allowed +{max_increase:.2%})"
        interval = stats.Interval(increase, -math.inf, math.inf)
        return GuardrailResult("error_rate", True, c, t, None, interval, max_increase, detail)
    se = math.sqrt(champion.mean_variance + challenger.mean_variance)
    lower = increase - look.critical(alpha, 1, champion.n + challenger.n) * se
    if math.isnan(lower):
        lower = -math.inf
    passed = not lower > max_increase
    detail = (
        f"{head}, at least {lower:+.2%} with {_confidence(alpha)} confidence (one-sided, "
        f"{_method_words(look)}); allowed +{max_increase:.2%})"
    )
    interval = stats.Interval(increase, lower, math.inf)
    return GuardrailResult("error_rate", passed, c, t, lower, interval, max_increase, detail)


def _method_words(look: Look) -> str:
    if look.method == "confidence_sequence":
        return "always-valid"
    return f"group-sequential look {look.number}"


def latency_guardrail(
    champion: LatencyHistogram,
    challenger: LatencyHistogram,
    max_increase: float,
    look: Look,
    alpha: float,
    *,
    budget_s: float | None = None,
) -> GuardrailResult:
    """Fails when even the lower bound of the relative p95 increase is above the margin, and,
    with an absolute budget, the challenger's p95 is above the budget beyond doubt too.

    Each arm's p95 gets a one-sided bound at α/2 (``stats.quantile_ranks`` at the look's critical
    value): the challenger's from below, the champion's from above, read off the histogram's
    bucket edges (conservative by at most one 1% bucket). Both hold at once with probability
    1 − α, so the ratio of the bounds bounds the ratio of the quantiles. The budget is a second
    way to pass: a challenger within it is acceptable whatever the champion does, so failing needs
    both bounds beyond their limits (each false alarm still has probability at most α).
    """
    n_c, n_t = champion.n, challenger.n
    if n_c < 2 or n_t < 2:
        return GuardrailResult(
            "latency_p95", True, None, None, None, None, max_increase, "too few latencies"
        )
    champ, chall = champion.quantile(LATENCY_Q), challenger.quantile(LATENCY_Q)
    assert champ is not None and chall is not None  # n >= 2
    estimate = chall / champ - 1.0
    allowed = f"allowed +{max_increase:.0%}"
    if budget_s is not None:
        allowed += f" or a p95 within {budget_s * 1e3:g} ms"
    head = f"p95 {chall * 1e3:.2f} ms vs {champ * 1e3:.2f} ms: {estimate:+.1%}"
    within_budget = budget_s is not None and chall <= budget_s
    if not estimate > max_increase or within_budget:
        interval = stats.Interval(estimate, -math.inf, math.inf)
        detail = f"{head}; {allowed}"
        return GuardrailResult(
            "latency_p95", True, champ, chall, None, interval, max_increase, detail
        )
    crit_c = look.critical(alpha / 2, 1, n_c)
    crit_t = look.critical(alpha / 2, 1, n_t)
    _, upper_rank_c = stats.quantile_ranks(n_c, LATENCY_Q, crit_c)
    lower_rank_t, _ = stats.quantile_ranks(n_t, LATENCY_Q, crit_t)
    champ_upper = champion.order_statistic_bounds(upper_rank_c)[1]
    chall_lower = challenger.order_statistic_bounds(lower_rank_t)[0]
    lower = chall_lower / champ_upper - 1.0 if math.isfinite(champ_upper) else -1.0
    passed = not lower > max_increase
    over_budget = ""
    if budget_s is not None:
        passed = passed or not chall_lower > budget_s
        over_budget = f", challenger p95 at least {chall_lower * 1e3:.2f} ms"
    detail = (
        f"{head}, at least {lower:+.1%}{over_budget} with {_confidence(alpha)} confidence "
        f"(one-sided, {_method_words(look)}); {allowed}"
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
    look: Look | None = None,
    waiting: str | None = None,
) -> tuple[Decision, str]:
    """The decision rule, step by step, with the one-sentence reason for it.

    ``look``: the group-sequential look, whose final analysis (the first at t ≥ 1) ends the
    experiment (None or a confidence-sequence look: ``max_samples`` does). ``waiting``: when
    decisions become possible, appended to the "too few rows" reason.
    """
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
            + (f" {waiting}" if waiting else "")
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
    if difference.label:
        text += f" ({difference.label})"
    sequential = look is not None and look.method == "group_sequential"
    if sequential and look is not None and look.past_final:
        return "inconclusive", (
            f"No worthwhile difference: the final analysis (the first look with N* = "
            f"{look.planned} units judged) found none and no error is left to spend at look "
            f"{look.number}; stop the experiment."
        )
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
    covers = "0" if d.lower <= 0.0 else f"min_effect {min_effect:g}"
    if sequential and look is not None and look.final:
        return "inconclusive", (
            f"No worthwhile difference: at the final analysis (look {look.number}, "
            f"{look.units} of N* = {look.planned} units judged) {text} still covers {covers}; "
            "stop the experiment."
        )
    if not sequential and units_total >= max_samples:
        return "inconclusive", (
            f"No worthwhile difference: {units_total} units passed the maximum of {max_samples} "
            f"and {text} still covers {covers}; stop the experiment."
        )
    if sequential and look is not None and not look.grew:
        return "inconclusive", (
            f"No decision at this look: no judged unit was added since the last recorded look, "
            f"so it spends nothing ({text}); keep collecting."
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
