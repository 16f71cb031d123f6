"""The writer's bulk path (PostgreSQL ``COPY``, SQLite positional executemany) keeps every rule of
the row-at-a-time writer: duplicates ignored and counted, the first record of a key wins (also
within one batch), bad records dropped alone, and a stop under load loses nothing accepted.

Real SQLite in tmp_path and real PostgreSQL 15 (marked), through ``tests/test_predlog.py``'s
fixtures.
"""

from __future__ import annotations

import threading

import pytest

from router.log.predlog import PredictionLog
from tests.pg import isolated_schema_url
from tests.test_predlog import NEVER, Backend, MakeLog, backend, make_log, rec, request

__all__ = ["backend", "make_log"]  # fixtures used by name below


def test_duplicates_within_and_across_batches_first_wins(
    backend: Backend, make_log: MakeLog
) -> None:
    log = make_log(flush_interval_s=NEVER)
    log.enqueue([rec("a", 0, score=0.1), *request("b", 2), rec("a", 0, score=0.9)])
    log.flush()
    assert (log.duplicates, log.dropped) == (1, 0)
    # A batch whose every row is new after one that held a duplicate: the fast path again.
    log.enqueue(request("c", 3))
    log.flush()
    # A key already in the table, a duplicate inside the batch and new rows, in one batch.
    log.enqueue([rec("b", 1, score=0.5), rec("d", 0, score=0.2), rec("d", 0, score=0.3)])
    log.flush()
    assert (log.duplicates, log.dropped) == (3, 0)
    assert backend.count("predictions") == 7
    scores = dict(backend.query("SELECT request_id || ':' || row_index, score FROM predictions"))
    assert scores["a:0"] == 0.1  # the first record queued, not the later one of the same batch
    assert scores["d:0"] == 0.2
    assert scores["b:1"] == 0.75  # from request("b", 2): row 1's score


def test_every_column_round_trips(backend: Backend, make_log: MakeLog) -> None:
    log = make_log(flush_interval_s=NEVER)
    full = rec(
        "full",
        3,
        "challenger",
        routing_key_hash="ab" * 16,
        reason="timeout",
        status="fallback",
        output='{"text": "tab\\there, newline\\n, backslash \\\\ and \\u00e9"}',
        predicted_class="na\\N",  # COPY's text format must not read this as NULL
    )
    empty = rec("empty", 0, score=None, predicted_class=None, output=None, latency_s=0.0)
    log.enqueue([full, empty])
    log.flush()
    columns = (
        "request_id, row_index, arm, experiment_id, model_name, model_version, ts, latency_s,"
        " status, routing_key_hash, reason, score, predicted_class, output"
    )
    rows = {r[0]: r for r in backend.query(f"SELECT {columns} FROM predictions")}
    for expected in (full, empty):
        assert rows[expected.request_id] == (
            expected.request_id,
            expected.row_index,
            expected.arm,
            expected.experiment_id,
            expected.model_name,
            expected.model_version,
            expected.ts,
            expected.latency_s,
            expected.status,
            expected.routing_key_hash,
            expected.reason,
            expected.score,
            expected.predicted_class,
            expected.output,
        )


@pytest.mark.postgres
def test_a_value_too_long_is_dropped_alone_on_postgres() -> None:
    """SQLite does not enforce VARCHAR lengths; PostgreSQL fails the whole COPY on one."""
    with isolated_schema_url() as url:
        log = PredictionLog(url, flush_interval_s=NEVER)
        log.start()
        log.enqueue([*request("good1", 2), rec("long", 0, arm="x" * 17), *request("good2", 2)])
        log.flush()
        log.close()
        assert Backend("postgres", url, None).count("predictions") == 4
    assert (log.dropped, log.duplicates) == (1, 0)


def test_a_stop_under_load_loses_nothing_accepted(backend: Backend, make_log: MakeLog) -> None:
    """Producers keep enqueueing while ``close`` runs: every record is either in the table or
    counted as dropped (refused after the close began), never silently gone."""
    log = make_log(batch_size=200, flush_interval_s=0.005)
    stop = threading.Event()
    sent = [0] * 4

    def produce(t: int) -> None:
        i = 0
        while not stop.is_set():
            n = 1 + i % 3
            log.enqueue(request(f"t{t}-{i}", n))
            sent[t] += n
            i += 1

    producers = [threading.Thread(target=produce, args=(t,)) for t in range(len(sent))]
    for p in producers:
        p.start()
    while backend.count("predictions") < 2_000:  # under load: batches are being written
        threading.Event().wait(0.01)
    log.close(timeout=60)
    stop.set()
    for p in producers:
        p.join()
    stored = backend.count("predictions")
    assert stored >= 2_000
    assert stored + log.dropped == sum(sent)
    assert log.duplicates == 0
    assert log.pending == 0
