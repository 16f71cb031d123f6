"""The HTTP layer: an app factory whose lifespan owns the models, the metrics and the log writer."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from mlflow.version import VERSION as MLFLOW_VERSION
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from router.arms import ModelManager
from router.changes import actor
from router.config import Settings, load_settings
from router.errors import (
    BadRequest,
    PayloadTooLarge,
    RegistryUnavailable,
    RequestTimeout,
    RouterError,
    Unauthorized,
    http_error_body,
)
from router.input.bodies import load_json, media_type
from router.log.feedback import FeedbackItem
from router.log.keyhash import RoutingKeyHasher
from router.log.predlog import PredictionLog
from router.logschema import Arm
from router.metrics import RouterMetrics, render
from router.registry import ModelNotFound, Registry
from router.server.headers import SecurityHeaders, content_security_policy
from router.server.supervisor import WorkerStart
from router.service import RouterService

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
LOG_SYNC_INTERVAL_S = 1.0
# A feedback batch costs a few hundred bytes of memory per outcome value while it is joined to
# the log: both bounds keep one request to a few MB (bench/body_rss.py measures it).
FEEDBACK_MAX_BYTES = 1_048_576
MAX_FEEDBACK_VALUES = 10_000
SECRET_HEAD_START_S = 0.5

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _service(request: Request) -> RouterService:
    service: RouterService = request.state.service
    return service


async def _read_body(request: Request, limit: int) -> bytes:
    """Refuse an oversized body before reading it whole (and before parsing any of it), and a
    body not received within ``limits.body_read_timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise BadRequest("Content-Length is not a number") from exc
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    received = 0
    timeout = _service(request).settings.limits.body_read_timeout_s
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise RequestTimeout(
            f"request body not received within {timeout:g} s (limits.body_read_timeout_s)"
        ) from exc
    return b"".join(chunks)


async def invocations(request: Request) -> Response:
    service = _service(request)
    body = await _read_body(request, service.settings.limits.max_body_bytes)
    result = await service.invoke(
        body,
        request.headers.get("content-type"),
        request.headers.get(service.settings.routing.routing_key_header),
        request.headers.get("x-request-id"),
    )
    content = {
        "predictions": result.predictions,
        "arm": result.arm,
        "model_version": result.model_version,
        "request_id": result.request_id,
    }
    headers = {
        "X-Arm": result.arm,
        "X-Model-Version": result.model_version,
        "X-Request-Id": result.request_id,
    }
    return JSONResponse(content, headers=headers)


def _feedback_items(payload: Any) -> list[FeedbackItem]:
    if not isinstance(payload, dict):
        raise BadRequest(
            'feedback must be a JSON object: {"request_id", "outcome"} or {"outcomes"}'
        )
    if "outcomes" in payload:
        entries = payload["outcomes"]
        if not isinstance(entries, list) or not entries:
            raise BadRequest('"outcomes" must be a non-empty list')
    else:
        entries = [payload]
    # A list outcome holds one value per scored row; each value costs a few hundred bytes while it
    # is joined to the log, so a batch holds at most MAX_FEEDBACK_VALUES of them.
    values = sum(
        len(e["outcome"]) if isinstance(e, dict) and isinstance(e.get("outcome"), list) else 1
        for e in entries
    )
    if values > MAX_FEEDBACK_VALUES:
        raise PayloadTooLarge(
            f"feedback holds {values} outcome values; the limit is {MAX_FEEDBACK_VALUES} per "
            "request (send several batches)"
        )
    items = []
    for i, entry in enumerate(entries):
        where = f"outcomes[{i}]" if "outcomes" in payload else "feedback"
        if not isinstance(entry, dict) or "request_id" not in entry or "outcome" not in entry:
            raise BadRequest(f'{where}: needs "request_id" and "outcome"')
        request_id = entry["request_id"]
        if not isinstance(request_id, str) or not request_id:
            raise BadRequest(f'{where}: "request_id" must be a non-empty string')
        if entry["outcome"] is None:
            raise BadRequest(f'{where}: "outcome" must not be null')
        items.append(FeedbackItem(request_id=request_id, outcome=entry["outcome"]))
    return items


async def feedback(request: Request) -> Response:
    token = _service(request).settings.feedback_token
    if token:  # optional: off unless ROUTER_FEEDBACK_TOKEN is set
        _check_bearer(request, token, "feedback")
    # JSON only: a browser can post text/plain cross-site without a CORS preflight.
    media_type(request.headers.get("content-type"), ("application/json",))
    payload = load_json(await _read_body(request, FEEDBACK_MAX_BYTES))
    results = await _service(request).feedback(_feedback_items(payload))
    accepted = [
        {"request_id": r.request_id, "rows": len(r.rows), "created": r.created} for r in results
    ]
    return JSONResponse({"accepted": accepted})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


