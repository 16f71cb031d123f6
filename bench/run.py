"""``python -m bench.run [--quick] [--duration S] [--postgres URL] [--out bench/results.md]``.

Trains three registered models into a temporary MLflow registry (the demo's ColumnTransformer
pipelines, a numeric StandardScaler+LogReg pipeline, gradient boosting), then, for each model,
starts each target one at a time on 127.0.0.1 (the router with batching on and off, with two
workers and with its log in PostgreSQL when one answers, a bare Starlette app, ``mlflow models
serve``), loads it from a second process with
single-row requests at 1/8/32/64 connections, reads the server's CPU time per request, profiles
one request's stages, stops it; finally times the request's pieces in-process. Writes the
markdown report (with the targets met or missed) to ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

from bench import load as loadgen
from bench.cpu import group_cpu_s
from bench.micro import measure_micro
from bench.pglog import ENV_VAR, default_url, postgres_reason, postgres_schema
from bench.registry import REPO_ROOT, BenchModel, BenchRegistry, train_models
from bench.report import BASELINE, MLFLOW_SERVE, Report, StageBudget, TargetRow, render
from bench.servers import RunningServer, ServerFailed, free_port, running
from bench.targets import (
    ROUTER,
    ROUTER_CHAMPION_ONLY,
    ROUTER_POSTGRES,
    ROUTER_TWO_WORKERS,
    ROUTER_UNBATCHED,
    ROUTERS,
    Target,
    arm_shares,
    baseline_target,
    check_answer,
    mlflow_serve_target,
    router_target,
)

# Command-line ids of the targets, in the order they run, and their names in the table.
ALL_TARGETS: dict[str, str] = {
    "router": ROUTER,
    "router-unbatched": ROUTER_UNBATCHED,
    "router-2-workers": ROUTER_TWO_WORKERS,
    "router-champion-only": ROUTER_CHAMPION_ONLY,
    "router-postgres": ROUTER_POSTGRES,
    "baseline": BASELINE,
    "mlflow-serve": MLFLOW_SERVE,
}
DEFAULT_TARGETS = (
    "router",
    "router-unbatched",
    "router-2-workers",
    "router-champion-only",
    "router-postgres",
    "baseline",
    "mlflow-serve",
)
MODEL_IDS = ("churn-predictor", "breast-cancer", "breast-cancer-gbm")
CONNECTIONS: tuple[int, ...] = (1, 8, 32, 64)
# The targets compared at fewer concurrencies (the issues' targets need 1 and 32): time.
REDUCED: dict[str, tuple[int, ...]] = {
    ROUTER_TWO_WORKERS: (1, 32),
    ROUTER_CHAMPION_ONLY: (1, 32),
    ROUTER_POSTGRES: (1, 32),
    MLFLOW_SERVE: (1, 32),
}
PROFILED = (ROUTER, BASELINE)
PACKAGES: tuple[str, ...] = (
    "mlflow",
    "scikit-learn",
    "pandas",
    "numpy",
    "starlette",
    "uvicorn",
    "httptools",
    "uvloop",
    "orjson",
)


@dataclass(frozen=True)
class Options:
    duration_s: float
    warmup_s: float
    connections: tuple[int, ...]
    targets: tuple[str, ...]
    models: tuple[str, ...]
    generator: str
    train_rows: int
    profile_s: float
    micro_target_s: float
    micro_repeats: int
    out: Path | None
    keep_work: bool
    postgres: str | None = None  # the base URL of the PostgreSQL log's server


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="~2 s per measurement, 1,32 conns")
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 3)")
    parser.add_argument("--warmup", type=float, help="seconds of discarded warm-up (default 0.5)")
    parser.add_argument("--connections", help="e.g. 1,8,32,64 (the default; --quick: 1,32)")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated subset of: {', '.join(ALL_TARGETS)}",
    )
    parser.add_argument(
        "--models", default=",".join(MODEL_IDS), help=f"subset of: {', '.join(MODEL_IDS)}"
    )
    parser.add_argument("--profile", type=float, help="seconds of stage profiling (0: none)")
    parser.add_argument(
        "--generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="auto: wrk when installed, else the Python generator",
    )
    parser.add_argument("--out", default="bench/results.md", help="'-' to only print")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--postgres",
        default=default_url(),
        help=f"PostgreSQL for the router-postgres target (default ${ENV_VAR}); a schema of its own",
    )
    args = parser.parse_args(argv)
    ids = _csv(args.targets)
    unknown = [t for t in ids if t not in ALL_TARGETS] + [
        m for m in _csv(args.models) if m not in MODEL_IDS
    ]
    if unknown:
        parser.error(f"unknown target(s) or model(s) {unknown}")
    generator = args.generator
    if generator == "auto":
        generator = loadgen.generator_name()
    elif generator == "wrk" and loadgen.wrk_path() is None:
        parser.error("--generator wrk: wrk is not installed (apt-get install -y wrk)")
    connections = args.connections or ("1,32" if args.quick else ",".join(map(str, CONNECTIONS)))
    return Options(
        duration_s=args.duration or (2.0 if args.quick else 3.0),
        warmup_s=args.warmup if args.warmup is not None else 0.5,
        connections=tuple(int(c) for c in _csv(connections)),
        targets=tuple(ALL_TARGETS[t] for t in ids),
        models=tuple(_csv(args.models)),
        generator=generator,
        train_rows=3_000 if args.quick else 5_000,
        profile_s=args.profile if args.profile is not None else (2.0 if args.quick else 4.0),
        micro_target_s=0.02 if args.quick else 0.1,
        micro_repeats=3 if args.quick else 5,
        out=None if args.out == "-" else Path(args.out),
        keep_work=args.keep_work,
        postgres=args.postgres,
    )


def machine_facts(generator: str) -> dict[str, str]:
    facts = {
        "nproc": str(len(os.sched_getaffinity(0))),
        "Python": f"{platform.python_version()} ({platform.machine()}, {platform.system()})",
    }
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            facts[package] = metadata.version(package)
    facts["load generator"] = (
        f"wrk {loadgen.wrk_version()} (1 thread, Lua script)"
        if generator == "wrk"
        else "Python asyncio raw sockets (bench/pyload.py), 1 process"
    )
    stack = [p for p in ("httptools", "uvloop") if importlib.util.find_spec(p) is not None]
    facts["servers"] = (
        "1 uvicorn worker each unless the target says 2, OMP_NUM_THREADS=1; every server (router,"
        " bare app, mlflow serve) on the same uvicorn stack from this environment: "
        + (" + ".join(stack) if stack else "h11 + asyncio")
    )
    return facts


@contextlib.contextmanager
def _challenger_removed(registry: BenchRegistry) -> Iterator[None]:
    """No @challenger alias while the block runs; put back afterwards."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    version = client.get_model_version_by_alias(registry.model_name, "challenger").version
    client.delete_registered_model_alias(registry.model_name, "challenger")
    try:
        yield
    finally:
        client.set_registered_model_alias(registry.model_name, "challenger", version)


