"""A real ``mlflow server`` as a subprocess (SQLite backend, served artifacts, 127.0.0.1), and the
bounded start and clean stop of any such server process.

Each server runs in its own session (process group): ``mlflow server`` starts uvicorn, which
starts its workers, and the stop reaches all of them by the group's id, the pid started here.
Start-up is bounded (the ready path answers 200 within ``START_DEADLINE_S``, else the test fails
with the server's output).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.live_router import wait_until

START_DEADLINE_S = 120.0
STOP_DEADLINE_S = 30.0


def server_args(root: Path, port: int, *, backend_db: Path | None = None) -> list[str]:
    """``mlflow server`` arguments: ``backend_db`` (default ``root/mlflow.db``) as the backend
    store, artifacts served from ``root/mlartifacts``, one worker (the machine is shared)."""
    db = backend_db if backend_db is not None else root / "mlflow.db"
    return [
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


@contextmanager
def server_process(
    command: Sequence[str],
    port: int,
    workdir: Path,
    *,
    ready_path: str,
    env: Mapping[str, str] | None = None,
    name: str = "server",
) -> Iterator[str]:
    """Run ``command`` (a server listening on ``port``) in ``workdir``; yield its URL once
    ``ready_path`` answers 200; stop its whole process group at the end (SIGTERM, then SIGKILL)."""
    output = workdir / f"{name}-{port}.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            list(command),
            cwd=workdir,
            env=dict(os.environ if env is None else env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=5) as client:

            def ready() -> bool:
                if process.poll() is not None:
                    text = output.read_text(encoding="utf-8", errors="replace")[-3000:]
                    raise AssertionError(f"{name} exited with {process.returncode}:\n{text}")
                try:
                    return client.get(ready_path).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, f"{ready_path} of {name} on port {port}", timeout_s=START_DEADLINE_S)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_DEADLINE_S)
        # Children may outlive their parent by a moment; none may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def mlflow_server(root: Path, *, backend_db: Path | None = None) -> Iterator[str]:
    """A real ``mlflow server`` over ``backend_db`` (default: a new ``root/mlflow.db``); yields
    its URL (the tracking and registry URI)."""
    from tests.conftest import free_port

    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = server_args(root, port, backend_db=backend_db)
    command = [sys.executable, "-m", "mlflow", "server", *args]
    # Nothing here uses MLflow's GenAI job runner (seven huey worker processes): off.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with server_process(
        command, port, root, ready_path="/health", env=env, name="mlflow-server"
    ) as url:
        yield url
