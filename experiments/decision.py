"""Deciding, without I/O: per-row metrics, paired intervals, guardrails and the decision rule.

Everything here is a pure function of numbers already read from the prediction log, so the rule
can be tested case by case and ``--dry-run`` costs nothing: :mod:`experiments.evaluate` gathers,
this module judges, :mod:`experiments.promote` acts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from experiments import stats
from router.config import MetricName

Decision = Literal["promote", "reject", "inconclusive", "invalid"]

#: The CLI's exit code for each decision (DESIGN.md, "CLI"); 1 is reserved for errors.
EXIT_CODES: dict[Decision, int] = {"promote": 0, "reject": 3, "inconclusive": 4, "invalid": 5}

#: Metrics where a larger per-row value is better; the others are losses.
HIGHER_IS_BETTER: dict[MetricName, bool] = {
    "accuracy": True,
    "outcome": True,
    "log_loss": False,
    "brier": False,
    "abs_error": False,
    "squared_error": False,
}

# Log loss of a probability of exactly 0 or 1 is infinite; sklearn clips the same way.
_EPS = 1e-15


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
    observed: float | None  # the figure compared with the threshold
    interval: stats.Interval | None
    threshold: float
    detail: str


def row_metric(
    metric: MetricName,
    score: float | None,
    predicted_class: str | None,
    outcome: str,
    outcome_value: float | None,
) -> float | None:
    """One scored row's metric in its natural units, or None when the row cannot carry it."""
    if metric == "accuracy":
        if predicted_class is None:
            return None
        return 1.0 if _same_label(predicted_class, outcome) else 0.0
    if metric == "outcome":
        return outcome_value
    if score is None or outcome_value is None or not math.isfinite(score):
        return None
    if metric in ("log_loss", "brier"):
        if outcome_value not in (0.0, 1.0):
            return None
        if metric == "brier":
            return (score - outcome_value) ** 2
        p = min(max(score, _EPS), 1.0 - _EPS)
        return -math.log(p) if outcome_value == 1.0 else -math.log(1.0 - p)
    if metric == "abs_error":
        return abs(score - outcome_value)
    return (score - outcome_value) ** 2


def _same_label(predicted_class: str, outcome_json: str) -> bool:
    # Outcomes arrive as JSON (1, "1", true, "churn"); predicted classes as strings ("1", "churn").
    try:
        outcome: object = json.loads(outcome_json)
    except ValueError:
        outcome = outcome_json
    if isinstance(outcome, bool):
        outcome = int(outcome)
    if isinstance(outcome, int | float):
        try:
            return float(predicted_class) == float(outcome)
        except ValueError:
            return False
    return predicted_class == str(outcome)


def _negate(interval: stats.Interval) -> stats.Interval:
    return stats.Interval(-interval.estimate, -interval.upper, -interval.lower)


def arm_interval(values: stats.ArmStats, planned_samples: int, alpha: float) -> stats.Interval:
    """An always-valid interval for one arm's mean (the same confidence sequence, one sample)."""
    if values.n < 2:
        return stats.Interval(values.mean if values.n else math.nan, -math.inf, math.inf)
    half = stats.cs_halfwidth(values.variance / values.n, values.n, planned_samples, alpha)
    return stats.Interval(values.mean, values.mean - half, values.mean + half)


def split_difference(
    champion: stats.ArmStats,
    challenger: stats.ArmStats,
    planned_samples: int,
    alpha: float,
    higher_is_better: bool,
) -> Difference:
    """Two independent samples: the Welch confidence sequence from :mod:`experiments.stats`."""
    absolute = stats.difference_absolute(champion, challenger, planned_samples, alpha)
    relative: stats.Interval | None = None
    if champion.mean != 0.0:
        relative = stats.difference_relative(champion, challenger, planned_samples, alpha)
    if not higher_is_better:
        absolute = _negate(absolute)
        relative = None if relative is None else _negate(relative)
    return Difference(absolute, relative, False, champion.n, challenger.n)


def paired_difference(
    champion: Sequence[float],
    challenger: Sequence[float],
    planned_samples: int,
    alpha: float,
    higher_is_better: bool,
) -> Difference:
    """Shadow mode: the same rows scored by both models, judged on per-pair differences.

    The confidence sequence is applied to the mean of the differences (variance of the mean
    s²_d/n, N = number of pairs); pairing removes the between-row variance both arms share. The
    relative difference uses the delta method with the pairs' covariance.
    """
    n = len(champion)
    if n != len(challenger):
        raise ValueError("paired samples must have the same length")
    sign = 1.0 if higher_is_better else -1.0
    diffs = stats.ArmStats.from_values(
        [sign * (t - c) for c, t in zip(champion, challenger, strict=True)]
    )
    if n < 2:
        nan = stats.Interval(diffs.mean if n else math.nan, -math.inf, math.inf)
        return Difference(nan, None, True, n, n)
    half = stats.cs_halfwidth(diffs.variance / n, n, planned_samples, alpha)
    absolute = stats.Interval(diffs.mean, diffs.mean - half, diffs.mean + half)
    mean_c = math.fsum(champion) / n
    mean_t = math.fsum(challenger) / n
    relative: stats.Interval | None = None
    if mean_c != 0.0:
        var_c = math.fsum((c - mean_c) ** 2 for c in champion) / (n - 1)
        var_t = math.fsum((t - mean_t) ** 2 for t in challenger) / (n - 1)
        cov = math.fsum(
            (c - mean_c) * (t - mean_t) for c, t in zip(champion, challenger, strict=True)
        ) / (n - 1)
        ratio = mean_t / mean_c
        var_ratio = (var_t - 2 * ratio * cov + ratio**2 * var_c) / (n * mean_c**2)
        half_r = stats.cs_halfwidth(max(var_ratio, 0.0), n, planned_samples, alpha)
        estimate = sign * (ratio - 1.0)
        relative = stats.Interval(estimate, estimate - half_r, estimate + half_r)
    return Difference(absolute, relative, True, n, n)


