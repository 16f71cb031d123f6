"""The SQL aggregation against its Python definition, on SQLite and PostgreSQL.

Every figure the evaluator reads is computed in SQL; these tests compute the same figures row by
row in Python (``decision.row_metric``, ``logschema.outcome_matches``, per-unit sums) and demand
equality, including the accuracy event's tricky spellings (numbers, JSON strings, booleans,
non-JSON text) and the outcome window's cut-offs.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pg import log_engine
from synthlog import insert_rows

from experiments.aggregate import SLICES, read_summary
from experiments.decision import row_metric
from experiments.stats import UnitMoments
from experiments.sufficient import LatencyHistogram
from router.config import MetricName
from router.logschema import MODEL_FAULTS, SERVED_STATUSES, Arm, Reason, RowStatus

EID = "m:v1-vs-v2"
T0 = 1_000_000.0
WINDOW = 100.0
CUTOFF = T0 + 900.0
CLASSES = ["1", "0", "churn", "1.0", "true"]
OUTCOMES = [  # (outcome JSON, numeric form)
    ("1", 1.0),
    ("0", 0.0),
    ('"1"', None),
    ("true", 1.0),
    ('"churn"', None),
    ("1.0", 1.0),
    ("not json", None),
    ("[1]", None),
    ("2.5", 2.5),
]


def _rows(seed: int, keyed: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    preds, outs = [], []
    for i in range(600):
        arm = "challenger" if rng.random() < 0.3 else "champion"
        status, reason = "ok", None
        r = rng.random()
        if r < 0.05:
            status, reason = "fallback", Reason.TIMEOUT.value
        elif r < 0.08:
            status, reason = "client_error", Reason.BAD_INPUT.value
        elif r < 0.10 and arm == "champion":
            status, reason = "error", Reason.ERROR.value
        ts = T0 + i * 1.7
        served = status in ("ok", "fallback")
        preds.append(
            {
                "request_id": f"r{i}",
                "row_index": 0,
                "arm": arm,
                "experiment_id": EID,
                "model_name": "m",
                "model_version": "1",
                "ts": ts,
                "latency_s": rng.uniform(0.001, 0.02) if status == "ok" else 0.0,
                "status": status,
                "reason": reason,
                "routing_key_hash": f"u{rng.randrange(40)}" if keyed else None,
                "score": rng.choice([rng.random(), 0.0, 1.0, None]) if served else None,
                "predicted_class": rng.choice(CLASSES) if served else None,
                "output": None,
            }
        )
        if rng.random() < 0.8:
            outcome, value = rng.choice(OUTCOMES)
            delay = rng.choice([1.0, 50.0, WINDOW, WINDOW + 1.0, 500.0])
            outs.append(
                {
                    "request_id": f"r{i}",
                    "row_index": 0,
                    "outcome": outcome,
                    "outcome_value": value,
                    "ts": ts + delay,
                }
            )
    return preds, outs


def _python_summary(
    preds: list[dict[str, Any]],
    outs: list[dict[str, Any]],
    metric: MetricName,
    cap: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Per arm, row by row: the metric and coverage moments over units, and the fault counts."""
    by_id = {(o["request_id"], o["row_index"]): o for o in outs}
    metric_x: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    metric_y: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    cov_x: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    cov_y: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    faults: dict[str, int] = defaultdict(int)
    requests: dict[str, int] = defaultdict(int)
    for p in preds:
        arm, unit = p["arm"], p["routing_key_hash"] or p["request_id"]
        if p["status"] != "client_error":
            requests[arm] += 1
            faults[arm] += p["reason"] in {r.value for r in MODEL_FAULTS}
        if p["status"] not in ("ok", "fallback") or p["ts"] > CUTOFF:
            continue
        cov_y[arm][unit] += 1
        metric_x[arm][unit] += 0.0
        metric_y[arm][unit] += 0.0
        o = by_id.get((p["request_id"], p["row_index"]))
        if o is None or o["ts"] > p["ts"] + WINDOW:
            continue
        cov_x[arm][unit] += 1
        v = row_metric(metric, p["score"], p["predicted_class"], o["outcome"], o["outcome_value"])
        if v is not None:
            metric_x[arm][unit] += v if cap is None else min(v, cap)
            metric_y[arm][unit] += 1
    out: dict[str, dict[str, Any]] = {}
    for arm in ("champion", "challenger"):
        units = sorted(cov_y[arm])
        out[arm] = {
            "metric": UnitMoments.from_units(
                [metric_x[arm][u] for u in units], [metric_y[arm][u] for u in units]
            ),
            "coverage": UnitMoments.from_units(
                [cov_x[arm][u] for u in units], [cov_y[arm][u] for u in units]
            ),
            "faults": faults[arm],
            "requests": requests[arm],
        }
    return out


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    with log_engine(request.param, tmp_path) as eng:
        yield eng


