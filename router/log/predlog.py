"""The prediction log: a batched background writer for prediction rows.

``enqueue`` runs on the event loop, on the request path: it appends to an in-memory queue under a
lock held for microseconds and never touches the database. One writer thread drains the queue in
batches (``batch_size`` records or ``flush_interval_s`` after the first one arrived, whichever comes
first), one transaction per batch (one positional executemany on SQLite, a ``COPY`` on PostgreSQL:
``router/log/pgcopy.py``). ``flush``/``close`` wait until every record accepted before the call is
committed: "rows logged == rows served" at SIGTERM rests on it.

A thread, not a process: measured (``python -m bench.ingest``), the writer costs 3 µs of CPU per
row on PostgreSQL and under 5 on SQLite, about 1% of a serving process at its highest rate, and a
serving loop loses no measurable throughput to it; a writer process would save the serving process
about 3 µs per row and cost a second process per worker plus a protocol for ``flush``/feedback.

Nothing is lost silently. A failing database is retried (backoff, one log line per attempt) for
as long as the queue has room: records are refused, counted in ``dropped`` and logged, only once
``max_pending`` records are waiting, or when ``close`` runs out of time. A record the database
rejects is dropped alone and counted. A SQLite file deleted or replaced under the writer is noticed
before and after every batch: the rows this process had written to it are counted as dropped, and
the log is reopened (its tables created again) when its directory is there.

Start-up never waits for the database: ``start`` only starts the writer, which creates the tables
(retrying like a write) while records queue. ``error`` says what is failing now, for ``/readyz``
and the ``router_prediction_log_healthy`` gauge.

``record_feedback`` delegates to ``router.log.feedback.FeedbackStore`` on the same engine, which
flushes this writer when feedback names a request id still in the queue.
"""

from __future__ import annotations

import collections
import logging
import math
import operator
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import sqlalchemy.orm  # imported here on purpose: see below
from sqlalchemy.engine import Connection, Engine

from router.log.database import (
    SqliteFile,
    add_missing_columns,
    add_missing_indexes,
    brief,
    create_engine,
    row_inserter,
    safe_url,
    sqlite_file,
)
from router.log.feedback import FeedbackItem, FeedbackResult, FeedbackStore
from router.logschema import metadata, predictions

if TYPE_CHECKING:
    from router.config import MetricName

logger = logging.getLogger(__name__)
# ``sqlalchemy.orm`` is imported above, on the importing thread, on purpose: the writer creates the
# tables while other threads import MLflow, and SQLAlchemy's DDL inspection touches
# ``sqlalchemy.orm``; seen half-imported by another thread it raised AttributeError in the writer.

_MAX_BACKOFF_S = 5.0
_WARN_EVERY_S = 10.0  # drop warnings: at most one line per interval, with the count since the last
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """One scored row of one arm; mirrors ``logschema.predictions`` (``output`` is JSON text)."""

    request_id: str
    row_index: int
    arm: str
    experiment_id: str
    model_name: str
    model_version: str
    ts: float
    latency_s: float
    status: str
    routing_key_hash: str | None = None
    reason: str | None = None  # a logschema.Reason for fallback / error / client_error rows
    score: float | None = None
    predicted_class: str | None = None
    output: str | None = None
    champion_score: float | None = None  # the champion's score for this row's input
    challenger_weight: float | None = None  # the split the request was assigned under

    def __post_init__(self) -> None:
        # The raw routing key (a user id) must never reach the log: refuse anything that does not
        # look like logschema.hash_routing_key's hex digest. A few hundred ns per record.
        key = self.routing_key_hash
        if key is not None and not (16 <= len(key) <= 64 and _HEX.issuperset(key)):
            raise ValueError(
                "routing_key_hash must come from logschema.hash_routing_key(), never the raw key"
            )


_RECORD_FIELDS = tuple(f.name for f in fields(PredictionRecord))
_as_row = operator.attrgetter(*_RECORD_FIELDS)  # a record as one tuple, in C
_REQUEST_ID, _ROW_INDEX = _RECORD_FIELDS.index("request_id"), _RECORD_FIELDS.index("row_index")


