"""Judging an experiment, without I/O: sufficient statistics in, per-arm figures and a decision out.

The steps, in the order :func:`judge` takes them:

1. **attribute**: done by the log itself (intent-to-treat, :mod:`router.logschema`): every request
   counts in the arm it was assigned to, a challenger that fell back keeps its request with the
   answer actually served; client errors are nobody's; only predictions whose outcome window has
   closed are judged, and only outcomes that arrived within it (:mod:`experiments.aggregate`).
2. **units**: the unit of analysis is the unit of randomisation: users (routing keys) when
   assignment is sticky, else requests. Each arm's metric is a ratio over units with a
   cluster-robust (delta-method) variance (:class:`experiments.stats.UnitMoments`).
3. **checks**: validity (sample ratio of units, requests per unit, feedback coverage), then
   enough data (rows, and events and non-events of a 0/1 metric), then the guardrails.
4. **estimate**: the difference with its variance (``decision.DifferenceEstimate``): paired in
   shadow mode; in split mode adjusted with the champion's prediction as covariate when
   :func:`experiments.covariate.adjust` allows, else raw.
5. **decide**: at this look (:mod:`experiments.looks`: the group-sequential boundary, or the
   confidence sequence), :func:`experiments.decision.decide`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from experiments import stats, strata
from experiments.covariate import AdjustmentResult, adjust
from experiments.decision import (
    BINARY_METRICS,
    GUARDRAIL_SHARE,
    HIGHER_IS_BETTER,
    METRIC_SHARE,
    VALIDITY_THRESHOLD,
    ArmEstimate,
    Check,
    Decision,
    Difference,
    DifferenceEstimate,
    GuardrailResult,
    adjusted_estimate,
    always_valid_look,
    arm_estimate,
    arm_interval_at,
    coverage_check,
    decide,
    difference,
    error_rate_guardrail,
    events_shortfall,
    latency_guardrail,
    paired_difference,
    paired_estimate,
    raw_difference,
    requests_per_unit_check,
    sample_ratio_check,
    split_difference,
)
from experiments.looks import Look, LookHistory, LookReport, this_look
from experiments.promquery import PrometheusGuardrails
from experiments.ramp import RampStage
from experiments.sufficient import ArmData, LatencyHistogram, LogSummary
from router.config import GuardrailSettings, JudgingMethod, MetricName, Settings
from router.logschema import Arm, RoutingMode, challenger_arm
from router.splitrecord import Split

_HIST_BINS = 30


@dataclass(frozen=True)
class AliasSnapshot:
    """The versions behind the three aliases at one moment (None: alias not set)."""

    champion: str | None
    challenger: str | None
    rollback: str | None


@dataclass(frozen=True)
class LatencySummary:
    n: int
    p50: float | None
    p95: float | None
    hist_edges: tuple[float, ...] = ()  # seconds, log-spaced, shared by both arms
    hist_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class ArmSummary:
    arm: Arm  # the challenger's is shadow in shadow mode
    version: str | None
    requests: int  # assigned requests (client errors excluded)
    errors: int  # requests that failed for a model fault
    n: int  # rows with an outcome inside the window that enter the metric
    metric_mean: float | None
    metric_interval: stats.Interval | None
    latency: LatencySummary
    units: int = 0
    fallbacks: int = 0
    client_errors: int = 0
    coverage: float | None = None  # share of matured predictions with an outcome

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class SeriesPoint:
    """The confidence sequence of the difference over the units that had entered by ``ts``.

    With requests as units that is the interval as of predictions made up to ``ts``; with users,
    the cumulative interval by cohort of first judged prediction (as GrowthBook plots it).
    """

    ts: float
    n_champion: int
    n_challenger: int
    estimate: float
    lower: float
    upper: float


@dataclass(frozen=True)
class Evaluation:
    """Everything one evaluation found, and the decision; a value, so acting is separate."""

    decision: Decision
    reason: str
    model_name: str
    experiment_id: str
    aliases: AliasSnapshot
    mode: RoutingMode
    metric: MetricName
    higher_is_better: bool
    alpha: float
    planned_samples: int
    min_samples_per_arm: int
    min_effect: float
    outcome_window_s: float
    evaluated_at: float
    cutoff: float
    started_at: float | None  # first prediction of the experiment
    champion: ArmSummary
    challenger: ArmSummary
    difference: Difference | None
    srm: stats.SrmResult | None  # None: not applicable (shadow mode)
    guardrails: tuple[GuardrailResult, ...]
    series: tuple[SeriesPoint, ...] = ()
    prometheus: PrometheusGuardrails | None = None
    skipped_rows: int = 0  # rows with an outcome the metric could not use (e.g. no score)
    notes: tuple[str, ...] = field(default=())
    unit: str = "request"  # what was randomised: "user (routing key)" or "request"
    checks: tuple[Check, ...] = ()
    cap: float | None = None  # the row metric was capped (winsorised) at this value
    max_samples: int = 0
    method: JudgingMethod = "group_sequential"
    look: LookReport | None = None
    adjustment: AdjustmentResult | None = None  # split mode: the covariate adjustment's verdict
    guardrail_settings: GuardrailSettings = field(default_factory=GuardrailSettings)
    interval_label: str = ""  # how the metric's intervals were computed (level, method, look)
    # The split's periods (one per challenger weight, experiments/strata.py) and, with
    # experiment.ramp, where the ramp stands (experiments/ramp.py, set by evaluate).
    periods: tuple[strata.PeriodFigures, ...] = ()
    ramp: RampStage | None = None
    split: Split | None = None  # the split in force when evaluated (set by evaluate)

    @property
    def advances_ramp(self) -> bool:
        """A ramp moves on to its next stage (experiments/ramp.py) rather than deciding."""
        return self.ramp is not None and self.ramp.action == "advance"


def judged_units(summary: LogSummary) -> int:
    """The units the primary metric judges (both arms; the pairs in shadow mode): the numerator
    of the information fraction."""
    if summary.paired is not None:
        return summary.paired.n
    return summary.champion.metric.n + summary.challenger.metric.n


def judge(
    settings: Settings,
    aliases: AliasSnapshot,
    eid: str,
    summary: LogSummary,
    *,
    now: float,
    no_data_reason: str | None = None,
    looks: LookHistory | Look | None = None,
) -> Evaluation:
    """Pure: turn the log's sufficient statistics into per-arm figures and a decision.

    ``no_data_reason``: the caller's finding that there is nothing to judge (no experiment
    running, no rows for this experiment); it stands as the decision's reason. ``looks``: the
    looks recorded before this one (the CLI, from the audit trail), or this look itself (the
    simulation, whose looks share one schedule); None: the first look.
    """
    exp = settings.experiment
    mode: RoutingMode = summary.mode or settings.routing.mode
    higher = HIGHER_IS_BETTER[exp.metric]
    binary = exp.metric in BINARY_METRICS
    alpha_metric = exp.alpha * METRIC_SHARE
    alpha_guard = exp.alpha * GUARDRAIL_SHARE
    planned = exp.planned_samples
    max_samples = exp.max_samples or 5 * planned
    champ, chall = summary.champion, summary.challenger

    # 1-2. attribute and units: done in the log and in SQL; here, only what is missing.
    no_data = no_data_reason or _no_data(eid, summary)
    units = judged_units(summary) if no_data is None else 0
    if isinstance(looks, Look):
        look = looks
    else:
        look = this_look(exp.method, looks or LookHistory(), units, planned)

    # 3. checks: validity first (they make the comparison meaningless), then enough data.
    checks: tuple[Check, ...] = ()
    srm: stats.SrmResult | None = None
    if mode == RoutingMode.SPLIT and no_data is None and summary.periods:
        # Each period of one challenger weight against its own shares (experiments/strata.py).
        checks, srm = strata.period_checks(summary, exp.planned_samples)
    elif mode == RoutingMode.SPLIT and no_data is None:
        w = settings.routing.challenger_weight
        counts = {Arm.CHAMPION.value: champ.units, Arm.CHALLENGER.value: chall.units}
        weights = {Arm.CHAMPION.value: 1.0 - w, Arm.CHALLENGER.value: w}
        srm = stats.sequential_srm(counts, weights, VALIDITY_THRESHOLD)
        checks = (
            sample_ratio_check(srm),
            requests_per_unit_check(champ.requests_per_unit, chall.requests_per_unit, planned),
            coverage_check(champ.coverage, chall.coverage, planned),
        )
    elif no_data is None:
        checks = (coverage_check(champ.coverage, chall.coverage, planned),)
    n_champ, n_chall = champ.metric.rows, chall.metric.rows

    diff: Difference | None = None
    adjustment: AdjustmentResult | None = None
    guardrails: tuple[GuardrailResult, ...] = ()
    shortfall: str | None = None
    overflow = _overflow(summary, exp.metric)
    if overflow is not None:
        no_data = no_data or overflow
    elif no_data is None and min(champ.metric.n, chall.metric.n) >= 2 and min(n_champ, n_chall):
        shortfall = events_shortfall(champ.metric, chall.metric, exp.metric)
        # 4. estimate: paired, adjusted or raw.
        estimate, adjustment = _estimate(summary, binary, exp.adjustment == "auto")
        diff = difference(estimate, look, alpha_metric, higher)
    if overflow is None and no_data is None:
        # Requests and latencies need no outcome: judged as soon as there are some (a ramp
        # rejects a failing challenger before its first outcome arrives). On the split in force
        # when the split changed (experiments/strata.py).
        g_champ, g_chall = strata.guardrail_arms(summary)
        g = exp.guardrails
        budget = None if g.max_latency_p95_ms is None else g.max_latency_p95_ms / 1e3
        # A ramp must stop a harmful challenger at any stage, before any outcome has closed (the
        # group-sequential looks count judged outcomes, so none would exist yet): its guardrails
        # use the always-valid sequence, valid at any moment, with the same share of alpha.
        guard_look = always_valid_look(planned) if exp.ramp else look
        guardrails = (
            error_rate_guardrail(
                g_champ.faults, g_chall.faults, g.max_error_rate_increase, guard_look, alpha_guard
            ),
            latency_guardrail(
                g_champ.latency,
                g_chall.latency,
                g.max_latency_p95_increase,
                guard_look,
                alpha_guard,
                budget_s=budget,
            ),
        )

    # 5. decide.
    decision, reason = decide(
        no_data_reason=no_data,
        checks=checks,
        n_champion=n_champ,
        n_challenger=n_chall,
        min_samples_per_arm=exp.min_samples_per_arm,
        too_few_events=shortfall,
        guardrails=guardrails,
        difference=diff,
        min_effect=exp.min_effect,
        units_total=champ.metric.n + chall.metric.n,
        max_samples=max_samples,
        metric=exp.metric,
        look=look,
        waiting=_waiting(summary, settings, now),
    )
    other = challenger_arm(mode)
    edges = _hist_edges(champ.latency, chall.latency)
    standardised = strata.arm_estimates(summary, binary) or (None, None)
    versions = {Arm.CHAMPION: aliases.champion, other: aliases.challenger}
    look_report = look.report(alpha_metric, max(units, 2)) if no_data is None else None
    return Evaluation(
        decision=decision,
        reason=reason,
        model_name=settings.model.name,
        experiment_id=eid,
        aliases=aliases,
        mode=mode,
        metric=exp.metric,
        higher_is_better=higher,
        alpha=exp.alpha,
        planned_samples=planned,
        min_samples_per_arm=exp.min_samples_per_arm,
        min_effect=exp.min_effect,
        outcome_window_s=exp.outcome_window_s,
        evaluated_at=now,
        cutoff=now - exp.outcome_window_s,
        started_at=summary.first_ts,
        champion=_arm_summary(
            Arm.CHAMPION, versions, champ, edges, binary, look, alpha_metric, standardised[0]
        ),
        challenger=_arm_summary(
            other, versions, chall, edges, binary, look, alpha_metric, standardised[1]
        ),
        difference=diff,
        srm=srm,
        guardrails=guardrails,
        series=_series(summary, binary, planned, alpha_metric, higher),
        skipped_rows=champ.skipped + chall.skipped,
        unit="user (routing key)" if summary.keyed else "request",
        checks=checks,
        cap=summary.cap,
        max_samples=max_samples,
        method=exp.method,
        look=look_report,
        adjustment=adjustment,
        guardrail_settings=exp.guardrails,
        interval_label=diff.label if diff is not None else "",
        periods=strata.figures(summary),
    )


def _estimate(
    s: LogSummary, binary: bool, adjust_allowed: bool
) -> tuple[DifferenceEstimate, AdjustmentResult | None]:
    """The difference to judge, and the adjustment's verdict (split mode only)."""
    if s.paired is not None:
        return paired_estimate(s.paired, s.champion.metric.mean), None
    if s.stratified is not None:
        # The split changed: each period judged on its own, then combined (experiments/strata.py).
        # The adjustment's cross-fitted slope is fitted over all rows, not per period: off here.
        return strata.stratified_estimate(s, binary), AdjustmentResult(
            False, "the split changed during the experiment: periods combined, unadjusted"
        )
    c, t = s.champion.metric, s.challenger.metric
    raw = raw_difference(arm_estimate(c, binary), arm_estimate(t, binary))
    if not adjust_allowed:
        return raw, AdjustmentResult(False, "experiment.adjustment is off")
    result = adjust(s.covariate, c, t, binary=binary)
    if not result.on or result.estimate is None or result.variance is None:
        return raw, result
    return adjusted_estimate(raw, result.estimate, result.variance, c.mean), result


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def duration(seconds: float) -> str:
    """A window in words: "7-day", "36-hour", "2-second"."""
    for unit, size in (("day", 86_400.0), ("hour", 3_600.0), ("minute", 60.0)):
        if seconds >= size and (seconds / size) == int(seconds / size):
            return f"{int(seconds / size)}-{unit}"
    return f"{seconds:g}-second"


