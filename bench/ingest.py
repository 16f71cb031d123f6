"""``python -m bench.ingest [--rows N] [--postgres URL]``: the prediction log's writer, alone.

Three measurements per backend (SQLite in a temporary file; PostgreSQL when ``--postgres`` or
``$ROUTER_TEST_POSTGRES_URL`` answers, in a schema of its own, dropped afterwards):

1. **ingest**: ``--rows`` one-row records are queued through ``PredictionLog.enqueue`` before the
   writer starts, then ``start()`` + ``flush()`` is timed: rows per second, and the writer
   thread's CPU per row (read from ``/proc/self/task``).
2. **serving path**: a loop standing in for the event loop does ``--work-us`` of pure-Python work
   and enqueues one record per turn for ``--seconds``, while the writer writes (and once with the
   writer not started: nothing written, the loop alone), in ``--rounds`` interleaved rounds, the
   best run of each kept. Turns per second and the p99 turn show what the writer takes from the
   serving thread under the GIL (and, on 2 cores, the database's own CPU beside it).
3. **a writer process instead** (once): what the serving process would pay per row just to hand
   rows to another process (pickle + pipe), the floor of that design.

Ratios within one run are the figures to read; the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.pglog import ENV_VAR, default_url, postgres_reason, postgres_schema
from router.log.predlog import PredictionLog, PredictionRecord

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
WRITER_THREAD = "prediction-log-writer"  # PredictionLog's thread name
TARGET_ROWS_PER_S = 50_000  # issue 21, PostgreSQL
TARGET_CPU_US_PER_ROW = 5.0


@dataclass(frozen=True)
class Ingest:
    backend: str
    rows: int
    seconds: float
    writer_cpu_s: float
    server_cpu_s: float | None = None  # PostgreSQL: the writer's backend process

    @property
    def server_us_per_row(self) -> float | None:
        return None if self.server_cpu_s is None else self.server_cpu_s * 1e6 / self.rows

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def cpu_us_per_row(self) -> float:
        return self.writer_cpu_s * 1e6 / self.rows


@dataclass(frozen=True)
class Serving:
    backend: str  # "writer not started" for the loop alone
    turns: int
    seconds: float
    p50_us: float
    p99_us: float

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.seconds


def record(i: int) -> PredictionRecord:
    """A typical one-row record of a binary classifier with a routing key."""
    return PredictionRecord(
        request_id=f"{i:08x}-7a6d-4a47-9d0c-2f3c1f4e5a6b",
        row_index=0,
        arm="champion" if i % 10 else "challenger",
        experiment_id="bench:v1-vs-v2",
        model_name="bench",
        model_version="1" if i % 10 else "2",
        ts=1_700_000_000.0 + i * 1e-3,
        latency_s=0.0004,
        status="ok",
        routing_key_hash=f"{i % 5000:032x}",
        score=0.25,
        predicted_class="0",
        output="[0.75, 0.25]",
    )


def thread_cpu_s(native_id: int, process: str = "self") -> float:
    """User + system CPU seconds of one thread of this process (or of process ``process``)."""
    stat = Path(f"/proc/{process}/task/{native_id}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _backend_pid(log: PredictionLog) -> int | None:
    """PostgreSQL: the server process behind the log's pooled connection, which the writer then
    checks out (the pool hands back its last connection); None elsewhere or on another host."""
    if log.engine.dialect.name != "postgresql" or log.engine.url.host not in ("127.0.0.1", None):
        return None
    with log.engine.connect() as conn:
        pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
    return pid if Path(f"/proc/{pid}").exists() else None


def _writer_id() -> int:
    for thread in threading.enumerate():
        if thread.name == WRITER_THREAD and thread.native_id is not None:
            return thread.native_id
    raise RuntimeError(f"no {WRITER_THREAD!r} thread running")


def _ready(url: str) -> None:
    """Create the tables first, so that the timed part is the writing."""
    log = PredictionLog(url)
    log.start()
    if not log.wait_prepared(60):
        raise RuntimeError(f"prediction log {url}: {log.error}")
    log.close()


def measure_ingest(backend: str, url: str, rows: int, batch_size: int) -> Ingest:
    _ready(url)
    log = PredictionLog(url, batch_size=batch_size, max_pending=rows, flush_interval_s=3600)
    for i in range(rows):  # one request of one row per call, as the router enqueues
        log.enqueue([record(i)])
    pid = _backend_pid(log)
    server_before = None if pid is None else thread_cpu_s(pid, str(pid))
    start = time.perf_counter()
    log.start()
    log.flush()
    seconds = time.perf_counter() - start
    cpu = thread_cpu_s(_writer_id())
    server = None
    if pid is not None and server_before is not None:
        with log.engine.connect() as conn:  # still the writer's connection?
            same = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() == pid
        server = thread_cpu_s(pid, str(pid)) - server_before if same else None
    log.close()
    if log.dropped or log.duplicates:
        raise RuntimeError(f"{backend}: {log.dropped} dropped, {log.duplicates} duplicates")
    return Ingest(backend, rows, seconds, cpu, server)


def _work(units: int) -> int:
    total = 0
    for i in range(units):
        total += i * i % 7
    return total


def _calibrate(work_us: float) -> int:
    """Loop iterations of ``_work`` that take ``work_us`` on this machine (best of five)."""
    best = min(_timed_work(10_000) for _ in range(5))
    return max(1, round(10_000 * work_us / (best * 1e6)))


def _timed_work(units: int) -> float:
    start = time.perf_counter()
    _work(units)
    return time.perf_counter() - start


def measure_serving(
    backend: str, url: str, seconds: float, units: int, offset: int, *, writer: bool
) -> Serving:
    _ready(url)
    log = PredictionLog(url, max_pending=10_000_000)
    if writer:
        log.start()
    turns: list[float] = []
    i = offset
    end = time.perf_counter() + seconds
    now = time.perf_counter()
    begin = now
    while now < end:
        _work(units)
        log.enqueue([record(i)])
        i += 1
        after = time.perf_counter()
        turns.append(after - now)
        now = after
    elapsed = now - begin
    if writer:
        log.flush()
    log.close(timeout=0.1 if not writer else 30.0)
    turns.sort()
    return Serving(
        backend if writer else "writer not started",
        len(turns),
        elapsed,
        statistics.median(turns) * 1e6,
        turns[int(0.99 * (len(turns) - 1))] * 1e6,
    )


def _drain(conn: multiprocessing.connection.Connection) -> None:
    while conn.recv_bytes():
        pass


def handoff_us_per_row(rows: int, batch_size: int) -> float:
    """The serving process's CPU per row to pickle batches of row tuples into a pipe to a child."""
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_drain, args=(child,))
    proc.start()
    batch = [dataclasses.astuple(r) for r in map(record, range(batch_size))]
    sent = 0
    start = time.process_time()
    while sent < rows:
        parent.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
        sent += batch_size
    cpu = time.process_time() - start
    parent.send_bytes(b"")
    proc.join(30)
    return cpu * 1e6 / sent


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def render(ingests: Sequence[Ingest], serving: Sequence[Serving], handoff_us: float) -> str:
    out = [
        "| log | rows | rows/s | writer CPU µs/row | database server CPU µs/row |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r.backend} | {r.rows:,} | {r.rows_per_s:,.0f} | {r.cpu_us_per_row:.1f} | "
            + ("(in the writer)" if r.server_us_per_row is None else f"{r.server_us_per_row:.1f}")
            + " |"
            for r in ingests
        ),
        "",
        "| serving loop with | turns/s | vs writer not started | p50 µs | p99 µs |",
        "|---|---:|---:|---:|---:|",
    ]
    alone = next((s for s in serving if s.backend == "writer not started"), None)
    for s in serving:
        ratio = f"{s.turns_per_s / alone.turns_per_s:.2f}×" if alone else "n/a"
        out.append(
            f"| {s.backend} | {s.turns_per_s:,.0f} | {ratio} | {s.p50_us:.0f} | {s.p99_us:.0f} |"
        )
    out += [
        "",
        f"Handing rows to a writer process instead (pickle + pipe, batches of 500): "
        f"{handoff_us:.1f} µs of the serving process's CPU per row, before any writing.",
        "",
        "| target (issue 21) | measured | verdict |",
        "|---|---|---|",
    ]
    pg = next((r for r in ingests if r.backend.startswith("PostgreSQL")), None)
    if pg is None:
        out.append("| PostgreSQL ingest ≥ 50,000 rows/s, ≤ 5 µs writer CPU/row | | not measured |")
    else:
        out.append(
            f"| PostgreSQL ingest ≥ {TARGET_ROWS_PER_S:,} rows/s | {pg.rows_per_s:,.0f} | "
            f"{_verdict(pg.rows_per_s >= TARGET_ROWS_PER_S)} |"
        )
        out.append(
            f"| PostgreSQL writer CPU ≤ {TARGET_CPU_US_PER_ROW:.0f} µs/row | "
            f"{pg.cpu_us_per_row:.1f} | {_verdict(pg.cpu_us_per_row <= TARGET_CPU_US_PER_ROW)} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=500, help="the writer's (default 500)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per serving-loop run")
    parser.add_argument("--rounds", type=int, default=3, help="serving-loop rounds (best kept)")
    parser.add_argument("--work-us", type=float, default=250.0, help="CPU per serving-loop turn")
    parser.add_argument("--postgres", default=default_url(), help=f"default ${ENV_VAR}")
    args = parser.parse_args(argv)
    reason = postgres_reason(args.postgres)
    units = _calibrate(args.work_us)
    ingests: list[Ingest] = []
    serving: list[Serving] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-ingest-") as work,
        contextlib.ExitStack() as stack,
    ):
        backends = [("SQLite (WAL)", f"sqlite:///{Path(work) / 'log.db'}")]
        if reason is None:
            backends.append(
                ("PostgreSQL (COPY)", stack.enter_context(postgres_schema(args.postgres)))
            )
        else:
            print(f"PostgreSQL left out: {reason}", file=sys.stderr)
        offset = args.rows
        for name, url in backends:
            print(f"ingest: {name} ...", file=sys.stderr, flush=True)
            ingests.append(measure_ingest(name, url, args.rows, args.batch_size))
        # Interleaved rounds, the best of each kept: noise on a shared machine only slows a run.
        best: dict[str, Serving] = {}
        for _ in range(args.rounds):
            print("serving loop round ...", file=sys.stderr, flush=True)
            runs = [measure_serving("", backends[0][1], args.seconds, units, 0, writer=False)]
            for name, url in backends:
                runs.append(measure_serving(name, url, args.seconds, units, offset, writer=True))
                offset += 10_000_000
            for run in runs:
                if run.backend not in best or run.turns_per_s > best[run.backend].turns_per_s:
                    best[run.backend] = run
        serving = list(best.values())
    print(render(ingests, serving, handoff_us_per_row(args.rows, args.batch_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
