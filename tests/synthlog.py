"""Synthetic prediction logs with known effects, written straight into the logschema tables.

Deterministic (seeded); no router needed. Rows follow the intent-to-treat contract of
``router/logschema.py``: one predictions row per input row in the ASSIGNED arm; a challenger that
failed leaves its ``challenger`` row with the champion's served answer, status ``fallback`` and a
reason; a champion fault an ``error`` row; a client fault a ``client_error`` row; shadow mode a
``champion`` and a ``shadow`` row per request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from experiments.aggregate import read_summary
from experiments.sufficient import LogSummary
from router import logschema
from router.config import Settings, settings_from_mapping
from router.logschema import Arm as Arm_
from router.logschema import Reason
from router.logschema import RowStatus as Status


@dataclass(frozen=True)
class Arm:
    accuracy: float = 0.7
    latency_s: float = 0.010  # median of a log-normal
    error_rate: float = 0.0


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def write_log(
    url: str,
    *,
    experiment_id: str,
    model_name: str = "churn-predictor",
    versions: tuple[str, str] = ("1", "2"),
    n_requests: int = 4000,
    challenger_weight: float = 0.5,
    champion: Arm = Arm(),
    challenger: Arm = Arm(),
    mode: str = "split",
    seed: int = 0,
    t0: float = 1_700_000_000.0,  # = T0
    spacing_s: float = 1.0,
    outcome_delay_s: float = 5.0,
    drop_challenger_every: int = 0,  # >0: lose every k-th challenger request (induces SRM)
    users: int = 0,  # >0: sticky users with heavy-tailed request volumes (routing keys set)
    client_error_rate: float = 0.0,  # share of requests that are the client's fault (4xx)
    champion_positive_delay_s: float | None = None,  # the champion's positives arrive this late
) -> None:
    """Append ``n_requests`` single-row requests (and their 0/1 outcomes) to the log at ``url``."""
    rng = random.Random(seed)
    engine = sa.create_engine(url)
    logschema.metadata.create_all(engine)
    preds: list[dict[str, Any]] = []
    outs: list[dict[str, Any]] = []
    challenger_seen = 0
    # Heavy-tailed volumes: a few users send most requests, as in real traffic.
    user_weights = [1.0 / (u + 1) for u in range(users)]
    user_arm = {u: rng.random() < challenger_weight for u in range(users)}

    def row(
        rid: str,
        arm: str,
        version: str,
        ts: float,
        spec: Arm | None,
        status: str,
        truth: int,
        unit: str | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        if spec is None:
            score, cls, lat = None, None, 0.0
        else:
            correct = rng.random() < spec.accuracy
            cls_i = truth if correct else 1 - truth
            score = min(max(0.5 + (0.3 if cls_i else -0.3) + rng.gauss(0, 0.1), 0.01), 0.99)
            cls = str(cls_i)
            lat = spec.latency_s * rng.lognormvariate(0, 0.3)
        return {
            "request_id": rid,
            "row_index": 0,
            "arm": arm,
            "experiment_id": experiment_id,
            "model_name": model_name,
            "model_version": version,
            "ts": ts,
            "latency_s": lat,
            "status": status,
            "reason": reason,
            "routing_key_hash": unit,
            "score": score,
            "predicted_class": cls,
            "output": None,
        }

    for i in range(n_requests):
        rid = f"{experiment_id}-{seed}-{i}"
        ts = t0 + i * spacing_s
        truth = int(rng.random() < 0.5)
        user = rng.choices(range(users), weights=user_weights)[0] if users else None
        unit = None if user is None else f"{user:032x}"
        to_challenger = user_arm[user] if user is not None else rng.random() < challenger_weight
        delay = outcome_delay_s
        if mode == "shadow":
            preds.append(row(rid, Arm_.CHAMPION, versions[0], ts, champion, Status.OK, truth))
            if rng.random() < challenger.error_rate:
                failed = row(rid, Arm_.SHADOW, versions[1], ts, None, Status.ERROR, truth)
                preds.append({**failed, "reason": Reason.ERROR.value})
            else:
                preds.append(row(rid, Arm_.SHADOW, versions[1], ts, challenger, Status.OK, truth))
        elif rng.random() < client_error_rate:
            arm = Arm_.CHALLENGER if to_challenger else Arm_.CHAMPION
            version = versions[1] if to_challenger else versions[0]
            preds.append(
                row(rid, arm, version, ts, None, Status.CLIENT_ERROR, truth, unit, Reason.BAD_INPUT)
            )
            continue
        elif to_challenger:
            challenger_seen += 1
            if drop_challenger_every and challenger_seen % drop_challenger_every == 0:
                continue
            if rng.random() < challenger.error_rate:
                # Intent-to-treat: the challenger's row carries the champion's served answer.
                preds.append(
                    row(
                        rid,
                        Arm_.CHALLENGER,
                        versions[0],
                        ts,
                        champion,
                        Status.FALLBACK,
                        truth,
                        unit,
                        Reason.ERROR,
                    )
                )
            else:
                preds.append(
                    row(rid, Arm_.CHALLENGER, versions[1], ts, challenger, Status.OK, truth, unit)
                )
        else:
            if rng.random() < champion.error_rate:
                preds.append(
                    row(
                        rid,
                        Arm_.CHAMPION,
                        versions[0],
                        ts,
                        None,
                        Status.ERROR,
                        truth,
                        unit,
                        Reason.ERROR,
                    )
                )
            else:
                preds.append(
                    row(rid, Arm_.CHAMPION, versions[0], ts, champion, Status.OK, truth, unit)
                )
            if champion_positive_delay_s is not None and truth == 1:
                delay = champion_positive_delay_s
        outs.append(
            {
                "request_id": rid,
                "row_index": 0,
                "outcome": str(truth),
                "outcome_value": float(truth),
                "ts": ts + delay,
            }
        )
    with engine.begin() as conn:
        if preds:
            conn.execute(sa.insert(logschema.predictions), preds)
        if outs:
            conn.execute(sa.insert(logschema.outcomes), outs)
    engine.dispose()


def insert_rows(
    engine: sa.Engine, predictions: list[dict[str, Any]], outcomes: list[dict[str, Any]]
) -> None:
    """Create the log's tables and append hand-made rows to them."""
    logschema.metadata.create_all(engine)
    with engine.begin() as conn:
        if predictions:
            conn.execute(sa.insert(logschema.predictions), predictions)
        if outcomes:
            conn.execute(sa.insert(logschema.outcomes), outcomes)


