"""Judging an experiment whose split changed: each period of one challenger weight on its own,
then combined. Pure functions of the log's sums, no I/O.

Why. When the weight changes mid-experiment (a ramp 5% -> 20% -> 50%, an operator's
``PUT /admin/weights``), pooling every row compares a challenger whose rows are mostly late with a
champion whose rows are mostly early: a trend in the outcome over time (seasonality, a drifting
population) then shows up as a difference between the models, in either direction (Simpson's
paradox). Within one period both arms share the same time and the same assignment rule (a unit
takes the challenger when its bucket is below that weight), so each period is a randomised
experiment of its own.

The estimator (post-stratification by period, as a Cochran-Mantel-Haenszel-type weighted mean):

    d = Σ_k ω_k (m_Tk − m_Ck),   ω_k ∝ Y_Ck·Y_Tk / (Y_Ck + Y_Tk)   (Σ ω_k = 1)

with m_ak the metric's mean over arm a's judged rows of period k and Y_ak their number. Both arms
are standardised to the same period weights, so a trend weighs on both alike. Its variance is the
delta method over units, as for one period (:class:`experiments.stats.UnitMoments`), but a unit
may have rows in several periods, and in both arms when an increase moved it to the challenger
(the bucket rule only ever moves units champion -> challenger): unit u's influence is

    z_u = Σ_k ω_k [ (x_uTk − m_Tk·y_uTk) / Y_Tk − (x_uCk − m_Ck·y_uCk) / Y_Ck ]

and Var(d) = Σ_u z_u² (the champion's and challenger's parts and their covariance, each with the
n/(n−1) of the one-period formula; :mod:`experiments.aggregate` sums them in one pass over units).
A moved user is thus counted in the arm it was assigned in each period (intent-to-treat per
period), and its rows in the two arms are one unit's, correlated, not two independent ones.
With one period this is exactly the Welch delta-method variance the judge uses.

Validity is checked per period too: the units of each arm against that period's expected shares
(1 − w, w), requests per unit and feedback coverage (a moved user has fewer requests in each arm
than a user who stayed, so those are only comparable within a period).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from experiments import stats
from experiments.decision import (
    VALIDITY_THRESHOLD,
    ArmEstimate,
    Check,
    DifferenceEstimate,
    coverage_check,
    requests_per_unit_check,
    sample_ratio_check,
)
from experiments.sufficient import ArmData, LogSummary, Period, Stratified
from router.logschema import Arm


@dataclass(frozen=True)
class Cell:
    """One arm in one period, for the influence pass: rows of period ``weight`` contribute
    ``coefficient`` x (value - ``mean``)."""

    weight: float
    coefficient: float  # ω_k / Y_ak
    mean: float  # m_ak


@dataclass(frozen=True)
class Plan:
    """The periods' weights and each arm's cells: what the influence pass needs."""

    weights: tuple[float, ...]  # ω_k per period, 0 for a period without judged rows in both arms
    champion: tuple[Cell, ...]
    challenger: tuple[Cell, ...]


@dataclass(frozen=True)
class Sums:
    """Sums over units of the influences (``z_T``, ``z_C``) and the units with judged rows."""

    tt: float
    cc: float
    tc: float
    challenger_units: int
    champion_units: int
    units: int


def plan(periods: Sequence[Period]) -> Plan | None:
    """The combination's weights and cells; None when no period has judged rows in both arms."""
    sizes = []
    for p in periods:
        c, t = p.champion.metric.sum_y, p.challenger.metric.sum_y
        finite = p.champion.metric.finite and p.challenger.metric.finite
        sizes.append(c * t / (c + t) if c > 0 and t > 0 and finite else 0.0)
    total = sum(sizes)
    if total <= 0:
        return None
    weights = tuple(s / total for s in sizes)

    def cells(arm: str) -> tuple[Cell, ...]:
        out = []
        for p, w in zip(periods, weights, strict=True):
            m = getattr(p, arm).metric
            if w > 0:
                out.append(Cell(p.weight, w / m.sum_y, m.mean))
        return tuple(out)

    return Plan(weights, cells(Arm.CHAMPION.value), cells(Arm.CHALLENGER.value))


def combine(plan: Plan, sums: Sums) -> Stratified:
    """The standardised means and their variances from the influence sums."""

    def mean(cells: Sequence[Cell]) -> float:
        # Σ ω_k m_k, with ω_k = coefficient · Y_k: recovered from the cells alone.
        return math.fsum(
            w * c.mean for w, c in zip([w for w in plan.weights if w > 0], cells, strict=True)
        )

    def ddof(n: int) -> float:
        return n / (n - 1) if n >= 2 else math.inf

    return Stratified(
        weights=plan.weights,
        champion_mean=mean(plan.champion),
        challenger_mean=mean(plan.challenger),
        champion_variance=ddof(sums.champion_units) * sums.cc,
        challenger_variance=ddof(sums.challenger_units) * sums.tt,
        covariance=ddof(sums.units) * sums.tc if sums.tc else 0.0,
        champion_units=sums.champion_units,
        challenger_units=sums.challenger_units,
    )


