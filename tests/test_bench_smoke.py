"""Smoke test of the benchmark harness: its pieces run for a moment and make a well-formed table.

No speed thresholds, ever: the machines are shared. Only the shape of the output and the
correctness of what was measured (answers are 200s, the counts add up) are checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import load as loadgen
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
    assert [cells[0] for cells in table] == [r.target for r in rows]
    measured = [cells for cells in table if cells[3]]
    assert measured and all(cells[7] == "1.00×" for cells in measured)  # baseline vs itself
    assert all(cells[8] == "n/a" for cells in measured)  # no mlflow serve figure to compare
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
