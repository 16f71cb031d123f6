"""Judging an experiment, without I/O: logged rows in, per-arm figures and a decision out.

Only rows whose outcome window has closed count (``ts <= now - experiment.outcome_window_s``, the
same cutoff for both arms; :mod:`experiments.evaluate` reads them), and only rows the arm itself
scored (status ``ok``): failures are the error-rate guardrail's business.

Attribution in split mode follows the router (``router/service.py``): a request assigned to the
challenger that failed leaves a ``challenger`` row with status ``error`` and a ``champion`` row
with status ``fallback`` (the champion answered). Such a request is the challenger's: it counts
once, as a challenger assignment and a challenger error, and never in the champion's figures.

In shadow mode (``shadow`` rows instead of ``challenger`` rows) every request is scored by both,
so there is no ratio to check; the comparison uses the pairs (same request id and row index, both
scored, outcome window closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from experiments import stats
from experiments.decision import (
    EXIT_CODES,
    HIGHER_IS_BETTER,
    Decision,
    Difference,
    GuardrailResult,
    arm_interval,
    decide,
    error_rate_guardrail,
    latency_guardrail,
    paired_difference,
    split_difference,
)
from experiments.promquery import PrometheusGuardrails
from router.config import MetricName, Settings

Mode = Literal["split", "shadow"]
_SERIES_POINTS = 60
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
    arm: str  # champion | challenger | shadow
    version: str | None
    requests: int  # assigned requests (split) or requests scored (shadow)
    errors: int
    n: int  # rows with a closed outcome that enter the metric
    metric_mean: float | None
    metric_interval: stats.Interval | None
    latency: LatencySummary

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class SeriesPoint:
    """The confidence sequence of the difference once the first ``n`` outcomes had arrived."""

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
    mode: Mode
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

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.decision]


@dataclass(frozen=True)
class LoggedRequest:
    """Row 0 of one arm's rows for one request: who was asked, how it went."""

    arm: str
    status: str
    latency_s: float
    ts: float
    unit: str | None = None  # the hashed routing key: the unit sticky assignment randomises


@dataclass(frozen=True)
class MetricRow:
    """One scored row with a closed outcome, as its per-row metric value."""

    request_id: str
    row_index: int
    arm: str
    value: float
    available_at: float  # when this row could first enter the evaluation


