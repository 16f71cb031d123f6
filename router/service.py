"""The transport-free core: pick the arm, predict, fall back, meter and record.

The HTTP layer (``router/app.py``) only parses headers and shapes responses around this.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import pandas as pd

from router.arms import ArmSet, ModelManager
from router.assignment import assign
from router.batcher import BatchScore, MicroBatcher
from router.config import Settings
from router.errors import BadRequest, InvalidInput, NotReady, PredictionFailed
from router.feedback import FeedbackItem, FeedbackResult
from router.logschema import hash_routing_key
from router.metrics import RouterMetrics
from router.models import LoadedModel
from router.outputs import RowFacts, row_facts, to_jsonable
from router.payload import ParsedInput, parse_invocation
from router.predlog import PredictionLog, PredictionRecord

log = logging.getLogger(__name__)

MAX_REQUEST_ID_LENGTH = 128
# Shadow scoring runs after the response; beyond this many in flight it is skipped (and counted)
# so a slow challenger can never build an unbounded backlog behind live traffic.
MAX_SHADOW_IN_FLIGHT = 64


@dataclass(frozen=True)
class Invocation:
    predictions: Any
    arm: str
    model_version: str
    request_id: str


@dataclass(frozen=True)
class _Call:
    """One request as it moves through the core: who asked, which models, what input."""

    arms: ArmSet
    request_id: str
    key_hash: str | None
    body: bytes
    content_type: str | None
    parsed: ParsedInput | None = None

    def parsed_with(self, parsed: ParsedInput) -> _Call:
        return dataclasses.replace(self, parsed=parsed, body=b"")

    @property
    def input(self) -> ParsedInput:
        assert self.parsed is not None, "parsed before scoring"
        return self.parsed


@dataclass(frozen=True)
class _Scored:
    prediction: Any
    latency_s: float


class RouterService:
    """Serves one registered model's champion and challenger; owned by the app's lifespan."""

    def __init__(
        self,
        settings: Settings,
        manager: ModelManager,
        prediction_log: PredictionLog,
        metrics: RouterMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.prediction_log = prediction_log
        self.metrics = metrics
        self.challenger_weight = settings.routing.challenger_weight
        self._rng = rng or random.Random()
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._shadow_limiter = anyio.CapacityLimiter(1)
        self._score_limiter = anyio.CapacityLimiter(settings.server.predict_threads)
        # One micro-batcher per loaded model, keyed by id (the model is kept alive beside it).
        self._batchers: dict[int, tuple[LoadedModel, MicroBatcher]] = {}
        self.publish_weights()

    # -- weights --------------------------------------------------------------------------------
    def set_challenger_weight(self, weight: float) -> None:
        if not 0.0 <= weight <= 1.0:
            raise InvalidInput(f"challenger_weight must be within [0, 1], got {weight}")
        self.challenger_weight = weight
        self.publish_weights()

    def publish_weights(self) -> None:
        weight = 0.0 if self.settings.routing.mode == "shadow" else self.challenger_weight
        self.metrics.arm_weight.labels("champion").set(1.0 - weight)
        self.metrics.arm_weight.labels("challenger").set(weight)

    # -- predictions ----------------------------------------------------------------------------
    def _arms(self) -> ArmSet:
        arms = self.manager.current
        if arms is None:
            raise NotReady("no champion model is loaded yet")
        return arms

    async def invoke(
        self,
        body: bytes,
        content_type: str | None,
        routing_key: str | None,
        request_id: str | None,
    ) -> Invocation:
        arms = self._arms()
        request_id = _check_request_id(request_id)
        shadow = self.settings.routing.mode == "shadow"
        assignment = assign(
            routing_key,
            self.settings.routing.salt,
            self.challenger_weight,
            arms.challenger is not None and not shadow,
            self._rng,
        )
        key_hash = (
            hash_routing_key(self.settings.routing.salt, routing_key) if routing_key else None
        )
        call = _Call(arms, request_id, key_hash, body, content_type)
        arm = assignment.arm
        batcher = self._batcher(_model_of(arms, arm))
        if batcher is None:
            call, invocation = await self._score_in_thread(call, arm)
        else:
            # A lone request is scored as without batching (one worker-thread hop, no wait);
            # under concurrency the parse stays in the worker thread and the model is shared.
            lone = batcher.active == 0
            batcher.active += 1
            try:
                if lone:
                    call, invocation = await self._score_in_thread(call, arm)
                else:
                    call, invocation = await self._score_batched(call, arm, batcher)
            finally:
                batcher.active -= 1
        if shadow and arms.challenger is not None:
            self._start_shadow(call, arms.challenger)
        return invocation

    async def _score_in_thread(self, call: _Call, arm: str) -> tuple[_Call, Invocation]:
        result: tuple[_Call, Invocation] = await anyio.to_thread.run_sync(
            self._score_and_record, call, arm, limiter=self._score_limiter
        )
        return result

    def _parse(self, call: _Call) -> _Call:
        rules = self.settings.validation
        return call.parsed_with(
            parse_invocation(
                call.body,
                call.content_type,
                call.arms.champion.input_schema,
                self.settings.limits.max_rows,
                extra_columns=rules.extra_columns,
                casting=rules.casting,
                non_finite=rules.non_finite,
                params_schema=call.arms.champion.params_schema,
            )
        )

    def _score_and_record(self, call: _Call, arm: str) -> tuple[_Call, Invocation]:
        """Runs in a worker thread: parsing, predicting and recording never block the loop."""
        return self._score_parsed(self._parse(call), arm)

    def _score_parsed(self, call: _Call, arm: str) -> tuple[_Call, Invocation]:
        """One request scored alone (worker thread): predict, fall back, record."""
        arms = call.arms
        model = _model_of(arms, arm)
        try:
            scored = _predict(model, call.input)
        except Exception as exc:  # a model may raise anything: judged and re-raised below
            self._record_failure(call, arm, model)
            if arm == "champion":
                raise _champion_error(call.input, model, exc) from exc
            log.warning("challenger v%s failed, champion answers: %s", model.version, exc)
            self.metrics.fallback.labels("challenger_error").inc()
            arm, model = "champion", arms.champion
            try:
                scored = _predict(model, call.input)
            except Exception as champion_exc:  # see above
                self._record_failure(call, arm, model)
                raise _champion_error(call.input, model, champion_exc) from champion_exc
            status = "fallback"
        else:
            status = "ok"
        jsonable = self._record(call, arm, model, scored, status)
        return call, Invocation(jsonable, arm, model.version, call.request_id)

    # -- micro-batching -------------------------------------------------------------------------
    def _batcher(self, model: LoadedModel) -> MicroBatcher | None:
        """The model's batcher, or None when batching is off or the model is unbatchable."""
        server = self.settings.server
        if server.batch_max_rows <= 1:
            return None
        entry = self._batchers.get(id(model))
        if entry is None:
            batcher = MicroBatcher(
                lambda frame: _model_output(model, frame),
                max_rows=server.batch_max_rows,
                wait_s=server.batch_wait_ms / 1000.0,
                run=self._run_scoring,
                on_batch=self.metrics.batch_rows.labels(model.version).observe,
                name=f"v{model.version}",
            )
            batcher.batchable = _is_batchable_model(model)
            self._prune_batchers()
            entry = self._batchers[id(model)] = (model, batcher)
        batcher = entry[1]
        return batcher if batcher.batchable else None

    def _prune_batchers(self) -> None:
        """Forget the batchers of models no longer in service (a reload swapped them out)."""
        arms = self.manager.current
        live = {id(arms.champion), id(arms.challenger)} if arms else set()
        for key in [key for key in self._batchers if key not in live]:
            del self._batchers[key]

    async def _run_scoring(self, fn: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, limiter=self._score_limiter)

    def _parse_for_batch(self, call: _Call, arm: str) -> tuple[_Call, Invocation | None]:
        """Worker thread: parse; a request the batcher cannot take is scored alone right here."""
        call = self._parse(call)
        parsed = call.input
        if (
            isinstance(parsed.data, pd.DataFrame)
            and not parsed.params
            and parsed.n_rows < self.settings.server.batch_max_rows
        ):
            return call, None
        return self._score_parsed(call, arm)

    async def _score_batched(
        self, call: _Call, arm: str, batcher: MicroBatcher
    ) -> tuple[_Call, Invocation]:
        """Parse in a worker thread, then share a model call with concurrent requests.

        Fallback, metrics and log rows are exactly those of :meth:`_score_parsed`; the predict
        latency each request records is the duration of the model call it shared.
        """
        batcher.expect()
        submitted = False
        try:
            call, done = await anyio.to_thread.run_sync(
                self._parse_for_batch, call, arm, limiter=self._score_limiter
            )
            if done is not None:
                return call, done
            frame = call.input.data
            assert isinstance(frame, pd.DataFrame)
            submitted = True
            model = _model_of(call.arms, arm)
            try:
                share: BatchScore = await batcher.submit(frame, expected=True)
            except Exception:  # noqa: BLE001 - the request's own fault (the batcher isolated it)
                # Score it alone on the ordinary path: the same fallback, metrics and log rows,
                # for the price of one more failing predict on a path that is already failing.
                return await anyio.to_thread.run_sync(
                    self._score_parsed, call, arm, limiter=self._score_limiter
                )
            scored = _Scored(share.prediction, share.latency_s)
            jsonable = self._record(call, arm, model, scored, "ok")
            return call, Invocation(jsonable, arm, model.version, call.request_id)
        finally:
            if not submitted:
                batcher.withdraw()

    def _record(
        self, call: _Call, arm: str, model: LoadedModel, scored: _Scored, status: str
    ) -> Any:
        """Meter and log one arm's answer; returns the JSON-able predictions."""
        jsonable = to_jsonable(scored.prediction)
        facts = row_facts(scored.prediction, jsonable, call.input.n_rows)
        version = model.version
        m = self.metrics
        m.requests.labels(arm, version, status).inc()
        m.predict_latency.labels(arm, version).observe(scored.latency_s)
        m.observe_scores(arm, version, (s for s in facts.scores if s is not None))
        m.count_classes(arm, version, facts.classes)
        self._enqueue(call, arm, version, status, scored.latency_s, facts)
        return jsonable

    def _record_failure(self, call: _Call, arm: str, model: LoadedModel) -> None:
        """A failed arm's rows stay in the log: the error-rate guardrail counts them."""
        self.metrics.requests.labels(arm, model.version, "error").inc()
        self._enqueue(call, arm, model.version, "error", 0.0, None)

    def _enqueue(
        self,
        call: _Call,
        arm: str,
        version: str,
        status: str,
        latency_s: float,
        facts: RowFacts | None,
    ) -> None:
        now = time.time()
        self.prediction_log.enqueue(
            [
                PredictionRecord(
                    request_id=call.request_id,
                    row_index=i,
                    arm=arm,
                    experiment_id=call.arms.experiment_id,
                    model_name=self.settings.model.name,
                    model_version=version,
                    ts=now,
                    latency_s=latency_s,
                    status=status,
                    routing_key_hash=call.key_hash,
                    score=facts.scores[i] if facts else None,
                    predicted_class=facts.classes[i] if facts else None,
                    output=facts.outputs[i] if facts else None,
                )
                for i in range(call.input.n_rows)
            ]
        )

    # -- shadow ---------------------------------------------------------------------------------
    def _start_shadow(self, call: _Call, model: LoadedModel) -> None:
        if len(self._shadow_tasks) >= MAX_SHADOW_IN_FLIGHT:
            self.metrics.requests.labels("shadow", model.version, "skipped").inc()
            return
        scoring = anyio.to_thread.run_sync(
            self._shadow_score, call, model, limiter=self._shadow_limiter
        )
        task = asyncio.get_running_loop().create_task(scoring)
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    def _shadow_score(self, call: _Call, model: LoadedModel) -> None:
        try:
            scored = _predict(model, call.input)
        except Exception as exc:  # noqa: BLE001 - a shadow fault never reaches clients: counted, logged, recorded
            log.warning("shadow v%s failed: %s", model.version, exc)
            self.metrics.fallback.labels("shadow_error").inc()
            self._record_failure(call, "shadow", model)
            return
        self._record(call, "shadow", model, scored, "ok")

    async def drain(self) -> None:
        """Wait for shadow scoring still in flight (shutdown: everything served gets logged)."""
        while self._shadow_tasks:
            await asyncio.gather(*list(self._shadow_tasks), return_exceptions=True)

    # -- feedback -------------------------------------------------------------------------------
    async def feedback(self, items: list[FeedbackItem]) -> list[FeedbackResult]:
        results = await anyio.to_thread.run_sync(self.prediction_log.record_feedback, items)
        for result in results:
            self._meter_feedback(result)
        return results

    def _meter_feedback(self, result: FeedbackResult) -> None:
        m = self.metrics
        for row in result.rows:
            if not row.created or row.arm not in ("champion", "challenger", "shadow"):
                continue
            labels = (row.arm, row.model_version)
            m.feedback.labels(*labels).inc()
            outcome = row.outcome
            if row.predicted_class is not None and _class_of(outcome) == row.predicted_class:
                m.feedback_correct.labels(*labels).inc()
            numeric = _numeric(outcome)
            if numeric is not None and row.score is not None:
                error = row.score - numeric
                m.feedback_abs_error.labels(*labels).inc(abs(error))
                m.feedback_squared_error.labels(*labels).inc(error * error)


