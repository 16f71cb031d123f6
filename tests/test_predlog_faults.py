"""The prediction log when its database fails: nothing lost silently, never a crash.

PostgreSQL behind a proxy that goes down and comes back; a SQLite directory deleted under the
writer; a ``-shm`` file the process cannot write. Real databases, real files, no mocks.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from router.log.predlog import PredictionLog, PredictionRecord
from tests.live_router import wait_until
from tests.pg import isolated_schema_url
from tests.router_process import clean_env
from tests.tcp_proxy import tcp_proxy


def _records(request_id: str, n: int) -> list[PredictionRecord]:
    return [
        PredictionRecord(
            request_id=request_id,
            row_index=i,
            arm="champion",
            experiment_id="churn:v1",
            model_name="churn",
            model_version="1",
            ts=1_700_000_000.0,
            latency_s=0.001,
            status="ok",
        )
        for i in range(n)
    ]


def _count(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one())
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_outage_is_retried_while_the_queue_has_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Records wait while PostgreSQL is down (formerly dropped after 5 retries, ~3 s); only
    records beyond ``max_pending`` are refused, counted; the rest land when it comes back."""
    with isolated_schema_url() as direct:
        url = sa.make_url(direct)
        with tcp_proxy((url.host or "127.0.0.1", url.port or 5432), start_up=False) as proxy:
            via_proxy = url.set(host="127.0.0.1", port=proxy.port)
            log = PredictionLog(
                via_proxy.render_as_string(hide_password=False),
                max_pending=10,
                retry_backoff_s=0.001,
                flush_interval_s=0.01,
            )
            with caplog.at_level(logging.WARNING, logger="router.log.predlog"):
                log.start()
                log.enqueue(_records("waits", 8))
                wait_until(lambda: "attempt 8," in caplog.text, "eight failed attempts")
                assert (log.dropped, log.pending) == (0, 8)
                assert log.error is not None
                log.enqueue(_records("too-many", 3))  # 11 > max_pending: refused, counted
                assert (log.dropped, log.pending) == (3, 8)
                proxy.up()
                log.flush(timeout=60)
            assert log.error is None
            log.close()
        assert _count(direct) == 8
        assert log.dropped == 3


def test_a_deleted_sqlite_directory_is_counted_and_the_log_reopened(tmp_path: Path) -> None:
    """SQLite writes on into an unlinked file without an error: rows vanished with the drop
    counter at 0. Now the rows written to the lost file are counted, and the log is reopened once
    its directory is back."""
    directory = tmp_path / "logs"
    directory.mkdir()
    url = f"sqlite:///{directory / 'predictions.db'}"
    log = PredictionLog(url, retry_backoff_s=0.01, flush_interval_s=0.01)
    log.start()
    try:
        log.enqueue(_records("first", 5))
        log.flush()
        shutil.rmtree(directory)
        log.enqueue(_records("while-gone", 3))
        wait_until(lambda: log.error is not None, "the writer to notice")
        assert log.dropped == 5  # the rows of the deleted file: gone, and said so
        assert log.pending == 3  # kept, not written into the void
        directory.mkdir()
        log.flush(timeout=60)
        assert log.error is None
    finally:
        log.close()
    assert _count(url) == 3
    assert log.dropped == 5


_SHM_SCENARIO = """
import sys, time
from router.log.predlog import PredictionLog, PredictionRecord
log = PredictionLog(sys.argv[1], retry_backoff_s=0.01, flush_interval_s=0.01)
log.start()
log.enqueue([PredictionRecord("r", 0, "champion", "e", "m", "1", 0.0, 0.0, "ok")])
deadline = time.monotonic() + 60
while log.error is None and time.monotonic() < deadline:
    time.sleep(0.01)
print("ERROR", log.error)
print("PENDING", log.pending)
log.close(timeout=0.5)
print("DROPPED", log.dropped)
"""


def _make_unwritable(path: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("chattr is needed to make a file unwritable for root (e2fsprogs)")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i failed here: {done.stderr.strip()}")


def test_an_unwritable_shm_file_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    """SQLite maps a ``-shm`` it cannot write read-only, where a wal-index it cannot grow ends
    in SIGBUS. The log refuses to open it, says why, retries and counts; the process lives."""
    db = tmp_path / "predictions.db"
    PredictionLog(f"sqlite:///{db}").close()  # nothing written: just a path
    shm = tmp_path / "predictions.db-shm"
    shm.write_bytes(b"")
    if os.geteuid() == 0:
        _make_unwritable(shm)  # root writes any file whatever its mode; not an immutable one
    else:
        shm.chmod(0o444)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SHM_SCENARIO, f"sqlite:///{db}"],
            capture_output=True,
            text=True,
            timeout=120,
            env=clean_env({}),
        )
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(shm)], check=False)
    assert done.returncode == 0, done.stderr[-2000:]  # -7 would be SIGBUS
    assert f"{shm} is not writable" in done.stdout, done.stdout
    assert "PENDING 1" in done.stdout
    assert "DROPPED 1" in done.stdout  # given up on at close: counted, not silent