def _waiting(s: LogSummary, settings: Settings, now: float) -> str | None:
    """When outcomes close and the earliest date a decision is possible (issue: "Only 0 rows
    with closed outcomes" said neither). The estimate assumes the traffic so far goes on and every
    prediction gets an outcome (coverage so far, once some have closed)."""
    exp = settings.experiment
    window = exp.outcome_window_s
    if s.first_ts is None:
        return None
    first_close = s.first_ts + window
    text = (
        f"Predictions are judged once their {duration(window)} outcome window "
        f"(experiment.outcome_window_s = {window:g} s) has closed: the first ones "
        f"({_utc(s.first_ts)}) {'closed' if first_close <= now else 'close'} on "
        f"{_utc(first_close)}."
    )
    elapsed = now - s.first_ts
    earliest = first_close
    for arm, data in ((Arm.CHAMPION, s.champion), (Arm.CHALLENGER, s.challenger)):
        if data.requests == 0 or elapsed <= 0:
            return text + f" The {arm} has no requests yet, so no decision date can be estimated."
        coverage = data.coverage.mean if data.coverage.sum_y > 0 else 1.0
        needed = exp.min_samples_per_arm / max(coverage, 1e-9)
        rate = data.requests / elapsed  # requests per second so far
        earliest = max(earliest, s.first_ts + needed / rate + window)
    return text + (
        f" At the traffic so far, both arms have {exp.min_samples_per_arm} judged rows around "
        f"{_utc(earliest)}: the earliest a decision is possible."
    )


