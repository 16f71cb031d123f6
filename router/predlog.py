"""The prediction log: a batched background writer for prediction rows, and the feedback store.

``enqueue`` runs on the event loop, on the request path: it appends to an in-memory queue under a
lock held for microseconds and never touches the database. One writer thread drains the queue in
batches (``batch_size`` records or ``flush_interval_s`` after the first one arrived, whichever comes
first), one transaction and one executemany per batch. ``flush``/``close`` wait until every
record accepted before the call is committed: "rows logged == rows served" at SIGTERM rests on it.

Nothing is lost silently: records refused because ``max_pending`` records are already waiting, and
records the writer gave up on (database down past the retries, or a record the database
rejects), are counted in ``dropped`` and logged.

``record_feedback`` is synchronous (call it off the event loop) and joins feedback to the logged
rows, in one transaction per call.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from router.errors import Conflict, InvalidInput, NotFound, RouterError
from router.logschema import metadata, outcomes, predictions

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000  # writer and feedback serialise on SQLite's single write lock
_MAX_BACKOFF_S = 5.0
_WARN_EVERY_S = 10.0  # drop warnings: at most one line per interval, with the count since the last
_FEEDBACK_FLUSH_TIMEOUT_S = 30.0
_IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's and PostgreSQL's parameter limits
_HEX = frozenset("0123456789abcdef")


class PredictionLogUnavailable(RouterError):
    """The prediction log's database cannot be reached or keeps failing (HTTP 503)."""

    status_code = 503
    code = "prediction_log_unavailable"


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
    score: float | None = None
    predicted_class: str | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        # The raw routing key (a user id) must never reach the log: refuse anything that does not
        # look like logschema.hash_routing_key's hex digest. A few hundred ns per record.
        key = self.routing_key_hash
        if key is not None and not (16 <= len(key) <= 64 and _HEX.issuperset(key)):
            raise ValueError(
                "routing_key_hash must come from logschema.hash_routing_key(), never the raw key"
            )


_RECORD_FIELDS = tuple(f.name for f in fields(PredictionRecord))


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


