"""The looks of one experiment: which evaluation this is, how much information it has, and the
critical value each test uses at it. Pure: the audit trail is read by :mod:`experiments.audit`.

Each ``evaluate_and_promote`` run that writes to MLflow is a *look*. Its information fraction is
t = judged units / N* (``experiment.planned_samples``), and the run records its look number, t and
its judged units in its audit run (:func:`record_params`), so the next run rebuilds the sequence
and :mod:`experiments.sequential` computes the boundary of every look from the fractions actually
taken. The first look with t ≥ 1 is the final analysis and spends what is left; a look after it
has nothing left to spend and cannot decide ("no worthwhile difference": stop the experiment).

What counts as a look, and what happens when a record is missing:

* A dry run is not a look: it writes nothing and cannot act, and shows the boundary a real run at
  this moment would use. (Acting by hand on a dry run's "would promote" is outside the guarantee.)
* A run records its look in the same MLflow call as its other parameters, before any alias
  moves, so every look that acted is on record. A run that failed before recording did not act:
  the looks that could act are exactly the recorded ones, and leaving the failed one out is exact.
* A run that judged nothing (no rows yet, mixed modes, an overflowing metric) records that it was
  no look (``look: none``): it could not decide, so it spends nothing.
* A record lost afterwards (a deleted run) shows as a gap in the look numbers. The spending
  through each recorded look is α(t) whatever happened between, so a gap changes only the
  correlation the later boundaries assume; the gap is reported and the look left out.
* A run of this experiment without a look record (written before looks were recorded, i.e. by an
  older version) is a look whose fraction is known only from above: its judged rows over N*
  (rows ≥ units), else this look's own fraction. The conservative rule of
  :func:`experiments.sequential.group_sequential_boundaries` applies (``spent_through``): this
  look does not spend again what such a look may already have spent.
* A look that adds no judged unit to the last recorded one (t did not grow; fewer units, after a
  retention run or a config change) spends nothing and cannot decide: its statistic may still
  differ from that look's (new rows of known users), and no α is left for it.

Information is counted in units, as N* is: with sticky users whose population stops growing,
rows added to known users add information that t does not count (conservative: the boundaries
assume more correlation between looks than there is), and t stays below 1 until new users come.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from experiments import stats
from experiments.sequential import SAME_LOOK, Spending, group_sequential_boundaries
from router.config import JudgingMethod

__all__ = [
    "Look",
    "LookHistory",
    "LookReport",
    "RecordedLook",
    "first_look",
    "parse_record",
    "record_params",
    "schedule",
    "this_look",
]

#: The audit run's parameters that record a look (written by ``experiments.promote``).
PARAM_LOOK = "look"
PARAM_FRACTION = "information_fraction"
PARAM_UNITS = "judged_units"
PARAM_METHOD = "method"

METHOD_TITLES: Mapping[JudgingMethod, str] = {
    "group_sequential": "group-sequential (O'Brien-Fleming-type alpha spending)",
    "confidence_sequence": "always-valid confidence sequence",
}


@dataclass(frozen=True)
class RecordedLook:
    """A look on record: its number, information fraction and judged units."""

    number: int
    fraction: float
    units: int


@dataclass(frozen=True)
class LookHistory:
    """What the audit trail says about the looks taken before this one."""

    looks: tuple[RecordedLook, ...] = ()
    # Looks of this experiment without a look record: an upper bound on each one's fraction.
    unrecorded: tuple[float, ...] = ()

    @property
    def missing(self) -> tuple[int, ...]:
        """Look numbers below the latest recorded one that have no record (deleted runs); the
        first ``len(unrecorded)`` numbers are the unrecorded runs'."""
        numbers = {look.number for look in self.looks}
        first = len(self.unrecorded) + 1
        return tuple(k for k in range(first, max(numbers, default=0)) if k not in numbers)

    @property
    def next_number(self) -> int:
        latest = max((look.number for look in self.looks), default=0)
        return max(latest, len(self.unrecorded)) + 1


