"""In-process micro-costs of the request path around the model: the app's HTTP layer (routing,
middleware, response), the response body, and what the recorder leaves (metrics, log records).

An ASGI call whose ``receive`` and ``send`` never wait finishes in one step of its coroutine, so it
is timed without an event loop: only the app's own work is measured, not a loop's scheduling.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Case = tuple[str, Callable[[], Any], int, str]  # as bench.micro.Case


def _drive(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never waits, to its end (no event loop)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("the ASGI call waited: it cannot be timed without a loop")


def _asgi_get(app: Any, path: str, state: dict[str, Any]) -> Callable[[], None]:
    """One ``GET path`` through ``app``, the response discarded."""
    headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    def call() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": dict(state),
        }
        _drive(app(scope, receive, send))

    return call


def _bare_app() -> Starlette:
    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"alive"}', media_type="application/json")

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"])])


@contextlib.contextmanager
def request_path_cases(work: Path) -> Iterator[list[Case]]:
    """The cases; ``work`` holds the (never started) prediction log's database."""
    from router.config import Settings
    from router.log.predlog import PredictionLog
    from router.logschema import Arm
    from router.metrics import RouterMetrics
    from router.recording import Recorder, RequestFacts
    from router.scoring.outputs import OutputReading
    from router.server.app import JSONResponse, create_app

    metrics = RouterMetrics(CollectorRegistry())
    # Not started: records only queue (what a request pays); close() drops them.
    plog = PredictionLog(f"sqlite:///{work / 'log.db'}", max_pending=10_000_000)
    service = SimpleNamespace(metrics=metrics)
    router_app = create_app(Settings())
    recorder = Recorder("breast-cancer", metrics, plog)
    request = RequestFacts("0f8e6b1c-7a6d-4a47-9d0c-2f3c1f4e5a6b", "ab" * 32, "bc:v1-vs-v2")
    # A model read by the default rules (no declared columns): what the demo models are.
    served_by = SimpleNamespace(
        role="champion", version="1", kind=SimpleNamespace(reading=OutputReading())
    )
    scored = SimpleNamespace(prediction=np.array([[0.1, 0.9]]), latency_s=0.0004)
    content = {
        "predictions": [[0.1, 0.9]],
        "arm": "champion",
        "model_version": "1",
        "request_id": request.request_id,
    }
    headers = {"X-Arm": "champion", "X-Model-Version": "1", "X-Request-Id": request.request_id}

    def answered() -> Any:
        return recorder.answered(
            request,
            arm=Arm.CHAMPION,
            arm_version="1",
            served_by=served_by,  # type: ignore[arg-type]
            scored=scored,  # type: ignore[arg-type]
            n_rows=1,
        )

    cases: list[Case] = [
        (
            "bare Starlette app, GET /healthz (ASGI, in-process)",
            _asgi_get(_bare_app(), "/healthz", {}),
            1,
            "routing + response: the floor of any Starlette app",
        ),
        (
            "router app, GET /healthz (ASGI, in-process)",
            _asgi_get(router_app, "/healthz", {"service": service}),
            1,
            "+ the router's middleware (route timer, security headers) and error handlers",
        ),
        (
            "router JSONResponse of a 1-row answer",
            lambda: JSONResponse(content, headers=headers),
            1,
            "orjson body + headers",
        ),
        (
            "router Recorder.answered, 1 row",
            answered,
            1,
            "outputs, 5 metric children, 1 log record queued",
        ),
    ]
    try:
        yield cases
    finally:
        quiet = logging.getLogger("router.log.predlog")
        quiet.disabled = True  # "records dropped at close": expected here
        try:
            plog.close()
        finally:
            quiet.disabled = False


def measure_request_path(
    time_call: Callable[..., tuple[float, float]], target_s: float, repeats: int
) -> list[tuple[str, float, float, str]]:
    """``(name, median µs, best µs, note)`` per case."""
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-micro-") as work,
        request_path_cases(Path(work)) as cases,
    ):
        for name, fn, _, note in cases:
            median, best = time_call(fn, target_s=target_s, repeats=repeats)
            results.append((name, median * 1e6, best * 1e6, note))
    return results