def _no_data(eid: str, s: LogSummary) -> str | None:
    if s.empty:
        return f"No predictions are logged for experiment {eid!r}."
    if s.mode is None:
        return "Both challenger and shadow rows are logged for this experiment: modes mixed."
    return None


def _overflow(summary: LogSummary, metric: MetricName) -> str | None:
    for arm, data in ((Arm.CHAMPION, summary.champion), (Arm.CHALLENGER, summary.challenger)):
        if not data.metric.finite:
            return (
                f"The {arm}'s {metric} overflows double precision (a score or outcome of "
                "magnitude above ~1e154): cap the metric (experiment.capping: on) or fix the "
                "model's output."
            )
    return None


def _arm_summary(
    arm: Arm,
    versions: dict[Arm, str | None],
    data: ArmData,
    edges: tuple[float, ...],
    binary: bool,
    look: Look,
    alpha: float,
    standardised: ArmEstimate | None = None,
) -> ArmSummary:
    m = data.metric
    interval = None
    if standardised is not None:  # the split changed: the mean over periods (strata.py)
        interval = arm_interval_at(standardised, look, alpha)
    elif m.n >= 2 and m.sum_y > 0 and m.finite:
        interval = arm_interval_at(arm_estimate(m, binary), look, alpha)
    return ArmSummary(
        arm=arm,
        version=versions.get(arm),
        requests=data.requests,
        errors=data.faulted,
        n=m.rows,
        metric_mean=(
            standardised.mean
            if standardised is not None
            else (m.mean if m.sum_y > 0 and m.finite else None)
        ),
        metric_interval=interval,
        latency=_latency_summary(data.latency, edges),
        units=data.units,
        fallbacks=data.fallbacks,
        client_errors=data.client_errors,
        coverage=data.coverage.mean if data.coverage.sum_y > 0 else None,
    )


