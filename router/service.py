"""The transport-free core: assign the arm, take the input for that arm's model, answer, record.

The HTTP layer (``router/server/app.py``) only parses headers and shapes responses around this.

One request, in order: the arm is assigned first; the body is then checked and cast against *that
arm's* signature (each model receives its own columns; clients send the union during a schema
change); the arm's :class:`~router.scoring.scorer.ModelScorer` answers. A challenger that cannot
answer hands the request to the champion, which answers in the challenger's arm (intent-to-treat,
status ``fallback`` with a reason): ``schema`` (the input fits the champion only), ``circuit_open``,
or one of the challenger's faults (``error``, ``timeout``, ``invalid_output``).

Whose fault is a failure (the rule, precisely):

- The input fits no arm that could answer it: the client's (4xx, ``client_error`` rows, reason
  ``bad_input``, in the assigned arm).
- A model refuses the input (:class:`~router.scoring.scorer.InputFault`: MLflow's own input
  errors, any exception on missing / non-finite values, any exception of a model without a
  signature): for the champion, the client's (400, as MLflow answers); for the challenger, the
  challenger's (reason ``error``) when the champion then answers the same input, the client's when
  the champion refuses it too.
- Anything else a model does wrong (:class:`~router.scoring.scorer.ModelFault`) is that model's: the
  champion's is a 500 (``error`` rows with the reason), the challenger's a fallback.

Client errors never count against a model: not in ``status="error"``, not in the breaker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import anyio

from router.arms import ArmSet, ModelManager
from router.assignment import assign
from router.config import Settings
from router.errors import (
    BadRequest,
    InvalidInput,
    NotFound,
    NotReady,
    PredictionFailed,
    RouterError,
)
from router.input.bodies import refuse_parquet
from router.input.payload import (
    CONTENT_TYPE_JSON,
    ParsedInput,
    RawInput,
    conform,
    decode_invocation,
)
from router.log.feedback import FeedbackItem, FeedbackResult
from router.log.keyhash import RoutingKeyHasher
from router.log.predlog import PredictionLog
from router.logschema import Arm, Reason, RowStatus, class_matches
from router.metrics import RouterMetrics
from router.recording import Recorder, RequestFacts
from router.scoring.breaker import BreakerState, CircuitBreaker
from router.scoring.scorer import InputFault, ModelFault, ModelScorer, Scored, ScorerOptions

log = logging.getLogger(__name__)

ARMS = frozenset(Arm)

MAX_REQUEST_ID_LENGTH = 128
# Shadow scoring runs after the response; beyond this many in flight it is skipped (and counted)
# so a slow challenger can never build an unbounded backlog behind live traffic.
MAX_SHADOW_IN_FLIGHT = 64
FEEDBACK_POLL_S = 0.2  # how often feedback for a not-yet-logged prediction looks again
# JSON bodies up to this size are decoded, and inputs up to this many rows conformed, on the event
# loop: a thread hop would cost more than the work.
INLINE_MAX_BYTES = 16_384
INLINE_MAX_ROWS = 64


@dataclass(frozen=True)
class Invocation:
    predictions: Any
    arm: str  # the arm whose model answered (the champion on a fallback)
    model_version: str
    request_id: str


@dataclass(frozen=True)
class _Scorers:
    """The scorers of one :class:`ArmSet` (a reload brings new ones)."""

    arms: ArmSet
    champion: ModelScorer
    challenger: ModelScorer | None
    # Both arms' column names when their signatures differ (else None): a column is unknown only
    # when neither arm takes it.
    known_columns: frozenset[str] | None = None

    @property
    def shared_input(self) -> bool:
        """Both arms take the same input: a request parsed for one fits the other."""
        return self.arms.signatures.same and self.arms.signatures.comparable


class RouterService:
    """Serves one registered model's champion and challenger; owned by the app's lifespan."""

    def __init__(
        self,
        settings: Settings,
        manager: ModelManager,
        prediction_log: PredictionLog,
        metrics: RouterMetrics,
        rng: random.Random | None = None,
        *,
        key_hasher: RoutingKeyHasher,
    ) -> None:
        self.settings = settings
        self.key_hasher = key_hasher  # its secret is never exposed: see router/log/keyhash.py
        self.manager = manager
        self.prediction_log = prediction_log
        self.metrics = metrics
        self.challenger_weight = settings.routing.challenger_weight
        self._rng = rng or random.Random()
        self._recorder = Recorder(settings.model.name, metrics, prediction_log)
        self._scorers: _Scorers | None = None
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.publish_weights()

    # -- weights --------------------------------------------------------------------------------
    def set_challenger_weight(self, weight: float) -> None:
        if not 0.0 <= weight <= 1.0:
            raise InvalidInput(f"challenger_weight must be within [0, 1], got {weight}")
        self.challenger_weight = weight
        self.publish_weights()

    def publish_weights(self) -> None:
        weight = 0.0 if self.settings.routing.shadow else self.challenger_weight
        self.metrics.arm_weight.labels(Arm.CHAMPION.value).set(1.0 - weight)
        self.metrics.arm_weight.labels(Arm.CHALLENGER.value).set(weight)

    # -- the models' scorers ----------------------------------------------------------------------
    def _scorers_for(self, arms: ArmSet) -> _Scorers:
        current = self._scorers
        if current is not None and current.arms is arms:
            return current
        old = (
            {id(s.model): s for s in (current.champion, current.challenger) if s} if current else {}
        )
        champion = old.pop(id(arms.champion), None) or self._new_scorer(arms.champion, Arm.CHAMPION)
        challenger = None
        if arms.challenger is not None:
            challenger = old.pop(id(arms.challenger), None) or self._new_scorer(
                arms.challenger,
                self.settings.routing.challenger_arm,
            )
        # Retired scorers need no closing: their idle threads retire by themselves, and a call
        # still in flight on the old models finishes there.
        known = None
        if challenger is not None and not arms.signatures.same:
            known = _column_names(champion) | _column_names(challenger)
        self._scorers = _Scorers(arms, champion, challenger, known)
        breaker = challenger.breaker if challenger is not None else None
        self.metrics.circuit_open.set(
            0 if breaker is None or breaker.state is BreakerState.CLOSED else 1
        )
        return self._scorers

    def _new_scorer(self, model: Any, role: Arm) -> ModelScorer:
        server, routing = self.settings.server, self.settings.routing
        options = ScorerOptions(
            threads=server.predict_threads,
            timeout_s=server.champion_timeout_s
            if role is Arm.CHAMPION
            else server.challenger_timeout_s,
            batch_max_rows=server.batch_max_rows,
            batch_wait_s=server.batch_wait_ms / 1000.0,
            batch_custom_models=server.batch_custom_models,
        )
        breaker = None
        if role is not Arm.CHAMPION:
            breaker = CircuitBreaker(
                routing.breaker_failures,
                routing.breaker_cooldown_s,
                on_change=self._circuit_changed,
            )
        return ModelScorer(
            model,
            role.value,
            options,
            breaker=breaker,
            on_batch=self.metrics.batch_rows.labels(model.version).observe,
        )

    def _circuit_changed(self, state: BreakerState) -> None:
        self.metrics.circuit_open.set(0 if state is BreakerState.CLOSED else 1)
        log.warning("challenger circuit breaker: %s", state.value)

    def reset_circuit(self) -> None:
        """An operator's reload: give the challenger another chance now."""
        scorers = self._scorers
        if scorers is not None and scorers.challenger and scorers.challenger.breaker:
            scorers.challenger.breaker.reset()

    def describe(self) -> dict[str, Any]:
        """Scoring state for ``/experiment``: signature differences and the challenger's breaker."""
        arms = self.manager.current
        if arms is None or arms.challenger is None:
            return {}
        body: dict[str, Any] = {"signatures": arms.signatures.to_json()}
        scorers = self._scorers_for(arms)
        challenger = scorers.challenger
        if challenger is not None and challenger.breaker is not None:
            body["challenger_circuit"] = challenger.breaker.describe()
            # This process's count for the version in service (router_fallback_total: all time).
            body["challenger_fallbacks"] = dict(challenger.fallbacks)
        return body

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
        salt = self.settings.routing.salt
        shadow = self.settings.routing.shadow
        assignment = assign(
            routing_key,
            salt,
            self.challenger_weight,
            arms.challenger is not None and not shadow,
            self._rng,
        )
        request = RequestFacts(
            request_id,
            self.key_hasher.hash(routing_key) if routing_key else None,
            arms.experiment_id,
        )
        scorers = self._scorers_for(arms)
        challenger = scorers.challenger
        if assignment.arm is Arm.CHALLENGER and challenger is not None:
            raw = await self._decode(request, Arm.CHALLENGER, challenger, body, content_type)
            return await self._challenger_answers(request, scorers, challenger, raw)
        raw = await self._decode(request, Arm.CHAMPION, scorers.champion, body, content_type)
        invocation, parsed = await self._champion_answers(request, scorers, raw)
        if shadow and scorers.challenger is not None:
            self._start_shadow(request, scorers, scorers.challenger, raw, parsed)
        return invocation

    async def _champion_answers(
        self, request: RequestFacts, scorers: _Scorers, raw: RawInput
    ) -> tuple[Invocation, ParsedInput]:
        champion = scorers.champion
        parsed = await self._champion_input(request, Arm.CHAMPION, champion, scorers, raw)
        scored = await self._champion_scores(request, Arm.CHAMPION, champion, champion, parsed)
        jsonable = self._recorder.answered(
            request, Arm.CHAMPION, champion.version, champion, scored, parsed.n_rows
        )
        return Invocation(
            jsonable, Arm.CHAMPION.value, champion.version, request.request_id
        ), parsed

    async def _challenger_answers(
        self, request: RequestFacts, scorers: _Scorers, challenger: ModelScorer, raw: RawInput
    ) -> Invocation:
        """The challenger's answer; else the champion's, in the challenger's arm (fallback)."""
        breaker = challenger.breaker
        assert breaker is not None
        parsed: ParsedInput | None = None
        refused: InputFault | None = None  # judged once the champion has seen the same input
        if not breaker.allow():
            reason = Reason.CIRCUIT_OPEN
        else:
            try:
                parsed = await self._conform(challenger, scorers, raw)
            except RouterError:
                breaker.release()
                reason = Reason.SCHEMA
            else:
                try:
                    scored = await challenger.score(parsed)
                except InputFault as fault:
                    refused, reason = fault, Reason.ERROR
                except ModelFault as fault:
                    breaker.failure()
                    reason = fault.reason
                    log.warning("challenger v%s: %s; champion answers", challenger.version, fault)
                else:
                    breaker.success()
                    jsonable = self._recorder.answered(
                        request,
                        Arm.CHALLENGER,
                        challenger.version,
                        challenger,
                        scored,
                        parsed.n_rows,
                    )
                    return Invocation(
                        jsonable, Arm.CHALLENGER.value, challenger.version, request.request_id
                    )
        champion = scorers.champion
        if parsed is None or not scorers.shared_input:
            parsed = await self._champion_input(request, Arm.CHALLENGER, challenger, scorers, raw)
        try:
            scored = await self._champion_scores(
                request, Arm.CHALLENGER, challenger, champion, parsed
            )
        except BadRequest:
            if refused is not None:
                breaker.release()  # both models refuse this input: the client's fault alone
            raise
        except PredictionFailed:
            if refused is not None:
                breaker.failure()
            raise
        if refused is not None:
            breaker.failure()
            log.warning(
                "challenger v%s refused input the champion took: %s", challenger.version, refused
            )
        jsonable = self._recorder.answered(
            request,
            Arm.CHALLENGER,
            challenger.version,
            champion,
            scored,
            parsed.n_rows,
            RowStatus.FALLBACK,
            reason,
        )
        challenger.fallbacks[reason.value] += 1
        return Invocation(jsonable, Arm.CHAMPION.value, champion.version, request.request_id)

    async def _champion_scores(
        self,
        request: RequestFacts,
        arm: Arm,
        assigned: ModelScorer,
        champion: ModelScorer,
        parsed: ParsedInput,
    ) -> Scored:
        """The champion's answer, or the request's error (recorded in ``arm``): the champion
        refusing the input is a 400, any other champion fault a 500."""
        try:
            return await champion.score(parsed)
        except (InputFault, ModelFault) as fault:
            client = isinstance(fault, InputFault)
            self._recorder.failed(
                request,
                arm,
                assigned.version,
                champion.version,
                parsed.n_rows,
                RowStatus.CLIENT_ERROR if client else RowStatus.ERROR,
                fault.reason if isinstance(fault, ModelFault) else Reason.BAD_INPUT,
            )
            if client:
                message = f"model version {champion.version} cannot score this input: {fault}"
                raise BadRequest(message) from None
            log.error("champion v%s failed: %s", champion.version, fault)
            timeout = isinstance(fault, ModelFault) and fault.reason is Reason.TIMEOUT
            what = "did not answer in time" if timeout else "failed"
            raise PredictionFailed(f"model version {champion.version} {what}") from None

    async def _champion_input(
        self,
        request: RequestFacts,
        arm: Arm,
        assigned: ModelScorer,
        scorers: _Scorers,
        raw: RawInput,
    ) -> ParsedInput:
        """The input for the champion; a client error (recorded in ``arm``) when it does not fit."""
        try:
            return await self._conform(scorers.champion, scorers, raw)
        except RouterError as exc:
            self._client_error(request, arm, assigned, raw.n_rows, exc)
            raise

    async def _decode(
        self,
        request: RequestFacts,
        arm: Arm,
        assigned: ModelScorer,
        body: bytes,
        content_type: str | None,
    ) -> RawInput:
        """The body decoded once, for every arm; a client error (recorded in ``arm``) if not."""
        max_rows = self.settings.limits.max_rows
        try:
            if not self.settings.limits.parquet:
                refuse_parquet(content_type)
            if len(body) <= INLINE_MAX_BYTES and (content_type or "").lower().startswith(
                CONTENT_TYPE_JSON
            ):
                return decode_invocation(body, content_type, max_rows)
            with assigned.arrival():
                raw: RawInput = await anyio.to_thread.run_sync(
                    decode_invocation, body, content_type, max_rows
                )
            return raw
        except RouterError as exc:
            self._client_error(request, arm, assigned, None, exc)
            raise

    async def _conform(self, scorer: ModelScorer, scorers: _Scorers, raw: RawInput) -> ParsedInput:
        """The decoded input checked and cast for ``scorer``'s model (its own signature)."""
        schema = scorer.model.input_schema
        checks = self.settings.validation
        extra = checks.extra_columns
        if extra == "reject" and scorers.known_columns is not None:
            # A column only the other arm takes is not unknown during a schema change.
            _refuse_unknown(raw, scorers.known_columns)
            extra = "ignore"
        rules: dict[str, Any] = {
            "extra_columns": extra,
            "casting": checks.casting,
            "non_finite": checks.non_finite,
            "params_schema": scorer.model.params_schema,
            "plan": scorer.column_plan,
        }
        if raw.n_rows <= INLINE_MAX_ROWS:
            return conform(raw, schema, **rules)
        with scorer.arrival():
            parsed: ParsedInput = await anyio.to_thread.run_sync(
                lambda: conform(raw, schema, **rules)
            )
        return parsed

    def _client_error(
        self,
        request: RequestFacts,
        arm: Arm,
        assigned: ModelScorer,
        n_rows: int | None,
        exc: RouterError,
    ) -> None:
        if exc.status_code < 500:
            self._recorder.failed(
                request,
                arm,
                assigned.version,
                assigned.version,
                n_rows,
                RowStatus.CLIENT_ERROR,
                Reason.BAD_INPUT,
            )

    # -- shadow ---------------------------------------------------------------------------------
    def _start_shadow(
        self,
        request: RequestFacts,
        scorers: _Scorers,
        shadow: ModelScorer,
        raw: RawInput,
        champion_input: ParsedInput,
    ) -> None:
        breaker = shadow.breaker
        if len(self._shadow_tasks) >= MAX_SHADOW_IN_FLIGHT or (breaker and not breaker.allow()):
            self._recorder.skipped(Arm.SHADOW, shadow.version)
            return
        parsed = champion_input if scorers.shared_input else None
        scoring = self._shadow_score(request, scorers, shadow, raw, parsed, champion_input.n_rows)
        task = asyncio.get_running_loop().create_task(scoring)
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow_score(
        self,
        request: RequestFacts,
        scorers: _Scorers,
        shadow: ModelScorer,
        raw: RawInput,
        parsed: ParsedInput | None,
        n_rows: int,
    ) -> None:
        """The challenger's own view of the input the champion answered; never reaches clients."""
        breaker = shadow.breaker
        assert breaker is not None
        try:
            parsed = parsed or await self._conform(shadow, scorers, raw)
        except RouterError:
            breaker.release()
            self._recorder.failed(
                request,
                Arm.SHADOW,
                shadow.version,
                shadow.version,
                n_rows,
                RowStatus.ERROR,
                Reason.SCHEMA,
            )
            return
        try:
            scored = await shadow.score(parsed)
        except (InputFault, ModelFault) as fault:  # the champion took this input: the model's
            breaker.failure()
            reason = fault.reason if isinstance(fault, ModelFault) else Reason.ERROR
            log.warning("shadow v%s failed: %s", shadow.version, fault)
            self._recorder.failed(
                request,
                Arm.SHADOW,
                shadow.version,
                shadow.version,
                parsed.n_rows,
                RowStatus.ERROR,
                reason,
            )
            return
        breaker.success()
        self._recorder.answered(request, Arm.SHADOW, shadow.version, shadow, scored, parsed.n_rows)

    async def drain(self) -> None:
        """Wait for shadow scoring still in flight (shutdown: everything served gets logged)."""
        while self._shadow_tasks:
            await asyncio.gather(*list(self._shadow_tasks), return_exceptions=True)

    # -- feedback -------------------------------------------------------------------------------
    async def feedback(self, items: list[FeedbackItem]) -> list[FeedbackResult]:
        """Store outcomes; an id not logged yet is looked up again for a few seconds before 404.

        Another replica may have served the prediction and not flushed its writer yet: waiting
        here (on the loop, not in a thread) loses no early feedback, and an id that never
        appears still gets its 404 after ``feedback.wait_for_prediction_s``.
        """
        deadline = time.monotonic() + self.settings.feedback.wait_for_prediction_s
        while True:
            try:
                results = await anyio.to_thread.run_sync(self.prediction_log.record_feedback, items)
                break
            except NotFound:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(FEEDBACK_POLL_S)
        for result in results:
            self._meter_feedback(result)
        return results

    def _meter_feedback(self, result: FeedbackResult) -> None:
        m = self.metrics
        for row in result.rows:
            if not row.created or row.arm not in ARMS:
                continue
            labels = (row.arm, row.model_version)
            m.feedback.labels(*labels).inc()
            if row.predicted_class is not None and class_matches(row.predicted_class, row.outcome):
                m.feedback_correct.labels(*labels).inc()
            if row.outcome_value is not None and row.score is not None:
                error = row.score - row.outcome_value
                m.feedback_abs_error.labels(*labels).inc(abs(error))
                m.feedback_squared_error.labels(*labels).inc(error * error)


def _column_names(scorer: ModelScorer) -> frozenset[str]:
    plan = scorer.column_plan
    return frozenset(plan.names) if plan is not None else frozenset()


def _refuse_unknown(raw: RawInput, known: frozenset[str]) -> None:
    unknown = [name for name in raw.columns or () if name not in known]
    if unknown:
        names = ", ".join(f"'{name}'" for name in unknown)
        raise InvalidInput(f"unknown column(s) in neither arm's model signature: {names}")


def _check_request_id(request_id: str | None) -> str:
    if request_id is None or request_id == "":
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable():
        raise BadRequest(
            f"X-Request-Id must be printable and at most {MAX_REQUEST_ID_LENGTH} characters"
        )
    return request_id