class PredictionLog:
    """Batched prediction writer plus feedback store over one SQLAlchemy engine.

    ``url`` is ``sqlite:///path`` (WAL mode; relative paths resolve against the working directory)
    or ``postgresql+psycopg://...`` (plain ``postgresql://`` uses psycopg 3, the driver installed).
    A batch is retried ``max_retries`` times with exponential backoff from ``retry_backoff_s``
    before its records are counted as dropped.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        max_pending: int = 100_000,
        max_retries: int = 5,
        retry_backoff_s: float = 0.1,
    ) -> None:
        if batch_size < 1 or max_pending < 1 or max_retries < 0:
            raise ValueError("batch_size and max_pending must be >= 1, max_retries >= 0")
        if not flush_interval_s > 0 or retry_backoff_s < 0:
            raise ValueError("flush_interval_s must be > 0 and retry_backoff_s >= 0")
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._max_pending = max_pending
        self._max_retries = max_retries
        self._retry_backoff_s = retry_backoff_s
        self._engine = _create_engine(url)
        self._safe_url = self._engine.url.render_as_string(hide_password=True)
        # Ignore-on-conflict: a client reusing a request id must not fail the other rows of the
        # batch. The first record for a (request_id, row_index, arm) wins; later ones are counted
        # in ``duplicates`` and logged, not stored.
        dialect = self._engine.dialect.name
        self._insert = _insert_ignoring(dialect, predictions)
        if dialect == "postgresql":
            # psycopg reports no rowcount for executemany: RETURNING says which rows went in.
            self._insert = self._insert.returning(predictions.c.row_index)
        # Feedback racing another call for the same rows sees fewer rows returned and starts over,
        # rather than failing on a unique violation (which psycopg also logs noisily).
        self._insert_outcomes = _insert_ignoring(dialect, outcomes).returning(outcomes.c.row_index)

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
        """Create the tables if missing and start the writer thread."""
        if self._thread is not None or self._closed:
            raise RuntimeError("PredictionLog.start() called twice or after close()")
        for attempt in range(3):
            try:
                with self._engine.begin() as conn:
                    metadata.create_all(conn)
                break
            except sa.exc.SQLAlchemyError as exc:
                # Replicas starting together on PostgreSQL race on CREATE TABLE; the loser sees the
                # tables on the next attempt. Anything else fails the same way three times.
                if attempt == 2:
                    raise PredictionLogUnavailable(
                        f"prediction log {self._safe_url}: cannot create tables: {_brief(exc)}"
                    ) from exc
                time.sleep(0.2)
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

    @property
    def duplicates(self) -> int:
        """Records ignored because their (request_id, row_index, arm) was already logged."""
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
        backlog = False
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if not self._queue:
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
                self._write(batch)
            except Exception:  # the thread's outermost layer: never die, count and log
                logger.exception("prediction log: unexpected error; %d records dropped", len(batch))
                self._count_dropped(len(batch))
            with self._progress:
                self._done += len(batch)
                self._progress.notify_all()

    def _write(self, batch: list[PredictionRecord]) -> None:
        rows = [{name: getattr(r, name) for name in _RECORD_FIELDS} for r in batch]
        attempt = 0
        while True:
            try:
                with self._engine.begin() as conn:
                    inserted = self._execute_insert(conn, rows)
                break
            except (sa.exc.DataError, sa.exc.IntegrityError) as exc:
                # A record the database rejects, not a database problem: retrying the same batch
                # cannot help, so write the records one by one and drop only the bad ones.
                logger.warning(
                    "prediction log: batch rejected (%s); writing row by row", _brief(exc)
                )
                self._write_each(rows)
                return
            except sa.exc.SQLAlchemyError as exc:
                attempt += 1
                if attempt > self._max_retries or self._abandon.is_set():
                    logger.error(
                        "prediction log: %d records dropped after %d attempts: %s",
                        len(rows),
                        attempt,
                        _brief(exc),
                    )
                    self._count_dropped(len(rows))
                    return
                delay = min(self._retry_backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                logger.warning(
                    "prediction log: write failed (%s); retry %d/%d in %.2fs",
                    _brief(exc),
                    attempt,
                    self._max_retries,
                    delay,
                )
                self._abandon.wait(delay)
        self._count_duplicates(len(rows) - inserted)

    def _write_each(self, rows: list[dict[str, Any]]) -> None:
        inserted = failed = 0
        for row in rows:
            try:
                with self._engine.begin() as conn:
                    inserted += self._execute_insert(conn, [row])
            except sa.exc.SQLAlchemyError as exc:
                logger.error(
                    "prediction log: record %r row %r dropped: %s",
                    row["request_id"],
                    row["row_index"],
                    _brief(exc),
                )
                failed += 1
        self._count_dropped(failed)
        self._count_duplicates(len(rows) - inserted - failed)

    def _execute_insert(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        """Insert, ignoring rows already logged; return how many went in."""
        result = conn.execute(self._insert, rows)
        return len(result.all()) if result.returns_rows else result.rowcount

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
    def record_feedback(self, items: Sequence[FeedbackItem]) -> list[FeedbackResult]:
        """Attach outcomes to logged predictions; synchronous, call it off the event loop.

        All items are validated before anything is written and the batch commits in one
        transaction: an unknown request id (``NotFound``), a wrong number of per-row values
        (``InvalidInput``) or an outcome differing from the stored one (``Conflict``) anywhere in
        the batch raises and stores nothing. The same value again is accepted with ``created=0``,
        so callers counting metrics on ``created`` never count a row twice. A request id not found
        at first may still be queued: the log is flushed once and looked up again. Database
        failures raise ``PredictionLogUnavailable`` (503). Each ``ScoredRow.created`` says whether
        this call stored that row's outcome: count live metrics on those rows only.
        """
        prepared = [_prepare(item) for item in items]
        if not prepared:
            return []
        flushed = False
        races = 0
        while True:
            try:
                with self._engine.begin() as conn:
                    return self._apply_feedback(conn, prepared, final=flushed)
            except _Missing:
                flushed = True
                if self._thread is not None and self._thread.is_alive():
                    try:
                        self.flush(_FEEDBACK_FLUSH_TIMEOUT_S)
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
                    f"prediction log {self._safe_url}: {_brief(exc)}"
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
                    predictions.c.score,
                    predictions.c.predicted_class,
                )
                .where(predictions.c.request_id.in_(chunk))
                .order_by(predictions.c.request_id, predictions.c.row_index, predictions.c.arm)
            )
            for row in conn.execute(query):
                logged.setdefault(row.request_id, []).append(row)
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
                    raise Conflict(
                        f"request_id {item.request_id!r} already has outcome "
                        f"{_short(previous)} for row {index}, not {_short(text)}"
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


def _prepare(item: FeedbackItem) -> _Prepared:
    """Validate and encode before any I/O. A list is always one value per row (a row whose
    outcome is itself a list is sent as a list of lists)."""
    rid = item.request_id
    if not isinstance(rid, str) or not rid:
        raise InvalidInput(f"request_id must be a non-empty string, got {rid!r}")
    if isinstance(item.outcome, list | tuple):
        return _Prepared(rid, None, [_encode(rid, v) for v in item.outcome])
    return _Prepared(rid, _encode(rid, item.outcome), None)


def _encode(request_id: str, value: Any) -> _Encoded:
    if value is None:
        raise InvalidInput(f"request_id {request_id!r}: outcome is missing (null)")
    try:
        # Canonical text (sorted keys, no spaces) so equal values compare equal when re-sent.
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"request_id {request_id!r}: outcome is not finite JSON: {exc}") from exc
    number: float | None = None
    if isinstance(value, bool | int | float):
        number = float(value)  # bool -> 0.0/1.0
    return json.loads(text), text, number


def _insert_ignoring(dialect: str, table: sa.Table) -> sa.Insert:
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    return postgresql.insert(table).on_conflict_do_nothing()


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[i : i + _IN_CHUNK] for i in range(0, len(ids), _IN_CHUNK)]


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _brief(exc: BaseException) -> str:
    """The driver's message, first line, without SQLAlchemy's SQL and parameter dump."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return f"{type(orig or exc).__name__}: {_short(text[0] if text else '', 300)}"


def _create_engine(url: str) -> Engine:
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
            # Each pooled connection would see its own empty database.
            raise ValueError(
                f"prediction log {url!r}: in-memory SQLite is not supported; use a file"
            )
        engine = sa.create_engine(parsed, connect_args={"check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg2 is not a dependency
        # pre_ping: a restarted server must not fail the first batch after it with a dead socket.
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    raise ValueError(
        f"prediction log {url!r}: unsupported database {backend!r} (use sqlite or postgresql)"
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Driver-level autocommit, so that _sqlite_on_begin alone decides how transactions start.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")  # first: WAL switch waits
        # WAL: the evaluator reads while the router writes; NORMAL sync is safe with WAL (a power
        # cut may lose the last commits, never corrupt the file).
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()
    if str(mode).lower() != "wal":
        logger.warning("prediction log: SQLite refused WAL mode (journal_mode=%s)", mode)


def _sqlite_on_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front: feedback reads then writes, and a deferred
    # transaction upgrading its lock fails with SQLITE_BUSY at once instead of waiting.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
