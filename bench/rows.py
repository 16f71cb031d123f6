"""One measurement row of the benchmark and how rows are looked up (shared by report and goals)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.load import LoadResult

BASELINE = "bare Starlette app"
MLFLOW_SERVE = "mlflow models serve"


@dataclass(frozen=True)
class TargetRow:
    """One target at one concurrency: a measurement, or why there is none."""

    target: str
    connections: int
    result: LoadResult | None
    load_before: float
    note: str = ""
    model: str = ""
    cpu_us: float | None = None  # the server's CPU time (all its processes) per request


def find(rows: Sequence[TargetRow], model: str, target: str, connections: int) -> LoadResult | None:
    for row in rows:
        if (row.model, row.target, row.connections) == (model, target, connections) and row.result:
            return row.result
    return None
