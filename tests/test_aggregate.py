"""The SQL aggregation against its Python definition, on SQLite and PostgreSQL.

Every figure the evaluator reads is computed in SQL; these tests compute the same figures row by
row in Python (``decision.row_metric``, ``logschema.outcome_matches``, per-unit sums) and demand
equality, including the accuracy event's tricky spellings (numbers, JSON strings, booleans,
non-JSON text) and the outcome window's cut-offs.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pg import isolated_schema_url
from synthlog import insert_rows

from experiments.aggregate import read_summary
from experiments.decision import row_metric
from experiments.stats import UnitMoments
from router.config import MetricName
from router.logschema import MODEL_FAULTS, Reason

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
def engine(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        eng = sa.create_engine(f"sqlite:///{tmp_path / 'log.db'}")
        yield eng
        eng.dispose()
        return
    with isolated_schema_url() as url:
        eng = sa.create_engine(url)
        yield eng
        eng.dispose()


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
            conn, EID, metric=metric, cutoff=CUTOFF, window_s=WINDOW, cap_quantile=None
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
            conn, EID, metric="abs_error", cutoff=CUTOFF, window_s=WINDOW, cap_quantile=0.9
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
