"""The evaluator on a big prediction log: wall time and peak RSS of one evaluation.

    python -m bench.evaluator --rows 1000000 [--url sqlite:////tmp/p.db | postgresql+psycopg://…]
        [--schema bench_eval]   # PostgreSQL: a throwaway schema of its own, created if missing

Fills the log in SQL (a recursive CTE on SQLite, ``generate_series`` on PostgreSQL: no Python per
row), with sticky users (routing keys, so the per-user path is measured), 90/10, 3% outcomes
missing, 0.5% challenger fallbacks, then runs the judging path the CLI runs
(:func:`experiments.evaluate.evaluate`, aliases given so no registry is needed) in a fresh child
process and reports its wall time, CPU time and peak resident memory (``ru_maxrss``), next to the
peak after imports alone (MLflow, SQLAlchemy, numpy: what any evaluator process holds), and a
markdown row for ``bench/evaluator.md`` with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import sqlalchemy as sa

from router import logschema

T0 = 1_700_000_000.0
EID = logschema.experiment_id("bench-model", "1", "2")

_SQLITE = """
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < :n - 1)
INSERT INTO {table} SELECT {columns} FROM (
  SELECT i, ABS(RANDOM()) % 1000000 AS r1, ABS(RANDOM()) % 1000000 AS r2,
         ABS(RANDOM()) % 1000000 AS r3 FROM seq) s
"""
_POSTGRES = """
INSERT INTO {table} SELECT {columns} FROM (
  SELECT i, FLOOR(RANDOM() * 1000000)::bigint AS r1, FLOOR(RANDOM() * 1000000)::bigint AS r2,
         FLOOR(RANDOM() * 1000000)::bigint AS r3
  FROM generate_series(CAST(0 AS BIGINT), :n - 1) AS i) s
"""


def fill(url: str, rows: int, users: int) -> float:
    """Write ``rows`` predictions and their outcomes; returns the seconds it took."""
    start = time.monotonic()
    engine = sa.create_engine(url)
    logschema.metadata.drop_all(engine)
    logschema.metadata.create_all(engine)
    pg = engine.dialect.name == "postgresql"
    text = "CAST(i AS TEXT)" if not pg else "i::text"
    user = f"(i * 7919) % {users}"
    arm = f"CASE WHEN ({user} * 2654435761) % 10 = 0 THEN 'challenger' ELSE 'champion' END"
    fallback = f"({arm}) = 'challenger' AND r3 < 5000"
    predictions = (
        f"'r' || {text}, 0, {arm}, '{EID}', 'bench-model', "
        f"CASE WHEN {fallback} THEN '1' WHEN ({arm}) = 'challenger' THEN '2' ELSE '1' END, "
        f"{T0} + i * 0.01, 0.002 + r1 / 1e8, "
        f"CASE WHEN {fallback} THEN 'fallback' ELSE 'ok' END, "
        f"CASE WHEN {fallback} THEN 'timeout' END, "
        f"'u' || CAST({user} AS TEXT), r2 / 1e6, "
        "CASE WHEN r2 >= 500000 THEN '1' ELSE '0' END, NULL"
    )
    # Outcome 1 for ~70% of the champion's answers being right: truth = class when r1 < 700000.
    outcomes = (
        f"'r' || {text}, 0, "
        "CASE WHEN (r1 < 700000) = (r2 >= 500000) THEN '1' ELSE '0' END, "
        "CASE WHEN (r1 < 700000) = (r2 >= 500000) THEN 1.0 ELSE 0.0 END, "
        f"{T0} + i * 0.01 + 30"
    )
    template = _POSTGRES if pg else _SQLITE
    with engine.begin() as conn:
        conn.execute(
            sa.text(template.format(table="predictions", columns=predictions)), {"n": rows}
        )
        # 3% of outcomes never arrive (r3 decides, drawn afresh: independent of the prediction).
        conn.execute(
            sa.text(
                template.format(table="outcomes", columns=outcomes).replace(
                    ") s", ") s WHERE r3 >= 30000"
                )
            ),
            {"n": rows},
        )
        if pg:
            conn.execute(sa.text("ANALYZE predictions; ANALYZE outcomes"))
    engine.dispose()
    return time.monotonic() - start


def measure(url: str) -> dict[str, float | str]:
    """Evaluate in a fresh process; its wall time and peak RSS."""
    code = (
        "import json, time\n"
        "from experiments.evaluate import evaluate\n"
        "from experiments.judge import AliasSnapshot\n"
        "from router.config import settings_from_mapping\n"
        f"s = settings_from_mapping({{'model': {{'name': 'bench-model'}}, "
        f"'prediction_log': {{'url': {url!r}}}}}, env={{}})\n"
        "import resource\n"
        "imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "t = time.monotonic()\n"
        f"ev = evaluate(s, aliases=AliasSnapshot('1', '2', None), now={T0} + 1e8)\n"
        "print(json.dumps({'seconds': time.monotonic() - t, 'decision': ev.decision, "
        "'n': ev.champion.n + ev.challenger.n, 'units': ev.unit, 'import_rss_mib': imported}))\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, float | str] = json.loads(out.strip().splitlines()[-1])
    # ru_maxrss of children is the largest of any child: this one is the only one.
    result["peak_rss_mib"] = after.ru_maxrss / 1024
    # CPU of the evaluator process (SQLite works inside it; PostgreSQL's work is the server's).
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.evaluator", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--url", default="sqlite:////tmp/bench-evaluator.db")
    parser.add_argument("--skip-fill", action="store_true", help="reuse the log at --url")
    parser.add_argument(
        "--schema", help="PostgreSQL: fill and read this schema (created if missing), not public"
    )
    args = parser.parse_args(argv)
    if args.schema:
        args.url = in_schema(args.url, args.schema)
    if not args.skip_fill:
        print(f"filled {args.rows:,} rows in {fill(args.url, args.rows, args.users):.0f} s")
    r = measure(args.url)
    safe = sa.make_url(args.url).render_as_string(hide_password=True)
    load = os.getloadavg()
    print(
        f"{safe}: {args.rows:,} rows -> {r['decision']} ({r['n']:,} judged rows, units "
        f"{r['units']}) in {float(r['seconds']):.1f} s wall ({float(r['cpu_s']):.1f} s CPU in the "
        f"evaluator process, whole process), peak RSS {float(r['peak_rss_mib']):.0f} MiB "
        f"({float(r['import_rss_mib']):.0f} MiB after imports); load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    backend = sa.make_url(args.url).get_backend_name()
    print(
        f"| {backend} | {args.rows:,} | {float(r['seconds']):.1f} s | {float(r['cpu_s']):.1f} s | "
        f"{float(r['peak_rss_mib']):.0f} MiB ({float(r['import_rss_mib']):.0f} after imports) | "
        f"{load[0]:.1f} |"
    )


def in_schema(url: str, schema: str) -> str:
    """``url`` with ``search_path`` set to ``schema``, created if missing (PostgreSQL only)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise SystemExit("--schema is for PostgreSQL URLs")
    engine = sa.create_engine(parsed)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    engine.dispose()
    return parsed.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


if __name__ == "__main__":
    main()
