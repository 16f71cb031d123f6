"""The traffic split: the challenger's share of requests, and the arm each request takes.

One :class:`ChallengerSplit` per process, owned by the service. Its weight starts at
``routing.challenger_weight``; an operator changes it with ``PUT /admin/weights``; the
``router_arm_weight`` gauges always show it (the challenger's share is 0 in shadow mode, where the
champion answers every request). Which arm a request takes is the pure function in
``router/assignment.py``, called with this weight.

The seam: every read of the weight goes through :attr:`ChallengerSplit.weight` (and
:meth:`~ChallengerSplit.assign`), the one write through :meth:`~ChallengerSplit.set`. A weight kept
elsewhere (the registry, shared by every replica) replaces what is behind them, nothing else.
"""

from __future__ import annotations

import random

from router.assignment import Assignment, assign
from router.config import RoutingSettings
from router.errors import InvalidInput
from router.logschema import Arm
from router.metrics import RouterMetrics


class ChallengerSplit:
    """This process's challenger weight, its gauges, and the assignment that reads it."""

    def __init__(
        self, routing: RoutingSettings, metrics: RouterMetrics, rng: random.Random | None = None
    ) -> None:
        self._routing = routing
        self._gauge = metrics.arm_weight
        self._rng = rng or random.Random()
        self._weight = routing.challenger_weight
        self._publish()

    @property
    def weight(self) -> float:
        """The configured challenger weight, in [0, 1] (what ``PUT /admin/weights`` set last)."""
        return self._weight

    def set(self, weight: float) -> None:
        """A new challenger weight for the requests that follow; outside [0, 1] is a 400."""
        if not 0.0 <= weight <= 1.0:
            raise InvalidInput(f"challenger_weight must be within [0, 1], got {weight}")
        self._weight = weight
        self._publish()

    def served_weight(self, challenger_loaded: bool) -> float:
        """The challenger's share of requests now: none in shadow mode or without a challenger."""
        if self._routing.shadow or not challenger_loaded:
            return 0.0
        return self._weight

    def assign(self, routing_key: str | None, challenger_loaded: bool) -> Assignment:
        """The arm for one request (the champion in shadow mode: the challenger answers none)."""
        return assign(
            routing_key,
            self._routing.salt,
            self._weight,
            challenger_loaded and not self._routing.shadow,
            self._rng,
        )

    def _publish(self) -> None:
        # Independent of whether a challenger is loaded: the gauge shows the configured split.
        weight = 0.0 if self._routing.shadow else self._weight
        self._gauge.labels(Arm.CHAMPION.value).set(1.0 - weight)
        self._gauge.labels(Arm.CHALLENGER.value).set(weight)
