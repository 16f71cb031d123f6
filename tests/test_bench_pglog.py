"""Issue 21's end-to-end targets in the benchmark's goal table: the router with its log in
PostgreSQL against the same router with SQLite, per model, from one run's rows (never a speed)."""

from __future__ import annotations

from bench import load as loadgen
from bench.goals import check_goals
from bench.ingest import Ingest, Serving, render
from bench.report import TargetRow
from bench.targets import ROUTER, ROUTER_POSTGRES


def _result(rps: float, p99_ms: float) -> loadgen.LoadResult:
    return loadgen.LoadResult("wrk", 1, int(rps * 10), 10.0, 0, 1.0, p99_ms)


def test_postgres_log_goals_compare_with_the_sqlite_router() -> None:
    rows = [
        TargetRow(ROUTER, 1, _result(1000, 3.0), 0.0, model="m"),
        TargetRow(ROUTER_POSTGRES, 1, _result(960, 4.4), 0.0, model="m"),
        TargetRow(ROUTER, 32, _result(2000, 20.0), 0.0, model="m"),
        TargetRow(ROUTER_POSTGRES, 32, _result(1800, 40.0), 0.0, model="m"),
    ]
    verdicts = {g.text: (g.measured, g.verdict) for g in check_goals(rows)}
    assert verdicts["1 connection: router with PostgreSQL log ≥ 0.95× with SQLite log"] == (
        "0.96×",
        "met",
    )
    assert verdicts["1 connection: PostgreSQL log p99 ≤ 1.5× SQLite log p99"] == ("1.47×", "met")
    assert verdicts["32 connections: router with PostgreSQL log ≥ 0.95× with SQLite log"] == (
        "0.90×",
        "**missed**",
    )
    assert verdicts["32 connections: PostgreSQL log p99 ≤ 1.5× SQLite log p99"] == (
        "2.00×",
        "**missed**",
    )


def test_ingest_report_gives_verdicts_only_for_postgres() -> None:
    serving = [Serving("writer not started", 100, 1.0, 250.0, 300.0)]
    sqlite_only = render([Ingest("SQLite (WAL)", 1000, 0.01, 0.005)], serving, 0.2)
    assert "| PostgreSQL ingest ≥ 50,000 rows/s, ≤ 5 µs writer CPU/row | | not measured |" in (
        sqlite_only
    )
    both = render(
        [Ingest("SQLite (WAL)", 1000, 0.01, 0.005), Ingest("PostgreSQL (COPY)", 1000, 0.04, 0.006)],
        serving,
        0.2,
    )
    assert "| PostgreSQL ingest ≥ 50,000 rows/s | 25,000 | **missed** |" in both
    assert "| PostgreSQL writer CPU ≤ 5 µs/row | 6.0 | **missed** |" in both
