"""The planner's output (``evaluate_and_promote --plan EFFECT``): the table people read, and the
JSON document (``--json``)."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from typing import Any

from experiments.planner import ArmPlan, ExperimentPlan
from experiments.report import finite

__all__ = ["plan_dict", "plan_text"]


def _utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _arm_line(name: str, a: ArmPlan) -> str:
    return (
        f"{name:<11} {a.units:>8} {_num(a.units_per_day, ',.1f'):>10} {a.judged_units:>8} "
        f"{_num(a.variance, '.4g'):>14} {_num(a.adjusted_variance, '.4g'):>14}"
    )


def plan_text(experiment_id: str, p: ExperimentPlan) -> str:
    """The plan as the table printed for people."""
    share = p.challenger_share
    lines = [
        f"Plan for experiment {experiment_id} ({1 - share:.0%}/{share:.0%} split, metric "
        f"{p.metric}; {p.method.replace('_', '-')}, alpha {p.alpha:.4g} for the metric "
        f"(two-sided), power {p.power:.0%})",
        "",
        f"{'arm':<11} {'units':>8} {'units/day':>10} {'judged':>8} {'variance/unit':>14} "
        f"{'adjusted':>14}",
        _arm_line("champion", p.champion),
        _arm_line("challenger", p.challenger),
        f"covariate adjustment: {'on' if p.adjusted else 'off'}"
        + ("" if p.adjusted else f" ({p.adjustment})"),
        "",
    ]
    if p.units_needed is None:
        lines.append(f"no plan: {p.reason}")
        return "\n".join(lines)
    n = p.units_needed
    lines.append(
        f"N* to promote a true improvement of {p.effect:+g} (beyond min_effect {p.margin:g}): "
        f"{math.ceil(n):,} units (champion {math.ceil(n * (1 - share)):,}, challenger "
        f"{math.ceil(n * share):,}), {p.looks} look(s) at {p.looks_per_day:.2g} a day; "
        f"{p.inflation:.3f} x the units of one fixed-horizon test"
        + (" (raised so that the smaller arm reaches min_samples_per_arm)" if p.raised else "")
    )
    lines.append(f"configured experiment.planned_samples: {p.configured:,}")
    if p.expected_at is not None and p.days_from_start is not None:
        lines.append(
            f"expected: N* units judged around {_utc(p.expected_at)} "
            f"({p.days_from_start:.1f} days after the first prediction, the outcome window "
            "included), if new units keep arriving at the rate so far"
        )
    elif p.reason:
        lines.append(f"expected: unknown ({p.reason})")
    return "\n".join(lines)


def plan_dict(experiment_id: str, p: ExperimentPlan) -> dict[str, Any]:
    """The plan as one JSON document (non-finite numbers as null)."""
    out = {"experiment_id": experiment_id, **dataclasses.asdict(p)}
    out["expected_date"] = _utc(p.expected_at)
    document: dict[str, Any] = finite(out)
    return document
