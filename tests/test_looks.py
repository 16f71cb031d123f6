"""experiments.looks: the sequence of looks an experiment takes, as the CLI rebuilds it from the
audit trail and as the simulation schedules it (the same boundaries), and the missing-record
rules."""

from __future__ import annotations

import math

import pytest

from experiments import stats
from experiments.looks import (
    LookHistory,
    RecordedLook,
    first_look,
    parse_record,
    record_params,
    schedule,
    this_look,
)
from experiments.sequential import group_sequential_boundaries

N_STAR = 20_000
ALPHA = 0.04


def _history(*units: int) -> LookHistory:
    return LookHistory(tuple(RecordedLook(k + 1, u / N_STAR, u) for k, u in enumerate(units)), ())


def test_the_cli_rebuilds_the_boundaries_the_simulation_schedules() -> None:
    # One code path: a look judged after k recorded looks has the boundary the simulation gives
    # look k + 1 of the same schedule (each boundary depends only on the looks up to it).
    units = [1_500, 4_000, 4_000, 9_000, 14_500, 20_000, 23_000]
    scheduled = schedule("group_sequential", units, N_STAR)
    for k, u in enumerate(units):
        rebuilt = this_look("group_sequential", _history(*units[:k]), u, N_STAR)
        assert rebuilt.number == scheduled[k].number == k + 1
        assert rebuilt.critical(ALPHA, 2, 0) == scheduled[k].critical(ALPHA, 2, 0)
        assert rebuilt.critical(0.005, 1, 0) == scheduled[k].critical(0.005, 1, 0)


def test_boundaries_are_the_spending_functions() -> None:
    units = [4_000, 10_000, 20_000]
    look = this_look("group_sequential", _history(*units[:2]), units[2], N_STAR)
    want = group_sequential_boundaries([u / N_STAR for u in units], ALPHA)
    assert look.critical(ALPHA, 2, 0) == pytest.approx(want.z[-1], abs=1e-12)
    assert look.spent(ALPHA, 2) == pytest.approx(ALPHA)  # t = 1: the final analysis
    assert look.final and not look.past_final


def test_after_the_final_analysis_nothing_is_left() -> None:
    look = this_look("group_sequential", _history(10_000, 21_000), 25_000, N_STAR)
    assert look.past_final and not look.final
    assert math.isinf(look.critical(ALPHA, 2, 0))


def test_a_look_without_new_units_cannot_decide() -> None:
    # The statistic may have moved (rows of known users) with no unit added: spending nothing,
    # this look must not reuse the last boundary.
    look = this_look("group_sequential", _history(5_000, 8_000), 8_000, N_STAR)
    assert not look.grew and math.isinf(look.critical(ALPHA, 2, 0))
    assert any("no judged unit added" in note for note in look.notes)
    fewer = this_look("group_sequential", _history(5_000, 8_000), 7_000, N_STAR)
    assert math.isinf(fewer.critical(ALPHA, 2, 0))
    # The simulation's schedule applies the same rule.
    assert math.isinf(schedule("group_sequential", [5_000, 5_000], N_STAR)[1].critical(ALPHA, 2, 0))


def test_a_deleted_record_is_reported_and_left_out() -> None:
    history = LookHistory((RecordedLook(1, 0.1, 2_000), RecordedLook(3, 0.5, 10_000)), ())
    assert history.missing == (2,)
    look = this_look("group_sequential", history, 12_000, N_STAR)
    assert look.number == 4
    assert look.fractions == (0.1, 0.5, 0.6)
    assert any("look(s) 2" in note for note in look.notes)


def test_runs_without_a_record_spend_up_to_their_bound() -> None:
    # Two runs of an older version (no look record): their fractions are bounded by their judged
    # rows / N*. This look may not spend again what they may have spent.
    history = LookHistory((), (0.3, 0.45))
    look = this_look("group_sequential", history, 10_000, N_STAR)
    assert look.number == 3
    plain = first_look("group_sequential", 10_000, N_STAR)
    assert look.critical(ALPHA, 2, 0) > plain.critical(ALPHA, 2, 0)
    want = group_sequential_boundaries([0.5], ALPHA, spent_through=0.45)
    assert look.critical(ALPHA, 2, 0) == pytest.approx(want.z[-1], abs=1e-12)
    # A bound at or past this look's own fraction leaves it nothing to spend.
    assert math.isinf(
        this_look("group_sequential", LookHistory((), (0.9,)), 10_000, N_STAR).critical(ALPHA, 2, 0)
    )
    # The next recorded look numbers on from them.
    after = LookHistory((RecordedLook(3, 0.5, 10_000),), (0.3, 0.45))
    assert after.next_number == 4 and after.missing == ()


def test_the_confidence_sequence_needs_no_history() -> None:
    look = this_look("confidence_sequence", _history(1_000, 2_000), 5_000, N_STAR)
    assert look.number == 3
    assert look.critical(ALPHA, 2, 5_000) == stats.cs_halfwidth(1.0, 5_000, N_STAR, ALPHA)
    assert look.critical(0.005, 1, 5_000) == stats.cs_halfwidth_one_sided(1.0, 5_000, N_STAR, 0.005)


def test_no_judged_unit_is_no_look_yet() -> None:
    look = first_look("group_sequential", 0, N_STAR)
    assert look.fractions == () and math.isinf(look.critical(ALPHA, 2, 0))


def test_records_round_trip() -> None:
    look = this_look("group_sequential", _history(3_000), 6_000, N_STAR)
    params = record_params(look.report(ALPHA, 6_000))
    assert params == {
        "look": "2",
        "information_fraction": repr(0.3),
        "judged_units": "6000",
        "method": "group_sequential",
    }
    assert parse_record(params, {}, N_STAR) == RecordedLook(2, 0.3, 6_000)
    # N* changed since: the fraction follows today's N*.
    assert parse_record(params, {}, 30_000) == RecordedLook(2, 0.2, 6_000)
    # An older run: its judged rows bound its units.
    old = {"experiment_id": "m:v1-vs-v2"}
    assert parse_record(old, {"champion_n": 900.0, "challenger_n": 100.0}, N_STAR) == 0.05
    assert parse_record(old, {}, N_STAR) == math.inf
    # A run that judged nothing (an empty log) was no look.
    assert record_params(None) == {"look": "none"}
    assert parse_record({**old, "look": "none"}, {}, N_STAR) is None
