"""Arm assignment: the shared table of cases, plus the properties the design relies on."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from router.assignment import BUCKETS, Assignment, assign, bucket_of, threshold_of

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "cases" / "assignment.json").read_text(encoding="utf-8")
)["cases"]

N_KEYS = 100_000
WEIGHTS = [0.01, 0.1, 0.25, 0.5, 0.9]


def _within_sigmas(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def buckets() -> list[int]:
    return [bucket_of("churn-experiment", f"user-{i}") for i in range(N_KEYS)]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_table_of_cases(case: dict[str, Any]) -> None:
    seed = case["rng_seed"]
    rng = random.Random(seed) if seed is not None else random.Random()
    got = assign(case["key"], case["salt"], case["weight"], case["challenger_available"], rng)
    want = case["expected"]
    assert got == Assignment(want["arm"], want["reason"], want["bucket"])


def test_bucket_recipe_is_the_documented_one() -> None:
    # sha256("churn-experiment:user-1") starts 7df98c6bbab4e350 (coreutils sha256sum).
    assert bucket_of("churn-experiment", "user-1") == 0x7DF98C6BBAB4E350 % BUCKETS


def test_sticky_is_deterministic_and_in_range(buckets: list[int]) -> None:
    assert all(0 <= b < BUCKETS for b in buckets[:1000])
    again = [bucket_of("churn-experiment", f"user-{i}") for i in range(1000)]
    assert again == buckets[:1000]
    rng = random.Random(3)
    first = [assign(f"user-{i}", "s", 0.3, True, rng) for i in range(200)]
    assert first == [assign(f"user-{i}", "s", 0.3, True, random.Random()) for i in range(200)]


def test_sticky_does_not_consume_the_rng() -> None:
    rng = random.Random(5)
    assign("user-1", "s", 0.5, True, rng)
    assert rng.random() == random.Random(5).random()


def test_threshold_rounds_half_up() -> None:
    assert threshold_of(0.0) == 0
    assert threshold_of(1.0) == BUCKETS
    assert threshold_of(0.1) == 1000
    assert threshold_of(0.00005) == 1  # Python's round() would give 0 (half to even)
    assert threshold_of(0.1504) == 1504


def test_raising_the_weight_never_moves_a_user_back() -> None:
    keys = [f"user-{i}" for i in range(1_000)]
    grid = [i / 100 for i in range(101)]
    rng = random.Random(0)  # unused by sticky assignment
    for key in keys:
        arms = [assign(key, "churn-experiment", w, True, rng).arm for w in grid]
        first = arms.index("challenger") if "challenger" in arms else len(arms)
        assert arms[:first] == ["champion"] * first
        assert arms[first:] == ["challenger"] * (len(arms) - first)


@pytest.mark.parametrize("weight", WEIGHTS)
def test_sticky_split_matches_weight(buckets: list[int], weight: float) -> None:
    threshold = threshold_of(weight)
    challengers = sum(b < threshold for b in buckets)
    assert _within_sigmas(challengers, N_KEYS, threshold / BUCKETS)


def test_buckets_are_uniform(buckets: list[int]) -> None:
    # 10 deciles of the bucket range, each within 5 sigma of N/10.
    counts = [0] * 10
    for b in buckets:
        counts[b * 10 // BUCKETS] += 1
    assert all(_within_sigmas(c, N_KEYS, 0.1) for c in counts), counts


@pytest.mark.parametrize("weight", WEIGHTS)
def test_random_split_matches_weight(weight: float) -> None:
    rng = random.Random(20240611)
    results = [assign(None, "s", weight, True, rng) for _ in range(N_KEYS)]
    assert {r.reason for r in results} == {"random"}
    assert {r.bucket for r in results} == {None}
    challengers = sum(r.arm == "challenger" for r in results)
    assert _within_sigmas(challengers, N_KEYS, weight)


def test_changing_the_salt_reshuffles() -> None:
    n = 20_000
    keys = [f"user-{i}" for i in range(n)]
    rng = random.Random(0)  # unused by sticky assignment
    a = [assign(k, "salt-a", 0.5, True, rng).arm for k in keys]
    b = [assign(k, "salt-b", 0.5, True, rng).arm for k in keys]
    same = sum(x == y for x, y in zip(a, b, strict=True))
    # Independent halves agree for half of the users, not for (nearly) all of them.
    assert _within_sigmas(same, n, 0.5)


@pytest.mark.parametrize("weight", [-0.1, 1.1, math.nan, math.inf])
def test_weight_outside_unit_interval_is_rejected(weight: float) -> None:
    with pytest.raises(ValueError, match="challenger_weight"):
        assign("k", "s", weight, True, random.Random(0))
