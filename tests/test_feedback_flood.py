"""A flood of feedback for unknown request ids never holds up scoring (issue 20, item 6).

Before: each re-check of an unknown id waited for a thread of the shared pool, 1,000 concurrent
posts took up to 11 s to be answered (designed: 2 s) and ``/invocations`` slowed meanwhile. Now
feedback runs on threads of its own and at most ``feedback.max_in_flight`` requests are in
progress per worker: the rest are refused at once with 503 and ``Retry-After``. A real
``python -m router`` process; ``python -m bench.feedback_flood`` gives the figures.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import MlflowRegistry
from tests.live_router import split_body
from tests.metrics_text import scrape
from tests.router_process import router_process

POSTS = 1000
MAX_IN_FLIGHT = 16


async def _flood(base_url: str) -> list[tuple[int, str | None, str | None, float]]:
    """POSTS concurrent posts for unknown ids: (status, error code, Retry-After, answered at)."""
    limits = httpx.Limits(max_connections=POSTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def one() -> tuple[int, str | None, str | None, float]:
            body = {"request_id": f"unknown-{uuid.uuid4().hex}", "outcome": 1}
            response = await client.post("/feedback", json=body)
            code = response.json()["error"]["code"] if response.status_code != 200 else None
            return (
                response.status_code,
                code,
                response.headers.get("retry-after"),
                time.monotonic(),
            )

        return await asyncio.gather(*(one() for _ in range(POSTS)))


def test_a_flood_of_unknown_ids_is_refused_quickly_while_scoring_answers(
    fresh_registry: Callable[[], MlflowRegistry], tmp_path: Path
) -> None:
    registry = fresh_registry()
    body = split_body(registry.holdout.head(1))
    feedback = {"max_in_flight": MAX_IN_FLIGHT, "wait_for_prediction_s": 2.0}
    with (
        router_process(registry, tmp_path, sections={"feedback": feedback}) as router,
        httpx.Client(base_url=router.base_url, timeout=120) as client,
    ):
        done = threading.Event()
        scored: list[tuple[int, float]] = []  # (status, answered at)

        def score_meanwhile() -> None:
            with httpx.Client(base_url=router.base_url, timeout=120) as scorer:
                while not done.is_set():
                    answer = scorer.post("/invocations", json=body)
                    scored.append((answer.status_code, time.monotonic()))

        thread = threading.Thread(target=score_meanwhile, name="score-meanwhile")
        started = time.monotonic()
        thread.start()
        try:
            answers = asyncio.run(_flood(router.base_url))
        finally:
            done.set()
            thread.join()
        finished = max(at for *_, at in answers)

        statuses = Counter((status, code) for status, code, _, _ in answers)
        # An unknown id flushes the log once before its 404; on a loaded machine that flush can
        # time out, a 503 saying the log is behind (seen once in 1,000 in CI): also a refusal.
        refusals = {(503, "feedback_busy"), (503, "prediction_log_unavailable")}
        assert set(statuses) <= {(404, "not_found"), *refusals}, statuses
        refused = statuses[(503, "feedback_busy")]
        assert refused > 0, statuses  # beyond the bound: refused, not queued
        assert all(retry == "2" for status, _, retry, _ in answers if status == 503), answers[:5]
        assert scrape(client).total("router_feedback_busy_total") == refused

        # Scoring kept answering while the flood was being answered.
        assert all(status == 200 for status, _ in scored), Counter(s for s, _ in scored)
        assert any(started < at < finished for _, at in scored), "no answer during the flood"

        # And feedback works again for a request that exists.
        served = client.post("/invocations", json=body)
        fed = client.post(
            "/feedback", json={"request_id": served.json()["request_id"], "outcome": 1}
        )
        assert fed.status_code == 200, fed.text
