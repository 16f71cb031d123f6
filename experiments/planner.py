"""The planner (``evaluate_and_promote --plan EFFECT``): from the log so far, the N* this experiment
needs to promote a true improvement of EFFECT with 80% power, and when it gets there. Pure.

It reads the sufficient statistics the judge reads (``LogSummary``):
units per day per arm, the metric's per-unit variance per arm, raw and adjusted with the champion's
prediction as covariate (:mod:`experiments.covariate`), and computes N* with
:func:`experiments.planning.plan` under the configured method (the primary metric's share of α,
two-sided, promotion past ``min_effect``), with one look per evaluation at the cadence the audit
trail shows (one a day without one). The expected date assumes new units keep arriving at the
rate so far and adds the outcome window (a unit is judged once its window closes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from experiments.covariate import adjust
from experiments.decision import BINARY_METRICS, METRIC_SHARE
from experiments.planning import plan, unit_variance
from experiments.sufficient import ArmData, LogSummary
from router.config import JudgingMethod, Settings

__all__ = ["POWER", "ArmPlan", "ExperimentPlan", "plan_experiment"]

POWER = 0.8
DAY_S = 86_400.0
#: Looks the design assumes at most: beyond 50 the inflation factor barely moves (1.049 at 50
#: looks, 1.051 at 100, O'Brien-Fleming-type, α 0.04) and each look costs the planner time.
MAX_LOOKS = 50


@dataclass(frozen=True)
class ArmPlan:
    units: int  # units with a request so far
    units_per_day: float | None
    judged_units: int
    variance: float | None  # the metric's per-unit variance (None: too few judged units)
    adjusted_variance: float | None  # with the covariate (None: adjustment off)


@dataclass(frozen=True)
class ExperimentPlan:
    """What the planner found; ``reason`` says why there is no N* when there is none."""

    method: JudgingMethod
    metric: str
    effect: float
    margin: float  # min_effect: a promotion needs the interval above it
    alpha: float  # the primary metric's share of α (two-sided)
    power: float
    challenger_share: float
    champion: ArmPlan
    challenger: ArmPlan
    adjusted: bool
    adjustment: str  # "on", or why it is off
    looks_per_day: float
    looks: int | None = None  # the looks up to N* the design assumes
    units_needed: float | None = None  # N*, both arms
    raised: bool = False  # N* raised to give the smaller arm min_samples_per_arm units
    inflation: float | None = None  # N* over the fixed-horizon N*
    configured: int = 0  # experiment.planned_samples today
    days_from_start: float | None = None  # until N* units are judged
    expected_at: float | None = None  # unix time N* units are judged
    reason: str | None = None


def _arm(data: ArmData, elapsed_days: float) -> ArmPlan:
    m = data.metric
    variance = unit_variance(m) if m.n >= 2 and m.sum_y > 0 else None
    per_day = data.units / elapsed_days if elapsed_days > 0 else None
    return ArmPlan(data.units, per_day, m.n, variance, None)


def plan_experiment(
    settings: Settings,
    summary: LogSummary,
    *,
    effect: float,
    now: float,
    looks_per_day: float = 1.0,
    looks: int | None = None,
) -> ExperimentPlan:
    """The plan for this experiment from its log so far (see the module docstring); ``looks``:
    the number of looks up to N*, when known (else from ``looks_per_day`` and the duration)."""
    exp = settings.experiment
    w = settings.routing.challenger_weight
    alpha = exp.alpha * METRIC_SHARE
    elapsed = (now - summary.first_ts) / DAY_S if summary.first_ts is not None else 0.0
    champion, challenger = _arm(summary.champion, elapsed), _arm(summary.challenger, elapsed)
    result = adjust(
        summary.covariate,
        summary.champion.metric,
        summary.challenger.metric,
        binary=exp.metric in BINARY_METRICS,
    )
    on = exp.adjustment == "auto" and result.on and summary.paired is None
    if on:
        champion = _with_adjusted(champion, result.champion_unit_variance)
        challenger = _with_adjusted(challenger, result.challenger_unit_variance)
    base = ExperimentPlan(
        method=exp.method,
        metric=exp.metric,
        effect=effect,
        margin=exp.min_effect,
        alpha=alpha,
        power=POWER,
        challenger_share=w,
        champion=champion,
        challenger=challenger,
        adjusted=on,
        adjustment="on" if on else result.reason,
        looks_per_day=looks_per_day,
        configured=exp.planned_samples,
    )
    reason = _cannot_plan(base, summary)
    if reason is not None:
        return replace(base, reason=reason)
    var_c = champion.adjusted_variance if on else champion.variance
    var_t = challenger.adjusted_variance if on else challenger.variance
    assert var_c is not None and var_t is not None  # _cannot_plan checked
    rate = (champion.units_per_day or 0.0) + (challenger.units_per_day or 0.0)
    least = exp.min_samples_per_arm / min(w, 1.0 - w)
    planned_looks = looks or 10
    for _ in range(1 if looks else 3):  # the looks depend on the duration, the duration on N*
        p = plan(
            effect,
            var_c,
            var_t,
            challenger_share=w,
            alpha=alpha,
            power=POWER,
            method=exp.method,
            looks=planned_looks,
            margin=exp.min_effect,
        )
        days = max(p.units, least) / rate if rate > 0 else math.inf
        if looks is None and math.isfinite(days):
            planned_looks = max(1, min(MAX_LOOKS, round(days * looks_per_day)))
    window_days = exp.outcome_window_s / DAY_S
    expected = None
    if math.isfinite(days) and summary.first_ts is not None:
        expected = summary.first_ts + (days + window_days) * DAY_S
    # Below min_samples_per_arm judged rows in the smaller arm nothing is decided: never less.
    return replace(
        base,
        looks=planned_looks,
        units_needed=max(p.units, least),
        raised=p.units < least,
        inflation=p.inflation,
        days_from_start=days + window_days if math.isfinite(days) else None,
        expected_at=expected,
        reason=None if rate > 0 else "no units arrive: no date can be estimated",
    )


def _cannot_plan(p: ExperimentPlan, summary: LogSummary) -> str | None:
    if summary.paired is not None:
        return "shadow mode is judged on pairs; the planner plans split experiments"
    if not 0.0 < p.challenger_share < 1.0:
        return f"routing.challenger_weight is {p.challenger_share:g}: no split to plan"
    if p.effect <= p.margin:
        return (
            f"the effect to find ({p.effect:g}) must exceed experiment.min_effect ({p.margin:g}): "
            "a promotion needs the interval wholly above it"
        )
    if p.champion.variance is None or p.challenger.variance is None:
        return (
            "too few judged units to estimate the metric's variance (each arm needs 2 whose "
            "outcome window has closed)"
        )
    return None


def _with_adjusted(arm: ArmPlan, variance: float | None) -> ArmPlan:
    return ArmPlan(arm.units, arm.units_per_day, arm.judged_units, arm.variance, variance)