class _Schedule:
    """The information fractions of one experiment's looks, and their boundaries, computed once
    per (α, sides) for all of them: each look's boundary depends only on the looks up to it, so
    one pass over the whole schedule serves every look (the simulation's many looks)."""

    def __init__(
        self, fractions: Sequence[float], spent_through: float | None, spending: Spending
    ) -> None:
        self.fractions = tuple(fractions)
        self.spent_through = spent_through
        self.spending = spending
        self._cache: dict[tuple[float, int], tuple[tuple[float, ...], tuple[float, ...]]] = {}

    def boundaries(self, alpha: float, sides: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(z, cumulative α spent) per look."""
        key = (alpha, sides)
        if key not in self._cache:
            b = group_sequential_boundaries(
                self.fractions,
                alpha,
                sides=sides,
                spending=self.spending,
                spent_through=self.spent_through,
            )
            self._cache[key] = (b.z, b.spent)
        return self._cache[key]


@dataclass(frozen=True)
class Look:
    """One look: its number and information, and the critical values of its tests."""

    method: JudgingMethod
    number: int
    units: int  # judged units (both arms)
    planned: int  # N*
    # The look's place in its schedule; None: no information yet (no judged unit).
    index: int | None = None
    schedule: _Schedule | None = field(default=None, compare=False, repr=False)
    grew: bool = True  # t grew past the previous look's
    notes: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        return self.units / self.planned

    @property
    def fractions(self) -> tuple[float, ...]:
        """The fractions of the looks through this one (the boundaries' design)."""
        if self.schedule is None or self.index is None:
            return ()
        return self.schedule.fractions[: self.index + 1]

    @property
    def final(self) -> bool:
        """This is the final analysis: the first look with t ≥ 1."""
        previous = self.fractions[:-1]
        return self.fraction >= 1.0 and all(t < 1.0 for t in previous)

    @property
    def past_final(self) -> bool:
        """An earlier look was the final analysis: nothing is left to spend."""
        return any(t >= 1.0 for t in self.fractions[:-1])

    def critical(self, alpha: float, sides: int, n: int) -> float:
        """The multiple of the standard error a test at ``alpha`` must clear at this look.

        Group-sequential: the boundary of this look in its schedule (infinite when it cannot
        decide). Confidence sequence: the sequence's half-width at ``n`` units, in standard errors
        (two-sided, or one-sided with the whole ``alpha`` on its side).
        """
        if self.method == "confidence_sequence":
            if n < 2:
                return math.inf
            if sides == 2:
                return stats.cs_halfwidth(1.0, n, self.planned, alpha)
            return stats.cs_halfwidth_one_sided(1.0, n, self.planned, alpha)
        if self.schedule is None or self.index is None or not self.grew:
            return math.inf
        return self.schedule.boundaries(alpha, sides)[0][self.index]

    def spent(self, alpha: float, sides: int) -> float | None:
        """Group-sequential: the error spent through this look by a test at ``alpha``."""
        if self.method != "group_sequential":
            return None
        if self.schedule is None or self.index is None:
            return 0.0
        return self.schedule.boundaries(alpha, sides)[1][self.index]

    def report(self, alpha: float, n: int) -> LookReport:
        """This look as a plain value for the report and the audit run; ``alpha`` and ``n`` are
        the primary metric's (its two-sided boundary is the one shown)."""
        return LookReport(
            method=self.method,
            number=self.number,
            units=self.units,
            planned=self.planned,
            fraction=self.fraction,
            fractions=self.fractions,
            boundary=self.critical(alpha, 2, n),
            alpha_spent=self.spent(alpha, 2),
            final=self.final,
            past_final=self.past_final,
            grew=self.grew,
            notes=self.notes,
        )


@dataclass(frozen=True)
class LookReport:
    """A look as the report, the JSON document and the audit run show it."""

    method: JudgingMethod
    number: int
    units: int
    planned: int
    fraction: float
    fractions: tuple[float, ...]  # the looks' fractions through this one
    boundary: float  # the primary metric's critical value at this look (|z|, standard errors)
    alpha_spent: float | None  # group-sequential: the metric's error spent through this look
    final: bool
    past_final: bool
    grew: bool
    notes: tuple[str, ...] = ()


def _design(
    fractions: Sequence[float],
) -> tuple[list[float], list[bool]]:
    """Looks with information, in order, as non-decreasing fractions; and did each one grow."""
    design: list[float] = []
    grew: list[bool] = []
    for t in fractions:
        if t <= 0.0:
            continue
        previous = design[-1] if design else 0.0
        grew.append(t - previous > SAME_LOOK)
        design.append(max(t, previous))
    return design, grew


def schedule(
    method: JudgingMethod,
    units: Sequence[int],
    planned: int,
    *,
    spending: Spending | None = None,
) -> list[Look]:
    """Every look of one experiment whose judged units per look are known in advance (the
    simulation): one schedule, its boundaries computed once for all looks."""
    fractions = [u / planned for u in units]
    design, grew = _design(fractions)
    shared = _Schedule(design, None, spending or Spending()) if design else None
    looks: list[Look] = []
    index = -1
    for k, u in enumerate(units):
        if u > 0:
            index += 1
            looks.append(Look(method, k + 1, u, planned, index, shared, grew[index]))
        else:
            looks.append(Look(method, k + 1, u, planned))
    return looks


def first_look(method: JudgingMethod, units: int, planned: int) -> Look:
    """A look with no history: the first one."""
    return this_look(method, LookHistory(), units, planned)


def this_look(
    method: JudgingMethod,
    history: LookHistory,
    units: int,
    planned: int,
    *,
    spending: Spending | None = None,
) -> Look:
    """The current look after the recorded ``history`` (see the module docstring's rules)."""
    notes: list[str] = []
    recorded = sorted(history.looks, key=lambda look: (look.number, look.fraction))
    if history.missing:
        notes.append(
            f"no record of look(s) {', '.join(map(str, history.missing))} (deleted audit runs?): "
            "left out of the boundaries' design; the α spent through each recorded look is "
            "unchanged"
        )
    fraction = units / planned
    spent_through: float | None = None
    if history.unrecorded:
        spent_through = min(max(history.unrecorded), fraction)
        notes.append(
            f"{len(history.unrecorded)} earlier run(s) of this experiment recorded no look "
            f"(an older version): assumed to have spent α up to t = {spent_through:.3f}"
        )
    design, grew = _design([look.fraction for look in recorded])
    number = history.next_number
    if units <= 0:
        return Look(method, number, units, planned, notes=tuple(notes))
    previous = design[-1] if design else 0.0
    if fraction - previous <= SAME_LOOK and design:
        notes.append(
            f"no judged unit added since the last recorded look (t = {previous:.4f}): this look "
            "spends nothing and cannot decide"
        )
        design.append(previous)
        grew.append(False)
    else:
        design.append(fraction)
        grew.append(True)
    shared = _Schedule(design, spent_through, spending or Spending())
    return Look(method, number, units, planned, len(design) - 1, shared, grew[-1], tuple(notes))


#: The record of a run that was no look (nothing judged: no rows, mixed modes, an overflow).
NO_LOOK = "none"


def record_params(look: LookReport | None) -> dict[str, str]:
    """The audit run's parameters that put this look on record (None: the run was no look)."""
    if look is None:
        return {PARAM_LOOK: NO_LOOK}
    return {
        PARAM_LOOK: str(look.number),
        PARAM_FRACTION: repr(look.fraction),
        PARAM_UNITS: str(look.units),
        PARAM_METHOD: look.method,
    }


def parse_record(
    params: Mapping[str, str], metrics: Mapping[str, float], planned: int
) -> RecordedLook | float | None:
    """A look from an audit run's parameters; None for a run that was no look; a run without a
    record gives an upper bound on its fraction instead: its judged rows over N* (rows ≥ units),
    else infinity (no bound known)."""
    if params.get(PARAM_LOOK) == NO_LOOK:
        return None
    try:
        number = int(params[PARAM_LOOK])
        units = int(params[PARAM_UNITS])
        fraction = units / planned
    except (KeyError, ValueError):
        rows = [metrics.get(f"{arm}_n") for arm in ("champion", "challenger")]
        if all(r is not None and math.isfinite(r) for r in rows):
            return sum(r for r in rows if r is not None) / planned
        return math.inf
    return RecordedLook(number, fraction, units)