def _approx(m: UnitMoments) -> Any:
    return pytest.approx((m.n, m.sum_x, m.sum_y, m.sum_xx, m.sum_yy, m.sum_xy), rel=1e-9, abs=1e-9)


def _tuple(m: UnitMoments) -> tuple[float, ...]:
    return (m.n, m.sum_x, m.sum_y, m.sum_xx, m.sum_yy, m.sum_xy)


@pytest.mark.parametrize("keyed", [False, True], ids=["request-units", "user-units"])
@pytest.mark.parametrize("metric", ["accuracy", "log_loss", "brier", "abs_error", "outcome"])
def test_sql_equals_the_python_definition(
    engine: sa.Engine, metric: MetricName, keyed: bool
) -> None:
    preds, outs = _rows(seed=7, keyed=keyed)
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
    want = _python_summary(preds, outs, metric)
    assert got.keyed is keyed
    for arm, data in (("champion", got.champion), ("challenger", got.challenger)):
        assert _tuple(data.metric) == _approx(want[arm]["metric"])
        assert _tuple(data.coverage) == _approx(want[arm]["coverage"])
        assert data.faulted == want[arm]["faults"] and data.requests == want[arm]["requests"]
    # The running slices add up to the whole.
    total = UnitMoments.zero()
    for piece in got.series:
        total += piece.champion
    assert _tuple(total) == _approx(got.champion.metric)


@pytest.mark.parametrize("keyed", [False, True], ids=["request-units", "user-units"])
def test_capping_is_the_same_cap_for_both_arms(engine: sa.Engine, keyed: bool) -> None:
    preds, outs = _rows(seed=9, keyed=keyed)
    insert_rows(engine, preds, outs)
    with engine.connect() as conn:
        got = read_summary(
            conn,
            EID,
            metric="abs_error",
            cutoff=CUTOFF,
            window_s=WINDOW,
            cap_quantile=0.9,
            default_weight=0.1,
        )
    # The cap: the 0.9 quantile of both arms' judged values, to a 1% bucket.
    values = [
        row_metric("abs_error", p["score"], p["predicted_class"], o["outcome"], o["outcome_value"])
        for p in preds
        for o in outs
        if o["request_id"] == p["request_id"]
        and p["status"] in ("ok", "fallback")
        and p["ts"] <= CUTOFF
        and o["ts"] <= p["ts"] + WINDOW
    ]
    judged = sorted(v for v in values if v is not None)
    exact = judged[math.ceil(0.9 * len(judged)) - 1]
    assert got.cap is not None and exact <= got.cap <= exact * 1.0101
    want = _python_summary(preds, outs, "abs_error", cap=got.cap)
    for arm, data in (("champion", got.champion), ("challenger", got.challenger)):
        assert _tuple(data.metric) == _approx(want[arm]["metric"])


# -- the per-user path, on a log shaped like production ------------------------------------------
# Sticky users (some requests without a key), multi-row requests, fallbacks, model and client
# errors, missing and late feedback, predictions not matured yet, and a second experiment in the
# same tables. The SQL takes shortcuts for speed (the key alone as the unit when every row has one,
# a narrow subquery on SQLite, its own planner settings on PostgreSQL); the whole ``LogSummary``
# (requests, units, faults, coverage, metric, skipped rows, latency histograms, the series by
# cohort) is held to the row-by-row definition, so a shortcut that changes a figure fails.

