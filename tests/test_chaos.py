"""A bounded chaos run against ``python -m router``: traffic with feedback while the prediction
log's PostgreSQL goes away and comes back, the registry goes away and comes back, and the
challenger hangs and then raises.

It asserts zero champion 5xx, zero champion requests over ``CHAMPION_BOUND_S``, and served =
logged + counted drops, and prints the figures. ``make chaos`` runs it for ``CHAOS_DURATION_S``
(60 s); the suite runs it for 12 s.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import FreshRegistry
from tests.live_router import query_log, split_body
from tests.pg import isolated_schema_url
from tests.pyfunc_models import ScriptedModel, register_in
from tests.router_process import EXIT_DEADLINE_S, router_process
from tests.tcp_proxy import TcpProxy, tcp_proxy

DURATION_S = float(os.environ.get("CHAOS_DURATION_S", "12"))
CONCURRENCY = 8
# Stated bound for a champion answer under every fault here: nothing on its path waits for the
# log database, the registry or the challenger (its own threads, its own timeout). Generous for a
# shared 2-core machine.
CHAMPION_BOUND_S = 2.0
CHALLENGER_TIMEOUT_S = 0.5


@dataclass
class Figures:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)  # (arm, status)
    champion_latencies: list[float] = field(default_factory=list)
    served_rows: dict[str, int] = field(default_factory=dict)
    feedback: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    phases: list[str] = field(default_factory=list)

    def champion_over(self, bound: float) -> int:
        return sum(1 for latency in self.champion_latencies if latency > bound)

    def champion_p99(self) -> float:
        ordered = sorted(self.champion_latencies)
        return ordered[int(0.99 * (len(ordered) - 1))] if ordered else float("nan")


@dataclass
class Faults:
    proxy: TcpProxy
    registry_db: Path
    control: Path

    def actions(self) -> list[tuple[float, str, Callable[[], None]]]:
        away = self.registry_db.with_name("registry-away.db")
        steps: list[tuple[float, str, Callable[[], None]]] = [
            (0.10, "log database down", self.proxy.down),
            (0.30, "log database up", self.proxy.up),
            (0.40, "registry away", lambda: os.replace(self.registry_db, away)),
            (0.55, "registry back", lambda: os.replace(away, self.registry_db)),
            (0.60, "challenger hangs", lambda: (self.control / "hang").touch()),
            (0.72, "challenger raises", lambda: (self.control / "raise").touch()),
            (0.74, "challenger stops hanging", lambda: (self.control / "hang").unlink()),
            (0.88, "challenger recovers", lambda: (self.control / "raise").unlink()),
        ]
        return sorted(steps, key=lambda step: step[0])


async def _traffic(base_url: str, bodies: list[dict[str, object]], faults: Faults) -> Figures:
    figures = Figures()
    start = time.monotonic()
    deadline = start + DURATION_S
    counter = iter(range(10**9))

    async def schedule() -> None:
        for at, what, act in faults.actions():
            await asyncio.sleep(max(0.0, start + at * DURATION_S - time.monotonic()))
            act()
            figures.phases.append(f"{time.monotonic() - start:5.1f}s {what}")

    async def worker(client: httpx.AsyncClient) -> None:
        rng = random.Random()
        while time.monotonic() < deadline:
            i = next(counter)
            body = bodies[i % len(bodies)]
            request_id = f"chaos-{i:06d}"
            headers = {"X-Request-Id": request_id, "X-Routing-Key": f"user-{i % 997}"}
            sent = time.monotonic()
            try:
                response = await client.post("/invocations", json=body, headers=headers)
            except httpx.TransportError as exc:
                figures.transport_errors[type(exc).__name__] += 1
                continue
            elapsed = time.monotonic() - sent
            arm = response.headers.get("x-arm", "none")
            figures.statuses[(arm, response.status_code)] += 1
            if arm == "champion":
                figures.champion_latencies.append(elapsed)
            if response.status_code != 200:
                continue
            figures.served_rows[request_id] = len(response.json()["predictions"])
            if rng.random() < 0.5:
                outcome = {"request_id": request_id, "outcome": rng.randint(0, 1)}
                try:
                    figures.feedback[
                        (await client.post("/feedback", json=outcome)).status_code
                    ] += 1
                except httpx.TransportError as exc:
                    figures.transport_errors[f"feedback {type(exc).__name__}"] += 1

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        await asyncio.gather(schedule(), *(worker(client) for _ in range(CONCURRENCY)))
    return figures


@pytest.mark.postgres
def test_chaos(fresh_registry: FreshRegistry, tmp_path: Path) -> None:
    registry = fresh_registry()
    control = tmp_path / "control"
    control.mkdir()
    register_in(registry, ScriptedModel(str(control)), alias="challenger", include_code=True)
    registry_db = registry.db_path.with_name("registry.db")
    registry.db_path.rename(registry_db)
    bodies = [split_body(registry.holdout.iloc[i : i + 1 + i % 3]) for i in range(60)]
    with isolated_schema_url() as direct:
        url = sa.make_url(direct)
        with tcp_proxy((url.host or "127.0.0.1", url.port or 5432)) as proxy:
            via_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
            with router_process(
                registry,
                tmp_path,
                log_url=via_proxy,
                model={
                    "tracking_uri": f"sqlite:///{registry_db}",
                    "poll_interval_s": 1,
                    "startup_retry_interval_s": 1,
                },
                # A connection per registry query: moving the file away is an outage at once.
                env={"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"},
                sections={
                    "server": {"challenger_timeout_s": CHALLENGER_TIMEOUT_S},
                    # The breaker opens on the hung and raising challenger; it probes again soon,
                    # so that the challenger is back before the run ends.
                    "routing": {"breaker_cooldown_s": 1.0},
                },
            ) as router:
                faults = Faults(proxy, registry_db, control)
                figures = asyncio.run(_traffic(router.base_url, bodies, faults))
                router.process.send_signal(signal.SIGTERM)
                router.process.wait(timeout=EXIT_DEADLINE_S)
                output = router.output_text(None)
        logged = query_log(direct, "SELECT DISTINCT request_id, row_index FROM predictions")

    closed = re.search(r"prediction log closed: (\d+) dropped in total", output)
    assert closed, output[-4000:]
    dropped = int(closed.group(1))
    served = {(rid, i) for rid, n in figures.served_rows.items() for i in range(n)}
    logged_rows = {(str(rid), int(i)) for rid, i in logged}
    champion_5xx = sum(n for (arm, code), n in figures.statuses.items() if code >= 500)
    print(
        f"\nchaos run: {DURATION_S:g}s, {CONCURRENCY} connections, faults:",
        *figures.phases,
        f"answers by (arm, status): {dict(figures.statuses)}",
        f"transport errors: {dict(figures.transport_errors)}",
        f"feedback statuses: {dict(figures.feedback)}",
        f"champion answers: {len(figures.champion_latencies)}, p99 {figures.champion_p99():.3f}s,"
        f" max {max(figures.champion_latencies, default=0):.3f}s,"
        f" over {CHAMPION_BOUND_S}s: {figures.champion_over(CHAMPION_BOUND_S)}",
        f"rows served {len(served)}, logged {len(logged_rows & served)}, dropped {dropped},"
        f" logged but not served {len(logged_rows - served)}",
        sep="\n  ",
    )
    assert figures.phases and len(figures.phases) == len(faults.actions())
    # The faults were real: the router saw each of them.
    assert "write failed" in output  # the log database
    assert "reload failed" in output  # the registry
    assert ("champion", 200) in figures.statuses and "challenger v" in output  # the challenger
    assert champion_5xx == 0, figures.statuses
    assert not figures.transport_errors, figures.transport_errors
    assert figures.champion_over(CHAMPION_BOUND_S) == 0
    assert ("challenger", 200) in figures.statuses  # the challenger served between faults
    # served = logged + counted drops (the queue had room: nothing was dropped)
    assert len(served - logged_rows) == dropped == 0
    assert logged_rows <= served
