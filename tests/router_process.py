"""``python -m router`` as a real process, as users run it: start, wait, inspect, always clean up.

Each router runs in its own session (process group), so cleanup reaches ``--workers`` children and
tests can tell whether any process of that router is still alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

from tests.live_router import RouterDir, wait_until

if TYPE_CHECKING:  # conftest is pytest's to import; a second import would run it twice
    from tests.conftest import MlflowRegistry

REPO_ROOT = Path(__file__).resolve().parent.parent
START_DEADLINE_S = 120.0
EXIT_DEADLINE_S = 60.0


@dataclass
class RouterProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    port: int
    output: Path

    def output_text(self, tail: int | None = 4000) -> str:
        """The process's output so far: its last ``tail`` characters (None: all of it)."""
        text = self.output.read_text(encoding="utf-8", errors="replace")
        return text if tail is None else text[-tail:]


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The test's environment without anything that would point the router elsewhere."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "ROUTER_")) and key != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid`` (Linux ``/proc``)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces; split after its ")".
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


@contextmanager
def router_process(
    registry: MlflowRegistry,
    workdir: Path,
    *,
    log_url: str | None = None,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    model_name: str | None = None,
    model: Mapping[str, Any] | None = None,
    wait_for: str | None = "/readyz",
    port: int | None = None,
    name: str = "router",
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[RouterProcess]:
    """Start ``python -m router`` (on ``port``, else a free one) and wait for ``wait_for`` to
    answer 200 (None: do not wait); kill its whole process group at the end.

    ``log_url`` None: the config's SQLite log in ``workdir``; else ``ROUTER_PREDICTION_LOG_URL``.
    ``model`` entries override the config's ``model`` section, ``sections`` add to any other
    (``{"server": {...}}``); ``name`` names the config and output files, so that several routers
    may share ``workdir``.
    """
    from tests.conftest import free_port

    config = {
        "model": {
            "name": model_name or registry.model_name,
            "tracking_uri": registry.tracking_uri,
            "poll_interval_s": 3600,
            "startup_retry_interval_s": 3600,
            **(model or {}),
        },
        "routing": {"challenger_weight": 0.5},
        "prediction_log": {"url": RouterDir(workdir).log_url},
    }
    for section, values in (sections or {}).items():
        config[section] = {**config.get(section, {}), **values}
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    extra = dict(env or {})
    if log_url is not None:
        extra["ROUTER_PREDICTION_LOG_URL"] = log_url
    port = free_port() if port is None else port
    output = workdir / f"{name}.out"
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
            env=clean_env(extra),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: cleanup reaches --workers children
        )
    router = RouterProcess(process, f"http://127.0.0.1:{port}", port, output)
    try:
        if wait_for is not None:
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
