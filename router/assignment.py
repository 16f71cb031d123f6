"""Arm assignment: a pure, deterministic function of (routing key, salt, weight).

Sticky mode (a routing key is given) hashes the key into one of ``BUCKETS`` fine buckets::

    digest = sha256(utf8(f"{salt}:{key}"))
    bucket = int.from_bytes(digest[:8], "big") % BUCKETS        # unsigned 64-bit, big-endian
    threshold = floor(challenger_weight * BUCKETS + 0.5)        # round half up
    arm = CHALLENGER if bucket < threshold else CHAMPION        # Arm, router/logschema.py

Any language reproduces it from that recipe (``tests/cases/assignment.json`` holds reference
values). The bucket depends only on (salt, key), so every replica, and every restart, puts a user in
the same arm without shared state. Because the challenger takes the *lowest* buckets, raising the
weight only moves users from champion to challenger, never back; changing the salt reshuffles.

Without a key (``None`` or empty) the arm is drawn from the injected ``rng`` by weight, so tests
can seed it. The result says why a request went where it did (``Assignment.reason``).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Literal

from router.logschema import Arm

# Why a request went to its arm (not a logschema.Reason, which says why a row fell back or failed).
AssignmentReason = Literal["sticky", "random", "no_challenger", "weight_zero", "weight_one"]

BUCKETS = 10_000


@dataclass(frozen=True)
class Assignment:
    """Where one request goes and why; ``bucket`` is the sticky bucket when a key was given."""

    arm: Arm  # CHAMPION or CHALLENGER (shadow scoring is not an assignment)
    reason: AssignmentReason
    bucket: int | None


def bucket_of(salt: str, key: str) -> int:
    """The key's stable bucket in ``[0, BUCKETS)``: sha256 of ``"{salt}:{key}"``, first 8 bytes."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def threshold_of(challenger_weight: float) -> int:
    """Buckets below this go to the challenger: ``floor(weight * BUCKETS + 0.5)``."""
    return math.floor(challenger_weight * BUCKETS + 0.5)


def assign(
    routing_key: str | None,
    salt: str,
    challenger_weight: float,
    challenger_available: bool,
    rng: random.Random,
) -> Assignment:
    """Pick the arm for one request.

    Precedence: no challenger loaded → champion (``no_challenger``); weight 0 → champion
    (``weight_zero``); weight 1 → challenger (``weight_one``); a routing key → sticky bucket
    (``sticky``); otherwise a draw from ``rng`` (``random``). ``bucket`` is reported whenever a
    key is given, whatever the reason, so a log line shows where that user would land.
    ``rng`` is consumed only in the ``random`` case.
    """
    if not (0.0 <= challenger_weight <= 1.0):  # also rejects NaN
        raise ValueError(f"challenger_weight must be within [0, 1], got {challenger_weight!r}")
    bucket = bucket_of(salt, routing_key) if routing_key else None
    if not challenger_available:
        return Assignment(Arm.CHAMPION, "no_challenger", bucket)
    if challenger_weight == 0.0:
        return Assignment(Arm.CHAMPION, "weight_zero", bucket)
    if challenger_weight == 1.0:
        return Assignment(Arm.CHALLENGER, "weight_one", bucket)
    if bucket is not None:
        sticky = Arm.CHALLENGER if bucket < threshold_of(challenger_weight) else Arm.CHAMPION
        return Assignment(sticky, "sticky", bucket)
    arm = Arm.CHALLENGER if rng.random() < challenger_weight else Arm.CHAMPION
    return Assignment(arm, "random", None)
