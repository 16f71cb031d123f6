"""End to end: ``python -m router`` as a real process, stopped with SIGTERM under load.

Rows logged == rows served: every row of every 200 answer is in the prediction log after a
graceful shutdown, and nothing else is, on SQLite and on PostgreSQL. With ``--workers 2`` the
``/metrics`` of both worker processes are aggregated (prometheus_client multiprocess mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.mmap_dict import MmapedDict

from tests.conftest import MlflowRegistry, free_port
from tests.live_router import http_client, query_log, split_body, wait_until
from tests.metrics_text import Scrape
from tests.pg import isolated_schema_url

REPO_ROOT = Path(__file__).resolve().parent.parent
FreshRegistry = Callable[[], MlflowRegistry]

TOTAL_REQUESTS = 1_500
CONCURRENCY = 16
SIGTERM_AFTER = 500  # answered requests before the signal: mid-stream
START_DEADLINE_S = 120.0
EXIT_DEADLINE_S = 60.0


@dataclass
class RouterProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    output: Path

    def output_text(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")[-4000:]


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The test's environment without anything that would point the router elsewhere."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "ROUTER_")) and key != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@contextmanager
def router_process(
    registry: MlflowRegistry,
    workdir: Path,
    *,
    log_url: str | None = None,
    workers: int = 1,
    env: dict[str, str] | None = None,
    model_name: str | None = None,
    wait_for: str = "/readyz",
) -> Iterator[RouterProcess]:
    """Start ``python -m router`` on a free port and wait for ``wait_for`` to answer 200; kill it
    if it is still running at the end.

    ``log_url`` None: the config's SQLite log in ``workdir``; else ``ROUTER_PREDICTION_LOG_URL``.
    """
    config = {
        "model": {
            "name": model_name or registry.model_name,
            "tracking_uri": registry.tracking_uri,
            "poll_interval_s": 3600,
            "startup_retry_interval_s": 3600,
        },
        "routing": {"challenger_weight": 0.5},
        "prediction_log": {"url": f"sqlite:///{workdir / 'predictions.db'}"},
    }
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    extra = dict(env or {})
    if log_url is not None:
        extra["ROUTER_PREDICTION_LOG_URL"] = log_url
    port = free_port()
    output = workdir / "router.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "router",
                "--config",
                str(config_path),
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--log-level",
                "info",  # the shutdown sequence is read back from the output
            ],
            cwd=workdir,
            env=_clean_env(extra),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: cleanup reaches --workers children
        )
    router = RouterProcess(process, f"http://127.0.0.1:{port}", output)
    try:
        with httpx.Client(base_url=router.base_url, timeout=10) as client:

            def ready() -> bool:
                if process.poll() is not None:
                    raise AssertionError(
                        f"router exited with {process.returncode}:\n{router.output_text()}"
                    )
                try:
                    return client.get(wait_for).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, f"{wait_for} of the router process", timeout_s=START_DEADLINE_S)
        yield router
    finally:
        # A test that failed midway leaves the router (and its workers) running: kill the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


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
    *,
    keep_alive: bool = True,
) -> Traffic:
    traffic = Traffic()
    pending = iter(range(total))  # shared by the workers: one event loop, no lock needed
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency if keep_alive else 0
    )
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
    assert signalled
    _assert_graceful_exit(router)
    # Mid-stream for real: the server stopped answering before the traffic ended.
    assert SIGTERM_AFTER <= len(traffic.served) < TOTAL_REQUESTS
    assert traffic.refused
    assert traffic.other == []
    return traffic


def test_sigterm_under_load_logs_every_served_row_sqlite(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry = fresh_registry()
    with router_process(registry, tmp_path) as router:
        traffic = _sigterm_mid_stream(router, registry)

    logged = _logged_rows(f"sqlite:///{tmp_path / 'predictions.db'}")
    assert sum(logged.values()) == sum(traffic.served.values())
    assert logged == traffic.served
    arms = query_log(
        f"sqlite:///{tmp_path / 'predictions.db'}", "SELECT DISTINCT arm FROM predictions"
    )
    assert {arm for (arm,) in arms} == {"champion", "challenger"}


@pytest.mark.postgres
def test_sigterm_under_load_logs_every_served_row_postgres(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry = fresh_registry()
    with isolated_schema_url() as url:
        with router_process(registry, tmp_path, log_url=url) as router:
            traffic = _sigterm_mid_stream(router, registry)
        logged = _logged_rows(url)

    assert sum(logged.values()) == sum(traffic.served.values())
    assert logged == traffic.served
    assert not (tmp_path / "predictions.db").exists()  # the override was used, not the config


def _requests_by_pid(metrics_dir: Path) -> dict[str, float]:
    """``router_requests_total`` per worker process, from its own multiprocess file."""
    totals: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = path.stem.removeprefix("counter_")
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "router_requests_total":  # [family, sample, labels, help]
                totals[pid] = totals.get(pid, 0.0) + value
    return totals


def test_two_workers_aggregate_metrics_and_log_every_row(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry = fresh_registry()
    metrics_dir = tmp_path / "prometheus"
    total = 300
    with router_process(
        registry, tmp_path, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    ) as router:
        # A connection per request (scrapes included): each may be accepted by either worker.
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
            # No keep-alive for the traffic either: a worker keeps the connections it accepted.
            traffic = asyncio.run(
                _drive(router.base_url, _bodies(registry), total, 8, keep_alive=False)
            )
            assert len(traffic.served) == total, (traffic.refused, traffic.other)
            # Each scrape may land on either worker: every one must show the whole count.
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
    assert len([pid for pid, n in by_pid.items() if n > 0]) == 2, by_pid  # both served
    logged = _logged_rows(f"sqlite:///{tmp_path / 'predictions.db'}")
    assert logged == traffic.served


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
