"""The servers under test: how each one is started and how its answer is checked."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.registry import REPO_ROOT, BenchRegistry

ROUTER = "router"
ROUTER_UNBATCHED = "router, no batching"
ROUTER_TWO_WORKERS = "router, 2 workers"
ROUTER_CHAMPION_ONLY = "router, champion only"
ROUTER_POSTGRES = "router, PostgreSQL log"
ROUTERS = (ROUTER, ROUTER_UNBATCHED, ROUTER_TWO_WORKERS, ROUTER_CHAMPION_ONLY, ROUTER_POSTGRES)
CHECKS_IN_A_ROW = 8
_STRIPPED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "ROUTER_CONFIG")
_STRIPPED_PREFIXES = ("ROUTER_", "PROMETHEUS_MULTIPROC_DIR")


@dataclass(frozen=True)
class Target:
    name: str
    cmd: list[str]
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    routing_keys: bool = False
    cwd: Path = REPO_ROOT
    workers: int = 1
    stages_out: Path | None = None  # run under ``bench.stages``: SIGUSR1/SIGUSR2 profile it


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The harness's environment without settings that would redirect a server."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _STRIPPED_ENV and not k.startswith(_STRIPPED_PREFIXES)
    }
    env.update(extra or {})
    return env


def router_config(
    registry: BenchRegistry, path: Path, log_url: str, port: int, batch_max_rows: int | None = None
) -> Path:
    """A config as users write it: SQLite registry, the prediction log at ``log_url``, 90/10."""
    batching = [] if batch_max_rows is None else [f"  batch_max_rows: {batch_max_rows}"]
    path.write_text(
        "\n".join(
            [
                "model:",
                f"  name: {registry.model_name}",
                f"  tracking_uri: {registry.tracking_uri}",
                "routing:",
                "  mode: split",
                "  challenger_weight: 0.1",
                "prediction_log:",
                f"  url: '{log_url}'",
                "server:",
                "  host: 127.0.0.1",
                f"  port: {port}",
                *batching,
                "",
            ]
        ),
        encoding="utf-8",
    )
    return path


def _profiled(cmd_module: list[str], stages_out: Path | None) -> list[str]:
    """``python -m <module> ...``, under the stage sampler when ``stages_out`` is given."""
    if stages_out is None:
        return [sys.executable, "-m", *cmd_module]
    return [sys.executable, "-m", "bench.stages", str(stages_out), "--", "-m", *cmd_module]


def router_target(
    name: str,
    registry: BenchRegistry,
    work: Path,
    port: int,
    stages_out: Path | None = None,
    log_url: str | None = None,
) -> Target:
    """``log_url`` None: a SQLite log in ``work`` (every target but the PostgreSQL one)."""
    slug = f"{registry.model_name}-{name.replace(' ', '-').replace(',', '')}"
    # batch_max_rows 1 turns the micro-batcher off: the same router, scoring each request alone.
    batch_max_rows = 1 if name == ROUTER_UNBATCHED else None
    workers = 2 if name == ROUTER_TWO_WORKERS else 1
    log_url = log_url or f"sqlite:///{work / f'{slug}-log.db'}"
    config = router_config(registry, work / f"{slug}.yaml", log_url, port, batch_max_rows)
    args = ["router", "--config", str(config), "--port", str(port), "--workers", str(workers)]
    return Target(
        name=name,
        cmd=_profiled(args, stages_out if workers == 1 else None),
        ready_path="/readyz",
        env=clean_env(),
        routing_keys=True,
        workers=workers,
        stages_out=stages_out if workers == 1 else None,
    )


def baseline_target(
    name: str, registry: BenchRegistry, port: int, stages_out: Path | None = None
) -> Target:
    args = [
        "bench.baseline_app",
        "--tracking-uri",
        registry.tracking_uri,
        "--model-uri",
        registry.uri_for("champion"),
        "--port",
        str(port),
    ]
    return Target(
        name=name,
        cmd=_profiled(args, stages_out),
        ready_path="/ping",
        env=clean_env(),
        stages_out=stages_out,
    )


def mlflow_serve_target(name: str, registry: BenchRegistry, port: int) -> Target:
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    return Target(
        name=name,
        cmd=[
            str(mlflow_cli),
            "models",
            "serve",
            "-m",
            registry.uri_for("champion"),
            "--env-manager",
            "local",
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
        ],
        ready_path="/ping",
        # It runs ``uvicorn`` by name: the interpreter's bin directory must be on PATH.
        env=clean_env(
            {
                "MLFLOW_TRACKING_URI": registry.tracking_uri,
                "PATH": os.pathsep.join([str(mlflow_cli.parent), os.environ.get("PATH", "")]),
            }
        ),
        cwd=registry.root,
    )


def check_answer(base_url: str, body: str, ready_timeout_s: float = 120.0) -> str:
    """Requests before the load: the target must answer 200 with ``predictions``.

    503 is retried until ``ready_timeout_s``, and ``CHECKS_IN_A_ROW`` answers on new connections
    must succeed: with several workers, the one that answered the readiness probe may not be the
    one whose models are loaded yet.
    """
    deadline = time.monotonic() + ready_timeout_s
    in_a_row = 0
    while in_a_row < CHECKS_IN_A_ROW:
        response = httpx.post(
            f"{base_url}/invocations",
            content=body,
            headers={"Content-Type": "application/json", "X-Routing-Key": "user-0"},
            timeout=30.0,
        )
        if response.status_code == 503 and time.monotonic() < deadline:
            in_a_row = 0
            time.sleep(0.5)
            continue
        if response.status_code != 200 or "predictions" not in orjson.loads(response.content):
            raise RuntimeError(f"bad answer {response.status_code}: {response.text[:300]}")
        in_a_row += 1
    return str(response.json()["predictions"])


def arm_shares(base_url: str) -> str:
    """``router_requests_total`` per arm from the router's own ``/metrics``, as shares."""
    text = httpx.get(f"{base_url}/metrics", timeout=10.0).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "router_requests":
            continue
        for sample in family.samples:
            if sample.name == "router_requests_total" and sample.labels.get("status") == "ok":
                arm = sample.labels["arm"]
                counts[arm] = counts.get(arm, 0.0) + sample.value
    total = sum(counts.values())
    if not total:
        return "no requests metered"
    return ", ".join(f"{arm} {n / total:.1%}" for arm, n in sorted(counts.items()))
