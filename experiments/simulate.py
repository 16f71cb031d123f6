"""The decision rule under traffic shaped like real traffic, by simulation (``make simulate``).

Each scenario draws whole experiments row by row: sticky users or independent requests, per-user
accuracy, failures and fallbacks, delayed outcomes, heavy-tailed losses. At each of ``looks``
evenly spaced evaluations it builds the same :class:`~experiments.sufficient.LogSummary` the SQL
aggregation returns (per-unit sums, coverage, faults, latency histograms, the cap) and calls the
same :func:`experiments.judge.judge` the CLI calls. An experiment "promotes" or "rejects" if any
look does; A/A scenarios must do either at most α of the time, overall.

Power: champion 0.70, challenger +2/+4/+6 points, promoted by any look up to N*, beside the
fixed-horizon z-test checked once at N* on the same data (the test a single look is allowed).

    python -m experiments.simulate [--experiments N] [--looks K] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from experiments import stats
from experiments.decision import METRIC_SHARE, arm_estimate
from experiments.judge import AliasSnapshot, judge
from experiments.sufficient import (
    NONPOSITIVE_BUCKET,
    ArmData,
    LatencyHistogram,
    LogSummary,
    cap_from_histogram,
)
from router.config import MetricName, Settings, settings_from_mapping
from router.logschema import RoutingMode

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

DEFAULT_SEED = 20_240_601
PLANNED = 20_000
DAY = 86_400.0
DURATION_S = 14 * DAY  # predictions are spread over two weeks
WINDOW_S = 7 * DAY  # config.yaml's outcome window


@dataclass(frozen=True)
class Scenario:
    name: str
    champion_accuracy: float = 0.70
    challenger_accuracy: float = 0.70
    users: int = 0  # > 0: sticky users (routing keys); else every request its own unit
    icc: float = 0.0  # intra-user correlation of correctness (per-user accuracy ~ Beta)
    hardest_fallback: float = 0.0  # the challenger falls back on this share of hardest rows
    champion_positive_delay_s: float = 0.0
    metric: MetricName = "accuracy"
    rows: int = PLANNED  # rows by the last look
    split: float = 0.1


AA_SCENARIOS: tuple[Scenario, ...] = (
    Scenario("ideal (independent rows, accuracy 0.70)"),
    Scenario("sticky users, per-user accuracy (ICC 0.09)", users=2_000, icc=0.09),
    Scenario("accuracy 0.99", champion_accuracy=0.99, challenger_accuracy=0.99),
    Scenario("accuracy 0.995", champion_accuracy=0.995, challenger_accuracy=0.995),
    Scenario("challenger falls back on its hardest 0.9%", hardest_fallback=0.009),
    Scenario(
        "challenger falls back on its hardest 0.9%, 100k rows",
        hardest_fallback=0.009,
        rows=100_000,
    ),
    Scenario("champion positives arrive 2 days late", champion_positive_delay_s=2 * DAY),
    Scenario("heavy-tailed losses (squared t3 residuals)", metric="squared_error"),
)
POWER_EFFECTS = (0.02, 0.04, 0.06)


@dataclass(frozen=True)
class Rates:
    scenario: str
    experiments: int
    promote: float
    reject: float
    invalid: float
    fixed_horizon: float | None = None  # power scenarios: the z-test once at N*

    def se(self, rate: float) -> float:
        return math.sqrt(max(rate * (1 - rate), 1e-12) / self.experiments)


def settings_for(scenario: Scenario, alpha: float = 0.05) -> Settings:
    return settings_from_mapping(
        {
            "model": {"name": "sim"},
            "routing": {"challenger_weight": scenario.split},
            "experiment": {
                "metric": scenario.metric,
                "alpha": alpha,
                "planned_samples": PLANNED,
                "outcome_window_s": WINDOW_S,
            },
        },
        env={},
    )


@dataclass(frozen=True)
class _Experiment:
    """One simulated log, rows in time order."""

    ts: FloatArray
    unit: IntArray  # unit index per row
    n_units: int
    challenger: NDArray[np.bool_]  # the row's assigned arm
    value: FloatArray  # the row metric on the answer served
    arrived: FloatArray  # when its outcome arrived
    fault: FloatArray  # 1.0: the model failed (a challenger fallback)
    latency_bucket: IntArray


def _draw(s: Scenario, rng: np.random.Generator) -> _Experiment:
    n = s.rows
    ts = np.sort(rng.uniform(0.0, DURATION_S, n))
    if s.users:
        # Heavy-tailed volumes (a few users send most requests); sticky assignment per user.
        weights = 1.0 / np.arange(1, s.users + 1) ** 0.7
        unit = rng.choice(s.users, size=n, p=weights / weights.sum())
        n_units = s.users
        to_challenger = rng.random(s.users) < s.split
        challenger = to_challenger[unit]
    else:
        unit = np.arange(n)
        n_units = n
        challenger = rng.random(n) < s.split
    acc = np.where(challenger, s.challenger_accuracy, s.champion_accuracy)
    if s.icc > 0:
        # Per-user accuracy ~ Beta with the arm's mean and ICC = 1 / (a + b + 1).
        k = 1.0 / s.icc - 1.0
        user_champ = rng.beta(s.champion_accuracy * k, (1 - s.champion_accuracy) * k, n_units)
        user_chall = rng.beta(s.challenger_accuracy * k, (1 - s.challenger_accuracy) * k, n_units)
        acc = np.where(challenger, user_chall[unit], user_champ[unit])
    fault = np.zeros(n)
    difficulty = rng.random(n)
    if s.hardest_fallback:
        # The hardest rows are the ones most often got wrong; the challenger fails on them and
        # the champion's (equally good, A/A) answer is served: intent-to-treat keeps them.
        hard = difficulty > 1.0 - s.hardest_fallback
        acc = np.where(hard, 0.2, (acc - s.hardest_fallback * 0.2) / (1 - s.hardest_fallback))
        fault = np.where(hard & challenger, 1.0, 0.0)
    correct = rng.random(n) < acc
    # Heavy tails: squared t3 residuals have no finite variance until capped.
    value: FloatArray = np.asarray(
        rng.standard_t(3, n) ** 2 if s.metric == "squared_error" else correct * 1.0,
        dtype=np.float64,
    )
    truth_positive = rng.random(n) < 0.5
    delay = rng.exponential(600.0, n)
    if s.champion_positive_delay_s:
        delay = np.where(~challenger & truth_positive, s.champion_positive_delay_s, delay)
    latency = rng.lognormal(math.log(0.01), 0.3, n)
    buckets = np.floor(np.log(latency / 1e-6) / math.log(1.01)).astype(np.int64)
    return _Experiment(ts, unit, n_units, challenger, value, ts + delay, fault, buckets)


def _moments(x: NDArray[Any], y: NDArray[Any], present: NDArray[np.bool_]) -> stats.UnitMoments:
    return stats.UnitMoments.from_units(x[present], y[present])


def summary_at(e: _Experiment, t: float, s: Scenario, cap_quantile: float | None) -> LogSummary:
    """What the SQL aggregation would return at time ``t``: the same sums, built in numpy."""
    logged = int(np.searchsorted(e.ts, t, side="right"))
    matured = int(np.searchsorted(e.ts, t - WINDOW_S, side="right"))
    counted = e.arrived[:matured] <= e.ts[:matured] + WINDOW_S
    value = e.value[:matured]
    cap = None
    if cap_quantile is not None and counted.any():
        v = value[counted]
        b = np.where(v > 0, np.floor(np.log(np.maximum(v, 1e-300) / 1e-6) / math.log(1.01)), 0)
        b = np.where(v > 0, b, NONPOSITIVE_BUCKET).astype(np.int64)
        keys, counts = np.unique(b, return_counts=True)
        cap = cap_from_histogram(
            dict(zip(keys.tolist(), counts.tolist(), strict=True)), cap_quantile
        )
        if cap is not None:
            value = np.minimum(value, cap)
    arms = []
    for is_challenger in (False, True):
        req = e.challenger[:logged] == is_challenger
        mat = e.challenger[:matured] == is_challenger
        units_r = e.unit[:logged][req]
        units_m = e.unit[:matured][mat]
        m = e.n_units
        r_y = np.bincount(units_r, minlength=m).astype(np.float64)
        r_x = np.bincount(units_r, weights=e.fault[:logged][req], minlength=m)
        c_y = np.bincount(units_m, minlength=m).astype(np.float64)
        c_x = np.bincount(units_m, weights=counted[mat].astype(np.float64), minlength=m)
        m_x = np.bincount(units_m, weights=np.where(counted[mat], value[mat], 0.0), minlength=m)
        present_r, present_m = r_y > 0, c_y > 0
        low = int(e.latency_bucket.min())
        counts = np.bincount(e.latency_bucket[:logged][req] - low)
        buckets = np.flatnonzero(counts)
        arms.append(
            ArmData(
                requests=int(req.sum()),
                fallbacks=int(e.fault[:logged][req].sum()),
                units=int(present_r.sum()),
                faults=_moments(r_x, r_y, present_r),
                coverage=_moments(c_x, c_y, present_m),
                metric=_moments(m_x, c_x, present_m),
                latency=LatencyHistogram(
                    dict(zip((buckets + low).tolist(), counts[buckets].tolist(), strict=True))
                ),
            )
        )
    first = float(e.ts[0]) if logged else None
    return LogSummary(RoutingMode.SPLIT, bool(s.users), arms[0], arms[1], first_ts=first, cap=cap)


def run(s: Scenario, n_experiments: int, looks: int, seed: int, alpha: float = 0.05) -> Rates:
    """Share of experiments promoted / rejected / invalid at any look, through ``judge``."""
    settings = settings_for(s, alpha)
    exp = settings.experiment
    cap_q = exp.cap_quantile if s.metric in ("abs_error", "squared_error") else None
    aliases = AliasSnapshot("1", "2", None)
    rng = np.random.default_rng(seed)
    times = WINDOW_S + DURATION_S * np.arange(1, looks + 1) / looks
    counts = {"promote": 0, "reject": 0, "invalid": 0}
    fixed = 0
    for _ in range(n_experiments):
        e = _draw(s, rng)
        seen: set[str] = set()
        for t in times:
            ev = judge(settings, aliases, "sim", summary_at(e, float(t), s, cap_q), now=float(t))
            if ev.decision == "invalid":
                seen.add("invalid")  # an alarm; the experiment keeps running
            elif ev.decision != "inconclusive":
                seen.add(ev.decision)
                break  # the first promotion or rejection acts
        for d in seen:
            counts[d] += 1
        if s.metric == "accuracy":  # the fixed-horizon z-test, once, on all the data
            final = summary_at(e, float(times[-1]), s, cap_q)
            c, t_ = final.champion.metric, final.challenger.metric
            if min(c.n, t_.n) >= 2:
                naive = stats.fixed_horizon_interval(
                    arm_estimate(c, False), arm_estimate(t_, False), alpha
                )
                fixed += naive.lower > 0
    n = n_experiments
    return Rates(
        s.name, n, counts["promote"] / n, counts["reject"] / n, counts["invalid"] / n, fixed / n
    )


def power_scenarios() -> tuple[Scenario, ...]:
    return tuple(
        Scenario(f"power: 0.70 -> {0.70 + d:.2f}", challenger_accuracy=0.70 + d)
        for d in POWER_EFFECTS
    )


def aa_header(alpha: float, looks: int) -> str:
    return (
        f"| A/A scenario (90/10, N* {PLANNED:,}, α {alpha}, {looks} looks, window 7 d) | "
        "promote ± MC SE | reject ± MC SE | promote or reject | invalid |\n"
        "|---|---:|---:|---:|---:|"
    )


def aa_row(r: Rates) -> str:
    either = r.promote + r.reject
    return (
        f"| {r.scenario} | {r.promote:.4f} ± {r.se(r.promote):.4f} | "
        f"{r.reject:.4f} ± {r.se(r.reject):.4f} | {either:.4f} ± {r.se(either):.4f} | "
        f"{r.invalid:.4f} |"
    )


def power_header(alpha: float) -> str:
    return (
        f"| power at N* {PLANNED:,} (90/10) | sequential, any look | fixed-horizon z-test once "
        f"at N* (α {alpha}) |\n|---|---:|---:|"
    )


def power_row(r: Rates) -> str:
    return f"| {r.scenario} | {r.promote:.3f} ± {r.se(r.promote):.3f} | {r.fixed_horizon:.3f} |"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.simulate", description=__doc__)
    parser.add_argument("--experiments", type=int, default=400)
    parser.add_argument("--looks", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--only", default=None, help="comma-separated scenario numbers (A/A first, then power)"
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    everything = [*AA_SCENARIOS, *power_scenarios()]
    wanted = range(len(everything)) if args.only is None else [int(i) for i in args.only.split(",")]
    # Rows print as they finish: a long run shows its progress.
    print(aa_header(args.alpha, args.looks), flush=True)
    for i in wanted:
        if i < len(AA_SCENARIOS):
            r = run(everything[i], args.experiments, args.looks, args.seed + i, args.alpha)
            print(aa_row(r), flush=True)
    print("\n" + power_header(args.alpha), flush=True)
    for i in wanted:
        if i >= len(AA_SCENARIOS):
            r = run(everything[i], args.experiments, args.looks, args.seed + 100 + i, args.alpha)
            print(power_row(r), flush=True)
    print(
        f"\nThe primary metric spends {METRIC_SHARE:.0%} of α (two-sided), each guardrail 10% "
        "(one-sided); 'invalid' (validity checks at 0.001) is neither a promotion nor a "
        f"rejection. MC SE = √(r(1 − r)/n); a rate of 0 bounds the true rate below "
        f"{3 / args.experiments:.3f} (95%, 3/n). {args.experiments} experiments per scenario, "
        f"seed {args.seed}, "
        f"{time.monotonic() - start:.0f} s."
    )


def with_rows(s: Scenario, rows: int) -> Scenario:
    """The scenario at another size (the tests' smaller runs)."""
    return replace(s, rows=rows)


if __name__ == "__main__":
    main()
