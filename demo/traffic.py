"""Synthetic live traffic for the demo and the load tests: sticky users, delayed feedback.

Talks only to the router it is given (127.0.0.1 in the demo and tests); every loop is bounded by a
request count and stops by itself.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pandas as pd


@dataclass
class TrafficResult:
    sent: int = 0
    failed: int = 0
    by_arm: dict[str, int] = field(default_factory=dict)
    feedback_sent: int = 0
    feedback_failed: int = 0
    request_ids: list[str] = field(default_factory=list)


async def send_traffic(
    base_url: str,
    features: pd.DataFrame,
    labels: Sequence[Any],
    *,
    n_requests: int,
    n_users: int = 2_000,
    concurrency: int = 8,
    feedback_delay_s: tuple[float, float] = (0.2, 1.5),
    seed: int = 0,
) -> TrafficResult:
    """Send ``n_requests`` single-row requests, then each row's true label after a random delay.

    Users are sticky to an arm through their routing key; each request scores a random row, so
    outcomes are independent draws (a user's requests are different situations).
    """
    rng = random.Random(seed)
    columns = list(features.columns)
    rows = features.to_numpy(dtype=object).tolist()
    result = TrafficResult()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    pending_feedback: list[asyncio.Task[None]] = []

    async def give_feedback(client: httpx.AsyncClient, request_id: str, outcome: Any) -> None:
        await asyncio.sleep(rng.uniform(*feedback_delay_s))
        response = await client.post(
            "/feedback", json={"request_id": request_id, "outcome": outcome}
        )
        if response.status_code == 200:
            result.feedback_sent += 1
        else:
            result.feedback_failed += 1

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            user = rng.randrange(n_users)
            row = rng.randrange(len(rows))
            body = {"dataframe_split": {"columns": columns, "data": [rows[row]]}}
            response = await client.post(
                "/invocations", json=body, headers={"X-Routing-Key": f"user-{user}"}
            )
            if response.status_code != 200:
                result.failed += 1
                continue
            payload = response.json()
            result.sent += 1
            result.by_arm[payload["arm"]] = result.by_arm.get(payload["arm"], 0) + 1
            result.request_ids.append(payload["request_id"])
            outcome = labels[row]
            outcome = outcome.item() if hasattr(outcome, "item") else outcome
            pending_feedback.append(
                asyncio.create_task(give_feedback(client, payload["request_id"], outcome))
            )

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        await asyncio.gather(*pending_feedback)
    return result
