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
import functools
import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any

import anyio

from router.arms import ArmSet, ModelManager
from router.config import Settings
from router.errors import (
    BadRequest,
    Conflict,
    InvalidInput,
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
from router.log.feedbackgate import FeedbackGate
from router.log.keyhash import RoutingKeyHasher
from router.log.predlog import PredictionLog
from router.logschema import Arm, Reason
from router.metrics import RouterMetrics
from router.recording import Recorder, RequestFacts
from router.scoring.covariates import CovariateScoring
from router.scoring.scorer import InputFault, ModelFault, ModelScorer, Scored
from router.scoring.scorers import Scorers, ScorerSet
from router.split import ChallengerSplit
from router.splitrecord import SplitRecord

log = logging.getLogger(__name__)

MAX_REQUEST_ID_LENGTH = 128
# Shadow scoring runs after the response; beyond this many in flight it is skipped (and counted)
# so a slow challenger can never build an unbounded backlog behind live traffic.
MAX_SHADOW_IN_FLIGHT = 64
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
class _Answer:
    """The challenger's valid answer to the input it took."""

    scored: Scored
    parsed: ParsedInput


@dataclass(frozen=True)
class _Fallback:
    """Why the challenger did not answer, and what it leaves the champion."""

    reason: Reason
    parsed: ParsedInput | None = None  # the input as the challenger took it, if it did
    # The challenger refused the input: its fault only if the champion then takes the input.
    refused: InputFault | None = None


class RouterService:
    """Serves one registered model's champion and challenger; owned by the app's lifespan.

    Its parts, one job each: ``split`` (the challenger's weight and each request's arm),
    ``scorers`` (one scorer per model in service), the recorder (metrics and log rows of requests
    and feedback); this class orchestrates a request across them.
    """

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
        self.split = ChallengerSplit(settings, metrics, rng)
        manager.on_split(self.split.follow)
        self.scorers = Scorers(settings, metrics)
        self._recorder = Recorder(settings.model.name, metrics, prediction_log)
        self._feedback_gate = FeedbackGate(
            prediction_log.record_feedback,
            metric=settings.experiment.metric,
            wait_s=settings.feedback.wait_for_prediction_s,
            max_in_flight=settings.feedback.max_in_flight,
            on_busy=metrics.feedback_busy.inc,
        )
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        # The champion's score of challenger-served inputs, after the response (the covariate).
        self._covariates = CovariateScoring(metrics)

    def describe(self) -> dict[str, Any]:
        """Scoring state for ``/experiment``: signature differences and the challenger's breaker."""
        arms = self.manager.current
        if arms is None or arms.challenger is None:
            return {}
        return {"signatures": arms.signatures.to_json(), **self.scorers.describe(arms)}

    # -- the split --------------------------------------------------------------------------------
    async def set_weight(self, weight: float, *, by: str) -> SplitRecord:
        """Make ``weight`` the split of record of the experiment in service, for every worker and
        replica (``router/splitrecord.py``); this process follows it at once, the others on
        their next poll. 409 without a challenger in service, or when the aliases moved."""
        if not 0.0 <= weight <= 1.0:  # also NaN
            raise InvalidInput(f"challenger_weight must be within [0, 1], got {weight}")
        arms = self._arms()
        m = self.settings.model
        if arms.challenger is None:
            raise Conflict(
                f"no challenger in service (@{m.challenger_alias}): the split of record is kept "
                "on the challenger's version; set the alias first"
            )
        record = await anyio.to_thread.run_sync(
            functools.partial(
                self.manager.registry.write_split,
                self.settings,
                arms.champion.version,
                arms.challenger.version,
                weight,
                by=by,
            )
        )
        current = self.manager.current
        if current is not None and current.experiment_id == record.experiment_id:
            self.split.adopt(record.experiment_id, record)
        return record

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
        # Read once: the row logs the weight its arm was drawn under.
        weight = self.split.deciding_weight(arms.challenger is not None)
        assignment = self.split.assign(routing_key, weight)
        request = RequestFacts(
            request_id,
            self.key_hasher.hash(routing_key) if routing_key else None,
            arms.experiment_id,
            weight,
        )
        scorers = self.scorers.for_arms(arms)
        challenger = scorers.challenger
        if assignment.arm is Arm.CHALLENGER and challenger is not None:
            raw = await self._decode(request, Arm.CHALLENGER, challenger, body, content_type)
            return await self._challenger_answers(request, scorers, challenger, raw)
        raw = await self._decode(request, Arm.CHAMPION, scorers.champion, body, content_type)
        invocation, parsed = await self._champion_answers(request, scorers, raw)
        if challenger is not None and self.settings.routing.shadow:
            self._start_shadow(request, scorers, challenger, raw, parsed)
        return invocation

    async def _champion_answers(
        self, request: RequestFacts, scorers: ScorerSet, raw: RawInput
    ) -> tuple[Invocation, ParsedInput]:
        champion = scorers.champion
        parsed = await self._champion_input(request, Arm.CHAMPION, champion, scorers, raw)
        scored = await self._champion_scores(request, Arm.CHAMPION, champion, champion, parsed)
        jsonable = self._recorder.answered(
            request,
            arm=Arm.CHAMPION,
            arm_version=champion.version,
            served_by=champion,
            scored=scored,
            n_rows=parsed.n_rows,
        )
        return Invocation(
            jsonable, Arm.CHAMPION.value, champion.version, request.request_id
        ), parsed

    async def _challenger_answers(
        self, request: RequestFacts, scorers: ScorerSet, challenger: ModelScorer, raw: RawInput
    ) -> Invocation:
        """The challenger's answer; else the champion's, in the challenger's arm (fallback)."""
        tried = await self._try_challenger(scorers, challenger, raw)
        if isinstance(tried, _Fallback):
            return await self._fallback(request, scorers, challenger, raw, tried)
        jsonable, write_rows = self._recorder.answered_pending(
            request,
            arm=Arm.CHALLENGER,
            arm_version=challenger.version,
            served_by=challenger,
            scored=tried.scored,
            n_rows=tried.parsed.n_rows,
        )
        challenger_input = tried.parsed

        async def champion_input() -> ParsedInput:
            if scorers.shared_input:
                return challenger_input
            return await self._conform(scorers.champion, scorers, raw)

        self._covariates.start(scorers.champion, champion_input, write_rows)
        return Invocation(jsonable, Arm.CHALLENGER.value, challenger.version, request.request_id)

    async def _try_challenger(
        self, scorers: ScorerSet, challenger: ModelScorer, raw: RawInput
    ) -> _Answer | _Fallback:
        """The challenger's valid answer, or why it has none; its breaker told what it can judge
        now (a refused input is judged in :meth:`_fallback`, once the champion has seen it)."""
        breaker = challenger.breaker
        assert breaker is not None
        if not breaker.allow():
            return _Fallback(Reason.CIRCUIT_OPEN)
        try:
            parsed = await self._conform(challenger, scorers, raw)
        except RouterError:
            breaker.release()
            return _Fallback(Reason.SCHEMA)
        try:
            scored = await challenger.score(parsed)
        except InputFault as fault:
            return _Fallback(Reason.ERROR, parsed, refused=fault)
        except ModelFault as fault:
            breaker.failure()
            log.warning("challenger v%s: %s; champion answers", challenger.version, fault)
            return _Fallback(fault.reason, parsed)
        breaker.success()
        return _Answer(scored, parsed)

    async def _fallback(
        self,
        request: RequestFacts,
        scorers: ScorerSet,
        challenger: ModelScorer,
        raw: RawInput,
        fallback: _Fallback,
    ) -> Invocation:
        """The champion's answer in the challenger's arm (status ``fallback``, with the reason)."""
        breaker = challenger.breaker
        assert breaker is not None
        champion = scorers.champion
        parsed = fallback.parsed if scorers.shared_input else None
        if parsed is None:
            parsed = await self._champion_input(request, Arm.CHALLENGER, challenger, scorers, raw)
        try:
            scored = await self._champion_scores(
                request, Arm.CHALLENGER, challenger, champion, parsed
            )
        except BadRequest:
            if fallback.refused is not None:
                breaker.release()  # both models refuse this input: the client's fault alone
            raise
        except PredictionFailed:
            if fallback.refused is not None:
                breaker.failure()
            raise
        if fallback.refused is not None:
            breaker.failure()
            log.warning(
                "challenger v%s refused input the champion took: %s",
                challenger.version,
                fallback.refused,
            )
        jsonable = self._recorder.answered(
            request,
            arm=Arm.CHALLENGER,
            arm_version=challenger.version,
            served_by=champion,
            scored=scored,
            n_rows=parsed.n_rows,
            fallback=fallback.reason,
        )
        challenger.fallbacks[fallback.reason.value] += 1
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
            reason = fault.reason if isinstance(fault, ModelFault) else Reason.BAD_INPUT
            self._recorder.failed(
                request,
                arm=arm,
                arm_version=assigned.version,
                reason=reason,
                n_rows=parsed.n_rows,
                row_version=champion.version,
            )
            if reason is Reason.BAD_INPUT:
                message = f"model version {champion.version} cannot score this input: {fault}"
                raise BadRequest(message) from None
            log.error("champion v%s failed: %s", champion.version, fault)
            what = "did not answer in time" if reason is Reason.TIMEOUT else "failed"
            raise PredictionFailed(f"model version {champion.version} {what}") from None

    async def _champion_input(
        self,
        request: RequestFacts,
        arm: Arm,
        assigned: ModelScorer,
        scorers: ScorerSet,
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

    async def _conform(self, scorer: ModelScorer, scorers: ScorerSet, raw: RawInput) -> ParsedInput:
        """The decoded input checked and cast for ``scorer``'s model (its own signature)."""
        schema = scorer.model.input_schema
        checks = self.settings.validation
        rules: dict[str, Any] = {
            "extra_columns": checks.extra_columns,
            "casting": checks.casting,
            "non_finite": checks.non_finite,
            "params_schema": scorer.model.params_schema,
            "plan": scorer.column_plan,
            "known_columns": scorers.known_columns,
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
                arm=arm,
                arm_version=assigned.version,
                reason=Reason.BAD_INPUT,
                n_rows=n_rows,
            )

    # -- shadow ---------------------------------------------------------------------------------
    def _start_shadow(
        self,
        request: RequestFacts,
        scorers: ScorerSet,
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
        scorers: ScorerSet,
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
                arm=Arm.SHADOW,
                arm_version=shadow.version,
                reason=Reason.SCHEMA,
                n_rows=n_rows,
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
                arm=Arm.SHADOW,
                arm_version=shadow.version,
                reason=reason,
                n_rows=parsed.n_rows,
            )
            return
        breaker.success()
        self._recorder.answered(
            request,
            arm=Arm.SHADOW,
            arm_version=shadow.version,
            served_by=shadow,
            scored=scored,
            n_rows=parsed.n_rows,
        )

    async def drain(self) -> None:
        """Wait for shadow and covariate scoring still in flight (shutdown: everything served
        gets logged)."""
        while self._shadow_tasks:
            await asyncio.gather(*list(self._shadow_tasks), return_exceptions=True)
        await self._covariates.drain()

    # -- feedback -------------------------------------------------------------------------------
    async def feedback(self, items: list[FeedbackItem]) -> list[FeedbackResult]:
        """Store outcomes the configured metric can judge, then meter them.

        The feedback gate runs them on threads of its own; an id not logged yet (another
        replica's writer may not have flushed) is looked up again for
        ``feedback.wait_for_prediction_s`` before its 404, by a bounded number of waiting
        requests (``router/log/feedbackgate.py``).
        """
        results = await self._feedback_gate.record(items)
        for result in results:
            self._recorder.feedback(result)
        return results


def _check_request_id(request_id: str | None) -> str:
    if request_id is None or request_id == "":
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable():
        raise BadRequest(
            f"X-Request-Id must be printable and at most {MAX_REQUEST_ID_LENGTH} characters"
        )
    return request_id