def judge(
    settings: Settings,
    aliases: AliasSnapshot,
    eid: str,
    requests: dict[str, list[LoggedRequest]],
    scored: Sequence[MetricRow],
    *,
    now: float,
    skipped: int = 0,
) -> Evaluation:
    """Pure: turn the rows read from the log into per-arm figures and a decision."""
    exp = settings.experiment
    mode = _mode(requests, settings.routing.mode)
    no_data: str | None = None
    if aliases.challenger is None:
        no_data = (
            f"No @{settings.model.challenger_alias} alias is set on {settings.model.name!r}: "
            "there is no experiment to judge."
        )
    elif not requests:
        no_data = f"No predictions are logged for experiment {eid!r}."
    elif mode is None:
        no_data = "Both challenger and shadow rows are logged for this experiment: modes mixed."
    mode = mode or settings.routing.mode
    other = "shadow" if mode == "shadow" else "challenger"

    # Guardrail inputs: who was assigned each request, who failed, how long the arm took.
    assigned: dict[str, int] = {"champion": 0, other: 0}
    errors: dict[str, int] = {"champion": 0, other: 0}
    latencies: dict[str, list[float]] = {"champion": [], other: []}
    champion_owned: set[str] = set()
    # Sticky assignment randomises users, not requests: the sample-ratio test counts distinct
    # units (a request without a routing key is its own unit), else heavy users fake a mismatch.
    units: dict[str, set[str]] = {"champion": set(), other: set()}
    for rid, logged in requests.items():
        by_arm = {r.arm: r for r in logged}
        if mode == "split":
            fell_back = (
                by_arm.get("champion") is not None and by_arm["champion"].status == "fallback"
            )
            owner = "challenger" if "challenger" in by_arm or fell_back else "champion"
            if owner == "champion":
                champion_owned.add(rid)
            mine = by_arm.get(owner)
            assigned[owner] += 1
            units[owner].add(next((r.unit for r in logged if r.unit), rid))
            if mine is None or mine.status != "ok" or fell_back:
                errors[owner] += 1
            elif mine.latency_s > 0:
                latencies[owner].append(mine.latency_s)
        else:
            for arm, r in by_arm.items():
                if arm not in assigned:
                    continue
                assigned[arm] += 1
                if r.status != "ok":
                    errors[arm] += 1
                elif r.latency_s > 0:
                    latencies[arm].append(r.latency_s)

    # Metric rows: in split mode only the champion's own requests count on its side.
    rows = [
        s
        for s in scored
        if s.arm == other
        or (s.arm == "champion" and (mode == "shadow" or s.request_id in champion_owned))
    ]
    higher = HIGHER_IS_BETTER[exp.metric]
    values: dict[str, list[float]] = {"champion": [], other: []}
    series: tuple[SeriesPoint, ...]
    if mode == "shadow":
        pairs = _pairs(rows, other)
        values["champion"] = [c.value for c, _ in pairs]
        values[other] = [t.value for _, t in pairs]
        series = _paired_series(pairs, exp.planned_samples, exp.alpha, higher)
    else:
        ordered = sorted(rows, key=lambda s: s.available_at)
        for s in ordered:
            values[s.arm].append(s.value)
        series = _split_series(ordered, other, exp.planned_samples, exp.alpha, higher)
    arm_stats = {arm: stats.ArmStats.from_values(v) for arm, v in values.items()}

    srm: stats.SrmResult | None = None
    if mode == "split":
        w = settings.routing.challenger_weight
        unit_counts = {arm: len(members) for arm, members in units.items()}
        srm = stats.sample_ratio_test(unit_counts, {"champion": 1.0 - w, "challenger": w})

    n_champ, n_chall = arm_stats["champion"].n, arm_stats[other].n
    guardrails: tuple[GuardrailResult, ...] = ()
    difference: Difference | None = None
    if no_data is None and min(n_champ, n_chall) >= 2:
        if mode == "shadow":
            difference = paired_difference(
                values["champion"], values[other], exp.planned_samples, exp.alpha, higher
            )
        else:
            difference = split_difference(
                arm_stats["champion"], arm_stats[other], exp.planned_samples, exp.alpha, higher
            )
        g = exp.guardrails
        guardrails = (
            error_rate_guardrail(
                errors["champion"],
                assigned["champion"],
                errors[other],
                assigned[other],
                g.max_error_rate_increase,
            ),
            latency_guardrail(
                latencies["champion"], latencies[other], g.max_latency_p95_increase, exp.alpha
            ),
        )
    decision, reason = decide(
        srm=srm,
        no_data_reason=no_data,
        n_champion=n_champ,
        n_challenger=n_chall,
        min_samples_per_arm=exp.min_samples_per_arm,
        guardrails=guardrails,
        difference=difference,
        min_effect=exp.min_effect,
        metric=exp.metric,
    )
    edges = _hist_edges(latencies["champion"] + latencies[other])
    summaries = {
        arm: ArmSummary(
            arm=arm,
            version=aliases.champion if arm == "champion" else aliases.challenger,
            requests=assigned[arm],
            errors=errors[arm],
            n=arm_stats[arm].n,
            metric_mean=arm_stats[arm].mean if arm_stats[arm].n else None,
            metric_interval=(
                arm_interval(arm_stats[arm], exp.planned_samples, exp.alpha)
                if arm_stats[arm].n >= 2
                else None
            ),
            latency=_latency_summary(latencies[arm], edges),
        )
        for arm in ("champion", other)
    }
    started = min((r.ts for rs in requests.values() for r in rs), default=None)
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
        planned_samples=exp.planned_samples,
        min_samples_per_arm=exp.min_samples_per_arm,
        min_effect=exp.min_effect,
        outcome_window_s=exp.outcome_window_s,
        evaluated_at=now,
        cutoff=now - exp.outcome_window_s,
        started_at=started,
        champion=summaries["champion"],
        challenger=summaries[other],
        difference=difference,
        srm=srm,
        guardrails=guardrails,
        series=series,
        skipped_rows=skipped,
    )