def _series(
    s: LogSummary, binary: bool, planned: int, alpha: float, higher: bool
) -> tuple[SeriesPoint, ...]:
    """The difference's confidence sequence as predictions accumulated (running sums)."""
    c = t = stats.UnitMoments.zero()
    points: list[SeriesPoint] = []
    for piece in s.series:
        c, t = c + piece.champion, t + piece.challenger
        if min(c.n, t.n) < 2 or min(c.sum_y, t.sum_y) <= 0 or not (c.finite and t.finite):
            continue
        if s.paired is not None:  # shadow: the challenger slot carries the differences
            d = paired_difference(t, c.mean, planned, alpha, higher).absolute
        else:
            d = split_difference(
                arm_estimate(c, binary), arm_estimate(t, binary), planned, alpha, higher
            ).absolute
        points.append(SeriesPoint(piece.ts, c.rows, t.rows, d.estimate, d.lower, d.upper))
    return tuple(points)


def _hist_edges(*hists: LatencyHistogram) -> tuple[float, ...]:
    buckets = [b for h in hists for b in h.counts]
    if not buckets:
        return ()
    lo, hi = min(buckets), max(buckets) + 1
    step = max(1, math.ceil((hi - lo) / _HIST_BINS))
    return tuple(LatencyHistogram.edge(b) for b in range(lo, hi + step, step))


def _latency_summary(hist: LatencyHistogram, edges: tuple[float, ...]) -> LatencySummary:
    if hist.n == 0:
        return LatencySummary(0, None, None)
    counts = [0] * max(len(edges) - 1, 0)
    for b, n in hist.counts.items():
        mid = LatencyHistogram.edge(b + 0.5)
        counts[min(bisect.bisect_right(edges, mid) - 1, len(counts) - 1)] += n
    return LatencySummary(
        n=hist.n,
        p50=hist.quantile(0.5),
        p95=hist.quantile(0.95),
        hist_edges=edges,
        hist_counts=tuple(counts),
    )