def _build_target(
    name: str,
    registry: BenchRegistry,
    work: Path,
    port: int,
    stages_out: Path | None,
    postgres_log: str | None,
) -> Target:
    if name == ROUTER_POSTGRES:
        if postgres_log is None:
            raise ServerFailed(postgres_reason(None) or "no PostgreSQL")
        return router_target(name, registry, work, port, stages_out, log_url=postgres_log)
    if name in ROUTERS:
        return router_target(name, registry, work, port, stages_out)
    if name == BASELINE:
        return baseline_target(name, registry, port, stages_out)
    return mlflow_serve_target(name, registry, port)


def _measure(
    server: RunningServer, spec: loadgen.LoadSpec, generator: str, warmup_s: float
) -> tuple[loadgen.LoadResult, float]:
    """One measurement after a warm-up, and the server's CPU µs per request over it."""
    if warmup_s > 0:
        loadgen.run_load(replace(spec, duration_s=warmup_s), generator)
    cpu_before = group_cpu_s(server.pid)
    result = loadgen.run_load(spec, generator)
    cpu_s = group_cpu_s(server.pid) - cpu_before
    return result, (cpu_s * 1e6 / result.requests if result.requests else float("nan"))


def _profile(
    server: RunningServer, spec: loadgen.LoadSpec, opts: Options, out: Path, model: str
) -> StageBudget:
    """Sample the server's stacks during a 1-connection run (``bench/stages.py``)."""
    os.kill(server.pid, signal.SIGUSR1)
    result, cpu_us = _measure(server, spec, opts.generator, 0.0)
    os.kill(server.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10.0
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    data = json.loads(out.read_text(encoding="utf-8"))
    return StageBudget(model, server.name, cpu_us, result.requests, data["stages"])


def bench_target(
    name: str, model: BenchModel, work: Path, opts: Options, postgres_log: str | None = None
) -> tuple[list[TargetRow], list[StageBudget]]:
    """Start ``name``, measure it at every concurrency, stop it; failures become table notes."""
    registry = model.registry
    rows: list[TargetRow] = []
    budgets: list[StageBudget] = []
    port = free_port()
    slug = f"{registry.model_name}-{name.replace(' ', '-').replace(',', '')}"
    profile = opts.profile_s > 0 and name in PROFILED
    stages_out = work / "stages" / f"{slug}.json" if profile else None
    if stages_out is not None:
        stages_out.parent.mkdir(parents=True, exist_ok=True)
    connections = [c for c in opts.connections if c in REDUCED.get(name, opts.connections)]
    try:
        target = _build_target(name, registry, work, port, stages_out, postgres_log)
        base = loadgen.LoadSpec(
            port=port,
            body=model.body,
            connections=1,
            duration_s=opts.duration_s,
            routing_keys=target.routing_keys,
        )
        with running(
            name,
            target.cmd,
            port=port,
            ready_path=target.ready_path,
            log_path=work / "logs" / f"{slug}.log",
            env=target.env,
            cwd=target.cwd,
        ) as server:
            check_answer(server.base_url, model.body)
            for n in connections:
                before = os.getloadavg()[0]
                try:
                    result, cpu_us = _measure(
                        server, replace(base, connections=n), opts.generator, opts.warmup_s
                    )
                except (RuntimeError, OSError) as exc:
                    rows.append(
                        TargetRow(name, n, None, before, f"load failed: {exc}", registry.model_name)
                    )
                    continue
                note = "routing key per request" if target.routing_keys else ""
                rows.append(TargetRow(name, n, result, before, note, registry.model_name, cpu_us))
            if target.stages_out is not None:
                spec = replace(base, duration_s=opts.profile_s)
                budgets.append(_profile(server, spec, opts, target.stages_out, registry.model_name))
            if name in ROUTERS:
                shares = arm_shares(server.base_url)
                rows = [replace(r, note=_join(r.note, f"arms: {shares}")) for r in rows]
    except (ServerFailed, RuntimeError, OSError, ValueError) as exc:
        reason = f"could not run: {' '.join(str(exc).split())[:300]}"
        done = {r.connections for r in rows}
        rows += [
            TargetRow(name, c, None, os.getloadavg()[0], reason, registry.model_name)
            for c in connections
            if c not in done
        ]
    return rows, budgets


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def run(opts: Options, command: str, log: Callable[[str], None] = print) -> Report:
    report = Report(
        command=command,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        facts=machine_facts(opts.generator),
        load_start=os.getloadavg(),
    )
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    stack = contextlib.ExitStack()
    try:
        postgres_log: str | None = None
        if ROUTER_POSTGRES in opts.targets:
            reason = postgres_reason(opts.postgres)
            if reason is None and opts.postgres is not None:
                postgres_log = stack.enter_context(postgres_schema(opts.postgres))
            else:
                log(f"{ROUTER_POSTGRES}: left out ({reason})")
        log(f"training the models into {work / 'registry'} ...")
        models = [
            m
            for m in train_models(work / "registry", n_rows=opts.train_rows)
            if m.registry.model_name in opts.models
        ]
        report.models = {m.registry.model_name: m.label for m in models}
        for model in models:
            for name in opts.targets:
                log(f"benchmarking {name} on {model.registry.model_name} ...")
                removed = (
                    _challenger_removed(model.registry) if name == ROUTER_CHAMPION_ONLY else None
                )
                with removed or contextlib.nullcontext():
                    rows, budgets = bench_target(name, model, work, opts, postgres_log)
                report.rows += rows
                report.budgets += budgets
        log("timing in-process micro-costs ...")
        demo = BenchRegistry(work / "registry")
        report.micro = measure_micro(demo, target_s=opts.micro_target_s, repeats=opts.micro_repeats)
    finally:
        stack.close()  # the PostgreSQL schema of the run is dropped
        report.load_end = os.getloadavg()
        if opts.keep_work:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # the in-process micro-costs, like the servers
    command = shlex.join(["python", "-m", "bench.run", *argv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's import-time notices
        report = run(opts, command, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    text = render(report)
    print(text)
    if opts.out is not None:
        out = opts.out if opts.out.is_absolute() else Path.cwd() / opts.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if Path.cwd() != REPO_ROOT:
        sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
