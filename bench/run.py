"""``python -m bench.run [--quick] [--duration S] [--out bench/results.md]``.

Trains the demo models into a temporary MLflow registry, then starts each target one at a time on
127.0.0.1 (the router with a 90/10 split, the router with the champion only, a bare Starlette
baseline, ``mlflow models serve``), loads it from a second process with single-row requests at 1
and 8 connections, stops it, and finally times the request's pieces in-process. Writes the
markdown report to ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench import load as loadgen
from bench.micro import measure_micro
from bench.registry import REPO_ROOT, BenchRegistry, split_body, train_registry
from bench.report import BASELINE, MLFLOW_SERVE, Report, TargetRow, render
from bench.servers import ServerFailed, free_port, running
from bench.targets import (
    ROUTER,
    ROUTER_CHAMPION_ONLY,
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
    "router-champion-only": ROUTER_CHAMPION_ONLY,
    "router-unbatched": ROUTER_UNBATCHED,
    "baseline": BASELINE,
    "mlflow-serve": MLFLOW_SERVE,
}
CONNECTIONS: tuple[int, ...] = (1, 8)
PACKAGES: tuple[str, ...] = (
    "mlflow",
    "scikit-learn",
    "pandas",
    "numpy",
    "starlette",
    "uvicorn",
    "orjson",
)


@dataclass(frozen=True)
class Options:
    duration_s: float
    warmup_s: float
    connections: tuple[int, ...]
    targets: tuple[str, ...]
    generator: str
    train_rows: int
    micro_target_s: float
    micro_repeats: int
    out: Path | None
    keep_work: bool


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="~2 s per measurement, light micro")
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds of discarded warm-up (default 1)")
    parser.add_argument("--connections", default=",".join(map(str, CONNECTIONS)), help="e.g. 1,8")
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of: {', '.join(ALL_TARGETS)}",
    )
    parser.add_argument(
        "--generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="auto: wrk when installed, else the Python generator",
    )
    parser.add_argument("--out", default="bench/results.md", help="'-' to only print")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    ids = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in ids if t not in ALL_TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {list(ALL_TARGETS)}")
    targets = tuple(ALL_TARGETS[t] for t in ids)
    generator = args.generator
    if generator == "auto":
        generator = loadgen.generator_name()
    elif generator == "wrk" and loadgen.wrk_path() is None:
        parser.error("--generator wrk: wrk is not installed (apt-get install -y wrk)")
    return Options(
        duration_s=args.duration or (2.0 if args.quick else 10.0),
        warmup_s=args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0),
        connections=tuple(int(c) for c in args.connections.split(",")),
        targets=targets,
        generator=generator,
        train_rows=3_000 if args.quick else 20_000,
        micro_target_s=0.02 if args.quick else 0.2,
        micro_repeats=3 if args.quick else 5,
        out=None if args.out == "-" else Path(args.out),
        keep_work=args.keep_work,
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
    facts["servers"] = "1 uvicorn worker each, OMP_NUM_THREADS=1"
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


def _build_target(name: str, registry: BenchRegistry, work: Path, port: int) -> Target:
    if name in ROUTERS:
        return router_target(name, registry, work, port)
    if name == BASELINE:
        return baseline_target(name, registry, port)
    return mlflow_serve_target(name, registry, port)


def bench_target(
    name: str, registry: BenchRegistry, work: Path, opts: Options, body: str
) -> list[TargetRow]:
    """Start ``name``, measure it at every concurrency, stop it; failures become table notes."""
    rows: list[TargetRow] = []
    port = free_port()
    target = _build_target(name, registry, work, port)
    try:
        with running(
            name,
            target.cmd,
            port=port,
            ready_path=target.ready_path,
            log_path=work / "logs" / f"{name.replace(' ', '-').replace(',', '')}.log",
            env=target.env,
            cwd=target.cwd,
        ) as server:
            check_answer(server.base_url, body)
            for connections in opts.connections:
                spec = loadgen.LoadSpec(
                    port=port,
                    body=body,
                    connections=connections,
                    duration_s=opts.duration_s,
                    routing_keys=target.routing_keys,
                )
                before = os.getloadavg()[0]
                try:
                    result = loadgen.measure(spec, opts.generator, opts.warmup_s)
                except (RuntimeError, OSError) as exc:
                    rows.append(TargetRow(name, connections, None, before, f"load failed: {exc}"))
                    continue
                note = "routing key per request" if target.routing_keys else ""
                rows.append(TargetRow(name, connections, result, before, note))
            if name in ROUTERS:
                shares = arm_shares(server.base_url)
                rows = [
                    TargetRow(
                        r.target,
                        r.connections,
                        r.result,
                        r.load_before,
                        _join(r.note, f"all runs incl. warm-up: {shares}"),
                    )
                    for r in rows
                ]
    except (ServerFailed, RuntimeError, OSError) as exc:
        reason = f"could not run: {' '.join(str(exc).split())[:300]}"
        done = {r.connections for r in rows}
        rows += [
            TargetRow(name, c, None, os.getloadavg()[0], reason)
            for c in opts.connections
            if c not in done
        ]
    return rows


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
    try:
        log(f"training the demo models into {work / 'registry'} ...")
        registry = train_registry(work / "registry", n_rows=opts.train_rows)
        body = split_body(1)
        for name in opts.targets:
            log(f"benchmarking {name} ...")
            removed = _challenger_removed(registry) if name == ROUTER_CHAMPION_ONLY else None
            with removed or contextlib.nullcontext():
                report.rows += bench_target(name, registry, work, opts, body)
        log("timing in-process micro-costs ...")
        report.micro = measure_micro(
            registry, target_s=opts.micro_target_s, repeats=opts.micro_repeats
        )
    finally:
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