U_EID, U_OTHER = "m:v1-vs-v2", "m:v1-vs-v3"
U_T0 = 2_000_000.0
U_WINDOW = 100.0
U_CUTOFF = U_T0 + 1_500.0  # the last ~150 s of predictions are not matured yet
_FAULTS = {r.value for r in MODEL_FAULTS}
_SERVED = {s.value for s in SERVED_STATUSES}


def _user(i: int) -> str:
    return hashlib.sha256(f"user-{i}".encode()).hexdigest()  # what the router logs: a digest


def _log(seed: int, all_keyed: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed)
    preds: list[dict[str, Any]] = []
    outs: list[dict[str, Any]] = []
    for i in range(900):
        eid = U_OTHER if i % 5 == 4 else U_EID
        u = rng.randrange(60)
        key = None if not all_keyed and rng.random() < 0.15 else _user(u)
        sticky = u % 10 < 3 if key is not None else rng.random() < 0.3
        arm = Arm.CHALLENGER if sticky else Arm.CHAMPION
        status, reason = RowStatus.OK, None
        r = rng.random()
        if r < 0.04:
            status, reason = RowStatus.CLIENT_ERROR, Reason.BAD_INPUT
        elif r < 0.10 and arm == Arm.CHALLENGER:
            status = RowStatus.FALLBACK
            reason = rng.choice([Reason.TIMEOUT, Reason.CIRCUIT_OPEN, Reason.ERROR])
        elif r < 0.12 and arm == Arm.CHAMPION:
            status, reason = RowStatus.ERROR, Reason.ERROR
        ts = U_T0 + i * 1.8
        served = status in _SERVED
        latency = rng.uniform(0.001, 0.05) if status == RowStatus.OK else 0.0
        n_rows = 1 if status == RowStatus.CLIENT_ERROR or rng.random() < 0.8 else 3
        for row in range(n_rows):
            rid = f"q{i}"
            preds.append(
                {
                    "request_id": rid,
                    "row_index": row,
                    "arm": arm.value,
                    "experiment_id": eid,
                    "model_name": "m",
                    "model_version": "2" if arm == Arm.CHALLENGER and status == "ok" else "1",
                    "ts": ts,
                    "latency_s": latency,
                    "status": status.value,
                    "reason": None if reason is None else reason.value,
                    "routing_key_hash": key,
                    "score": rng.choice([rng.random(), 0.0, 1.0, None]) if served else None,
                    "predicted_class": rng.choice(["0", "1"]) if served else None,
                    "output": None,
                }
            )
            if rng.random() < 0.75:  # the rest never get feedback
                truth = rng.random() < 0.6
                delay = rng.choice([2.0, 40.0, U_WINDOW, U_WINDOW + 0.5, 900.0])  # some arrive late
                outs.append(
                    {
                        "request_id": rid,
                        "row_index": row,
                        "outcome": rng.choice(["1", "true", '"1"']) if truth else "0",
                        "outcome_value": 1.0 if truth else 0.0,
                        "ts": ts + delay,
                    }
                )
    return preds, outs


