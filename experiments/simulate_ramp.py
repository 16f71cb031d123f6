"""A ramp under realistic traffic, by simulation (``make simulate`` runs it after the fixed splits).

Each experiment is a closed loop, as in production: sticky users (heavy-tailed volumes, per-user
accuracy), the challenger weight starting at the ramp's first stage, and at every look the log's
sums built as :mod:`experiments.aggregate` builds them (one period per weight, the metric combined
over periods, :mod:`experiments.strata`), judged by the same :func:`experiments.judge.judge` and
stepped by the same :func:`experiments.ramp.step` the CLI uses. When a look advances the ramp, the
requests after it are assigned under the next weight, by the router's bucket rule: a user moves
from champion to challenger when its bucket falls below the new weight, never back.

Scenarios: an A/A ramp 5% -> 20% -> 50% without drift, and with the outcome rate drifting up by 5
points over the experiment (the Simpson's-paradox trap: the challenger's rows are mostly late,
when outcomes are better); an A/B ramp with a +4-point challenger. Beside each A/A row, the share
of experiments whose *pooled* difference (every row in one bucket per arm, as if the split had
never changed) excludes 0 at the last look: what judging a ramp without periods would risk.

    python -m experiments.simulate_ramp [--experiments N] [--looks K] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from experiments import ramp, strata
from experiments.decision import METRIC_SHARE, arm_estimate, split_difference
from experiments.judge import AliasSnapshot, judge
from experiments.looks import LookHistory, RecordedLook
from experiments.stats import UnitMoments
from experiments.sufficient import ArmData, LatencyHistogram, LogSummary, Period
from router.config import Settings, settings_from_mapping
from router.logschema import RoutingMode
from router.splitrecord import Split, default_split

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

DEFAULT_SEED = 20_240_617
DAY = 86_400.0
DURATION_S = 21 * DAY
WINDOW_S = DAY  # outcomes arrive within hours; a day's window keeps the loop short
RAMP = (0.05, 0.2, 0.5)
STAGE_MIN_S = 6 * DAY
MIN_SAMPLES = 200
PLANNED = 20_000


@dataclass(frozen=True)
class RampScenario:
    name: str
    drift: float = 0.0  # outcome rate change over the experiment, both arms alike
    effect: float = 0.0  # challenger accuracy minus the champion's
    users: int = 20_000
    rows: int = 100_000
    accuracy: float = 0.70
    icc: float = 0.05


SCENARIOS: tuple[RampScenario, ...] = (
    RampScenario("A/A ramp 5% -> 20% -> 50%"),
    RampScenario("A/A ramp 5% -> 20% -> 50%, outcome rate drifts +5 points", drift=0.05),
    RampScenario("A/B ramp 5% -> 20% -> 50%, challenger +4 points, drift +5", 0.05, 0.04),
)


@dataclass(frozen=True)
class RampRates:
    scenario: str
    experiments: int
    promote: float
    reject: float
    invalid: float
    reached_last: float  # experiments whose ramp reached its last stage
    pooled_excludes_zero: float  # the pooled difference's interval excludes 0 at the last look

    def se(self, rate: float) -> float:
        return math.sqrt(max(rate * (1 - rate), 1e-12) / self.experiments)


def settings_for(alpha: float = 0.05) -> Settings:
    return settings_from_mapping(
        {
            "model": {"name": "sim"},
            "experiment": {
                "alpha": alpha,
                "planned_samples": PLANNED,
                "outcome_window_s": WINDOW_S,
                "min_samples_per_arm": MIN_SAMPLES,
                "ramp": list(RAMP),
                "ramp_stage_min_s": STAGE_MIN_S,
            },
        },
        env={},
    )


@dataclass
class _Traffic:
    """One experiment's requests in time order; arms and outcomes are set as the ramp goes."""

    ts: FloatArray
    unit: IntArray
    bucket: FloatArray  # per user, in [0, 1): the challenger's while below the weight
    p_champion: FloatArray  # per request: the chance the champion's answer is right
    p_challenger: FloatArray
    draw: FloatArray  # per request: uniform, right when below the served arm's chance
    arrived: FloatArray
    latency_bucket: IntArray
    weight: FloatArray  # per request: the weight it was assigned under (NaN: not yet)


