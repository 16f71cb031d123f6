"""The prediction log against real databases: SQLite in tmp_path and PostgreSQL 15 (marked).

Every test runs on both backends. Nothing is mocked: blocked or failing databases are produced by
holding real locks or dropping the real table. No assertion depends on wall-clock time: waits that
make a test deterministic use an interval far longer than any test (``NEVER``) plus ``flush``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from router.errors import Conflict, InvalidInput, NotFound
from router.log.feedback import FeedbackItem
from router.log.predlog import PredictionLog, PredictionRecord
from router.logschema import hash_routing_key, outcomes, predictions
from tests.pg import isolated_schema_url

NEVER = 3600.0  # a flush interval no test outlives: rows appear only through flush/close/batch


@dataclass
class Backend:
    name: str
    url: str
    sqlite_path: Path | None

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.exec_driver_sql(sql)]
        finally:
            engine.dispose()

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT count(*) FROM {table}")[0][0])

    @contextmanager
    def write_locked(self) -> Iterator[None]:
        """Hold the database's write lock from another connection: the writer blocks on it."""
        if self.sqlite_path is not None:
            conn = sqlite3.connect(self.sqlite_path, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        else:
            engine = sa.create_engine(self.url)
            try:
                with engine.begin() as c:
                    c.exec_driver_sql("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
                    yield
            finally:
                engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "predictions.db"
        yield Backend("sqlite", f"sqlite:///{path}", path)
    else:
        with isolated_schema_url() as url:
            yield Backend("postgres", url, None)


MakeLog = Callable[..., PredictionLog]


@pytest.fixture
def make_log(backend: Backend) -> Iterator[MakeLog]:
    """Build logs on the backend (started unless start=False); all closed at teardown."""
    made: list[PredictionLog] = []

    def make(*, start: bool = True, **kwargs: Any) -> PredictionLog:
        log = PredictionLog(backend.url, **kwargs)
        made.append(log)
        if start:
            log.start()
            assert log.wait_prepared(60), log.error  # tables exist: tests may lock them
        return log

    yield make
    for log in made:
        log.close(timeout=10)


def rec(
    request_id: str, row_index: int = 0, arm: str = "champion", **over: Any
) -> PredictionRecord:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "row_index": row_index,
        "arm": arm,
        "experiment_id": "churn:v1-vs-v2",
        "model_name": "churn",
        "model_version": "1" if arm == "champion" else "2",
        "ts": 1_700_000_000.0,
        "latency_s": 0.001,
        "status": "ok",
        "routing_key_hash": None,
        "score": 0.25 + 0.5 * (row_index % 2),
        "predicted_class": str(row_index % 2),
        "output": f"[{0.75 - 0.5 * (row_index % 2)}, {0.25 + 0.5 * (row_index % 2)}]",
    }
    fields.update(over)
    return PredictionRecord(**fields)


def request(request_id: str, n_rows: int, arm: str = "champion") -> list[PredictionRecord]:
    return [rec(request_id, i, arm) for i in range(n_rows)]


# -- the writer ---------------------------------------------------------------------------------
def test_batched_writes_from_threads_all_land(backend: Backend, make_log: MakeLog) -> None:
    log = make_log(batch_size=128, flush_interval_s=0.01)
    threads, per_thread = 4, 2_500

    def produce(t: int) -> None:
        i = 0
        while i < per_thread:  # requests of 1..7 rows, like real traffic
            n = min(1 + i % 7, per_thread - i)
            log.enqueue([rec(f"t{t}-r{i}", j) for j in range(n)])
            i += n

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    log.flush()
    assert backend.count("predictions") == threads * per_thread == 10_000
    assert log.pending == 0
    assert log.dropped == 0
    assert log.duplicates == 0


def test_full_batch_is_written_without_flush(backend: Backend, make_log: MakeLog) -> None:
    log = make_log(batch_size=10, flush_interval_s=NEVER)
    log.enqueue(request("full", 10))  # a full batch wakes the writer; the interval never expires
    while log.pending:  # the writer commits it by itself; the test's timeout bounds this loop
        threading.Event().wait(0.01)
    assert backend.count("predictions") == 10


def test_flush_waits_for_queued_records(backend: Backend, make_log: MakeLog) -> None:
    log = make_log(batch_size=10_000, flush_interval_s=NEVER)
    log.enqueue(request("a", 3))
    log.enqueue(request("b", 4))
    assert log.pending == 7
    log.flush(timeout=60)
    assert backend.count("predictions") == 7
    assert log.pending == 0


def test_close_writes_everything_then_refuses(backend: Backend, make_log: MakeLog) -> None:
    log = make_log(batch_size=64, flush_interval_s=NEVER)
    for i in range(50):
        log.enqueue(request(f"r{i}", 5))
    log.close()
    assert backend.count("predictions") == 250
    log.enqueue(request("late", 2))  # after close: counted, never silently lost
    assert log.dropped == 2
    log.close()  # idempotent


def test_flush_without_writer_raises_instead_of_hanging(make_log: MakeLog) -> None:
    log = make_log(start=False)
    log.flush()  # nothing pending: returns
    log.enqueue(request("x", 1))
    with pytest.raises(RuntimeError, match="not running"):
        log.flush()


def test_drops_past_max_pending_when_writer_not_started(
    backend: Backend, make_log: MakeLog, caplog: pytest.LogCaptureFixture
) -> None:
    log = make_log(start=False, max_pending=5, flush_interval_s=NEVER)
    log.enqueue(request("a", 3))
    with caplog.at_level(logging.WARNING, logger="router.log.predlog"):
        log.enqueue(request("b", 3))  # would make 6: the whole request is dropped, not a part
    log.enqueue(request("c", 2))  # exactly 5: accepted
    log.enqueue(request("d", 1))
    assert (log.pending, log.dropped) == (5, 4)
    assert "dropped 3 records" in caplog.text
    log.start()
    log.flush()
    assert backend.count("predictions") == 5
    assert sorted(r[0] for r in backend.query("SELECT DISTINCT request_id FROM predictions")) == [
        "a",
        "c",
    ]


def test_drops_past_max_pending_while_database_blocked(backend: Backend, make_log: MakeLog) -> None:
    log = make_log(max_pending=10, batch_size=4, flush_interval_s=0.01)
    with backend.write_locked():
        # The writer may take a batch but cannot commit it: in-flight records still count as
        # pending, so the eleventh record is refused whatever the writer is doing.
        for i in range(10):
            log.enqueue([rec(f"b{i}")])
        log.enqueue([rec("over")])
        assert log.dropped == 1
        assert log.pending == 10
    log.flush()
    assert backend.count("predictions") == 10
    assert log.dropped == 1


def test_a_dropped_table_is_created_again_and_nothing_is_lost(
    backend: Backend, make_log: MakeLog, caplog: pytest.LogCaptureFixture
) -> None:
    log = make_log(retry_backoff_s=0.001, flush_interval_s=NEVER)
    log.enqueue(request("before", 2))
    log.flush()
    engine = sa.create_engine(backend.url)
    try:
        predictions.drop(engine)
    finally:
        engine.dispose()
    with caplog.at_level(logging.WARNING, logger="router.log.predlog"):
        log.enqueue(request("after", 5))
        log.flush()
    assert "write failed" in caplog.text and "attempt 1" in caplog.text
    assert backend.count("predictions") == 5  # the table came back, empty but for these
    assert (log.dropped, log.error) == (0, None)


def test_rejected_record_does_not_poison_its_batch(backend: Backend, make_log: MakeLog) -> None:
    log = make_log(flush_interval_s=NEVER)
    bad = rec("bad", experiment_id=None)  # violates NOT NULL on both dialects
    log.enqueue([*request("good1", 4), bad, *request("good2", 5)])
    log.flush()
    assert backend.count("predictions") == 9
    assert log.dropped == 1


def test_reused_request_id_keeps_first_row_and_the_rest_of_the_batch(
    backend: Backend, make_log: MakeLog
) -> None:
    log = make_log(flush_interval_s=NEVER)
    log.enqueue([rec("dup", 0, score=0.1)])
    log.flush()
    # Same batch: a reused request id (in the table already), a duplicate inside the batch, and
    # new rows that must all land.
    log.enqueue([rec("dup", 0, score=0.9), *request("new", 3), rec("new", 0, score=0.5)])
    log.flush()
    assert backend.count("predictions") == 4
    assert backend.query("SELECT score FROM predictions WHERE request_id = 'dup'") == [(0.1,)]
    assert log.duplicates == 2
    assert log.dropped == 0


def test_sqlite_runs_in_wal_mode_with_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    log = PredictionLog(f"sqlite:///{path}")
    log.start()
    try:
        with log.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar_one() >= 1000
    finally:
        log.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persisted in the file
    finally:
        conn.close()


def test_relative_sqlite_path_resolves_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    log = PredictionLog("sqlite:///relative.db")
    log.start()
    log.close()
    assert (tmp_path / "relative.db").exists()


def test_routing_key_is_never_stored_raw(backend: Backend, make_log: MakeLog) -> None:
    raw = "user-4242@example.com"
    with pytest.raises(ValueError, match="hash_routing_key"):
        rec("r", routing_key_hash=raw)
    log = make_log()
    hashed = hash_routing_key(b"secret", raw)
    log.enqueue([rec("r", 0, routing_key_hash=hashed), rec("r", 1, routing_key_hash=hashed)])
    log.close()
    rows = backend.query("SELECT * FROM predictions")
    assert {r for (r,) in backend.query("SELECT routing_key_hash FROM predictions")} == {hashed}
    assert all(raw not in repr(r) for r in rows)
    if backend.sqlite_path is not None:  # not in the file or its WAL either
        for path in backend.sqlite_path.parent.glob("predictions.db*"):
            assert raw.encode() not in path.read_bytes()


# -- feedback -----------------------------------------------------------------------------------
def test_feedback_accepted_then_idempotent(backend: Backend, make_log: MakeLog) -> None:
    log = make_log()
    log.enqueue(request("req", 2))
    log.flush()
    (first,) = log.record_feedback([FeedbackItem("req", 1)])
    assert first.created == 2
    assert [(r.arm, r.model_version, r.row_index, r.predicted_class) for r in first.rows] == [
        ("champion", "1", 0, "0"),
        ("champion", "1", 1, "1"),
    ]
    assert [r.score for r in first.rows] == [0.25, 0.75]
    assert all(r.outcome == 1 and r.outcome_value == 1.0 and r.created for r in first.rows)
    stored = backend.query("SELECT row_index, outcome, outcome_value FROM outcomes ORDER BY 1")
    assert stored == [(0, "1", 1.0), (1, "1", 1.0)]

    (again,) = log.record_feedback([FeedbackItem("req", 1)])
    assert again.created == 0
    assert len(again.rows) == 2 and not any(r.created for r in again.rows)
    assert backend.count("outcomes") == 2


def test_conflicting_feedback_is_409_and_keeps_the_first(
    backend: Backend, make_log: MakeLog
) -> None:
    log = make_log()
    log.enqueue(request("req", 1))
    log.record_feedback([FeedbackItem("req", 0)])
    with pytest.raises(Conflict, match="'req'") as info:
        log.record_feedback([FeedbackItem("req", 1)])
    assert info.value.status_code == 409
    assert backend.query("SELECT outcome FROM outcomes") == [("0",)]


def test_unknown_request_id_is_404_naming_it(make_log: MakeLog) -> None:
    log = make_log()
    with pytest.raises(NotFound) as info:
        log.record_feedback([FeedbackItem("nope", 1)])
    assert info.value.status_code == 404
    assert info.value.message == "unknown request_id 'nope'"


def test_feedback_for_a_record_still_queued(backend: Backend, make_log: MakeLog) -> None:
    log = make_log(batch_size=10_000, flush_interval_s=NEVER)
    log.enqueue(request("queued", 3))
    assert backend.count("predictions") == 0  # still in memory
    (result,) = log.record_feedback([FeedbackItem("queued", 0)])
    assert result.created == 3


def test_per_row_outcomes_and_length_mismatch(backend: Backend, make_log: MakeLog) -> None:
    log = make_log()
    log.enqueue(request("rows", 3))
    with pytest.raises(InvalidInput, match=r"2 values, expected 3") as info:
        log.record_feedback([FeedbackItem("rows", [1, 0])])
    assert info.value.status_code == 400
    (result,) = log.record_feedback([FeedbackItem("rows", [0, 1, True])])
    assert [(r.row_index, r.outcome, r.outcome_value) for r in result.rows] == [
        (0, 0, 0.0),
        (1, 1, 1.0),
        (2, True, 1.0),  # bool -> 0/1 numeric form
    ]
    stored = backend.query("SELECT outcome FROM outcomes ORDER BY row_index")
    assert stored == [("0",), ("1",), ("true",)]


def test_feedback_joins_every_arm_of_a_request(backend: Backend, make_log: MakeLog) -> None:
    log = make_log()
    log.enqueue(request("shadowed", 2, "champion"))
    log.enqueue(request("shadowed", 2, "shadow"))
    (result,) = log.record_feedback([FeedbackItem("shadowed", "churned")])
    assert result.created == 2  # one outcome per row, joined by every arm's row of it
    assert sorted((r.arm, r.row_index) for r in result.rows) == [
        ("champion", 0),
        ("champion", 1),
        ("shadow", 0),
        ("shadow", 1),
    ]
    assert all(r.outcome == "churned" and r.outcome_value is None for r in result.rows)
    assert backend.query("SELECT DISTINCT outcome FROM outcomes") == [('"churned"',)]
    assert backend.count("outcomes") == 2


@pytest.mark.parametrize(
    ("bad", "conflict"),
    [(FeedbackItem("missing", 1), NotFound), (FeedbackItem("seen", 0), Conflict)],
)
def test_feedback_batch_is_all_or_nothing(
    backend: Backend, make_log: MakeLog, bad: FeedbackItem, conflict: type[Exception]
) -> None:
    log = make_log()
    for rid in ("a", "b", "seen"):
        log.enqueue(request(rid, 2))
    log.record_feedback([FeedbackItem("seen", 1)])
    with pytest.raises(conflict):
        log.record_feedback([FeedbackItem("a", 1), bad, FeedbackItem("b", 0)])
    assert backend.count("outcomes") == 2  # only "seen" from before
    results = log.record_feedback([FeedbackItem("a", 1), FeedbackItem("b", 0)])
    assert [r.created for r in results] == [2, 2]


def test_same_request_twice_in_one_batch(make_log: MakeLog) -> None:
    log = make_log()
    log.enqueue(request("twice", 1))
    first, second = log.record_feedback([FeedbackItem("twice", 1), FeedbackItem("twice", 1.0)])
    assert (first.created, second.created) == (1, 0)
    log.enqueue(request("clash", 1))
    with pytest.raises(Conflict):
        log.record_feedback([FeedbackItem("clash", 1), FeedbackItem("clash", 0)])


@pytest.mark.parametrize("outcome", [None, float("nan"), object(), {"a": float("inf")}])
def test_invalid_outcomes_are_rejected_before_any_io(make_log: MakeLog, outcome: Any) -> None:
    log = make_log()
    log.enqueue(request("r", 1))
    with pytest.raises(InvalidInput, match="'r'"):
        log.record_feedback([FeedbackItem("r", outcome)])


def test_concurrent_feedback_has_one_winner(backend: Backend, make_log: MakeLog) -> None:
    """Racing calls for the same request: one stores it; the rest are idempotent or 409."""
    log = make_log()
    rounds, racers = 10, 4
    for i in range(rounds):
        log.enqueue(request(f"race{i}", 3))
    log.flush()
    outcomes_seen: list[tuple[int, str]] = []
    guard = threading.Lock()

    def race(i: int, value: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            (result,) = log.record_feedback([FeedbackItem(f"race{i}", value)])
            label = f"created={result.created}"
        except Conflict:
            label = "conflict"
        with guard:
            outcomes_seen.append((i, label))

    for i in range(rounds):
        barrier = threading.Barrier(racers)
        # Even rounds: everyone sends the same value; odd rounds: all different.
        values = [1] * racers if i % 2 == 0 else list(range(racers))
        threads = [threading.Thread(target=race, args=(i, v, barrier)) for v in values]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(rounds):
        labels = sorted(label for j, label in outcomes_seen if j == i)
        loser = "created=0" if i % 2 == 0 else "conflict"
        assert labels == sorted(["created=3"] + [loser] * (racers - 1)), (i, labels)
    assert backend.count("outcomes") == rounds * 3


def test_outcome_rows_are_keyed_like_the_schema(backend: Backend, make_log: MakeLog) -> None:
    log = make_log()
    log.enqueue(request("k", 2))
    log.record_feedback([FeedbackItem("k", [0.5, 2])])
    engine = sa.create_engine(backend.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    outcomes.c.request_id, outcomes.c.row_index, outcomes.c.outcome_value
                ).order_by(outcomes.c.row_index)
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [("k", 0, 0.5), ("k", 1, 2.0)]


def test_a_log_created_before_a_new_nullable_column_gains_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE predictions (request_id VARCHAR(128), row_index INTEGER, arm VARCHAR(16),"
            " experiment_id VARCHAR(256) NOT NULL, model_name VARCHAR(256) NOT NULL,"
            " model_version VARCHAR(32) NOT NULL, ts FLOAT NOT NULL, latency_s FLOAT NOT NULL,"
            " status VARCHAR(16) NOT NULL, routing_key_hash VARCHAR(64), score FLOAT,"
            " predicted_class VARCHAR(256), output TEXT,"
            " PRIMARY KEY (request_id, row_index, arm))"
        )
    log = PredictionLog(url)
    log.start()
    log.close()
    columns = {c["name"] for c in sa.inspect(engine).get_columns("predictions")}
    assert "reason" in columns
    engine.dispose()
