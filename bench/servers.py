"""Start one server process at a time on 127.0.0.1, wait until it answers, and always stop it.

Each server runs in its own session (process group) with ``OMP_NUM_THREADS=1``; stopping sends
SIGTERM to the whole group, then SIGKILL after a grace period, so no worker outlives the harness.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0


class ServerFailed(RuntimeError):
    """The server exited or never became ready; the message ends with its log's tail."""


@dataclass(frozen=True)
class RunningServer:
    name: str
    port: int
    pid: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    """An ephemeral port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _log_tail(path: Path, lines: int = 2) -> str:
    """The last lines of a server's log (the exception message, usually)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " / ".join(tail) + f" (log: {path.name})"


@contextlib.contextmanager
def running(
    name: str,
    cmd: Sequence[str],
    *,
    port: int,
    ready_path: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[RunningServer]:
    """Run ``cmd`` (which must listen on ``port``) until the block ends; wait for ``ready_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Output goes to a file, never a pipe nobody reads (a full pipe would stall the server).
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            list(cmd),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=server_env(env),
            cwd=cwd,
            start_new_session=True,
        )
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}{ready_path}", log_path, ready_timeout_s)
        yield RunningServer(name=name, port=port, pid=proc.pid, log_path=log_path)
    finally:
        stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerFailed(
                    f"exited with code {proc.returncode} before ready: {_log_tail(log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.2)
    raise ServerFailed(f"not ready after {timeout_s:.0f} s: {_log_tail(log_path)}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after the grace period."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
    # Workers may linger in the group after the leader exits: the group goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE_S)
