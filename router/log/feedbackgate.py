"""Feedback's own threads and a bound on feedback in progress, so that it never competes with
scoring.

Behind one call, ``await gate.record(items)``: the store's work (``PredictionLog.record_feedback``:
a lookup, a flush of this replica's writer on a first miss, one transaction) runs on
``FEEDBACK_THREADS`` threads of its own, never in the pool that decodes request bodies. An id not
logged yet may be another replica's prediction whose writer has not flushed: the request waits on
the event loop (no thread held) and looks again every ``poll_s`` until
``feedback.wait_for_prediction_s``, then answers 404. At most ``feedback.max_in_flight`` requests
are in the gate at once (waiting for a thread, being stored, or waiting to look again); one more
is refused at once with 503 and ``Retry-After`` (``FeedbackBusy``), before any work: a flood of
unknown ids costs a bounded number of lookups per second, whatever its size.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio

from router.errors import FeedbackBusy, NotFound
from router.log.feedback import FeedbackItem, FeedbackResult

if TYPE_CHECKING:
    from router.config import MetricName

# Two: feedback is one short transaction per request; more threads would only take more of the
# GIL from scoring under a flood (the waiting room, not the threads, absorbs bursts).
FEEDBACK_THREADS = 2
POLL_S = 0.2  # how often a waiting request looks again for its ids


class FeedbackGate:
    """Runs feedback on its own threads; refuses what is beyond its bound at once."""

    def __init__(
        self,
        record: Callable[..., list[FeedbackResult]],
        *,
        metric: MetricName | None,
        wait_s: float,
        max_in_flight: int,
        poll_s: float = POLL_S,
        on_busy: Callable[[], None] | None = None,
    ) -> None:
        self._record = record
        self._metric = metric
        self._wait_s = wait_s
        self._max_in_flight = max_in_flight
        self._poll_s = poll_s
        self._on_busy = on_busy
        self._limiter = anyio.CapacityLimiter(FEEDBACK_THREADS)
        self.in_flight = 0  # requests in the gate, whatever they are doing

    async def record(self, items: Sequence[FeedbackItem]) -> list[FeedbackResult]:
        """The store's results for ``items``; ``NotFound`` once ids stayed unknown for the wait,
        ``FeedbackBusy`` (503, Retry-After) when ``max_in_flight`` requests are in the gate."""
        if self.in_flight >= self._max_in_flight:
            if self._on_busy is not None:
                self._on_busy()
            raise FeedbackBusy(
                f"{self.in_flight} feedback requests are in progress (feedback.max_in_flight); "
                "retry later",
                retry_after_s=max(1, math.ceil(self._wait_s)),
            )
        self.in_flight += 1
        try:
            return await self._record_until_found(items)
        finally:
            self.in_flight -= 1

    async def _record_until_found(self, items: Sequence[FeedbackItem]) -> list[FeedbackResult]:
        deadline = time.monotonic() + self._wait_s
        flush = True
        while True:
            try:
                return await self._attempt(items, flush=flush)
            except NotFound:
                if time.monotonic() >= deadline:
                    raise
            # This replica's writer was flushed by the first attempt: what is still missing can
            # only come from another replica's, so no flush again.
            flush = False
            await asyncio.sleep(self._poll_s)

    async def _attempt(self, items: Sequence[FeedbackItem], *, flush: bool) -> list[FeedbackResult]:
        call = functools.partial(self._record, items, self._metric, flush=flush)
        return await anyio.to_thread.run_sync(call, limiter=self._limiter)
