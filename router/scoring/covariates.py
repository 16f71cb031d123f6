"""The champion's score for inputs the challenger answered, computed after the response.

The evaluator adjusts the comparison with the champion's prediction as covariate
(``experiments/covariate.py``): every judged row needs the champion's score for its input. On
champion and fallback rows that is the answer served; on challenger rows the champion has not
seen the input, so it scores it here, off the response path, like shadow scoring: the client
already has the challenger's answer, and the challenger's log rows wait (milliseconds) for the
champion's scores before they are written (``champion_score`` in the log).

Bounded: at most ``MAX_IN_FLIGHT`` at once, and only while the champion has an idle scoring thread,
so live champion traffic never queues behind it. Skipped otherwise: the rows are written at once
without it (``champion_score`` NULL) and the skip is counted
(``router_covariate_scorings_total{result="skipped"}``). A champion that cannot score the input
(it fails, or the input does not fit its signature) leaves the rows without it too, counted as
``failed``. The evaluator turns the adjustment off, with the reason, when too many rows lack it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from router.errors import RouterError
from router.input.payload import ParsedInput
from router.metrics import RouterMetrics
from router.scoring.outputs import row_facts, to_jsonable
from router.scoring.scorer import InputFault, ModelFault, ModelScorer

log = logging.getLogger(__name__)

#: Champion scorings for the covariate in flight at once; beyond it they are skipped.
MAX_IN_FLIGHT = 64

#: Writes a request's log rows with the champion's scores (None: without them).
RowWriter = Callable[[Sequence[float | None] | None], None]


class CovariateScoring:
    """Scores the champion on challenger-served inputs in the background (module docstring)."""

    def __init__(self, metrics: RouterMetrics, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()

    def start(
        self,
        champion: ModelScorer,
        champion_input: Callable[[], Awaitable[ParsedInput]],
        write: RowWriter,
    ) -> None:
        """Score ``champion_input()`` with the champion after the response, then ``write`` the
        rows with its scores; write them at once, without, when the champion is busy."""
        bulkhead = champion.bulkhead
        if len(self._tasks) >= self._max_in_flight or bulkhead.busy >= bulkhead.threads:
            self._count("skipped")
            write(None)
            return
        task = asyncio.get_running_loop().create_task(self._score(champion, champion_input, write))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _score(
        self,
        champion: ModelScorer,
        champion_input: Callable[[], Awaitable[ParsedInput]],
        write: RowWriter,
    ) -> None:
        scores: list[float | None] | None = None
        try:
            parsed = await champion_input()
            scored = await champion.score(parsed)
            prediction = scored.prediction
            scores = row_facts(prediction, to_jsonable(prediction), parsed.n_rows).scores
        except (RouterError, InputFault, ModelFault) as exc:
            log.debug("champion v%s could not score a challenger input: %s", champion.version, exc)
        finally:
            # Whatever happened, the request's rows are written: with the scores, or without.
            self._count("failed" if scores is None else "scored")
            write(scores)

    def _count(self, result: str) -> None:
        self._metrics.covariate_scorings.labels(result).inc()

    async def drain(self) -> None:
        """Wait for the scorings in flight (shutdown: every served request gets logged)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
