"""A SQLite log whose ``-shm`` file becomes unwritable while the router runs (issue 20, item 10).

The start-up check (``database._refuse_unwritable``) only saw the file as it was when a
connection opened. A pooled connection kept its mapping of the ``-shm``; once the file was made
immutable (the same class of fault as a filesystem remounted read-only) and its pages written back,
the writer's next transaction wrote into the mapping and the kernel killed the router with SIGBUS.
Now no SQLite connection outlives a burst of writing, a new one is refused while the file cannot
be written, and the router keeps serving: the writer retries, ``/readyz`` says why, and once the
file is writable again every served row is logged.

A real ``python -m router`` process; another process keeps the database open throughout (as an
evaluator or a second worker would), so that the ``-shm`` file stays in place between batches.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import MlflowRegistry
from tests.live_router import query_log, split_body, wait_until
from tests.router_process import EXIT_DEADLINE_S, router_process

_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM predictions").fetchone()  # maps the -shm, keeps it
print("holding", flush=True)
time.sleep(3600)  # killed with SIGKILL: never closes, so never touches the faulted file
"""


@contextmanager
def _holding_the_database(db: Path) -> Iterator[None]:
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(db)], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
            yield
        finally:
            holder.kill()


@contextmanager
def _immutable(path: Path) -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("making a file unwritable for the router (root) needs chattr, as root")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i failed here: {done.stderr.strip()}")
    try:
        os.sync()  # write the mapped pages back: the next write to them faults
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_shm_file_made_unwritable_at_runtime_is_survived(
    fresh_registry: Callable[[], MlflowRegistry], tmp_path: Path
) -> None:
    registry = fresh_registry()
    db = tmp_path / "predictions.db"
    bodies = [split_body(registry.holdout.iloc[i : i + 1]) for i in range(40)]
    served: list[str] = []
    with (
        router_process(registry, tmp_path) as router,
        httpx.Client(base_url=router.base_url, timeout=30) as client,
    ):

        def send(first: int, last: int) -> None:
            for i in range(first, last):
                response = client.post(
                    "/invocations", json=bodies[i], headers={"X-Request-Id": f"r{i}"}
                )
                assert response.status_code == 200, response.text
                served.append(f"r{i}")

        def logged() -> int:
            return len(query_log(f"sqlite:///{db}", "SELECT DISTINCT request_id FROM predictions"))

        send(0, 20)
        wait_until(lambda: logged() == 20, "the first requests logged")
        with _holding_the_database(db):
            with _immutable(tmp_path / "predictions.db-shm"):
                send(20, 40)  # the writer's next batch meets the unwritable file

                def reported() -> bool:
                    assert router.process.poll() is None, router.output_text()  # -7: SIGBUS
                    state = client.get("/readyz").json()["prediction_log"]
                    return state["healthy"] is False

                wait_until(reported, "/readyz to report the prediction log failing")
                state = client.get("/readyz").json()["prediction_log"]
                assert "predictions.db-shm is not writable" in state["error"]
                assert client.get("/healthz").status_code == 200
            wait_until(lambda: logged() == 40, "the rows written once the file is writable")
        assert router.process.poll() is None, router.output_text()
        router.process.send_signal(signal.SIGTERM)
        router.process.wait(timeout=EXIT_DEADLINE_S)
    assert "prediction log closed: 0 dropped in total" in router.output_text()
    rows = query_log(f"sqlite:///{db}", "SELECT DISTINCT request_id FROM predictions")
    assert sorted(r for (r,) in rows) == sorted(served)
