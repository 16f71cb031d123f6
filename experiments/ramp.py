"""A ramp's stage rule, without I/O: given the evaluation at the split in force, stay, move on to
the next stage, or let the last stage decide.

``experiment.ramp`` lists the challenger weights of the stages (e.g. ``[0.05, 0.2, 0.5]``); the
experiment starts at the first (``router/splitrecord.py``'s default). Each scheduled
``evaluate_and_promote`` run applies :func:`step` to the evaluation :func:`experiments.judge.judge`
made (every period of one weight judged on its own and combined, ``experiments/strata.py``):

* **invalid** (a period's sample ratio, requests per unit or feedback coverage): stays invalid,
  nothing moves;
* **reject**, at any stage: a guardrail failed at the current stage (with however few requests:
  an always-valid bound is as valid at 50 requests as at 50,000, and a failing challenger must not
  wait for outcomes to be sent back), or the primary metric, combined over the stages, is
  significantly worse (the evaluation's own REJECT);
* **advance** (before the last stage), when the current stage has lasted
  ``experiment.ramp_stage_min_s``, each arm has ``experiment.min_samples_per_arm`` units with
  requests at it, and each guardrail is clear there: judged, not failed, and its estimate within
  its margin. A better primary metric advances too; only the last stage promotes.
* **decide** (the last stage): the evaluation's decision stands, promote or reject as without a
  ramp.

Otherwise the stage holds (``inconclusive``), the reason says what it waits for.

Guardrails "clear" rather than "shown non-inferior" (an upper bound below the margin): at a 5%
stage a p95's upper confidence bound needs thousands of rows per arm to exist at all (the
quantile sequence's band exceeds the sample below ~1,000 rows at N* 20,000), so that gate would
hold a healthy challenger for days; a challenger that is worse beyond doubt is rejected instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from experiments.decision import Decision, GuardrailResult
from experiments.sufficient import LogSummary
from router.config import Settings
from router.splitrecord import Split

if TYPE_CHECKING:  # judge imports RampStage from here
    from experiments.judge import Evaluation

RampAction = Literal["advance", "hold", "decide"]


@dataclass(frozen=True)
class RampStage:
    """Where the ramp stands and what this evaluation does with it."""

    stages: tuple[float, ...]
    weight: float  # the challenger weight in force
    stage: int  # 1-based: the last stage at or below the weight (0: below the first)
    action: RampAction
    next_weight: float | None  # advance: the weight of the next stage
    stage_started_at: float | None  # when the weight in force began
    reason: str

    @property
    def last(self) -> bool:
        return self.next_weight is None


def stage_of(ramp: tuple[float, ...], weight: float) -> tuple[int, float | None]:
    """The 1-based stage a weight is at (the last stage at or below it; 0: below the first) and
    the next stage's weight (None: at or past the last stage)."""
    stage = sum(1 for w in ramp if w <= weight)
    above = [w for w in ramp if w > weight]
    return stage, (above[0] if above else None)


def step(
    settings: Settings, split: Split, evaluation: Evaluation, summary: LogSummary, now: float
) -> Evaluation:
    """``evaluation`` with the ramp's decision, reason and :class:`RampStage`."""
    exp = settings.experiment
    ramp = exp.ramp
    stage, next_weight = stage_of(ramp, split.challenger_weight)
    started = _stage_start(split, summary)
    where = f"Stage {stage} of {len(ramp)} (challenger weight {split.challenger_weight:g})"

    def result(action: RampAction, decision: Decision, reason: str) -> Evaluation:
        moving_to = next_weight if action == "advance" else None
        state = RampStage(ramp, split.challenger_weight, stage, action, moving_to, started, reason)
        return dataclasses.replace(evaluation, decision=decision, reason=reason, ramp=state)

    failed = [g for g in evaluation.guardrails if not g.passed]
    if evaluation.decision != "invalid" and failed:
        names = "; ".join(f"{g.name}: {g.detail}" for g in failed)
        return result("decide", "reject", f"{where}: guardrail failed ({names}).")
    if next_weight is None or evaluation.decision in ("invalid", "reject"):
        return result("decide", evaluation.decision, f"{where}: {evaluation.reason}")
    if split.challenger_weight == 0.0:
        return result("hold", "inconclusive", f"{where}: paused at weight 0; nothing moves.")
    waiting = _waiting(settings, evaluation, summary, started, now)
    if waiting:
        return result(
            "hold", "inconclusive", f"{where} holds: {'; '.join(waiting)}. {evaluation.reason}"
        )
    clear = ", ".join(f"{g.name} {g.detail}" for g in evaluation.guardrails)
    return result(
        "advance",
        "inconclusive",
        f"{where} passed (guardrails clear: {clear}): the split moves to {next_weight:g}.",
    )


def _stage_start(split: Split, summary: LogSummary) -> float | None:
    if split.changed_at is not None:
        return split.changed_at
    # The configured default is in force since the experiment began: its period's first row.
    if summary.current is not None:
        return summary.periods[summary.current].first_ts
    return summary.first_ts


def _waiting(
    settings: Settings,
    evaluation: Evaluation,
    summary: LogSummary,
    started: float | None,
    now: float,
) -> list[str]:
    """What the current stage still lacks before the split may move on."""
    exp = settings.experiment
    waiting = []
    if started is None or now - started < exp.ramp_stage_min_s:
        elapsed = 0.0 if started is None else now - started
        waiting.append(
            f"{elapsed:.0f} s of the {exp.ramp_stage_min_s:g} s a stage lasts "
            "(experiment.ramp_stage_min_s)"
        )
    if summary.current is None:
        units = (0, 0)
    else:
        period = summary.periods[summary.current]
        units = (period.champion.units, period.challenger.units)
    if min(units) < exp.min_samples_per_arm:
        waiting.append(
            f"units with requests at this stage: champion {units[0]}, challenger {units[1]}, "
            f"{exp.min_samples_per_arm} per arm needed (experiment.min_samples_per_arm)"
        )
    unclear = [g for g in evaluation.guardrails if not _clear(g)]
    if unclear or not evaluation.guardrails:
        what = ", ".join(f"{g.name} ({g.detail})" for g in unclear) or "not evaluated yet"
        waiting.append(f"guardrails not clear: {what}")
    return waiting


def _clear(g: GuardrailResult) -> bool:
    """Judged with data, not failed, and the estimate within the margin."""
    return g.passed and g.interval is not None and g.interval.estimate <= g.threshold
