"""The challenger's circuit breaker, on a fake clock: a table of event sequences and states."""

from __future__ import annotations

import itertools

import pytest

from router.scoring.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# Events: "ok" / "fail" (a request allowed, then judged), "skip" (a request not allowed),
# "free" (allowed, then released: the client's fault), "wait" (the cool-down passes).
CASES = [
    ("closed while faults stay below the threshold", "fail fail ok fail fail", "closed"),
    ("opens after 3 faults in a row", "fail fail fail skip skip", "open"),
    ("half-open after the cool-down: one probe only", "fail fail fail wait", "half_open"),
    ("a successful probe closes it", "fail fail fail wait ok ok", "closed"),
    ("a failed probe opens it again", "fail fail fail wait fail skip", "open"),
    ("a released probe lets the next request probe", "fail fail fail wait free ok", "closed"),
    ("client faults never count", "fail fail free free free", "closed"),
]


@pytest.mark.parametrize(("why", "events", "state"), CASES, ids=[c[0] for c in CASES])
def test_breaker_states(why: str, events: str, state: str) -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(3, 10.0, clock=clock, on_change=changes.append)
    for event in events.split():
        if event == "wait":
            clock.now += 10.0
            continue
        allowed = breaker.allow()
        assert allowed == (event != "skip"), (why, event)
        if event == "ok":
            breaker.success()
        elif event == "fail":
            breaker.failure()
        elif event == "free":
            breaker.release()
    if state == "half_open":
        assert breaker.allow()  # the probe
        assert not breaker.allow()  # ...and only one at a time
    assert breaker.state.value == state
    assert all(a is not b for a, b in itertools.pairwise(changes))


def test_a_probe_never_judged_does_not_block_probing_for_good() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 10.0, clock=clock)
    assert breaker.allow()
    breaker.failure()
    clock.now = 10.0
    assert breaker.allow()  # the probe... whose request then went away unjudged
    assert not breaker.allow()
    clock.now = 20.0
    assert breaker.allow()  # a new probe after another cool-down
    breaker.success()
    assert breaker.state is BreakerState.CLOSED


def test_an_open_breaker_says_when_it_probes_again_and_reset_closes_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    assert breaker.allow()
    breaker.failure()
    clock.now = 12.0
    described = breaker.describe()
    assert described["state"] == "open"
    assert described["retry_in_s"] == pytest.approx(18.0)
    breaker.reset()
    assert breaker.describe()["state"] == "closed"
    assert breaker.allow()
