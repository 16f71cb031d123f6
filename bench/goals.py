"""The speed targets of issues 10, 12 and 21, checked against one run's rows (ratios, not asserts).

Each target compares two measurements of the same model from the same run; a target whose
measurements are missing says so instead of a verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.load import LoadResult
from bench.rows import BASELINE, MLFLOW_SERVE, TargetRow, find
from bench.targets import ROUTER, ROUTER_CHAMPION_ONLY, ROUTER_POSTGRES, ROUTER_TWO_WORKERS


@dataclass(frozen=True)
class Goal:
    model: str
    text: str
    measured: str
    met: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


@dataclass(frozen=True)
class _Rule:
    text: str
    target: tuple[str, int]  # (target, connections) measured
    reference: tuple[str, int]  # (target, connections) compared against
    check: Callable[[LoadResult, LoadResult], tuple[float, bool]]  # (ratio, met)


def _throughput(at_least: float) -> Callable[[LoadResult, LoadResult], tuple[float, bool]]:
    def check(mine: LoadResult, ref: LoadResult) -> tuple[float, bool]:
        ratio = mine.rps / ref.rps
        return ratio, ratio >= at_least

    return check


def _p99_no_worse(mine: LoadResult, ref: LoadResult) -> tuple[float, bool]:
    return mine.p99_ms / ref.p99_ms, mine.p99_ms <= ref.p99_ms


def _p99_within(factor: float) -> Callable[[LoadResult, LoadResult], tuple[float, bool]]:
    def check(mine: LoadResult, ref: LoadResult) -> tuple[float, bool]:
        ratio = mine.p99_ms / ref.p99_ms
        return ratio, ratio <= factor

    return check


def _p50_within_10pct(mine: LoadResult, ref: LoadResult) -> tuple[float, bool]:
    return mine.p50_ms / ref.p50_ms, mine.p50_ms <= 1.1 * ref.p50_ms


RULES: tuple[_Rule, ...] = (
    _Rule("1 connection: router ≥ 0.9× bare app", (ROUTER, 1), (BASELINE, 1), _throughput(0.9)),
    # The bare app serves the champion only; the router sends 10% to the challenger, whose model
    # may cost more (the demo's gradient boosting: 4x the champion). Same model, same work: this
    # is the router's own overhead.
    _Rule(
        "1 connection: router with the champion only ≥ 0.9× bare app (the router's overhead)",
        (ROUTER_CHAMPION_ONLY, 1),
        (BASELINE, 1),
        _throughput(0.9),
    ),
    _Rule("32 connections: router ≥ 3× bare app", (ROUTER, 32), (BASELINE, 32), _throughput(3.0)),
    _Rule(
        "32 connections: router ≥ 10× mlflow models serve",
        (ROUTER, 32),
        (MLFLOW_SERVE, 32),
        _throughput(10.0),
    ),
    _Rule(
        "32 connections: router p99 ≤ bare app p99 (ratio of p99s)",
        (ROUTER, 32),
        (BASELINE, 32),
        _p99_no_worse,
    ),
    _Rule(
        "32 connections: 2 workers ≥ 1.7× one worker",
        (ROUTER_TWO_WORKERS, 32),
        (ROUTER, 32),
        _throughput(1.7),
    ),
    _Rule(
        "1 connection: 2 workers' p50 within 10% of one worker's (ratio of p50s)",
        (ROUTER_TWO_WORKERS, 1),
        (ROUTER, 1),
        _p50_within_10pct,
    ),
    # Issue 21: the production configuration (one PostgreSQL log for every replica) against the
    # embedded default, the same router otherwise.
    *(
        rule
        for n in (1, 32)
        for rule in (
            _Rule(
                f"{n} connection{'s' if n > 1 else ''}: router with PostgreSQL log ≥ 0.95× "
                "with SQLite log",
                (ROUTER_POSTGRES, n),
                (ROUTER, n),
                _throughput(0.95),
            ),
            _Rule(
                f"{n} connection{'s' if n > 1 else ''}: PostgreSQL log p99 ≤ 1.5× SQLite log p99",
                (ROUTER_POSTGRES, n),
                (ROUTER, n),
                _p99_within(1.5),
            ),
        )
    ),
)


def check_goals(rows: Sequence[TargetRow]) -> list[Goal]:
    """Every rule for every model that has at least one measured row."""
    goals: list[Goal] = []
    for model in dict.fromkeys(row.model for row in rows if row.result is not None):
        for rule in RULES:
            mine = find(rows, model, *rule.target)
            ref = find(rows, model, *rule.reference)
            if mine is None or ref is None:
                goals.append(Goal(model, rule.text, "", None))
                continue
            value, met = rule.check(mine, ref)
            goals.append(Goal(model, rule.text, f"{value:.2f}×", met))
    return goals
