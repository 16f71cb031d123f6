"""The covariate adjustment: its sums in SQL against the Python definition (SQLite and PostgreSQL),
and the rules that turn it on or off (missing covariates, imbalance, the 0/1 metrics' floor)."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from pg import log_engine
from synthlog import insert_rows

from experiments.aggregate import SLICES, read_summary
from experiments.covariate import (
    MAX_MISSING,
    CovariateFolds,
    CovariateSums,
    adjust,
    row_covariate,
)
from experiments.decision import row_metric
from experiments.stats import UnitMoments
from router.config import MetricName

EID = "m:v1-vs-v2"
T0 = 1_000_000.0
WINDOW = 100.0
CUTOFF = T0 + 900.0


def _rows(seed: int, keyed: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    preds, outs = [], []
    for i in range(600):
        arm = "challenger" if rng.random() < 0.3 else "champion"
        status = "fallback" if rng.random() < 0.05 else "ok"
        ts = T0 + i * 1.7
        score = rng.random()
        preds.append(
            {
                "request_id": f"r{i}",
                "row_index": 0,
                "arm": arm,
                "experiment_id": EID,
                "model_name": "m",
                "model_version": "1",
                "ts": ts,
                "latency_s": 0.01,
                "status": status,
                "reason": "timeout" if status == "fallback" else None,
                "routing_key_hash": f"u{rng.randrange(40)}" if keyed else None,
                "score": score,
                "predicted_class": str(int(score > 0.5)),
                "output": None,
                # Missing (a skipped scoring), outside [0, 1] (not a probability), or a score.
                "champion_score": rng.choice([None, 3.5, rng.random(), rng.random(), 0.0, 1.0]),
            }
        )
        if rng.random() < 0.85:
            truth = int(rng.random() < 0.5)
            delay = rng.choice([1.0, 50.0, WINDOW + 1.0])
            outs.append(
                {
                    "request_id": f"r{i}",
                    "row_index": 0,
                    "outcome": str(truth),
                    "outcome_value": float(truth),
                    "ts": ts + delay,
                }
            )
    return preds, outs


def _unit(x: float, y: float, c: float, m: float) -> CovariateSums:
    """One unit's sums."""
    return CovariateSums(
        n=1,
        sum_x=x,
        sum_y=y,
        sum_c=c,
        sum_m=m,
        sum_xx=x * x,
        sum_yy=y * y,
        sum_xy=x * y,
        sum_cc=c * c,
        sum_mm=m * m,
        sum_cm=c * m,
        sum_xc=x * c,
        sum_xm=x * m,
        sum_yc=y * c,
        sum_ym=y * m,
    )


def _python_folds(
    preds: list[dict[str, Any]], outs: list[dict[str, Any]], metric: MetricName
) -> CovariateFolds:
    """Per arm and fold, row by row: x, y, c (the covariate where present) and m (missing)."""
    by_id = {o["request_id"]: o for o in outs}
    first_ts = min(p["ts"] for p in preds)
    last_ts = max(p["ts"] for p in preds)
    width = max((min(last_ts, CUTOFF) - first_ts) / SLICES, 1e-9) * (1 + 1e-9)
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    first_slice: dict[tuple[str, str], int] = {}
    for p in preds:
        if p["ts"] > CUTOFF:
            continue
        key = (p["arm"], p["routing_key_hash"] or p["request_id"])
        s = math.floor((p["ts"] - first_ts) / width)
        first_slice[key] = min(first_slice.get(key, s), s)
        unit = sums[key]
        o = by_id.get(p["request_id"])
        if o is None or o["ts"] > p["ts"] + WINDOW:
            continue
        v = row_metric(metric, p["score"], p["predicted_class"], o["outcome"], o["outcome_value"])
        if v is None:
            continue
        g = row_covariate(metric, p["champion_score"])
        unit[0] += v
        unit[1] += 1
        unit[2] += 0.0 if g is None else g
        unit[3] += 1.0 if g is None else 0.0
    folds: dict[str, list[CovariateSums]] = {
        arm: [CovariateSums(), CovariateSums()] for arm in ("champion", "challenger")
    }
    for (arm, unit_id), (x, y, c, m) in sums.items():
        fold = first_slice[(arm, unit_id)] % 2
        folds[arm][fold] = folds[arm][fold] + _unit(x, y, c, m)
    c_folds, t_folds = folds["champion"], folds["challenger"]
    return CovariateFolds((c_folds[0], c_folds[1]), (t_folds[0], t_folds[1]))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    with log_engine(request.param, tmp_path) as eng:
        yield eng