def summary_of_rows(
    db_path: Path,
    predictions: list[dict[str, Any]],
    outcomes: list[dict[str, Any]],
    *,
    cutoff: float,
    window_s: float,
    default_weight: float,
    current_weight: float | None = None,
) -> LogSummary:
    """What the evaluator's SQL reads from these rows (experiment ``x``, accuracy, no cap), in a
    new SQLite log at ``db_path``: the simulations' sums are checked against it."""
    engine = sa.create_engine(sqlite_url(db_path))
    try:
        insert_rows(engine, predictions, outcomes)
        with engine.connect() as conn:
            return read_summary(
                conn,
                "x",
                metric="accuracy",
                cutoff=cutoff,
                window_s=window_s,
                cap_quantile=None,
                default_weight=default_weight,
                current_weight=current_weight,
            )
    finally:
        engine.dispose()


T0 = 1_700_000_000.0
OUTCOME_WINDOW_S = 600.0  # the tests' window: synthetic outcomes arrive within seconds


def settings_for(
    tracking_uri: str,
    log_url: str,
    *,
    model_name: str = "churn-predictor",
    experiment: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    prometheus_url: str | None = None,
) -> Settings:
    """Validated settings for a test registry and log (no environment overrides)."""
    raw: dict[str, Any] = {
        "model": {"name": model_name, "tracking_uri": tracking_uri},
        "prediction_log": {"url": log_url},
        "routing": {"challenger_weight": 0.5, **(routing or {})},
        "experiment": {
            "min_samples_per_arm": 500,
            "outcome_window_s": OUTCOME_WINDOW_S,
            **(experiment or {}),
        },
        "prometheus": {"url": prometheus_url},
    }
    return settings_from_mapping(raw, env={})


def write_config(path: Path, settings_raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(settings_raw), encoding="utf-8")
    return path
