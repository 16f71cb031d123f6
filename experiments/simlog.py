"""Simulated prediction logs for ``make simulate``: whole experiments drawn row by row, and at any
moment the :class:`~experiments.sufficient.LogSummary` the SQL aggregation would return for them.

A row's outcome follows the input's difficulty, which the champion's own prediction reflects: each
row has the champion's calibrated confidence q (its expected accuracy on that input), the
covariate the router logs (``champion_score``) and the evaluator adjusts with. Sticky users,
per-user accuracy, fallbacks on the hardest rows, late labels, heavy-tailed losses, and inputs
shaped by earlier answers are the scenarios' knobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from experiments import stats
from experiments.aggregate import SLICES
from experiments.covariate import CovariateFolds, CovariateSums
from experiments.sufficient import (
    NONPOSITIVE_BUCKET,
    ArmData,
    LatencyHistogram,
    LogSummary,
    cap_from_histogram,
)
from router.config import MetricName
from router.logschema import RoutingMode

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

PLANNED = 20_000
DAY = 86_400.0
DURATION_S = 14 * DAY  # predictions are spread over two weeks
WINDOW_S = 7 * DAY  # config.yaml's outcome window
#: The champion's confidence on a row is 1 − (1 − accuracy)·B/E[B], B ~ Beta(0.6, 0.4): its mean
#: is the accuracy, it never drops below 0.5 at accuracy 0.70, and it explains about 14% of the
#: variance of a 0/1 outcome there (what the adjustment can remove).
_CONFIDENCE_BETA = (0.6, 0.4)


@dataclass(frozen=True)
class Scenario:
    name: str
    champion_accuracy: float = 0.70
    challenger_accuracy: float = 0.70
    users: int = 0  # > 0: sticky users (routing keys); else every request its own unit
    icc: float = 0.0  # intra-user correlation of correctness (per-user accuracy ~ Beta)
    hardest_fallback: float = 0.0  # the challenger falls back on this share of hardest rows
    champion_positive_delay_s: float = 0.0
    metric: MetricName = "accuracy"
    rows: int = PLANNED  # rows by the last look
    split: float = 0.1
    looks: int | None = None  # None: the run's number of looks
    # Inputs shaped by earlier answers: a challenger user's rows after their first are this much
    # easier (the champion's confidence, and so the chance of a right answer, rises by it).
    shaped: float = 0.0


def with_rows(s: Scenario, rows: int) -> Scenario:
    """The scenario at another size (the tests' smaller runs)."""
    return replace(s, rows=rows)


@dataclass(frozen=True)
class Experiment:
    """One simulated log, rows in time order."""

    ts: FloatArray
    unit: IntArray  # unit index per row
    n_units: int
    challenger: NDArray[np.bool_]  # the row's assigned arm
    value: FloatArray  # the row metric on the answer served
    arrived: FloatArray  # when its outcome arrived
    fault: FloatArray  # 1.0: the model failed (a challenger fallback)
    latency_bucket: IntArray
    covariate: FloatArray  # the row covariate from the champion's score of its input
    expected: FloatArray  # the row's expected metric on the answer served (the truth)


def draw(s: Scenario, rng: np.random.Generator) -> Experiment:
    n = s.rows
    ts = np.sort(rng.uniform(0.0, DURATION_S, n))
    if s.users:
        # Heavy-tailed volumes (a few users send most requests); sticky assignment per user.
        weights = 1.0 / np.arange(1, s.users + 1) ** 0.7
        unit = rng.choice(s.users, size=n, p=weights / weights.sum())
        n_units = s.users
        to_challenger = rng.random(s.users) < s.split
        challenger = to_challenger[unit]
    else:
        unit = np.arange(n)
        n_units = n
        challenger = rng.random(n) < s.split
    a, b = _CONFIDENCE_BETA
    ease = rng.beta(a, b, n) / (
        a / (a + b)
    )  # mean 1: the row's difficulty, as the champion sees it
    confidence = 1.0 - (1.0 - s.champion_accuracy) * ease  # the champion's expected accuracy
    if s.shaped:
        # Rows after a user's first, for challenger users: their inputs were shaped by earlier
        # answers (easier), which the champion's confidence on them shows.
        _, first = np.unique(unit, return_index=True)
        later = np.ones(n, dtype=bool)
        later[first] = False
        confidence = np.where(
            challenger & later, np.minimum(confidence + s.shaped, 1.0), confidence
        )
    shift = np.where(challenger, s.challenger_accuracy - s.champion_accuracy, 0.0)
    acc = confidence + shift
    if s.icc > 0:
        # Per-user accuracy ~ Beta with the arm's mean and ICC = 1 / (a + b + 1), the row's
        # difficulty around it.
        k = 1.0 / s.icc - 1.0
        user_champ = rng.beta(s.champion_accuracy * k, (1 - s.champion_accuracy) * k, n_units)
        user_chall = rng.beta(s.challenger_accuracy * k, (1 - s.challenger_accuracy) * k, n_units)
        user = np.where(challenger, user_chall[unit], user_champ[unit])
        acc = user + (confidence - s.champion_accuracy)
    fault = np.zeros(n)
    if s.hardest_fallback:
        # The hardest rows are the ones most often got wrong; the challenger fails on them and
        # the champion's (equally good, A/A) answer is served: intent-to-treat keeps them.
        hard = rng.random(n) > 1.0 - s.hardest_fallback
        acc = np.where(hard, 0.2, (acc - s.hardest_fallback * 0.2) / (1 - s.hardest_fallback))
        fault = np.where(hard & challenger, 1.0, 0.0)
    acc = np.clip(acc, 0.0, 1.0)
    # Accuracy: the champion's max(p, 1 − p) on the input, its own expected accuracy.
    covariate: NDArray[Any] = confidence
    expected: NDArray[Any]
    value: NDArray[Any]
    if s.metric == "squared_error":
        # Heavy tails: squared t3 residuals on a per-row scale the champion's prediction knows.
        scale = rng.lognormal(0.0, 0.5, n)
        value = (scale * rng.standard_t(3, n)) ** 2
        covariate, expected = scale**2, 3.0 * scale**2  # E[t3²] = 3
    else:
        value = (rng.random(n) < acc) * 1.0
        expected = acc
    truth_positive = rng.random(n) < 0.5
    delay = rng.exponential(600.0, n)
    if s.champion_positive_delay_s:
        delay = np.where(~challenger & truth_positive, s.champion_positive_delay_s, delay)
    latency = rng.lognormal(math.log(0.01), 0.3, n)
    buckets = np.floor(np.log(latency / 1e-6) / math.log(1.01)).astype(np.int64)
    return Experiment(
        ts,
        unit,
        n_units,
        challenger,
        np.asarray(value, dtype=np.float64),
        ts + delay,
        fault,
        buckets,
        np.asarray(covariate, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
    )


def _moments(x: NDArray[Any], y: NDArray[Any], present: NDArray[np.bool_]) -> stats.UnitMoments:
    return stats.UnitMoments.from_units(x[present], y[present])


def summary_at(e: Experiment, t: float, s: Scenario, cap_quantile: float | None) -> LogSummary:
    """What the SQL aggregation would return at time ``t``: the same sums, built in numpy."""
    logged = int(np.searchsorted(e.ts, t, side="right"))
    cutoff = t - WINDOW_S
    matured = int(np.searchsorted(e.ts, cutoff, side="right"))
    counted = e.arrived[:matured] <= e.ts[:matured] + WINDOW_S
    value = e.value[:matured]
    cap = None
    if cap_quantile is not None and counted.any():
        v = value[counted]
        b = np.where(v > 0, np.floor(np.log(np.maximum(v, 1e-300) / 1e-6) / math.log(1.01)), 0)
        b = np.where(v > 0, b, NONPOSITIVE_BUCKET).astype(np.int64)
        keys, counts = np.unique(b, return_counts=True)
        cap = cap_from_histogram(
            dict(zip(keys.tolist(), counts.tolist(), strict=True)), cap_quantile
        )
        if cap is not None:
            value = np.minimum(value, cap)
    # The aggregation's time slices (experiments.aggregate.read_summary): the covariate's folds
    # are the parity of the slice of each unit's first judged prediction.
    first = float(e.ts[0]) if logged else None
    width = 0.0
    if first is not None and matured:
        last = float(e.ts[logged - 1])
        width = max((min(last, cutoff) - first) / SLICES, 1e-9) * (1 + 1e-9)
    arms = []
    folds = []
    for is_challenger in (False, True):
        req = e.challenger[:logged] == is_challenger
        mat = e.challenger[:matured] == is_challenger
        units_r = e.unit[:logged][req]
        units_m = e.unit[:matured][mat]
        m = e.n_units
        r_y = np.bincount(units_r, minlength=m).astype(np.float64)
        r_x = np.bincount(units_r, weights=e.fault[:logged][req], minlength=m)
        c_y = np.bincount(units_m, minlength=m).astype(np.float64)
        c_x = np.bincount(units_m, weights=counted[mat].astype(np.float64), minlength=m)
        m_x = np.bincount(units_m, weights=np.where(counted[mat], value[mat], 0.0), minlength=m)
        present_r, present_m = r_y > 0, c_y > 0
        low = int(e.latency_bucket.min())
        counts = np.bincount(e.latency_bucket[:logged][req] - low)
        buckets = np.flatnonzero(counts)
        arms.append(
            ArmData(
                requests=int(req.sum()),
                fallbacks=int(e.fault[:logged][req].sum()),
                units=int(present_r.sum()),
                faults=_moments(r_x, r_y, present_r),
                coverage=_moments(c_x, c_y, present_m),
                metric=_moments(m_x, c_x, present_m),
                latency=LatencyHistogram(
                    dict(zip((buckets + low).tolist(), counts[buckets].tolist(), strict=True))
                ),
            )
        )
        g = np.where(counted[mat], e.covariate[:matured][mat], 0.0)
        k_c = np.bincount(units_m, weights=g, minlength=m)
        folds.append(_folds(e, mat, units_m, m_x, c_x, k_c, present_m, first, width))
    covariate = CovariateFolds(folds[0], folds[1]) if matured else None
    return LogSummary(
        RoutingMode.SPLIT,
        bool(s.users),
        arms[0],
        arms[1],
        first_ts=first,
        cap=cap,
        covariate=covariate,
    )


def _folds(
    e: Experiment,
    mat: NDArray[np.bool_],
    units_m: NDArray[Any],
    x: NDArray[Any],
    y: NDArray[Any],
    c: NDArray[Any],
    present: NDArray[np.bool_],
    first: float | None,
    width: float,
) -> tuple[CovariateSums, CovariateSums]:
    """Per fold, an arm's covariate sums (every simulated row has its covariate: m = 0)."""
    if first is None or not present.any():
        return CovariateSums(), CovariateSums()
    unit_ids, first_row = np.unique(units_m, return_index=True)  # rows are in time order
    first_ts = e.ts[: mat.size][mat][first_row]
    fold = np.zeros(e.n_units, dtype=np.int64)
    fold[unit_ids] = np.floor((first_ts - first) / width).astype(np.int64) % 2
    out = []
    for k in (0, 1):
        keep = present & (fold == k)
        out.append(
            CovariateSums(
                n=int(keep.sum()),
                sum_x=float(x[keep].sum()),
                sum_y=float(y[keep].sum()),
                sum_c=float(c[keep].sum()),
                sum_xx=float((x[keep] ** 2).sum()),
                sum_yy=float((y[keep] ** 2).sum()),
                sum_xy=float((x[keep] * y[keep]).sum()),
                sum_cc=float((c[keep] ** 2).sum()),
                sum_xc=float((x[keep] * c[keep]).sum()),
                sum_yc=float((y[keep] * c[keep]).sum()),
            )
        )
    return out[0], out[1]