@pytest.mark.parametrize("keyed", [False, True], ids=["request-units", "user-units"])
@pytest.mark.parametrize("metric", ["accuracy", "log_loss", "brier", "abs_error"])
def test_sql_covariate_sums_equal_the_python_definition(
    engine: sa.Engine, metric: MetricName, keyed: bool
) -> None:
    preds, outs = _rows(seed=11, keyed=keyed)
    insert_rows(engine, preds, outs)
    with engine.connect() as conn:
        got = read_summary(
            conn,
            EID,
            metric=metric,
            cutoff=CUTOFF,
            window_s=WINDOW,
            cap_quantile=None,
            default_weight=0.1,
        )
    want = _python_folds(preds, outs, metric)
    assert got.covariate is not None
    for arm in ("champion", "challenger"):
        for got_fold, want_fold in zip(
            getattr(got.covariate, arm), getattr(want, arm), strict=True
        ):
            assert got_fold.n > 0 and got_fold.sum_m > 0  # both folds, some covariates missing
            names = [f.name for f in fields(got_fold)]
            assert [getattr(got_fold, n) for n in names] == pytest.approx(
                [getattr(want_fold, n) for n in names], rel=1e-9, abs=1e-9
            ), arm
        # The folds' metric sums are the arm's metric moments.
        total = got.covariate.total(arm)
        metric_moments = getattr(got, arm).metric
        assert (total.n, total.sum_x, total.sum_y) == pytest.approx(
            (metric_moments.n, metric_moments.sum_x, metric_moments.sum_y)
        )


@pytest.mark.parametrize(
    ("metric", "score", "expected"),
    [
        ("accuracy", 0.8, 0.8),
        ("accuracy", 0.3, 0.7),
        ("accuracy", 3.5, None),  # not a probability: a label, or a regressor's output
        ("brier", 0.8, 0.8 * 0.2),
        ("log_loss", 0.5, math.log(2.0)),
        ("log_loss", 1.0, 0.0),
        ("abs_error", 3.5, 3.5),
        ("squared_error", -2.0, -2.0),
        ("outcome", None, None),
        ("abs_error", math.inf, None),
    ],
)
def test_row_covariate(metric: MetricName, score: float | None, expected: float | None) -> None:
    got = row_covariate(metric, score)
    assert got == (None if expected is None else pytest.approx(expected, abs=1e-12))


# --- the rules ----------------------------------------------------------------------------------


def _folds(
    rng: np.random.Generator, n: int, *, missing: float = 0.0, shift: float = 0.0
) -> tuple[CovariateFolds, UnitMoments, UnitMoments]:
    """Independent units (one row each) with a covariate that explains half the metric's variance;
    ``missing``: the share of the challenger's covariates missing; ``shift``: added to the
    challenger's covariates (inputs shaped by the arm)."""
    arms = []
    for arm, share in (("champion", 0.9), ("challenger", 0.1)):
        k = int(n * share)
        c = rng.normal(0.0, 1.0, k) + (shift if arm == "challenger" else 0.0)
        x = c + rng.normal(0.0, 1.0, k)
        m = (rng.random(k) < missing).astype(float) if arm == "challenger" else np.zeros(k)
        c = np.where(m > 0, 0.0, c)
        fold = rng.random(k) < 0.5
        per_fold = []
        for f in (fold, ~fold):
            total = CovariateSums()
            for xi, ci, mi in zip(x[f], c[f], m[f], strict=True):
                total = total + _unit(float(xi), 1.0, float(ci), float(mi))
            per_fold.append(total)
        arms.append((tuple(per_fold), UnitMoments.from_rows(x)))
    (c_folds, c_moments), (t_folds, t_moments) = arms
    folds = CovariateFolds((c_folds[0], c_folds[1]), (t_folds[0], t_folds[1]))
    return folds, c_moments, t_moments


def test_the_adjustment_removes_the_variance_the_covariate_explains() -> None:
    folds, c, t = _folds(np.random.default_rng(1), 20_000)
    result = adjust(folds, c, t, binary=False)
    assert result.on and result.reason == "on"
    assert result.variance_reduction == pytest.approx(0.5, abs=0.05)
    assert result.theta == pytest.approx(1.0, abs=0.1)
    assert result.estimate is not None and abs(result.estimate) < 0.1


def test_too_many_missing_covariates_turn_it_off_with_the_reason() -> None:
    folds, c, t = _folds(np.random.default_rng(2), 20_000, missing=MAX_MISSING * 2)
    result = adjust(folds, c, t, binary=False)
    assert not result.on and result.estimate is None
    assert "missing for 0.0% of the champion's and 10" in result.reason
    # A few missing ones are imputed and the adjustment stays on.
    folds, c, t = _folds(np.random.default_rng(2), 20_000, missing=0.01)
    assert adjust(folds, c, t, binary=False).on


def test_a_covariate_shaped_by_the_arm_turns_it_off() -> None:
    folds, c, t = _folds(np.random.default_rng(3), 20_000, shift=0.3)
    result = adjust(folds, c, t, binary=False)
    assert not result.on and result.balance_z is not None and result.balance_z > 3.29
    assert "not pre-treatment" in result.reason
    assert not adjust(None, c, t, binary=False).on


def test_the_floor_of_a_0_1_metric_keeps_its_share() -> None:
    # All-correct arms: a raw variance of 0, floored at one pseudo-error per arm; the adjusted
    # variance is never below the floor times the share the covariate could remove (none here).
    rows = [_unit(1.0, 1.0, 0.8 if i % 2 else 0.9, 0.0) for i in range(500)]
    ones = sum(rows, CovariateSums())
    folds = CovariateFolds((ones, ones), (ones, ones))
    moments = UnitMoments.from_rows(np.ones(1000))
    result = adjust(folds, moments, moments, binary=True)
    assert result.on and result.variance is not None
    assert result.variance == pytest.approx(result.raw_variance)
    assert result.variance > 0
