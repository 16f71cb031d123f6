"""A circuit breaker for the challenger: stop sending it traffic while it keeps failing.

Closed: every request may try the challenger; ``failures`` model faults in a row (errors,
timeouts, invalid outputs) open it. Open: no request tries it (the champion answers, reason
``circuit_open``) until ``cooldown_s`` has passed; then it is half-open: exactly one request
probes the challenger (another one a cool-down later if the first is never judged). A probe that
succeeds closes the breaker; one that fails opens it for another cool-down. A reload that brings a
new challenger version starts with a new breaker, and ``reset`` closes it on an operator's reload.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe (event-loop thread only)."""

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._probing = False
        self._probe_started = 0.0

    def allow(self) -> bool:
        """May this request try the challenger? (An allowed half-open request is the probe.)"""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            assert self.opened_at is not None
            if self._clock() - self.opened_at < self.cooldown_s:
                return False
            self._set(BreakerState.HALF_OPEN)
        now = self._clock()
        if self._probing and now - self._probe_started < self.cooldown_s:
            return False
        # No probe in flight, or one that was never judged (its request went away): probe now.
        self._probing = True
        self._probe_started = now
        return True

    def success(self) -> None:
        self.consecutive_failures = 0
        self._probing = False
        if self.state is not BreakerState.CLOSED:
            self.opened_at = None
            self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        self.consecutive_failures += 1
        probe_failed = self.state is BreakerState.HALF_OPEN
        self._probing = False
        if probe_failed or self.consecutive_failures >= self.failures:
            self.opened_at = self._clock()
            self._set(BreakerState.OPEN)

    def release(self) -> None:
        """A request that was allowed but never judged the challenger (the client's fault)."""
        self._probing = False

    def reset(self) -> None:
        self.consecutive_failures = 0
        self._probing = False
        self.opened_at = None
        self._set(BreakerState.CLOSED)

    def describe(self) -> dict[str, Any]:
        retry_in = None
        if self.state is BreakerState.OPEN and self.opened_at is not None:
            retry_in = max(0.0, self.cooldown_s - (self._clock() - self.opened_at))
        return {
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "failures_to_open": self.failures,
            "cooldown_s": self.cooldown_s,
            "retry_in_s": retry_in,
        }

    def _set(self, state: BreakerState) -> None:
        changed = state is not self.state
        self.state = state
        if changed and self._on_change is not None:
            self._on_change(state)