async def version(request: Request) -> Response:
    """The installed MLflow version, as ``mlflow models serve`` answers (bare text)."""
    return Response(MLFLOW_VERSION, media_type="application/json")


async def readyz(request: Request) -> Response:
    """200 once the champion is loaded. The prediction log's state is reported, not required: a
    failing log database queues, retries and counts drops, and must not take serving down."""
    service = _service(request)
    arms = service.manager.current
    plog = service.prediction_log
    log_state = {
        "healthy": plog.error is None,
        "error": plog.error,
        "dropped": plog.dropped,
        "routing_key_secret": service.key_hasher.state(),
    }
    if arms is None:
        reason = service.manager.last_error or "champion not loaded yet"
        body = {"status": "not ready", "reason": reason, "prediction_log": log_state}
        return JSONResponse(body, status_code=503)
    body = {
        "status": "ready",
        "champion_version": arms.champion.version,
        "prediction_log": log_state,
    }
    return JSONResponse(body)


async def metrics(request: Request) -> Response:
    service = _service(request)
    log_ = service.prediction_log
    service.metrics.sync_prediction_log(log_.pending, log_.dropped, log_.error is None)
    body, content_type = render(service.metrics.registry)
    return Response(body, media_type=content_type)


def _arm_json(arm: Arm, alias: str, weight: float, loaded: Any) -> dict[str, Any]:
    return {
        "arm": arm.value,
        "alias": alias,
        "version": loaded.version,
        "run_id": loaded.ref.run_id,
        "resolved_via": loaded.ref.resolved_via,
        "weight": weight,
        "loaded_at": loaded.loaded_at,
    }


async def experiment(request: Request) -> Response:
    service = _service(request)
    s = service.settings
    arms = service.manager.current
    body: dict[str, Any] = {
        "model": s.model.name,
        "mode": s.routing.mode,
        "salt": s.routing.salt,
        "routing_key_header": s.routing.routing_key_header,
        "metric": s.experiment.metric,  # what the evaluator judges; the status page shows it
        "ready": arms is not None,
        "experiment_id": arms.experiment_id if arms else None,
        "arms": [],
    }
    if arms is None:
        body["error"] = service.manager.last_error
        return JSONResponse(body)
    weight = service.split.served_weight(arms.challenger is not None)
    body["arms"].append(
        _arm_json(Arm.CHAMPION, s.model.champion_alias, 1.0 - weight, arms.champion)
    )
    if arms.challenger is not None:
        arm = s.routing.challenger_arm
        body["arms"].append(_arm_json(arm, s.model.challenger_alias, weight, arms.challenger))
    else:
        why = arms.challenger_error or f"no @{s.model.challenger_alias} version"
        body["challenger_missing"] = f"{why}: the champion serves all traffic"
    body["split"] = service.split.describe()
    body.update(service.describe())
    return JSONResponse(body)


def _require_admin(request: Request) -> None:
    token = _service(request).settings.admin_token
    if not token:
        raise Unauthorized("admin endpoints are disabled (ROUTER_ADMIN_TOKEN is not set)")
    _check_bearer(request, token, "admin")


def _check_bearer(request: Request, token: str, what: str) -> None:
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized(f"missing or wrong {what} bearer token")


async def admin_reload(request: Request) -> Response:
    _require_admin(request)
    service = _service(request)
    service.scorers.reset_circuit()  # an operator's reload: a tripped challenger's new chance
    try:
        changed = await service.manager.refresh()
    except (RegistryUnavailable, ModelNotFound) as exc:
        raise RegistryUnavailable(f"reload failed, models in service unchanged: {exc}") from exc
    arms = service.manager.current
    return JSONResponse({"changed": changed, "experiment_id": arms.experiment_id if arms else None})


async def admin_weights(request: Request) -> Response:
    """The fleet's split: written to the registry (audited), followed here at once and by every
    other worker and replica on its next poll; the answer says by when."""
    _require_admin(request)
    payload = load_json(await _read_body(request, 4096))
    weight = payload.get("challenger_weight") if isinstance(payload, dict) else None
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise BadRequest('body must be {"challenger_weight": <number in [0, 1]>}')
    service = _service(request)
    host = request.client.host if request.client is not None else "unknown"
    record = await service.set_weight(float(weight), by=f"admin API from {host} ({actor()})")
    poll = service.settings.model.poll_interval_s
    everywhere_by = record.changed_at + poll
    return JSONResponse(
        {
            "challenger_weight": record.challenger_weight,
            "previous": record.previous,
            "experiment_id": record.experiment_id,
            "epoch": record.epoch,
            "source": "registry",
            "audit_run_id": record.run_id,
            "in_force_everywhere_by": everywhere_by,
            "takes_effect": (
                f"now on this process; on every worker and replica within one poll "
                f"(model.poll_interval_s = {poll:g} s), by "
                f"{datetime.fromtimestamp(everywhere_by, UTC).isoformat(timespec='seconds')}"
            ),
        }
    )