def _definition(
    preds: list[dict[str, Any]], outs: list[dict[str, Any]], metric: MetricName
) -> dict[str, Any]:
    """The per-user figures, row by row (units: the key, else the request)."""
    mine = [p for p in preds if p["experiment_id"] == U_EID]
    feedback = {(o["request_id"], o["row_index"]): o for o in outs}
    first = min(p["ts"] for p in mine)
    last = max(p["ts"] for p in mine)
    width = max((min(last, U_CUTOFF) - first) / SLICES, 1e-9) * (1 + 1e-9)
    unit: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: dict.fromkeys(("r", "f", "m", "c", "mx", "my", "skipped"), 0) | {"first": None}
    )
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    latencies: dict[str, list[float]] = defaultdict(list)
    for p in mine:
        arm = p["arm"]
        u = unit[arm, p["routing_key_hash"] or p["request_id"]]
        if p["row_index"] == 0:
            if p["status"] == RowStatus.CLIENT_ERROR:
                counts[arm]["client_errors"] += 1
            else:
                u["r"] += 1
                u["f"] += p["reason"] in _FAULTS
            counts[arm]["fallbacks"] += p["status"] == RowStatus.FALLBACK
            if p["status"] == RowStatus.OK:
                latencies[arm].append(p["latency_s"])
        if p["status"] not in _SERVED or p["ts"] > U_CUTOFF:
            continue
        u["m"] += 1
        s = math.floor((p["ts"] - first) / width)
        u["first"] = s if u["first"] is None else min(u["first"], s)
        o = feedback.get((p["request_id"], p["row_index"]))
        if o is None or o["ts"] > p["ts"] + U_WINDOW:
            continue
        u["c"] += 1
        v = row_metric(metric, p["score"], p["predicted_class"], o["outcome"], o["outcome_value"])
        if v is None:
            u["skipped"] += 1
        else:
            u["mx"] += v
            u["my"] += 1

    def moments(arm: str, x: str, y: str, cohort: int | None = None) -> UnitMoments:
        # Faults count over units with a request; coverage and metric over units with a matured
        # prediction (a unit whose feedback all came late still counts, with x = y = 0).
        among = "r" if x == "f" else "m"
        picked = [
            u
            for (a, _), u in unit.items()
            if a == arm and u[among] > 0 and (cohort is None or u["first"] == cohort)
        ]
        return UnitMoments.from_units([u[x] for u in picked], [u[y] for u in picked])

    arms = (Arm.CHAMPION.value, Arm.CHALLENGER.value)
    cohorts = sorted({u["first"] for u in unit.values() if u["first"] is not None})
    return {
        "first_ts": first,
        "arms": {
            arm: {
                "requests": sum(u["r"] for (a, _), u in unit.items() if a == arm),
                "client_errors": counts[arm]["client_errors"],
                "fallbacks": counts[arm]["fallbacks"],
                "units": sum(1 for (a, _), u in unit.items() if a == arm and u["r"] > 0),
                "faults": moments(arm, "f", "r"),
                "coverage": moments(arm, "c", "m"),
                "metric": moments(arm, "mx", "my"),
                "skipped": sum(u["skipped"] for (a, _), u in unit.items() if a == arm),
                "latency": LatencyHistogram.from_values(latencies[arm]).counts,
            }
            for arm in arms
        },
        "series": [
            (
                first + (s + 1) * width,
                moments(arms[0], "mx", "my", s),
                moments(arms[1], "mx", "my", s),
            )
            for s in cohorts
        ],
    }


@pytest.mark.parametrize("all_keyed", [True, False], ids=["every-row-keyed", "some-unkeyed"])
@pytest.mark.parametrize("metric", ["accuracy", "brier"])
def test_per_user_summary_equals_the_row_by_row_definition(
    engine: sa.Engine, metric: MetricName, all_keyed: bool
) -> None:
    preds, outs = _log(seed=11, all_keyed=all_keyed)
    insert_rows(engine, preds, outs)
    with engine.connect() as conn:
        got = read_summary(
            conn,
            U_EID,
            metric=metric,
            cutoff=U_CUTOFF,
            window_s=U_WINDOW,
            cap_quantile=None,
            default_weight=0.1,
        )
    want = _definition(preds, outs, metric)
    assert got.mode == "split" and got.keyed and got.first_ts == want["first_ts"]
    for arm, data in ((Arm.CHAMPION, got.champion), (Arm.CHALLENGER, got.challenger)):
        w = want["arms"][arm.value]
        assert (data.requests, data.client_errors, data.fallbacks, data.units, data.skipped) == (
            w["requests"],
            w["client_errors"],
            w["fallbacks"],
            w["units"],
            w["skipped"],
        )
        assert data.requests > 0 and data.client_errors > 0 and data.skipped >= 0
        assert _tuple(data.faults) == _approx(w["faults"])
        assert _tuple(data.coverage) == _approx(w["coverage"])
        assert _tuple(data.metric) == _approx(w["metric"])
        assert dict(data.latency.counts) == w["latency"]
    assert got.challenger.fallbacks > 0 and got.champion.faulted > 0
    assert len(got.series) == len(want["series"]) > 1
    for piece, (ts, champion, challenger) in zip(got.series, want["series"], strict=True):
        assert piece.ts == pytest.approx(ts, rel=1e-12)
        assert _tuple(piece.champion) == _approx(champion)
        assert _tuple(piece.challenger) == _approx(challenger)