class PredictionLog:
    """Batched prediction writer plus feedback store over one SQLAlchemy engine.

    ``url`` is ``sqlite:///path`` (WAL mode; relative paths resolve against the working directory)
    or ``postgresql+psycopg://...`` (plain ``postgresql://`` uses psycopg 3, the driver installed).
    A failing batch is retried with exponential backoff from ``retry_backoff_s`` (at most
    ``_MAX_BACKOFF_S`` apart) until it is written or ``close`` gives up on it.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        max_pending: int = 100_000,
        retry_backoff_s: float = 0.1,
    ) -> None:
        if batch_size < 1 or max_pending < 1:
            raise ValueError("batch_size and max_pending must be >= 1")
        if not flush_interval_s > 0 or retry_backoff_s < 0:
            raise ValueError("flush_interval_s must be > 0 and retry_backoff_s >= 0")
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._max_pending = max_pending
        self._retry_backoff_s = retry_backoff_s
        self._engine = create_engine(url)
        self._safe_url = safe_url(self._engine)
        self._file: SqliteFile | None = sqlite_file(self._engine)
        self._tables_ready = False  # only the writer thread reads and writes these four
        self._held: Connection | None = None  # the writer's connection while a backlog lasts
        self._written_to_file = 0  # rows this process wrote to the SQLite file now open
        self._error: str | None = None
        self._prepared = threading.Event()  # the tables were created once
        # Ignore-on-conflict: a client reusing a request id must not fail the other rows of the
        # batch. The first record for a (request_id, row_index, arm), or for a (request_id,
        # row_index) in an assigned arm (``logschema.ONE_ASSIGNED_ARM``), wins; later ones are
        # counted in ``duplicates`` and logged, not stored. PostgreSQL: COPY, then one insert.
        self._insert = row_inserter(self._engine, predictions, _RECORD_FIELDS)
        self._feedback = FeedbackStore(self._engine, self._flush_if_running)

        lock = threading.Lock()
        self._wake = threading.Condition(lock)  # writer waits here for records/flush/close
        self._progress = threading.Condition(lock)  # flush() waits here for the writer
        self._queue: collections.deque[PredictionRecord] = collections.deque()
        self._accepted = 0  # records ever accepted into the queue
        self._done = 0  # accepted records committed or given up on
        self._flush_target = 0  # the writer skips its batching wait while _done < this
        self._dropped = 0
        self._duplicates = 0
        self._closed = False
        self._stopping = False
        self._abandon = threading.Event()  # close() timed out: stop retrying, drop and count
        self._thread: threading.Thread | None = None
        self._last_warning = -math.inf
        self._unreported_drops = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer thread; it creates the tables if missing (never blocks the caller)."""
        if self._thread is not None or self._closed:
            raise RuntimeError("PredictionLog.start() called twice or after close()")
        self._thread = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Write everything accepted so far, stop the writer and dispose of the engine.

        Records enqueued after ``close`` starts are dropped and counted. If the database does not
        take the backlog within ``timeout``, the writer stops retrying and the rest are counted as
        dropped (logged at ERROR).
        """
        deadline = time.monotonic() + timeout
        with self._wake:
            if self._closed:
                return
            self._closed = True
        thread = self._thread
        if thread is not None:
            try:
                self.flush(timeout)
            except (TimeoutError, RuntimeError):
                logger.error(
                    "prediction log: %d records not written within %.1fs of close; dropping them",
                    self.pending,
                    timeout,
                )
                self._abandon.set()
            with self._wake:
                self._stopping = True
                self._wake.notify()
            # Give an abandoned writer a moment to count what it drops.
            thread.join(max(deadline - time.monotonic(), 1.0))
            if thread.is_alive():
                logger.error("prediction log: writer still busy at close; %d pending", self.pending)
        else:
            with self._wake:
                lost = len(self._queue)
                self._queue.clear()
                self._done += lost
                self._dropped += lost
            if lost:
                logger.error("prediction log closed before start(): %d records dropped", lost)
        self._engine.dispose()

    # -- the request path -----------------------------------------------------------------------
    def enqueue(self, records: Sequence[PredictionRecord]) -> None:
        """Queue one request's records for the writer; never blocks on the database.

        All or nothing per call, so that a request is either fully logged or not at all: when the
        records would take the pending count past ``max_pending`` (or the log is closed) they are
        dropped and counted in ``dropped``.
        """
        n = len(records)
        if n == 0:
            return
        with self._wake:
            if self._closed or self._accepted - self._done + n > self._max_pending:
                self._dropped += n
                self._unreported_drops += n
                warn = time.monotonic() - self._last_warning >= _WARN_EVERY_S
                if warn:
                    self._last_warning = time.monotonic()
                    count, self._unreported_drops = self._unreported_drops, 0
            else:
                warn = False
                was_empty = not self._queue
                self._queue.extend(records)
                self._accepted += n
                # Wake the writer for the first record (it sleeps while idle) or a full batch.
                if was_empty or len(self._queue) >= self._batch_size:
                    self._wake.notify()
        if warn:  # outside the lock: logging does I/O
            logger.warning(
                "prediction log: dropped %d records (%s; max_pending=%d, total dropped %d)",
                count,
                "log closed" if self._closed else "writer behind",
                self._max_pending,
                self._dropped,
            )

    @property
    def pending(self) -> int:
        """Records accepted but not yet committed (queued or in the batch being written)."""
        with self._wake:
            return self._accepted - self._done

    @property
    def dropped(self) -> int:
        """Records refused at ``enqueue`` or given up on by the writer, since start."""
        return self._dropped

    def wait_prepared(self, timeout: float) -> bool:
        """Wait until the writer has created the tables once; False after ``timeout``."""
        return self._prepared.wait(timeout)

    @property
    def error(self) -> str | None:
        """Why the database is failing now (None: the last attempt worked, or none was made)."""
        return self._error

    @property
    def duplicates(self) -> int:
        """Records ignored because their (request_id, row_index) was already logged in that arm,
        or, in an assigned arm, in the other one."""
        return self._duplicates

    @property
    def engine(self) -> Engine:
        """The engine (diagnostics and tests; the writer owns the write path)."""
        return self._engine

    def flush(self, timeout: float | None = None) -> None:
        """Block until every record enqueued before this call is committed or counted dropped.

        Raises ``TimeoutError`` after ``timeout`` seconds, and ``RuntimeError`` if records are
        pending but the writer is not running (they could never be written).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            target = self._accepted
            if self._done >= target:
                return
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError(
                    f"prediction log writer not running; {target - self._done} pending"
                )
            self._flush_target = max(self._flush_target, target)
            self._wake.notify()
            while self._done < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"prediction log: {target - self._done} records pending after {timeout}s"
                    )
                # Bounded waits so that a writer that died (it should not) cannot hang us.
                self._progress.wait(1.0 if remaining is None else min(remaining, 1.0))
                if not self._thread.is_alive() and self._done < target:
                    raise RuntimeError("prediction log writer stopped with records pending")

    # -- the writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        self._prepare_at_start()
        backlog = False
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if not self._queue:
                    self._release()
                    return  # stopping, and everything accepted is done
                if not backlog:
                    deadline = time.monotonic() + self._flush_interval_s
                    while (
                        len(self._queue) < self._batch_size
                        and not self._stopping
                        and self._flush_target <= self._done
                    ):
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._wake.wait(remaining)
                batch = [
                    self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))
                ]
                backlog = bool(self._queue)  # more waiting already: no reason to wait again
            try:
                self._write(batch, keep=backlog)
            except Exception:  # the thread's outermost layer: never die, count and log
                logger.exception("prediction log: unexpected error; %d records dropped", len(batch))
                self._count_dropped(len(batch))
            with self._progress:
                self._done += len(batch)
                self._progress.notify_all()

    def _prepare_at_start(self) -> None:
        """Create the tables before any record arrives, so ``error`` tells at once if it fails."""
        attempt = 0
        while True:
            try:
                self._prepare()
                return
            except sa.exc.SQLAlchemyError as exc:
                attempt += 1
                delay = self._failed(exc, attempt, "cannot create its tables")
            except Exception as exc:  # the writer thread's outermost layer: it must never die
                attempt += 1
                logger.exception("prediction log: unexpected error creating its tables")
                delay = self._failed(exc, attempt, "cannot create its tables")
            with self._wake:
                if self._stopping or self._abandon.is_set():
                    return  # close(): the records still queued are written (or dropped) by _run
                self._wake.wait(delay)

    def _prepare(self) -> None:
        """Reopen a SQLite file deleted or replaced under us; create missing tables and columns.

        Replicas starting together on PostgreSQL race on CREATE TABLE; the loser fails, retries
        and finds the tables.
        """
        if self._file is not None and self._file.replaced():
            lost, self._written_to_file = self._written_to_file, 0
            self._count_dropped(lost)
            logger.error(
                "prediction log: %s was deleted or replaced while open: the %d records this "
                "process wrote to it are gone (counted as dropped); reopening",
                self._file.path,
                lost,
            )
            self._file.forget()
            self._release()
            self._engine.dispose()  # pooled connections still point at the old file
            self._tables_ready = False
        if self._tables_ready:
            return
        with self._engine.begin() as conn:
            metadata.create_all(conn)
            add_missing_columns(conn)
            add_missing_indexes(conn)
        self._tables_ready = True
        if self._file is not None:
            self._file.remember()
        self._prepared.set()

    def _failed(self, exc: Exception, attempt: int, doing: str) -> float:
        """Record and log one failed attempt; return the wait before the next one."""
        self._error = f"{doing}: {brief(exc)}"
        self._tables_ready = False  # a dropped table or a new file: create them again
        delay: float = min(self._retry_backoff_s * 2.0 ** (attempt - 1), _MAX_BACKOFF_S)
        logger.warning(
            "prediction log %s %s (attempt %d, retrying in %.2fs; %d records pending)",
            self._safe_url,
            self._error,
            attempt,
            delay,
            self.pending,
        )
        return delay

    def _write(self, batch: list[PredictionRecord], *, keep: bool = False) -> None:
        """Write one batch; ``keep``: more are waiting, hold the connection for the next one.

        Otherwise the connection is closed after the batch: on SQLite (no pool) no connection,
        and so no mapping of the ``-shm`` file, outlives a burst of writing. A mapping that sits
        idle is what a ``-shm`` truncated or made unwritable under it turns into a SIGBUS at its
        next use (issue 20); a new connection maps the file as it is now, and one that cannot be
        written is refused (``database._refuse_unwritable``). Holding the connection through a
        backlog keeps SQLite from checkpointing at every close (16,600 rows/s instead of 61,000).
        """
        rows = list(map(_as_row, batch))
        attempt = 0
        while True:
            try:
                self._prepare()
                conn, self._held = self._held or self._engine.connect(), None
                try:
                    with conn.begin():
                        inserted = self._insert(conn, rows)
                except BaseException:
                    conn.close()
                    raise
                if keep:
                    self._held = conn
                else:
                    conn.close()
                if self._file is not None and self._file.replaced():
                    # Committed to a file no longer in the log: write the batch again.
                    raise sa.exc.OperationalError(
                        "commit", None, FileNotFoundError(f"{self._file.path} was replaced")
                    )
                break
            except (sa.exc.DataError, sa.exc.IntegrityError) as exc:
                # A record the database rejects, not a database problem: retrying the same batch
                # cannot help, so write the records one by one and drop only the bad ones.
                logger.warning(
                    "prediction log: batch rejected (%s); writing row by row", brief(exc)
                )
                self._write_each(rows)
                return
            except sa.exc.SQLAlchemyError as exc:
                attempt += 1
                if self._abandon.is_set():
                    logger.error(
                        "prediction log: %d records dropped at close after %d attempts: %s",
                        len(rows),
                        attempt,
                        brief(exc),
                    )
                    self._count_dropped(len(rows))
                    return
                # Retried while the queue has room: new records are refused (and counted) only
                # once max_pending are waiting, this batch included.
                self._abandon.wait(self._failed(exc, attempt, "write failed"))
        self._error = None
        self._written_to_file += inserted
        self._count_duplicates(len(rows) - inserted)

    def _release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def _write_each(self, rows: list[tuple[Any, ...]]) -> None:
        inserted = failed = 0
        for row in rows:
            try:
                with self._engine.begin() as conn:
                    n = self._insert(conn, [row])
                inserted += n
                self._written_to_file += n
            except sa.exc.SQLAlchemyError as exc:
                logger.error(
                    "prediction log: record %r row %r dropped: %s",
                    row[_REQUEST_ID],
                    row[_ROW_INDEX],
                    brief(exc),
                )
                failed += 1
        self._count_dropped(failed)
        self._count_duplicates(len(rows) - inserted - failed)

    def _count_dropped(self, n: int) -> None:
        if n:
            with self._wake:
                self._dropped += n

    def _count_duplicates(self, n: int) -> None:
        if n > 0:
            self._duplicates += n  # only the writer thread writes this counter
            logger.warning(
                "prediction log: %d records ignored: (request_id, row_index, arm) already logged",
                n,
            )

    # -- feedback -------------------------------------------------------------------------------
    def record_feedback(
        self, items: Sequence[FeedbackItem], metric: MetricName | None = None, *, flush: bool = True
    ) -> list[FeedbackResult]:
        """Attach outcomes to logged predictions: ``FeedbackStore.record`` on this log's engine.

        Synchronous, call it off the event loop. A request id not found at first may still be
        queued here: unless ``flush`` is false, this log is flushed once and the id looked up
        again. ``metric``: refuse outcomes it cannot judge.
        """
        return self._feedback.record(items, metric, flush=flush)

    def _flush_if_running(self, timeout: float) -> None:
        # Records can only still appear if the writer is running; otherwise look up what is there.
        if self._thread is not None and self._thread.is_alive():
            self.flush(timeout)