async def status_page(request: Request) -> Response:
    page = STATIC_DIR / "status.html"
    if not page.exists():
        return JSONResponse({"see": ["/experiment", "/metrics", "/readyz"]})
    return FileResponse(page, media_type="text/html")


async def _router_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RouterError)
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(
        http_error_body(exc.status_code, code, message), status_code=exc.status_code
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = http_error_body(500, "internal_error", "internal server error")
    return JSONResponse(body, status_code=500)


class RouteTimer:
    """Raw ASGI middleware timing every request by route (cheaper than BaseHTTPMiddleware).

    The histogram comes from the lifespan state Starlette copies into every request's scope.
    """

    def __init__(self, app: ASGIApp, routes: set[str]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        service = scope.get("state", {}).get("service") if scope["type"] == "http" else None
        if service is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            path = scope["path"]
            route = path if path in self.routes else "other"
            service.metrics.observe_request_latency(route, time.perf_counter() - start)


async def _load_then_poll(manager: ModelManager, start: WorkerStart | None) -> None:
    await manager.load_until_ready()
    if start is not None and not start.listen_when_ready:
        start.announce_ready()
    # Everything long-lived exists now (modules, models, the app): move it out of the collector's
    # generations, so the full collections that per-request garbage triggers stop traversing
    # hundreds of thousands of objects (bench/results.md, "gc" in the micro-costs).
    gc.freeze()
    await manager.poll_forever()


def create_app(
    settings: Settings,
    *,
    metrics_registry: CollectorRegistry | None = None,
    start: WorkerStart | None = None,
) -> Starlette:
    """Build the router app; nothing is loaded until its lifespan starts.

    ``start``: a worker under ``--workers N`` (``router/server/supervisor.py``); one whose socket
    listens once ready finishes its start-up only when its champion is loaded.
    """
    routes = [
        Route("/invocations", invocations, methods=["POST"]),
        Route("/feedback", feedback, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        # `mlflow models serve` clients probe /ping and /health and read /version.
        Route("/ping", healthz, methods=["GET"]),
        Route("/health", healthz, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/experiment", experiment, methods=["GET"]),
        Route("/admin/reload", admin_reload, methods=["POST"]),
        Route("/admin/weights", admin_weights, methods=["PUT"]),
        Route("/", status_page, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
        router_metrics = RouterMetrics(registry)
        router_metrics.ready.set(0)
        plog = PredictionLog(
            settings.prediction_log.url,
            batch_size=settings.prediction_log.batch_size,
            flush_interval_s=settings.prediction_log.flush_interval_s,
            max_pending=settings.prediction_log.max_pending,
        )
        plog.start()  # the writer creates the tables in its own thread: nothing here waits
        # Nothing connects to the registry here either: the poller loads in the background.
        manager = ModelManager(
            settings, Registry(settings.model.tracking_uri, settings.model.name), router_metrics
        )
        hasher = RoutingKeyHasher(settings.routing_key_secret, settings.prediction_log.url)
        service = RouterService(settings, manager, plog, router_metrics, key_hasher=hasher)
        poller = asyncio.create_task(_load_then_poll(manager, start), name="alias-poller")
        secret_loader = asyncio.create_task(hasher.load_forever(), name="routing-key-secret")
        # A head start (a local or healthy database answers at once), never a wait on it.
        await asyncio.wait({secret_loader}, timeout=SECRET_HEAD_START_S)
        syncer = asyncio.create_task(_sync_log_metrics(service), name="log-metrics")
        try:
            if start is not None and start.listen_when_ready:
                await start.wait_to_listen(lambda: manager.current is not None)
            yield {"service": service}
        finally:
            poller.cancel()
            syncer.cancel()
            secret_loader.cancel()
            await asyncio.gather(poller, syncer, secret_loader, return_exceptions=True)
            await service.drain()
            await asyncio.to_thread(plog.close)
            log.info("prediction log closed: %d dropped in total", plog.dropped)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            RouterError: _router_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    app.add_middleware(RouteTimer, routes={r.path for r in routes})
    app.add_middleware(SecurityHeaders, csp=content_security_policy(STATIC_DIR / "status.html"))
    return app


async def _sync_log_metrics(service: RouterService) -> None:
    while True:
        await asyncio.sleep(LOG_SYNC_INTERVAL_S)
        plog = service.prediction_log
        service.metrics.sync_prediction_log(plog.pending, plog.dropped, plog.error is None)


def app_from_env() -> Starlette:
    """Factory for ``--workers N``: each worker process reads ``$ROUTER_CONFIG`` itself."""
    return create_app(load_settings(), start=WorkerStart.from_env())
