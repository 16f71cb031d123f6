"""The decision rule under traffic shaped like real traffic, by simulation (``make simulate``).

Each scenario draws whole experiments row by row (:mod:`experiments.simlog`). At each of
``looks`` evenly spaced evaluations it builds the same :class:`~experiments.sufficient.LogSummary`
the SQL aggregation returns and calls the same :func:`experiments.judge.judge` the CLI calls, with
the look's place in the experiment's sequence of looks (:func:`experiments.looks.schedule`: the
boundaries of all its looks computed once, as the CLI computes each from the recorded ones). An
experiment "promotes" or "rejects" if any look does; A/A scenarios must do either at most α of the
time, overall.

Power: champion 0.70, challenger +2/+4/+6 points, promoted by any look up to N*, for the default
method (group-sequential, adjusted with the champion's prediction), without the adjustment, with
the always-valid confidence sequence, and the fixed-horizon z-test once at N* on the same data.
Then inputs shaped by earlier answers (what the adjustment does when the covariate is not
pre-treatment), and the planner's N* checked against the power it promises.

    python -m experiments.simulate [--experiments N] [--looks K] [--seed S] [--only 0,3,...]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from experiments import stats
from experiments.adjustment import cross_fitted_difference
from experiments.covariate import adjust
from experiments.decision import BINARY_METRICS, METRIC_SHARE, arm_estimate
from experiments.judge import AliasSnapshot, judge, judged_units
from experiments.looks import schedule
from experiments.planner import plan_experiment
from experiments.simlog import (
    DAY,
    DURATION_S,
    PLANNED,
    WINDOW_S,
    Experiment,
    Scenario,
    draw,
    summary_at,
    with_rows,
)
from experiments.sufficient import LogSummary
from router.config import JudgingMethod, Settings, settings_from_mapping

__all__ = [
    "AA_SCENARIOS",
    "DURATION_S",
    "PLANNED",
    "WINDOW_S",
    "Rates",
    "Scenario",
    "Variant",
    "draw",
    "main",
    "power_scenarios",
    "run",
    "summary_at",
    "with_rows",
]

DEFAULT_SEED = 20_240_601
DEFAULT_LOOKS = 14  # a daily evaluation over the two weeks of judged predictions
#: The 500-look scenario's experiments are capped: its boundaries cost ~2 s per experiment.
MANY_LOOKS_EXPERIMENTS = 60

AA_SCENARIOS: tuple[Scenario, ...] = (
    Scenario("ideal (independent rows, accuracy 0.70)"),
    Scenario("sticky users, per-user accuracy (ICC 0.09)", users=2_000, icc=0.09),
    Scenario("sticky users, 20k users (units grow to N*)", users=20_000, icc=0.09, rows=60_000),
    Scenario("accuracy 0.99", champion_accuracy=0.99, challenger_accuracy=0.99),
    Scenario("accuracy 0.995", champion_accuracy=0.995, challenger_accuracy=0.995),
    Scenario("challenger falls back on its hardest 0.9%", hardest_fallback=0.009),
    Scenario("champion positives arrive 2 days late", champion_positive_delay_s=2 * DAY),
    Scenario("heavy-tailed losses (squared t3 residuals)", metric="squared_error"),
    Scenario("ideal, 10 looks", looks=10),
    Scenario("ideal, 50 looks", looks=50),
    Scenario("ideal, 500 looks", looks=500),
)
POWER_EFFECTS = (0.02, 0.04, 0.06)
PLANNER_EFFECT = 0.04  # the effect the planner check plans for
SHAPED = Scenario(
    "inputs shaped by earlier answers (+0.02 easier for challenger users)",
    users=10_000,
    rows=30_000,
    shaped=0.02,
)


@dataclass(frozen=True)
class Variant:
    """A way of judging: the method and whether the covariate adjustment may be used."""

    name: str
    method: JudgingMethod = "group_sequential"
    adjustment: Literal["auto", "off"] = "auto"


DEFAULT = Variant("group-sequential, adjusted (default)")
UNADJUSTED = Variant("group-sequential, unadjusted", adjustment="off")
SEQUENCE = Variant("confidence sequence, unadjusted", "confidence_sequence", "off")


@dataclass(frozen=True)
class Outcome:
    promote: float
    reject: float
    invalid: float


@dataclass(frozen=True)
class Rates:
    scenario: str
    experiments: int
    looks: int
    outcomes: dict[str, Outcome]  # by variant name, the default first
    fixed_horizon: float | None = None  # accuracy: the z-test once at N*, share promoted
    variance_reduction: float | None = None  # mean at the last look, when the adjustment is on
    adjusted_share: float = 0.0  # experiments with the adjustment on at the last look
    raw_estimate: float = 0.0  # mean at the last look, challenger − champion
    adjusted_estimate: float | None = None  # mean, the cross-fitted estimate whatever the gate
    true_effect: float = 0.0  # mean of the rows' expected metric, challenger − champion
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def default(self) -> Outcome:
        return next(iter(self.outcomes.values()))

    @property
    def promote(self) -> float:
        return self.default.promote

    @property
    def reject(self) -> float:
        return self.default.reject

    @property
    def invalid(self) -> float:
        return self.default.invalid

    def se(self, rate: float) -> float:
        return math.sqrt(max(rate * (1 - rate), 1e-12) / self.experiments)


def settings_for(
    scenario: Scenario,
    alpha: float = 0.05,
    variant: Variant = DEFAULT,
    planned: int = PLANNED,
) -> Settings:
    return settings_from_mapping(
        {
            "model": {"name": "sim"},
            "routing": {"challenger_weight": scenario.split},
            "experiment": {
                "metric": scenario.metric,
                "alpha": alpha,
                "planned_samples": planned,
                "outcome_window_s": WINDOW_S,
                "method": variant.method,
                "adjustment": variant.adjustment,
            },
        },
        env={},
    )


def _look_times(looks: int) -> list[float]:
    return [float(WINDOW_S + DURATION_S * k / looks) for k in range(1, looks + 1)]


def run(
    s: Scenario,
    n_experiments: int,
    looks: int,
    seed: int,
    alpha: float = 0.05,
    variants: Sequence[Variant] = (DEFAULT,),
    planned: int = PLANNED,
) -> Rates:
    """Share of experiments promoted / rejected / invalid at any look, per variant, through
    ``judge``; and the adjustment's figures at the last look."""
    looks = s.looks or looks
    cap_q = 0.99 if s.metric in ("abs_error", "squared_error") else None
    aliases = AliasSnapshot("1", "2", None)
    rng = np.random.default_rng(seed)
    times = _look_times(looks)
    settings = {v.name: settings_for(s, alpha, v, planned) for v in variants}
    counts = {v.name: {"promote": 0, "reject": 0, "invalid": 0} for v in variants}
    fixed = adjusted_on = 0
    reductions: list[float] = []
    raw_estimates: list[float] = []
    adjusted_estimates: list[float] = []
    truths: list[float] = []
    binary = s.metric in BINARY_METRICS
    for _ in range(n_experiments):
        e = draw(s, rng)
        summaries = [summary_at(e, t, s, cap_q) for t in times]
        units = [judged_units(summary) for summary in summaries]
        methods = {v.method for v in variants}
        sequences = {m: schedule(m, units, planned) for m in methods}
        for v in variants:
            seen: set[str] = set()
            for k, t in enumerate(times):
                ev = judge(
                    settings[v.name],
                    aliases,
                    "sim",
                    summaries[k],
                    now=t,
                    looks=sequences[v.method][k],
                )
                if ev.decision == "invalid":
                    seen.add("invalid")  # an alarm; the experiment keeps running
                elif ev.decision != "inconclusive":
                    seen.add(ev.decision)
                    break  # the first promotion or rejection acts
            for d in seen:
                counts[v.name][d] += 1
        final = summaries[-1]
        c, t_ = final.champion.metric, final.challenger.metric
        if s.metric == "accuracy" and min(c.n, t_.n) >= 2:
            naive = stats.fixed_horizon_interval(
                arm_estimate(c, False), arm_estimate(t_, False), alpha
            )
            fixed += naive.lower > 0
        result = adjust(final.covariate, c, t_, binary=binary)
        if result.on and result.variance_reduction is not None:
            adjusted_on += 1
            reductions.append(result.variance_reduction)
        raw_estimates.append(t_.mean - c.mean)
        ungated = _ungated_adjusted(final)
        if ungated is not None:
            adjusted_estimates.append(ungated)
        truths.append(_true_effect(e))
    n = n_experiments
    return Rates(
        s.name,
        n,
        looks,
        {
            v.name: Outcome(
                counts[v.name]["promote"] / n,
                counts[v.name]["reject"] / n,
                counts[v.name]["invalid"] / n,
            )
            for v in variants
        },
        fixed / n if s.metric == "accuracy" else None,
        float(np.mean(reductions)) if reductions else None,
        adjusted_on / n,
        float(np.mean(raw_estimates)),
        float(np.mean(adjusted_estimates)) if adjusted_estimates else None,
        float(np.mean(truths)),
    )


