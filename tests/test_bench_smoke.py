"""Smoke test of the benchmark harness: its pieces run for a moment and make a well-formed table.

No speed thresholds, ever: the machines are shared. Only the shape of the output and the
correctness of what was measured (answers are 200s, the counts add up) are checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bench import load as loadgen
from bench.cpu import group_cpu_s
from bench.goals import check_goals
from bench.micro import measure_micro
from bench.registry import BenchRegistry, split_body
from bench.report import (
    BASELINE,
    MICRO_COLUMNS,
    THROUGHPUT_COLUMNS,
    Report,
    TargetRow,
    render,
)
from bench.servers import free_port, running
from bench.stages import OTHER, stage_of
from bench.targets import baseline_target, check_answer
from tests.conftest import MlflowRegistry

_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _table_rows(text: str, header: tuple[str, ...]) -> list[list[str]]:
    """The body rows of the markdown table whose header is ``header``; each the header's width."""
    lines = text.splitlines()
    start = lines.index("| " + " | ".join(header) + " |")
    assert set(lines[start + 1]) <= {"|", "-"}
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in _CELL_SPLIT.split(line)[1:-1]]
        assert len(cells) == len(header), line
        rows.append(cells)
    return rows


def _generators() -> list[str]:
    return ["python", "wrk"] if loadgen.wrk_path() else ["python"]


def test_harness_pieces_make_a_well_formed_report(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    registry = BenchRegistry(root=mlflow_registry.root, model_name=mlflow_registry.model_name)
    body = split_body(1)
    port = free_port()
    target = baseline_target(BASELINE, registry, port)
    rows: list[TargetRow] = []
    with running(
        target.name,
        target.cmd,
        port=port,
        ready_path=target.ready_path,
        log_path=tmp_path / "baseline.log",
        env=target.env,
        cwd=target.cwd,
    ) as server:
        check_answer(server.base_url, body)
        for connections, generator in zip((1, 2), _generators(), strict=False):
            spec = loadgen.LoadSpec(port=port, body=body, connections=connections, duration_s=1.0)
            result = loadgen.measure(spec, generator, warmup_s=0.0)
            assert result.generator == generator
            assert result.requests > 0
            assert result.errors == 0
            assert 0 < result.p50_ms <= result.p99_ms
            rows.append(TargetRow(BASELINE, connections, result, 0.0))
    rows.append(TargetRow("mlflow models serve", 1, None, 0.0, "could not run: a | reason"))

    micro = measure_micro(registry, target_s=0.001, repeats=1)
    report = Report(command="python -m bench.run --quick", date="today", facts={"nproc": "2"})
    report.rows, report.micro = rows, micro
    text = render(report)

    table = _table_rows(text, THROUGHPUT_COLUMNS)
    column = {name: i for i, name in enumerate(THROUGHPUT_COLUMNS)}
    assert [cells[column["target"]] for cells in table] == [r.target for r in rows]
    measured = [cells for cells in table if cells[column["requests/s"]]]
    # The baseline against itself; no mlflow serve figure to compare with.
    assert measured and all(cells[column["vs bare app"]] == "1.00×" for cells in measured)
    assert all(cells[column["vs mlflow serve"]] == "n/a" for cells in measured)
    assert "could not run" in table[-1][-1]
    micro_rows = _table_rows(text, MICRO_COLUMNS)
    assert len(micro_rows) == len(micro)
    assert any("parse_invocation" in cells[0] for cells in micro_rows)
    assert all(float(cells[1].replace(",", "")) > 0 for cells in micro_rows)
    assert "python -m bench.run --quick" in text


def test_unknown_generator_is_refused() -> None:
    spec = loadgen.LoadSpec(port=1, body="{}", connections=1, duration_s=0.1)
    with pytest.raises(ValueError, match="unknown load generator"):
        loadgen.run_load(spec, "ab")


def _result(rps: float, p50_ms: float = 1.0, p99_ms: float = 2.0) -> loadgen.LoadResult:
    return loadgen.LoadResult("wrk", 1, int(rps * 10), 10.0, 0, p50_ms, p99_ms)


def test_goals_are_met_missed_or_not_measured_per_model() -> None:
    rows = [
        TargetRow(BASELINE, 1, _result(100), 0.0, model="m"),
        TargetRow("router", 1, _result(95), 0.0, model="m"),
        TargetRow(BASELINE, 32, _result(100, p99_ms=50.0), 0.0, model="m"),
        TargetRow("router", 32, _result(250, p99_ms=40.0), 0.0, model="m"),
        TargetRow("router, 2 workers", 32, _result(450), 0.0, model="m"),
        TargetRow("router, champion only", 1, _result(85), 0.0, model="m"),
    ]
    verdicts = {g.text: (g.measured, g.verdict) for g in check_goals(rows)}
    overhead = "1 connection: router with the champion only ≥ 0.9× bare app (the router's overhead)"
    assert verdicts[overhead] == ("0.85×", "**missed**")
    assert verdicts["1 connection: router ≥ 0.9× bare app"] == ("0.95×", "met")
    assert verdicts["32 connections: router ≥ 3× bare app"] == ("2.50×", "**missed**")
    assert verdicts["32 connections: router ≥ 10× mlflow models serve"] == ("", "not measured")
    assert verdicts["32 connections: router p99 ≤ bare app p99 (ratio of p99s)"][1] == "met"
    assert verdicts["32 connections: 2 workers ≥ 1.7× one worker"] == ("1.80×", "met")


def test_stage_of_takes_the_deepest_named_frame_and_skips_idle_threads() -> None:
    parse = ["x/uvicorn/main.py:run", "router/service.py:invoke", "router/input/payload.py:conform"]
    assert stage_of([*parse, "pandas/core/frame.py:__init__"]) == (
        "parse + input checks (payload, casting, columns)"
    )
    built = [
        "router/scoring/batcher.py:_timed",
        "router/input/rows.py:frame",
        "pandas/core/frame.py:__init__",
    ]
    assert stage_of(built) == "model input, built once per call (rows.py)"
    assert stage_of([*parse, "/sklearn/pipeline.py:predict"]) == "model (sklearn, numpy)"
    assert stage_of(["threading.py:run", "/usr/lib/python3.11/threading.py:wait"]) is None
    assert stage_of(["asyncio/base_events.py:run_forever"]) == OTHER
    assert stage_of(["uvicorn/main.py:run", "/usr/lib/python3.11/asyncio/runners.py:run"]) is None


def test_group_cpu_counts_this_process() -> None:
    own = os.times()
    assert group_cpu_s(os.getpgid(0)) >= own.user + own.system - 0.05  # clock-tick rounding
