"""``--workers N`` process hygiene and sockets: TCP_NODELAY on accepted connections, workers that
die with their supervisor, a clean restart on the same port, and a metrics directory of which only
the router's own stale files are removed."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from demo.data import FEATURES
from router.metrics import remove_stale_files
from router.server.supervisor import WorkerStart, claim_port, listening_socket
from tests.conftest import FreshRegistry
from tests.live_router import http_client, split_body, wait_until
from tests.metrics_text import Scrape
from tests.pyfunc_models import StaggeredLoadModel, register_pyfunc
from tests.router_process import EXIT_DEADLINE_S, group_members, router_process


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


@contextmanager
def _serving(sock: socket.socket) -> Iterator[uvicorn.Server]:
    config = uvicorn.Config(_hello, lifespan="off", log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the server to start")
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_accepted_connections_have_tcp_nodelay() -> None:
    """A worker's listening socket says it is TCP, so asyncio disables Nagle on every accepted
    connection (without it each keep-alive response waits for the client's delayed ACK)."""
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    with _serving(sock) as server, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(3):  # one keep-alive connection, reused
            assert client.get("/").text == "hello"
        connections = list(server.server_state.connections)
        assert connections
        for connection in connections:
            accepted = connection.transport.get_extra_info("socket")  # type: ignore[attr-defined]
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_port_in_use_is_refused_even_by_reuse_port_sockets() -> None:
    """Another router's (or an orphaned worker's) reuse-port listener makes the probe fail: two
    routers never silently share one port."""
    holder = listening_socket("127.0.0.1", 0)
    port = holder.getsockname()[1]
    with holder, pytest.raises(OSError, match="in use"):
        claim_port("127.0.0.1", port)
    assert claim_port("127.0.0.1", port) == port  # free again once the listener is closed


def test_workers_exit_when_the_supervisor_is_killed_and_a_restart_binds(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry = fresh_registry()
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    with router_process(registry, first_dir, workers=2) as first:
        supervisor = first.process.pid
        workers = [int(p) for p in re.findall(r"worker (\d+) started", first.output_text(None))]
        assert len(workers) == 2 and set(workers) <= set(group_members(supervisor))
        # A worker that dies is replaced (a worker of the router this test started).
        os.kill(workers[0], signal.SIGKILL)
        wait_until(
            lambda: (
                f"worker {workers[0]} died" in first.output_text(None)
                and len(re.findall(r"worker \d+ started", first.output_text(None))) == 3
            ),
            "a replacement worker",
        )
        # The replacement must be serving before the crash, or on a slow machine it is still
        # starting when orphaned and exits without a shutdown line of its own.
        wait_until(
            lambda: first.output_text(None).count("Application startup complete.") >= 3,
            "the replacement worker's start-up",
        )
        with http_client(first.base_url) as client:
            assert client.get("/healthz").status_code == 200
            first.process.send_signal(signal.SIGKILL)  # a crash: no chance to stop the workers
            first.process.wait(timeout=EXIT_DEADLINE_S)
            # Bounded, not timed: the orphans notice and shut down (gracefully, on SIGTERM).
            wait_until(
                lambda: not group_members(supervisor),
                "the orphaned workers to exit",
                timeout_s=EXIT_DEADLINE_S,
            )
        wait_until(
            lambda: first.output_text(None).count("Application shutdown complete.") == 2,
            "both orphaned workers' graceful shutdown lines",
            timeout_s=EXIT_DEADLINE_S,
        )
        port = first.port

    # router_process waits for /readyz 200 from the new router on the same port.
    with (
        router_process(registry, second_dir, workers=2, port=port) as second,
        http_client(second.base_url) as client,
    ):
        assert client.get("/healthz").status_code == 200
        assert second.process.poll() is None


def test_metrics_files_of_past_runs_are_removed_and_nothing_else(tmp_path: Path) -> None:
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = int(ended.stdout)
    alive = os.getppid()  # pytest's parent: another process, running
    names = {
        "stale": [f"counter_{dead}.db", f"gauge_livesum_{dead}.db", f"histogram_{os.getpid()}.db"],
        "kept": [f"counter_{alive}.db", "notes.txt", "counter_x.db", "mine.db"],
    }
    for name in names["stale"] + names["kept"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / f"counter_{dead}.d").mkdir()

    removed = remove_stale_files(tmp_path)

    assert sorted(p.name for p in removed) == sorted(names["stale"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*names["kept"], f"counter_{dead}.d"]
    )


def test_a_fresh_single_worker_start_does_not_add_past_counts(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    """One worker with ``PROMETHEUS_MULTIPROC_DIR`` set (as in the container): the counts of the
    previous run must not be added to the new one's."""
    registry = fresh_registry()
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    body = split_body(registry.holdout.iloc[:1])
    for run, requests in (("first", 5), ("second", 3)):
        with router_process(registry, tmp_path, env=env, name=run) as router:
            with http_client(router.base_url) as client:
                for _ in range(requests):
                    assert client.post("/invocations", json=body).status_code == 200
                total = Scrape.parse(client.get("/metrics").text).total("router_requests_total")
            router.process.send_signal(signal.SIGTERM)
            router.process.wait(timeout=EXIT_DEADLINE_S)
        assert total == requests, run


def test_no_worker_takes_traffic_before_its_champion_is_loaded(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    """``--workers 2`` where the second worker loads its champion seconds after the first: from the
    first 200 on ``/readyz`` on, every probe and prediction (each on a new connection, so spread
    over both workers) is answered by a ready worker; ``/healthz`` answers before that."""
    registry = fresh_registry()
    gate = tmp_path / "gate"
    gate.mkdir()
    register_pyfunc(
        registry.tracking_uri,
        registry.model_name,
        StaggeredLoadModel(str(gate), extra_s=4.0),
        registry.holdout[FEATURES],
        alias="champion",
        include_code=True,
    )
    body = split_body(registry.holdout.iloc[:1])
    with (
        router_process(registry, tmp_path, workers=2, wait_for="/healthz") as router,
        http_client(router.base_url, keep_alive=False) as client,
    ):
        wait_until(lambda: client.get("/readyz").status_code == 200, "the first ready worker")
        # Both workers ready (the second waited extra_s) or not: every answer is a ready one.
        statuses: list[tuple[str, int]] = []
        wait_until(lambda: (gate / "first").exists(), "the staggered load to begin")
        for _ in range(120):
            statuses.append(("/readyz", client.get("/readyz").status_code))
            statuses.append(("/invocations", client.post("/invocations", json=body).status_code))
        assert [s for s in statuses if s[1] != 200] == []
        output = router.output_text(None)
        assert "listens once its champion is loaded" in output


def test_a_stop_before_the_wait_began_ends_a_waiting_worker(tmp_path: Path) -> None:
    # A SIGTERM that reaches uvicorn's handler while the worker is still starting (before its
    # lifespan waits to listen): the wait must see it, though its champion never loads.
    server = uvicorn.Server(uvicorn.Config(_hello))
    before = signal.signal(signal.SIGTERM, server.handle_exit)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert server.should_exit
        start = WorkerStart(tmp_path / "ready", listen_when_ready=True)

        async def wait() -> None:
            # Bounds the test only: without the fix the wait never returns.
            await asyncio.wait_for(start.wait_to_listen(lambda: False), timeout=30)

        asyncio.run(wait())
        assert signal.getsignal(signal.SIGTERM) == server.handle_exit  # uvicorn's, put back
    finally:
        signal.signal(signal.SIGTERM, before)
