"""Retention of the prediction log: old rows removed in bounded batches, running experiments never.

The rule, with ``cutoff = now - prediction_log.retention_days``:

- An experiment (an experiment id with a challenger, ``logschema.has_challenger``) is **running**
  when it is the experiment of the registry's current ``@champion``/``@challenger`` (what the
  routers serve and ``evaluate_and_promote`` judges, until a promotion, a rejection or an alias move
  ends it), or when it has a prediction logged at or after the cutoff (a router still serves it, or
  it ended less than the retention period ago). A running experiment keeps every row, however old:
  the evaluator judges an experiment on all of its rows, and a log cut by age would bias it.
- A finished experiment (every other id with a challenger) is removed whole: all its rows are older
  than the cutoff by definition.
- Champion-only traffic (``...-vs-vnone``: no challenger, nothing judged; ``evaluate_and_promote``
  says "no experiment running") is removed by age: its rows older than the cutoff.
- An outcome goes with the last prediction row it joins (same request id and row).

No row at or after the cutoff is ever removed, whatever the experiment. Each batch is one short
transaction of at most ``batch_rows`` prediction rows (and their outcomes), so the router's writer
and feedback wait at most one batch for the lock. Which experiments run is decided once, at the
start of a pass.

Listing the experiments costs one scan of ``predictions`` per pass (no index on ``ts``): fine
hourly up to tens of millions of rows; beyond, partition by time (docs/deploy.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from router.logschema import has_challenger, outcomes, predictions

logger = logging.getLogger(__name__)

DAY_S = 86_400.0
_CHUNK = 1_000


@dataclass(frozen=True)
class RetentionPlan:
    """What one pass will do: decided from the log and the running experiments, nothing removed."""

    cutoff: float
    running: tuple[str, ...]  # experiment ids kept whole
    finished: tuple[str, ...]  # experiment ids removed whole
    by_age: tuple[str, ...]  # champion-only ids: rows before the cutoff removed


@dataclass
class RetentionResult:
    plan: RetentionPlan
    removed: dict[str, int] = field(default_factory=dict)  # prediction rows per experiment id
    outcomes_removed: int = 0
    batches: int = 0

    @property
    def rows_removed(self) -> int:
        return sum(self.removed.values())


def plan_retention(
    engine: Engine, retention_days: float, current: Collection[str], now: float | None = None
) -> RetentionPlan:
    """Classify the log's experiment ids (see the module's rule); ``current``: the experiment
    ids the registry's aliases give now (never removed, even without recent rows)."""
    if not retention_days > 0:
        raise ValueError("retention_days must be > 0")
    cutoff = (time.time() if now is None else now) - retention_days * DAY_S
    p = predictions
    with engine.connect() as conn:
        last_ts = sa.select(p.c.experiment_id, sa.func.max(p.c.ts)).group_by(p.c.experiment_id)
        latest = conn.execute(last_ts).all()
    running, finished, by_age = [], [], []
    for eid, last in sorted(latest):
        if not has_challenger(eid):
            by_age.append(eid)
        elif eid in current or last >= cutoff:
            running.append(eid)
        else:
            finished.append(eid)
    return RetentionPlan(cutoff, tuple(running), tuple(finished), tuple(by_age))


def apply_retention(
    engine: Engine, plan: RetentionPlan, batch_rows: int = 5_000
) -> RetentionResult:
    """Remove what ``plan`` says, ``batch_rows`` prediction rows per transaction."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    result = RetentionResult(plan)
    for eid in (*plan.finished, *plan.by_age):
        removed = 0
        while True:
            n, gone = _delete_batch(engine, eid, plan.cutoff, batch_rows)
            result.batches += 1 if n else 0
            removed += n
            result.outcomes_removed += gone
            if n < batch_rows:
                break
        if removed:
            result.removed[eid] = removed
            logger.info("prediction log retention: %d rows of %s removed", removed, eid)
    return result


def _delete_batch(engine: Engine, eid: str, cutoff: float, batch_rows: int) -> tuple[int, int]:
    """One transaction: up to ``batch_rows`` rows of ``eid`` older than ``cutoff``, and the
    outcomes no prediction row joins any more. Returns (predictions removed, outcomes removed)."""
    p, o = predictions, outcomes
    chosen = (
        sa.select(p.c.request_id, p.c.row_index, p.c.arm)
        .where(p.c.experiment_id == eid, p.c.ts < cutoff)
        .limit(batch_rows)
    )
    key = sa.tuple_(p.c.request_id, p.c.row_index, p.c.arm)
    still_joined = sa.exists().where(
        p.c.request_id == o.c.request_id, p.c.row_index == o.c.row_index
    )
    removed = outcomes_removed = 0
    with engine.begin() as conn:
        keys = [tuple(k) for k in conn.execute(chosen)]
        # IN lists of at most _CHUNK keys: under either database's parameter limit.
        for i in range(0, len(keys), _CHUNK):
            removed += conn.execute(sa.delete(p).where(key.in_(keys[i : i + _CHUNK]))).rowcount
        request_ids = sorted({k[0] for k in keys})
        for i in range(0, len(request_ids), _CHUNK):
            outcomes_removed += conn.execute(
                sa.delete(o).where(o.c.request_id.in_(request_ids[i : i + _CHUNK]), ~still_joined)
            ).rowcount
    return removed, outcomes_removed