def _draw(s: RampScenario, rng: np.random.Generator) -> _Traffic:
    n = s.rows
    ts = np.sort(rng.uniform(0.0, DURATION_S, n))
    volume = 1.0 / np.arange(1, s.users + 1) ** 0.7
    unit = rng.choice(s.users, size=n, p=volume / volume.sum())
    k = 1.0 / s.icc - 1.0
    user_accuracy = rng.beta(s.accuracy * k, (1 - s.accuracy) * k, s.users)
    trend = s.drift * ts / DURATION_S
    p_champion = np.clip(user_accuracy[unit] + trend, 0.0, 1.0)
    latency = rng.lognormal(math.log(0.01), 0.3, n)
    return _Traffic(
        ts=ts,
        unit=unit,
        bucket=rng.random(s.users),
        p_champion=p_champion,
        p_challenger=np.clip(p_champion + s.effect, 0.0, 1.0),
        draw=rng.random(n),
        arrived=ts + rng.exponential(3_600.0, n),
        latency_bucket=np.floor(np.log(latency / 1e-6) / math.log(1.01)).astype(np.int64),
        weight=np.full(n, np.nan),
    )


def _arm(
    t: _Traffic, rows: BoolArray, matured: BoolArray, counted: BoolArray, value: FloatArray
) -> ArmData:
    """One arm's sums over ``rows`` (logged requests), as the SQL aggregation sums them."""
    m = len(t.bucket)
    units_r = t.unit[rows]
    r_y = np.bincount(units_r, minlength=m).astype(np.float64)
    mat = rows & matured
    c_y = np.bincount(t.unit[mat], minlength=m).astype(np.float64)
    c_x = np.bincount(t.unit[mat], weights=counted[mat].astype(np.float64), minlength=m)
    judged = mat & counted
    m_x = np.bincount(t.unit[judged], weights=value[judged], minlength=m)
    present_r, present_m = r_y > 0, c_y > 0
    buckets, counts = np.unique(t.latency_bucket[rows], return_counts=True)
    return ArmData(
        requests=int(rows.sum()),
        units=int(present_r.sum()),
        faults=UnitMoments.from_units(np.zeros(int(present_r.sum())), r_y[present_r]),
        coverage=UnitMoments.from_units(c_x[present_m], c_y[present_m]),
        metric=UnitMoments.from_units(m_x[present_m], c_x[present_m]),
        latency=LatencyHistogram(dict(zip(buckets.tolist(), counts.tolist(), strict=True))),
    )


def summary_at(t: _Traffic, now: float, current_weight: float) -> LogSummary:
    """What :func:`experiments.aggregate.read_summary` returns at ``now``: the periods, their sums
    (the arms then add them up) and the combination's influence sums, in numpy."""
    logged = t.ts <= now
    matured = t.ts <= now - WINDOW_S
    counted = t.arrived <= t.ts + WINDOW_S
    challenger = t.bucket[t.unit] < t.weight
    right = t.draw < np.where(challenger, t.p_challenger, t.p_champion)
    value = right.astype(np.float64)
    weights = [w for w in dict.fromkeys(t.weight[logged].tolist())]
    periods = []
    for w in weights:
        here = logged & (t.weight == w)
        periods.append(
            Period(
                w,
                _arm(t, here & ~challenger, matured, counted, value),
                _arm(t, here & challenger, matured, counted, value),
                float(t.ts[here].min()),
                float(t.ts[here].max()),
            )
        )
    pooled = [
        _arm(t, logged & ~challenger, matured, counted, value),
        _arm(t, logged & challenger, matured, counted, value),
    ]
    found = [i for i, p in enumerate(periods) if p.weight == current_weight]
    summary = LogSummary(
        RoutingMode.SPLIT,
        True,
        pooled[0],
        pooled[1],
        first_ts=float(t.ts[0]),
        periods=tuple(periods),
        current=found[0] if found else None,
    )
    if len(periods) < 2:
        return summary
    plan = strata.plan(periods)
    if plan is None:
        return summary
    judged = matured & counted
    m = len(t.bucket)

    def z(arm_rows: BoolArray, cells: Sequence[strata.Cell]) -> FloatArray:
        out = np.zeros(m)
        for cell in cells:
            rows = judged & arm_rows & (t.weight == cell.weight)
            out += np.bincount(
                t.unit[rows], weights=cell.coefficient * (value[rows] - cell.mean), minlength=m
            )
        return out

    z_t, z_c = z(challenger, plan.challenger), z(~challenger, plan.champion)
    in_t = np.bincount(t.unit[judged & challenger], minlength=m) > 0
    in_c = np.bincount(t.unit[judged & ~challenger], minlength=m) > 0
    sums = strata.Sums(
        float(z_t @ z_t),
        float(z_c @ z_c),
        float(z_t @ z_c),
        int(in_t.sum()),
        int(in_c.sum()),
        int((in_t | in_c).sum()),
    )
    return replace(summary, stratified=strata.combine(plan, sums))