def _mode(requests: dict[str, list[LoggedRequest]], configured: Mode) -> Mode | None:
    arms = {r.arm for rows in requests.values() for r in rows}
    if "shadow" in arms and "challenger" in arms:
        return None
    if "shadow" in arms:
        return "shadow"
    if "challenger" in arms:
        return "split"
    return configured


def _pairs(rows: Sequence[MetricRow], other: str) -> list[tuple[MetricRow, MetricRow]]:
    champion = {(s.request_id, s.row_index): s for s in rows if s.arm == "champion"}
    pairs = [
        (champion[(s.request_id, s.row_index)], s)
        for s in rows
        if s.arm == other and (s.request_id, s.row_index) in champion
    ]
    pairs.sort(key=lambda p: max(p[0].available_at, p[1].available_at))
    return pairs


def _checkpoints(n: int) -> list[int]:
    if n == 0:
        return []
    return sorted({max(1, round(n * k / _SERIES_POINTS)) for k in range(1, _SERIES_POINTS + 1)})


def _split_series(
    ordered: Sequence[MetricRow], other: str, planned: int, alpha: float, higher: bool
) -> tuple[SeriesPoint, ...]:
    """The difference's confidence sequence at up to 60 points as outcomes accumulated."""
    is_t = np.array([s.arm == other for s in ordered], dtype=bool)
    v = np.array([s.value for s in ordered], dtype=np.float64)
    cum = {
        flag: (np.cumsum(mask), np.cumsum(v * mask), np.cumsum(v * v * mask))
        for flag, mask in ((False, (~is_t).astype(float)), (True, is_t.astype(float)))
    }
    points: list[SeriesPoint] = []
    for k in _checkpoints(len(ordered)):
        i = k - 1
        c = stats.ArmStats(int(cum[False][0][i]), float(cum[False][1][i]), float(cum[False][2][i]))
        t = stats.ArmStats(int(cum[True][0][i]), float(cum[True][1][i]), float(cum[True][2][i]))
        if c.n < 2 or t.n < 2:
            continue
        d = split_difference(c, t, planned, alpha, higher).absolute
        points.append(SeriesPoint(ordered[i].available_at, c.n, t.n, d.estimate, d.lower, d.upper))
    return tuple(points)


def _paired_series(
    pairs: Sequence[tuple[MetricRow, MetricRow]], planned: int, alpha: float, higher: bool
) -> tuple[SeriesPoint, ...]:
    sign = 1.0 if higher else -1.0
    d = np.array([sign * (t.value - c.value) for c, t in pairs], dtype=np.float64)
    n_cum, s_cum, q_cum = np.arange(1, len(d) + 1), np.cumsum(d), np.cumsum(d * d)
    points: list[SeriesPoint] = []
    for k in _checkpoints(len(d)):
        if k < 2:
            continue
        i = k - 1
        diffs = stats.ArmStats(int(n_cum[i]), float(s_cum[i]), float(q_cum[i]))
        half = stats.cs_halfwidth(diffs.variance / k, k, planned, alpha)
        at = max(pairs[i][0].available_at, pairs[i][1].available_at)
        points.append(SeriesPoint(at, k, k, diffs.mean, diffs.mean - half, diffs.mean + half))
    return tuple(points)


def _hist_edges(latencies: Sequence[float]) -> tuple[float, ...]:
    if not latencies:
        return ()
    lo, hi = min(latencies), max(latencies)
    if hi <= lo:
        hi = lo * 1.01 + 1e-9
    return tuple(float(x) for x in np.geomspace(lo, hi, _HIST_BINS + 1))


def _latency_summary(latencies: Sequence[float], edges: tuple[float, ...]) -> LatencySummary:
    if not latencies:
        return LatencySummary(0, None, None)
    arr = np.asarray(latencies, dtype=np.float64)
    counts = np.histogram(arr, bins=np.asarray(edges))[0] if edges else np.array([], dtype=int)
    return LatencySummary(
        n=int(arr.size),
        p50=float(np.quantile(arr, 0.5)),
        p95=float(np.quantile(arr, 0.95)),
        hist_edges=edges,
        hist_counts=tuple(int(c) for c in counts),
    )
