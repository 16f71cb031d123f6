"""In-process micro-costs (no HTTP): where one single-row request's time can go.

Each cost is timed with ``timeit`` in batches of calls sized to last ``target_s``; the figure is
the median per-call time over ``repeats`` batches (the best one is kept too).
"""

from __future__ import annotations

import gc
import statistics
import time
import timeit
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from bench.baseline_app import predict_body
from bench.micro_path import measure_request_path
from bench.registry import BenchRegistry, split_body

Case = tuple[str, Callable[[], Any], int, str]  # name, call, rows per call, note


@dataclass(frozen=True)
class MicroCost:
    name: str
    median_us: float
    best_us: float
    rows: int = 1  # rows per call: per-row cost is median_us / rows
    note: str = ""

    @property
    def per_row_us(self) -> float:
        return self.median_us / self.rows


def time_call(fn: Callable[[], Any], *, target_s: float, repeats: int) -> tuple[float, float]:
    """``(median, best)`` seconds per call of ``fn``."""
    timer = timeit.Timer(fn)
    number = 1
    while True:  # bounded: ``number`` grows tenfold until one batch lasts ``target_s``
        elapsed = timer.timeit(number)
        if elapsed >= target_s or number >= 1_000_000:
            break
        number *= 10
    per_call = [t / number for t in timer.repeat(repeat=repeats, number=number)]
    return statistics.median(per_call), min(per_call)


def _load(registry: BenchRegistry, alias: str) -> Any:
    import mlflow.pyfunc
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    version = client.get_model_version_by_alias(registry.model_name, alias).version
    source = client.get_model_version_download_uri(registry.model_name, version)
    return mlflow.pyfunc.load_model(source), version


def measure_micro(
    registry: BenchRegistry, *, target_s: float = 0.2, repeats: int = 5
) -> list[MicroCost]:
    """Time the pieces of one request's work against ``registry``'s champion and challenger."""
    from router.input.payload import parse_invocation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's import-time and load-time notices
        models = {alias: _load(registry, alias) for alias in ("champion", "challenger")}
    schema = models["champion"][0].metadata.get_input_schema()
    body = split_body(1).encode()
    parsed = parse_invocation(body, "application/json", schema, 1000)
    frame = parsed.data
    cases: list[Case] = [
        ("orjson.loads of the 1-row body", lambda: orjson.loads(body), 1, ""),
        (
            "router.input.payload.parse_invocation, 1 row",
            lambda: parse_invocation(body, "application/json", schema, 1000),
            1,
            "JSON to checked typed rows, signature checks (no DataFrame)",
        ),
    ]
    frames = {
        n: parse_invocation(split_body(n).encode(), "application/json", schema, 1000).data
        for n in (8, 32)
    }
    for alias, (pyfunc, version) in models.items():
        cases += _model_cases(f"v{version} {alias}", pyfunc, frame, frames)
    champion_sk = models["champion"][0].get_raw_model()
    cases.append(
        (
            "baseline handler work (orjson + DataFrame + predict_proba + dumps), champion",
            lambda: predict_body(champion_sk, body),
            1,
            "what bench/baseline_app.py does per request",
        )
    )
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn, rows, note in cases:
            median, best = time_call(fn, target_s=target_s, repeats=repeats)
            results.append(MicroCost(name, median * 1e6, best * 1e6, rows, note))
        results += [
            MicroCost(name, median, best, 1, note)
            for name, median, best, note in measure_request_path(time_call, target_s, repeats)
        ]
        champion = models["champion"][0]
        results += measure_gc(
            calls=max(100, round(target_s * 10_000)),
            request=lambda: champion.predict(
                parse_invocation(body, "application/json", schema, 10).data
            ),
        )
    return results


def measure_gc(request: Callable[[], Any], calls: int = 2_000) -> list[MicroCost]:
    """What the cyclic collector costs one request, with and without ``gc.freeze()``.

    Counts the full (generation 2) collections ``calls`` requests trigger, and times one full
    collection in this process (MLflow, sklearn, pandas and two models loaded, as in the router)
    before and after freezing what exists: per request, the product of the two.
    """
    full = 0

    def count(phase: str, info: dict[str, int]) -> None:
        nonlocal full
        if phase == "start" and info["generation"] == 2:
            full += 1

    gc.collect()
    gc.callbacks.append(count)
    try:
        for _ in range(calls):
            request()
    finally:
        gc.callbacks.remove(count)
    tracked = len(gc.get_objects())
    thawed = statistics.median(_timed(gc.collect) for _ in range(3))
    gc.freeze()
    try:
        frozen = statistics.median(_timed(gc.collect) for _ in range(3))
    finally:
        gc.unfreeze()
    note = (
        f"{full} full collections in {calls:,} requests ({tracked:,} objects tracked): "
        f"{thawed * full / calls * 1e6:,.1f} µs per request on average, as one pause"
    )
    return [
        MicroCost("gc: one full collection, models loaded", thawed * 1e6, thawed * 1e6, 1, note),
        MicroCost(
            "gc: one full collection after gc.freeze()",
            frozen * 1e6,
            frozen * 1e6,
            1,
            "the router freezes once its models are loaded",
        ),
    ]


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _model_cases(label: str, pyfunc: Any, frame: Any, frames: dict[int, Any]) -> list[Case]:
    """One model's costs: pyfunc against the flavour, preprocessing, batches, output shaping."""
    from router.scoring.flavors import predictor_for
    from router.scoring.outputs import row_facts, to_jsonable

    sk = pyfunc.get_raw_model()
    tag = f"{label} ({type(sk[-1]).__name__})"
    out = pyfunc.predict(frame)
    xt = sk[:-1].transform(frame)
    predictor = predictor_for(pyfunc)
    return [
        (
            f"pyfunc predict, 1 row, {tag}",
            lambda: pyfunc.predict(frame),
            1,
            "schema enforcement + predict_proba",
        ),
        (
            f"router.scoring.flavors predictor, 1 row, {tag}",
            lambda: predictor.predict(frame, None),
            1,
            f"the flavor's estimator (numpy: {predictor.takes_numpy})",
        ),
        (
            f"sklearn predict_proba, 1-row DataFrame, {tag}",
            lambda: sk.predict_proba(frame),
            1,
            "the pipeline, no pyfunc",
        ),
        (
            f"  pipeline preprocessing only, {tag}",
            lambda: sk[:-1].transform(frame),
            1,
            "ColumnTransformer on the DataFrame",
        ),
        (
            f"  final estimator on numpy, {tag}",
            lambda: sk[-1].predict_proba(xt),
            1,
            "sklearn input validation + arithmetic",
        ),
        (
            f"sklearn predict_proba, 8-row DataFrame, {tag}",
            lambda: sk.predict_proba(frames[8]),
            8,
            "what a micro-batch of 8 costs",
        ),
        (
            f"sklearn predict_proba, 32-row DataFrame, {tag}",
            lambda: sk.predict_proba(frames[32]),
            32,
            "",
        ),
        (
            f"router outputs (to_jsonable + row_facts), {tag}",
            lambda: row_facts(out, to_jsonable(out), 1),
            1,
            "per-row facts for log/metrics",
        ),
    ]