def _ungated_adjusted(summary: LogSummary) -> float | None:
    """The cross-fitted adjusted difference even where the balance check would refuse it."""
    folds = summary.covariate
    if folds is None:
        return None
    pairs = [
        (c.imputed(0.0), t.imputed(0.0))
        for c, t in zip(folds.champion, folds.challenger, strict=True)
    ]
    if any(m.n < 2 or m.sum_y <= 0 for pair in pairs for m in pair):
        return None
    return cross_fitted_difference(pairs).estimate


def _true_effect(e: Experiment) -> float:
    return float(e.expected[e.challenger].mean() - e.expected[~e.challenger].mean())


def power_scenarios() -> tuple[Scenario, ...]:
    return tuple(
        Scenario(f"power: 0.70 -> {0.70 + d:.2f}", challenger_accuracy=0.70 + d)
        for d in POWER_EFFECTS
    )


def planner_check(
    effect: float, n_experiments: int, looks: int, seed: int, alpha: float = 0.05
) -> Rates:
    """Plan N* with the product's planner on a pilot log (the first look's data of one drawn
    experiment), then run experiments of that size: the share promoted should be its 80%."""
    base = Scenario(f"planner: 0.70 -> {0.70 + effect:.2f}", challenger_accuracy=0.70 + effect)
    pilot_rng = np.random.default_rng(seed)
    pilot = draw(base, pilot_rng)
    t = _look_times(looks)[looks // 2]
    settings = settings_for(base, alpha)
    summary = summary_at(pilot, t, base, None)
    p = plan_experiment(settings, summary, effect=effect, now=t, looks=looks)
    assert p.units_needed is not None, p.reason
    planned = math.ceil(p.units_needed)
    sized = replace(base, rows=planned)
    rates = run(sized, n_experiments, looks, seed + 1, alpha, (DEFAULT,), planned=planned)
    return replace(rates, extra={"planned": float(planned), "plan_looks": float(p.looks or 0)})


def aa_header(alpha: float, looks: int) -> str:
    return (
        f"| A/A scenario (90/10, N* {PLANNED:,}, α {alpha}, {looks} looks unless named, "
        "window 7 d) | promote ± MC SE | reject ± MC SE | promote or reject | invalid | "
        "adjusted | variance removed |\n|---|---:|---:|---:|---:|---:|---:|"
    )


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def aa_row(r: Rates) -> str:
    either = r.promote + r.reject
    return (
        f"| {r.scenario} ({r.experiments} exp.) | {r.promote:.4f} ± {r.se(r.promote):.4f} | "
        f"{r.reject:.4f} ± {r.se(r.reject):.4f} | {either:.4f} ± {r.se(either):.4f} | "
        f"{r.invalid:.4f} | {r.adjusted_share:.0%} | {_share(r.variance_reduction)} |"
    )


def power_header(alpha: float) -> str:
    names = " | ".join(v.name for v in (DEFAULT, UNADJUSTED, SEQUENCE))
    return (
        f"| power at N* {PLANNED:,} (90/10), any look | {names} | fixed-horizon z-test once at "
        f"N* (α {alpha}) | variance removed |\n|---|---:|---:|---:|---:|---:|"
    )


def power_row(r: Rates) -> str:
    cells = " | ".join(f"{o.promote:.3f} ± {r.se(o.promote):.3f}" for o in r.outcomes.values())
    fixed = "-" if r.fixed_horizon is None else f"{r.fixed_horizon:.3f}"
    return f"| {r.scenario} | {cells} | {fixed} | {_share(r.variance_reduction)} |"


def shaped_table(r: Rates) -> str:
    return (
        "| inputs shaped by earlier answers | true effect (ITT) | raw estimate | adjusted "
        "estimate (ungated) | adjustment kept on | promote | reject |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        f"| {r.scenario} ({r.experiments} exp.) | {r.true_effect:+.4f} | {r.raw_estimate:+.4f} | "
        f"{r.adjusted_estimate:+.4f} | {r.adjusted_share:.0%} | {r.promote:.3f} | "
        f"{r.reject:.3f} |"
    )


def planner_table(rows: Sequence[Rates]) -> str:
    lines = [
        "| planner check (group-sequential, adjusted) | planned N* | looks | promoted at N* "
        "(planned 0.80) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} ({r.experiments} exp.) | {r.extra['planned']:,.0f} | {r.looks} | "
            f"{r.promote:.3f} ± {r.se(r.promote):.3f} |"
        )
    return "\n".join(lines)


def _task(job: tuple[str, int, int, int, int, float]) -> str:
    """One table row, computed in a worker process (``--jobs``)."""
    kind, index, n, looks, seed, alpha = job
    if kind == "aa":
        return aa_row(run(AA_SCENARIOS[index], n, looks, seed, alpha))
    if kind == "power":
        variants = (DEFAULT, UNADJUSTED, SEQUENCE)
        return power_row(run(power_scenarios()[index], n, looks, seed, alpha, variants))
    if kind == "shaped":
        return shaped_table(run(SHAPED, n, looks, seed, alpha))
    return planner_table([planner_check(PLANNER_EFFECT, n, looks, seed, alpha)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.simulate", description=__doc__)
    parser.add_argument("--experiments", type=int, default=100)
    parser.add_argument("--looks", type=int, default=DEFAULT_LOOKS)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1: none)")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated scenario numbers (A/A first, then power, shaped inputs, planner)",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    n_aa, n_power = len(AA_SCENARIOS), len(POWER_EFFECTS)
    total = n_aa + n_power + 2
    wanted = set(range(total)) if args.only is None else {int(i) for i in args.only.split(",")}
    n, alpha, looks, seed = args.experiments, args.alpha, args.looks, args.seed
    jobs: list[tuple[str, int, int, int, int, float]] = []
    for i, scenario in enumerate(AA_SCENARIOS):
        count = min(n, MANY_LOOKS_EXPERIMENTS) if (scenario.looks or 0) >= 500 else n
        jobs.append(("aa", i, count, looks, seed + i, alpha))
    jobs += [("power", j, n, looks, seed + 100 + j, alpha) for j in range(n_power)]
    jobs += [
        ("shaped", 0, n, looks, seed + 200, alpha),
        ("planner", 0, n, looks, seed + 300, alpha),
    ]
    chosen = [job for k, job in enumerate(jobs) if k in wanted]
    headers = {
        "aa": aa_header(alpha, looks),
        "power": "\n" + power_header(alpha),
        "shaped": "",
        "planner": "",
    }
    # Rows print as they finish, in order: a long run shows its progress.
    with contextlib.ExitStack() as stack:
        if args.jobs > 1 and len(chosen) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(args.jobs))
            rows: Iterator[str] = pool.map(_task, chosen)
        else:
            rows = map(_task, chosen)
        shown: set[str] = set()
        for job, row in zip(chosen, rows, strict=True):
            kind = job[0]
            if kind not in shown:
                shown.add(kind)
                if headers[kind]:
                    print(headers[kind], flush=True)
            print(("\n" if kind in ("shaped", "planner") else "") + row, flush=True)
    print(
        f"\nThe primary metric spends {METRIC_SHARE:.0%} of α (two-sided), each guardrail 10% "
        "(one-sided); 'invalid' (validity checks at 0.001) is neither a promotion nor a "
        f"rejection. MC SE = √(r(1 − r)/n); a rate of 0 bounds the true rate below 3/n (95%). "
        f"{n} experiments per scenario unless named, seed {seed}, "
        f"{time.monotonic() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
