"""End to end: ``python -m router`` as a real process, stopped with SIGTERM under load.

Rows logged == rows served: every row of every 200 answer is in the prediction log after a
graceful shutdown, and nothing else is, on SQLite and on PostgreSQL. With ``--workers 2`` a pooled
client's connections reach both workers and the ``/metrics`` of both worker processes are
aggregated (prometheus_client multiprocess mode).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.conftest import FreshRegistry, MlflowRegistry
from tests.live_router import RouterDir, http_client, query_log, split_body, wait_until
from tests.metrics_text import Scrape
from tests.pg import isolated_schema_url
from tests.router_process import EXIT_DEADLINE_S, RouterProcess, router_process

TOTAL_REQUESTS = 1_500
CONCURRENCY = 16
SIGTERM_AFTER = 500  # answered requests before the signal: mid-stream


@dataclass
class Traffic:
    served: dict[str, int] = field(default_factory=dict)  # request id -> rows answered (200s)
    refused: list[str] = field(default_factory=list)  # transport errors once the server stops
    other: list[tuple[int, str]] = field(default_factory=list)  # non-200 answers


def _bodies(registry: MlflowRegistry) -> list[dict[str, Any]]:
    """Bodies of 1, 2 and 3 rows, cycling through the holdout set."""
    holdout = registry.holdout
    return [split_body(holdout.iloc[i : i + 1 + i % 3]) for i in range(90)]


async def _drive(
    base_url: str,
    bodies: list[dict[str, Any]],
    total: int,
    concurrency: int,
    after_each: Callable[[Traffic], None] | None = None,
) -> Traffic:
    traffic = Traffic()
    pending = iter(range(total))  # shared by the workers: one event loop, no lock needed
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for i in pending:
                request_id = f"req-{i:05d}"
                headers = {"X-Request-Id": request_id, "X-Routing-Key": f"user-{i % 211}"}
                try:
                    response = await client.post(
                        "/invocations", json=bodies[i % len(bodies)], headers=headers
                    )
                except httpx.TransportError as exc:
                    traffic.refused.append(type(exc).__name__)
                    continue
                if response.status_code == 200:
                    payload = response.json()
                    assert payload["request_id"] == request_id
                    traffic.served[request_id] = len(payload["predictions"])
                else:
                    traffic.other.append((response.status_code, response.text[:200]))
                if after_each is not None:
                    after_each(traffic)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return traffic


def _logged_rows(url: str) -> dict[str, int]:
    rows = query_log(url, "SELECT request_id, count(*) FROM predictions GROUP BY request_id")
    return {request_id: int(n) for request_id, n in rows}


def _assert_graceful_exit(router: RouterProcess) -> None:
    """The process finished uvicorn's graceful shutdown, lifespan (log flush) included.

    A single-worker uvicorn re-raises the SIGTERM it handled once it is done, so the status is
    -SIGTERM there (0 with --workers); see test_sigterm_exit_status_is_zero_with_one_worker.
    """
    exit_code = router.process.wait(timeout=EXIT_DEADLINE_S)
    output = router.output_text()
    assert exit_code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete." in output
    assert "prediction log closed: 0 dropped in total" in output


def _sigterm_mid_stream(router: RouterProcess, registry: MlflowRegistry) -> Traffic:
    signalled = False

    def maybe_signal(traffic: Traffic) -> None:
        nonlocal signalled
        if not signalled and len(traffic.served) >= SIGTERM_AFTER:
            router.process.send_signal(signal.SIGTERM)
            signalled = True

    traffic = asyncio.run(
        _drive(router.base_url, _bodies(registry), TOTAL_REQUESTS, CONCURRENCY, maybe_signal)
    )
    assert signalled, (
        len(traffic.served),
        traffic.other[:5],
        traffic.refused[:5],
        router.output_text(),
    )
    _assert_graceful_exit(router)
    # Mid-stream for real: the server stopped answering before the traffic ended.
    assert SIGTERM_AFTER <= len(traffic.served) < TOTAL_REQUESTS
    assert traffic.refused
    assert traffic.other == []
    return traffic


def test_sigterm_under_load_logs_every_served_row_sqlite(
    fresh_registry: FreshRegistry, tmp_path: Path, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    with router_process(registry, tmp_path) as router:
        traffic = _sigterm_mid_stream(router, registry)

    logged = _logged_rows(router_dir.log_url)
    assert sum(logged.values()) == sum(traffic.served.values())
    assert logged == traffic.served
    arms = router_dir.log_rows("SELECT DISTINCT arm FROM predictions")
    assert {arm for (arm,) in arms} == {"champion", "challenger"}


@pytest.mark.postgres
def test_sigterm_under_load_logs_every_served_row_postgres(
    fresh_registry: FreshRegistry, tmp_path: Path, router_dir: RouterDir
) -> None:
    registry = fresh_registry()
    with isolated_schema_url() as url:
        with router_process(registry, tmp_path, log_url=url) as router:
            traffic = _sigterm_mid_stream(router, registry)
        logged = _logged_rows(url)

    assert sum(logged.values()) == sum(traffic.served.values())
    assert logged == traffic.served
    assert not router_dir.log_path.exists()  # the override was used, not the config


def _requests_by_pid(metrics_dir: Path) -> dict[str, float]:
    """``router_requests_total`` per worker process, from its own multiprocess file."""
    totals: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = path.stem.removeprefix("counter_")
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "router_requests_total":  # [family, sample, labels, help]
                totals[pid] = totals.get(pid, 0.0) + value
    return totals


def test_two_workers_share_a_pooled_client_and_aggregate_metrics(
    fresh_registry: FreshRegistry, tmp_path: Path, router_dir: RouterDir
) -> None:
    """A keep-alive client's connections are spread over both workers (one reuse-port socket
    each), every scrape shows the whole count, every row is logged, and files in the metrics
    directory that are not the router's survive its start."""
    registry = fresh_registry()
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    unrelated = metrics_dir / "notes.txt"
    unrelated.write_text("not the router's", encoding="utf-8")
    total = 320
    with router_process(
        registry, tmp_path, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    ) as router:
        # A connection per scrape: each may be accepted by either worker.
        with http_client(router.base_url, keep_alive=False) as client:
            # /readyz answered from one worker; router_ready (livemin over the live workers'
            # files) is 1 once both have their champion.
            wait_until(
                lambda: (
                    len(list(metrics_dir.glob("gauge_livemin_*.db"))) == 2
                    and Scrape.parse(client.get("/metrics").text).total("router_ready") == 1
                ),
                "both workers ready",
            )
            # 16 keep-alive connections, each opened once and reused: a pooled client.
            traffic = asyncio.run(_drive(router.base_url, _bodies(registry), total, 16))
            assert len(traffic.served) == total, (traffic.refused, traffic.other)
            counts = [
                Scrape.parse(client.get("/metrics").text).total("router_requests_total")
                for _ in range(8)
            ]
        by_pid = _requests_by_pid(metrics_dir)

        router.process.send_signal(signal.SIGTERM)
        assert router.process.wait(timeout=EXIT_DEADLINE_S) == 0, router.output_text()
        output = router.output_text()

    # Each worker ran its lifespan shutdown, the log flush included, and says so.
    assert output.count("Application shutdown complete.") == 2
    assert output.count("prediction log closed: 0 dropped in total") == 2
    assert counts == [total] * len(counts)
    assert sum(by_pid.values()) == total
    # Both workers served some of the pooled connections (all 16 on one: a 2 in 65,536 chance).
    assert len([pid for pid, n in by_pid.items() if n > 0]) == 2, by_pid
    logged = _logged_rows(router_dir.log_url)
    assert logged == traffic.served
    assert unrelated.read_text(encoding="utf-8") == "not the router's"


def test_sigterm_exit_status_is_zero_with_one_worker(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry = fresh_registry()
    # A model with no versions: the process serves /healthz at once, no model to load first.
    with router_process(
        registry, tmp_path, model_name="nothing-here", wait_for="/healthz"
    ) as router:
        router.process.send_signal(signal.SIGTERM)
        exit_code = router.process.wait(timeout=EXIT_DEADLINE_S)
        output = router.output_text()

    assert "Application shutdown complete." in output  # graceful, whatever the status says
    assert exit_code == 0
