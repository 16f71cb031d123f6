"""The feedback store: outcomes joined to logged predictions, idempotently.

``FeedbackStore.record`` is synchronous (call it off the event loop). It validates a whole batch
before any I/O, joins it to the logged prediction rows and stores the outcomes in one transaction:
the same outcome sent again is accepted and counted as not created, a different one is a conflict.
Request ids not found at first may still be in the prediction writer's queue: the store flushes
the writer once (the callable it was given) and looks again. Given the configured metric, every
outcome must be one that metric can judge (``logschema.outcome_fits``), or nothing is stored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from router.errors import Conflict, InvalidInput, NotFound, PredictionLogUnavailable
from router.log.database import brief, insert_ignoring, safe_url, short
from router.logschema import (
    OUTCOME_NEEDS,
    Arm,
    outcome_fits,
    outcome_number,
    outcomes,
    predictions,
)

if TYPE_CHECKING:
    from router.config import MetricName

_FLUSH_TIMEOUT_S = 30.0
_IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's and PostgreSQL's parameter limits


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    """Feedback for one request: a scalar outcome for every row, or a list with one per row."""

    request_id: str
    outcome: Any


@dataclass(frozen=True, slots=True)
class ScoredRow:
    """A logged prediction row matched by feedback, with the outcome now attached to it."""

    arm: str
    model_version: str
    row_index: int
    status: str  # a RowStatus: only served rows carry an answer to judge
    score: float | None
    predicted_class: str | None
    outcome: Any
    outcome_value: float | None
    created: bool  # this call stored the outcome (False: it was already there, same value)


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    """Rows of every arm for the request; ``created`` counts outcome rows this call inserted."""

    request_id: str
    rows: list[ScoredRow]
    created: int


class _Missing(Exception):
    """Internal: request ids not (yet) in the table; the caller flushes and looks again."""


class _Raced(Exception):
    """Internal: a concurrent call stored some of the same outcomes first; look again."""


class FeedbackStore:
    """Attaches outcomes to the prediction rows in ``engine``'s ``predictions`` table.

    ``flush(timeout)`` is called when request ids are missing: it must return once every
    prediction accepted so far is committed, or raise ``TimeoutError``/``RuntimeError``.
    """

    def __init__(self, engine: Engine, flush: Callable[[float], None]) -> None:
        self._engine = engine
        self._flush = flush
        self._safe_url = safe_url(engine)
        # Feedback racing another call for the same rows sees fewer rows returned and starts over,
        # rather than failing on a unique violation (which psycopg also logs noisily).
        self._insert_outcomes = insert_ignoring(engine, outcomes).returning(outcomes.c.row_index)

    def record(
        self, items: Sequence[FeedbackItem], metric: MetricName | None = None, *, flush: bool = True
    ) -> list[FeedbackResult]:
        """Attach outcomes to logged predictions; synchronous, call it off the event loop.

        All items are validated before anything is written and the batch commits in one
        transaction: an unknown request id (``NotFound``), a wrong number of per-row values or,
        given ``metric``, a value that metric cannot judge (``InvalidInput``), or an outcome
        differing from the stored one (``Conflict``) anywhere in the batch raises and stores
        nothing. The same value again is accepted with ``created=0``, so callers counting metrics
        on ``created`` never count a row twice. A request id not found at first may still be
        queued: the log is flushed once and the id looked up again (``flush=False``: no flush, a
        look for rows another replica writes). Database failures raise
        ``PredictionLogUnavailable`` (503). Each ``ScoredRow.created`` says whether this call
        stored that row's outcome: count live metrics on those rows only.
        """
        prepared = [_prepare(item, metric) for item in items]
        if not prepared:
            return []
        flushed = not flush
        races = 0
        while True:
            try:
                with self._engine.begin() as conn:
                    return self._apply_feedback(conn, prepared, final=flushed)
            except _Missing:
                flushed = True
                try:
                    self._flush(_FLUSH_TIMEOUT_S)
                except (TimeoutError, RuntimeError) as exc:
                    raise PredictionLogUnavailable(f"prediction log is behind: {exc}") from exc
            except _Raced as exc:
                # PostgreSQL only (BEGIN IMMEDIATE serialises SQLite): the transaction rolled back;
                # the next look finds the other call's values, equal (idempotent) or not (409).
                races += 1
                if races >= 5:
                    raise PredictionLogUnavailable("feedback kept racing other calls") from exc
            except sa.exc.SQLAlchemyError as exc:
                raise PredictionLogUnavailable(
                    f"prediction log {self._safe_url}: {brief(exc)}"
                ) from exc

    def _apply_feedback(
        self, conn: Connection, prepared: list[_Prepared], *, final: bool
    ) -> list[FeedbackResult]:
        ids = list(dict.fromkeys(p.request_id for p in prepared))
        logged: dict[str, list[Any]] = {}  # request id -> its prediction rows
        for chunk in _chunks(ids):
            query = (
                sa.select(
                    predictions.c.request_id,
                    predictions.c.row_index,
                    predictions.c.arm,
                    predictions.c.model_version,
                    predictions.c.status,
                    predictions.c.score,
                    predictions.c.predicted_class,
                )
                .where(predictions.c.request_id.in_(chunk))
                .order_by(predictions.c.request_id, predictions.c.row_index, predictions.c.arm)
            )
            for row in conn.execute(query):
                logged.setdefault(row.request_id, []).append(row)
        _refuse_reused_across_arms(logged)
        missing = [rid for rid in ids if rid not in logged]
        if missing:
            if not final:
                raise _Missing
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise NotFound(f"unknown request_id {missing[0]!r}{more}")

        stored: dict[tuple[str, int], str] = {}
        for chunk in _chunks(ids):
            query = sa.select(
                outcomes.c.request_id, outcomes.c.row_index, outcomes.c.outcome
            ).where(outcomes.c.request_id.in_(chunk))
            for hit in conn.execute(query):
                stored[(hit.request_id, hit.row_index)] = hit.outcome

        now = time.time()
        inserts: list[dict[str, Any]] = []
        results: list[FeedbackResult] = []
        for item in prepared:
            rows = logged[item.request_id]
            indices = sorted({row.row_index for row in rows})
            per_row = item.per_row(len(indices))
            created: dict[int, bool] = {}
            for index, (value, text, number) in zip(indices, per_row, strict=True):
                key = (item.request_id, index)
                previous = stored.get(key)
                if previous is None:
                    stored[key] = text  # a later item of this batch compares against it
                    created[index] = True
                    inserts.append(
                        {
                            "request_id": item.request_id,
                            "row_index": index,
                            "outcome": text,
                            "outcome_value": number,
                            "ts": now,
                        }
                    )
                elif json.loads(previous) == value:
                    created[index] = False
                else:
                    # Never the stored value: it is another client's outcome, maybe a secret.
                    raise Conflict(
                        f"request_id {item.request_id!r} already has a different outcome for "
                        f"row {index}; an outcome is stored once and never changed"
                    )
            values = dict(zip(indices, per_row, strict=True))
            results.append(
                FeedbackResult(
                    request_id=item.request_id,
                    rows=[
                        ScoredRow(
                            arm=row.arm,
                            model_version=row.model_version,
                            row_index=row.row_index,
                            status=row.status,
                            score=row.score,
                            predicted_class=row.predicted_class,
                            outcome=values[row.row_index][0],
                            outcome_value=values[row.row_index][2],
                            created=created[row.row_index],
                        )
                        for row in rows
                    ],
                    created=sum(created.values()),
                )
            )
        if inserts and len(conn.execute(self._insert_outcomes, inserts).all()) != len(inserts):
            raise _Raced
        return results


def _refuse_reused_across_arms(logged: dict[str, list[Any]]) -> None:
    """409 for a request id with a row in both assigned arms: its outcome would count twice.

    The log's unique index (``logschema.ONE_ASSIGNED_ARM``) keeps a reused ``X-Request-Id`` from
    being logged in a second arm; a log whose rows predate it may still hold such ids.
    """
    assigned = {Arm.CHAMPION.value, Arm.CHALLENGER.value}
    for request_id, rows in logged.items():
        arms_of_row: dict[int, set[str]] = {}
        for row in rows:
            if row.arm in assigned:
                arms_of_row.setdefault(row.row_index, set()).add(row.arm)
        if any(len(arms) > 1 for arms in arms_of_row.values()):
            raise Conflict(
                f"request_id {request_id!r} was logged in both arms (a reused X-Request-Id): "
                "an outcome for it would count in both; refused"
            )


_Encoded = tuple[Any, str, float | None]  # (decoded value, JSON text, numeric form)


@dataclass(frozen=True, slots=True)
class _Prepared:
    request_id: str
    scalar: _Encoded | None
    values: list[_Encoded] | None

    def per_row(self, n_rows: int) -> list[_Encoded]:
        if self.values is None:
            assert self.scalar is not None
            return [self.scalar] * n_rows
        if len(self.values) != n_rows:
            raise InvalidInput(
                f"request_id {self.request_id!r}: outcome has {len(self.values)} values, "
                f"expected {n_rows} (one per row)"
            )
        return self.values


def _prepare(item: FeedbackItem, metric: MetricName | None) -> _Prepared:
    """Validate and encode before any I/O. A list is always one value per row (a row whose
    outcome is itself a list is sent as a list of lists)."""
    rid = item.request_id
    if not isinstance(rid, str) or not rid:
        raise InvalidInput(f"request_id must be a non-empty string, got {rid!r}")
    if isinstance(item.outcome, list | tuple):
        return _Prepared(
            rid, None, [_encode(rid, v, metric, f"row {i}") for i, v in enumerate(item.outcome)]
        )
    return _Prepared(rid, _encode(rid, item.outcome, metric, None), None)


def _encode(request_id: str, value: Any, metric: MetricName | None, row: str | None) -> _Encoded:
    what = f"request_id {request_id!r}: outcome" + (f" of {row}" if row else "")
    if value is None:
        raise InvalidInput(f"{what} is missing (null)")
    try:
        # Canonical text (sorted keys, no spaces) so equal values compare equal when re-sent.
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not finite JSON: {exc}") from exc
    if metric is not None and not outcome_fits(metric, value):
        raise InvalidInput(
            f"{what} {short(text)} cannot be judged by the metric {metric} "
            f"(experiment.metric): it needs {OUTCOME_NEEDS[metric]}"
        )
    return json.loads(text), text, outcome_number(value)


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[i : i + _IN_CHUNK] for i in range(0, len(ids), _IN_CHUNK)]