def run(s: RampScenario, n_experiments: int, looks: int, seed: int, alpha: float) -> RampRates:
    """Share of experiments promoted / rejected / invalid at any look, the ramp in the loop."""
    settings = settings_for(alpha)
    aliases = AliasSnapshot("1", "2", None)
    rng = np.random.default_rng(seed)
    times = DURATION_S * np.arange(1, looks + 1) / looks
    counts = {"promote": 0, "reject": 0, "invalid": 0, "last": 0, "pooled": 0}
    alpha_metric = alpha * METRIC_SHARE
    for _ in range(n_experiments):
        t = _draw(s, rng)
        split = default_split(settings)
        seen: set[str] = set()
        start = 0.0
        summary = None
        # Each look goes on record as the CLI's audit run puts it, and the next is judged after
        # the recorded ones (experiments/looks.py): the ramp's looks are not known in advance.
        history = LookHistory()
        for now in times:
            t.weight[(t.ts > start) & (t.ts <= now)] = split.challenger_weight
            start = float(now)
            summary = summary_at(t, float(now), split.challenger_weight)
            ev = judge(settings, aliases, "sim", summary, now=float(now), looks=history)
            if ev.look is not None:
                taken = RecordedLook(ev.look.number, ev.look.fraction, ev.look.units)
                history = replace(history, looks=(*history.looks, taken))
            ev = ramp.step(settings, split, ev, summary, float(now))
            assert ev.ramp is not None
            if ev.ramp.last:
                seen.add("last")
            if ev.decision == "invalid":
                seen.add("invalid")  # an alarm; the experiment keeps running
            elif ev.decision in ("promote", "reject"):
                seen.add(ev.decision)
                break
            elif ev.ramp.action == "advance":
                assert ev.ramp.next_weight is not None
                split = Split(ev.ramp.next_weight, "registry", split.epoch + 1, float(now), "sim")
                if ev.ramp.next_weight == RAMP[-1]:
                    seen.add("last")
        for d in seen:
            counts[d] += 1
        if summary is not None and _pooled_excludes_zero(summary, alpha_metric):
            counts["pooled"] += 1
    n = n_experiments
    return RampRates(
        s.name,
        n,
        counts["promote"] / n,
        counts["reject"] / n,
        counts["invalid"] / n,
        counts["last"] / n,
        counts["pooled"] / n,
    )


def _pooled_excludes_zero(summary: LogSummary, alpha: float) -> bool:
    c, t = summary.champion.metric, summary.challenger.metric
    if min(c.n, t.n) < 2:
        return False
    d = split_difference(
        arm_estimate(c, True), arm_estimate(t, True), PLANNED, alpha, higher_is_better=True
    ).absolute
    return d.lower > 0 or d.upper < 0


def header(alpha: float, looks: int) -> str:
    return (
        f"| ramp scenario ({' -> '.join(f'{w:g}' for w in RAMP)}, stage ≥ "
        f"{STAGE_MIN_S / DAY:g} d and {MIN_SAMPLES} units per arm, sticky users, N* "
        f"{PLANNED:,}, α {alpha}, {looks} looks over {DURATION_S / DAY:g} d) | promote ± MC SE | "
        "reject ± MC SE | promote or reject | invalid | reached the last stage | "
        "pooled difference excludes 0 |\n|---|---:|---:|---:|---:|---:|---:|"
    )


def row(r: RampRates) -> str:
    either = r.promote + r.reject
    return (
        f"| {r.scenario} | {r.promote:.4f} ± {r.se(r.promote):.4f} | "
        f"{r.reject:.4f} ± {r.se(r.reject):.4f} | {either:.4f} ± {r.se(either):.4f} | "
        f"{r.invalid:.4f} | {r.reached_last:.3f} | {r.pooled_excludes_zero:.3f} |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.simulate_ramp", description=__doc__
    )
    parser.add_argument("--experiments", type=int, default=400)
    parser.add_argument("--looks", type=int, default=42)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    began = time.monotonic()
    print(header(args.alpha, args.looks), flush=True)
    for i, scenario in enumerate(SCENARIOS):
        rates = run(scenario, args.experiments, args.looks, args.seed + i, args.alpha)
        print(row(rates), flush=True)
    print(
        f"\n{args.experiments} experiments per scenario, seed {args.seed}, "
        f"{time.monotonic() - began:.0f} s. MC SE = √(r(1 − r)/n). 'pooled difference excludes "
        "0': the share of experiments whose difference, every row pooled per arm as if the split "
        "had never changed, lies wholly on one side of 0 at the last look (the A/A rows: the "
        "Simpson's-paradox trap the periods avoid)."
    )


if __name__ == "__main__":
    main()