def error_rate_guardrail(
    champion_errors: int,
    champion_requests: int,
    challenger_errors: int,
    challenger_requests: int,
    max_increase: float,
) -> GuardrailResult:
    """Fails when the challenger's error rate exceeds the champion's by more than the margin."""
    if champion_requests == 0 or challenger_requests == 0:
        return GuardrailResult(
            "error_rate", True, None, None, None, None, max_increase, "no requests to compare"
        )
    champ = champion_errors / champion_requests
    chall = challenger_errors / challenger_requests
    increase = chall - champ
    passed = increase <= max_increase
    detail = (
        f"challenger {chall:.2%} vs champion {champ:.2%} "
        f"({increase:+.2%}, allowed +{max_increase:.2%})"
    )
    return GuardrailResult("error_rate", passed, champ, chall, increase, None, max_increase, detail)


def latency_guardrail(
    champion_latencies: Sequence[float],
    challenger_latencies: Sequence[float],
    max_increase: float,
    alpha: float,
) -> GuardrailResult:
    """Fails when even the lower bound of the relative p95 increase is above the margin."""
    if len(champion_latencies) < 2 or len(challenger_latencies) < 2:
        return GuardrailResult(
            "latency_p95", True, None, None, None, None, max_increase, "too few latencies"
        )
    ratio = stats.quantile_ratio_interval(champion_latencies, challenger_latencies, 0.95, alpha)
    champ = stats.quantile_interval(champion_latencies, 0.95, alpha).estimate
    chall = stats.quantile_interval(challenger_latencies, 0.95, alpha).estimate
    passed = not ratio.lower > max_increase
    detail = (
        f"p95 {chall * 1e3:.2f} ms vs {champ * 1e3:.2f} ms: {ratio.estimate:+.1%} "
        f"[{ratio.lower:+.1%}, {ratio.upper:+.1%}], allowed +{max_increase:.0%}"
    )
    return GuardrailResult(
        "latency_p95", passed, champ, chall, ratio.lower, ratio, max_increase, detail
    )


def decide(
    *,
    srm: stats.SrmResult | None,
    no_data_reason: str | None,
    n_champion: int,
    n_challenger: int,
    min_samples_per_arm: int,
    guardrails: Sequence[GuardrailResult],
    difference: Difference | None,
    min_effect: float,
    metric: MetricName,
) -> tuple[Decision, str]:
    """The decision rule, in DESIGN.md's order, with the one-sentence reason for it."""
    if no_data_reason is not None:
        return "invalid", no_data_reason
    if srm is not None and srm.mismatch:
        observed = ", ".join(f"{arm} {count}" for arm, count in srm.observed.items())
        return "invalid", (
            f"Sample-ratio mismatch (p = {srm.p_value:.2g} < 0.001, observed {observed}): "
            "assignment is broken, so no comparison can be trusted."
        )
    short = min(n_champion, n_challenger)
    if short < min_samples_per_arm:
        return "inconclusive", (
            f"Only {short} rows with closed outcomes in the smaller arm "
            f"(champion {n_champion}, challenger {n_challenger}); "
            f"{min_samples_per_arm} per arm are needed before deciding."
        )
    failed = [g for g in guardrails if not g.passed]
    if failed:
        names = "; ".join(f"{g.name}: {g.detail}" for g in failed)
        return "reject", f"Guardrail failed ({names})."
    if difference is None:  # pragma: no cover - every path with enough rows computes one
        return "inconclusive", "No difference could be computed."
    d = difference.absolute
    text = f"{metric} difference {d.estimate:+.4g} [{d.lower:+.4g}, {d.upper:+.4g}]"
    if d.lower > min_effect:
        margin = f"min_effect {min_effect:g}" if min_effect else "0"
        return "promote", f"The challenger is better: {text} lies wholly above {margin}."
    if d.upper < 0.0:
        return "reject", f"The challenger is worse: {text} lies wholly below 0."
    return "inconclusive", (
        f"No decision yet: {text} still covers "
        f"{'0' if d.lower <= 0.0 <= d.upper else f'min_effect {min_effect:g}'}; keep collecting."
    )