def _model_of(arms: ArmSet, arm: str) -> LoadedModel:
    return arms.challenger if arm == "challenger" and arms.challenger else arms.champion


def _predict(model: LoadedModel, parsed: ParsedInput) -> _Scored:
    start = time.perf_counter()
    prediction = _model_output(model, parsed.data, parsed.params)
    return _Scored(prediction, time.perf_counter() - start)


def _model_output(model: LoadedModel, data: Any, params: dict[str, Any] | None = None) -> Any:
    with warnings.catch_warnings():
        # A model fitted on a DataFrame warns on every numpy call; that is the caller's choice.
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        if params:
            return model.model.predict(data, params=params)
        return model.model.predict(data)


def _is_batchable_model(model: LoadedModel) -> bool:
    """Column signatures only (typed DataFrames); ``router_batchable: false`` in the MLmodel's
    ``metadata`` opts a model out (one whose rows are not scored independently)."""
    schema = model.input_schema
    if schema is None or schema.is_tensor_spec() or not schema.has_input_names():
        return False
    metadata = getattr(getattr(model.model, "metadata", None), "metadata", None)
    return not (isinstance(metadata, dict) and metadata.get("router_batchable") is False)


def _missing_columns(parsed: ParsedInput) -> list[str]:
    data = parsed.data
    if isinstance(data, pd.DataFrame):
        return [str(c) for c in data.columns[data.isna().any(axis=0).to_numpy()]]
    if isinstance(data, np.ndarray) and np.issubdtype(data.dtype, np.floating):
        return ["(tensor)"] if bool(np.isnan(data).any()) else []
    return []


def _champion_error(parsed: ParsedInput, model: LoadedModel, exc: BaseException) -> Exception:
    """A failure on input with missing values is the input's fault (4xx); otherwise ours (5xx)."""
    missing = _missing_columns(parsed)
    if missing:
        return InvalidInput(
            f"model version {model.version} cannot score missing values (NaN/null) "
            f"in column(s): {', '.join(missing)}"
        )
    log.error("champion v%s failed: %r", model.version, exc)
    return PredictionFailed(f"model version {model.version} failed to predict")


def _check_request_id(request_id: str | None) -> str:
    if request_id is None or request_id == "":
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable():
        raise BadRequest(
            f"X-Request-Id must be printable and at most {MAX_REQUEST_ID_LENGTH} characters"
        )
    return request_id


def _class_of(outcome: Any) -> str | None:
    if isinstance(outcome, bool):
        return str(int(outcome))
    if isinstance(outcome, float) and outcome.is_integer():
        return str(int(outcome))
    if isinstance(outcome, int | str):
        return str(outcome)
    return None


def _numeric(outcome: Any) -> float | None:
    if isinstance(outcome, bool):
        return float(outcome)
    if isinstance(outcome, int | float):
        return float(outcome)
    return None