def arm_estimates(summary: LogSummary, binary: bool) -> tuple[ArmEstimate, ArmEstimate] | None:
    """Each arm's standardised mean with its variance (floored for a 0/1 metric as one period's
    is: Σ ω_k² x the floor of each period), or None without a combination."""
    s = summary.stratified
    if s is None:
        return None
    variances = [s.champion_variance, s.challenger_variance]
    if binary:
        for i, arm in enumerate((Arm.CHAMPION.value, Arm.CHALLENGER.value)):
            floor = math.fsum(
                w * w * stats.binary_variance_floor(m.sum_x, m.rows)
                for p, w in zip(summary.periods, s.weights, strict=True)
                if w > 0
                for m in (getattr(p, arm).metric,)
            )
            variances[i] = max(variances[i], floor)
    return (
        ArmEstimate(s.champion_units, s.champion_mean, variances[0]),
        ArmEstimate(s.challenger_units, s.challenger_mean, variances[1]),
    )


def stratified_estimate(summary: LogSummary, binary: bool) -> DifferenceEstimate:
    """The challenger minus the champion over all periods, on the stratified variance (the
    covariance of units in both arms included), for the decision rule as any other estimate."""
    estimates = arm_estimates(summary, binary)
    s = summary.stratified
    assert estimates is not None and s is not None
    champion, challenger = estimates
    m_c, m_t = champion.mean, challenger.mean
    variance = max(champion.mean_variance + challenger.mean_variance - 2.0 * s.covariance, 0.0)
    relative: tuple[float, float] | None = None
    if m_c != 0.0:
        ratio = m_t / m_c
        rel_variance = (
            challenger.mean_variance
            - 2.0 * s.covariance * ratio
            + champion.mean_variance * ratio * ratio
        ) / (m_c * m_c)
        relative = (ratio - 1.0, max(rel_variance, 0.0))
    return DifferenceEstimate(m_t - m_c, variance, champion.n, challenger.n, relative=relative)


def period_checks(
    summary: LogSummary, planned_samples: int
) -> tuple[tuple[Check, ...], stats.SrmResult | None]:
    """Each period's validity checks against its own weight, and the period whose sample ratio
    fits worst (the one the report shows). One period: exactly the checks of an unchanged split."""
    checks: list[Check] = []
    worst: stats.SrmResult | None = None
    several = len(summary.periods) > 1
    for p in summary.periods:
        c, t = p.champion, p.challenger
        srm = stats.sequential_srm(
            {Arm.CHAMPION.value: c.units, Arm.CHALLENGER.value: t.units},
            {Arm.CHAMPION.value: 1.0 - p.weight, Arm.CHALLENGER.value: p.weight},
            VALIDITY_THRESHOLD,
        )
        if worst is None or srm.p_value < worst.p_value:
            worst = srm
        found: tuple[Check, ...] = (
            sample_ratio_check(srm),
            requests_per_unit_check(c.requests_per_unit, t.requests_per_unit, planned_samples),
            coverage_check(c.coverage, t.coverage, planned_samples),
        )
        if several:
            found = tuple(
                dataclasses.replace(x, detail=f"at challenger weight {p.weight:g}: {x.detail}")
                for x in found
            )
        checks.extend(found)
    return tuple(checks), worst


@dataclass(frozen=True)
class PeriodFigures:
    """One period as the report shows it."""

    weight: float
    first_ts: float | None
    last_ts: float | None
    champion_units: int
    challenger_units: int
    champion_n: int  # rows judged (closed outcomes)
    challenger_n: int
    combination_weight: float | None  # ω of the period in the combined metric


def figures(summary: LogSummary) -> tuple[PeriodFigures, ...]:
    s = summary.stratified
    return tuple(
        PeriodFigures(
            p.weight,
            p.first_ts,
            p.last_ts,
            p.champion.units,
            p.challenger.units,
            p.champion.metric.rows,
            p.challenger.metric.rows,
            s.weights[i] if s is not None else None,
        )
        for i, p in enumerate(summary.periods)
    )


def guardrail_arms(summary: LogSummary) -> tuple[ArmData, ArmData]:
    """The arms the guardrails judge: the split in force's period (none yet: empty arms), or the
    whole experiment when it has no periods (shadow mode)."""
    if not summary.periods:
        return summary.champion, summary.challenger
    if summary.current is None:
        return ArmData(), ArmData()
    current = summary.periods[summary.current]
    return current.champion, current.challenger
