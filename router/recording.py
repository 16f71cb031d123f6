"""What one request leaves behind: its Prometheus counts and its prediction-log rows; and the
feedback metrics an outcome adds to them.

Intent-to-treat (``router/logschema.py``): a request counts once in the arm it was *assigned* to,
whatever happened to it. ``router_requests_total{arm, model_version, status}`` carries the
assigned arm and that arm's model version; the log rows carry the assigned arm and the answer
actually served (the champion's version, score and class on a fallback row). The histograms of
model behaviour (predict latency, values, classes) are labelled by the model that answered.
Feedback counts in the logged row's arm and version; each metric of a served row by
``logschema.row_metric``, from the stored numeric outcome, as the evaluator reads them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from router.config import METRICS
from router.log.feedback import FeedbackResult
from router.log.predlog import PredictionLog, PredictionRecord
from router.logschema import SERVED_STATUSES, Arm, Reason, RowStatus, row_metric
from router.metrics import RouterMetrics
from router.scoring.outputs import RowFacts, row_facts, to_jsonable
from router.scoring.scorer import ModelScorer, Scored

_ARMS = frozenset(Arm)
_SERVED = frozenset(s.value for s in SERVED_STATUSES)


@dataclass(frozen=True)
class RequestFacts:
    """Who asked, once per request: the same for every row and arm it leaves."""

    request_id: str
    key_hash: str | None
    experiment_id: str
    challenger_weight: float | None = None  # the split it was assigned under (split mode)


class Recorder:
    """Meters and logs each request's outcome (one call per request and arm), and feedback."""

    def __init__(self, model_name: str, metrics: RouterMetrics, prediction_log: PredictionLog):
        self._model_name = model_name
        self._metrics = metrics
        self._log = prediction_log

    def answered(
        self,
        request: RequestFacts,
        *,
        arm: Arm,
        arm_version: str,
        served_by: ModelScorer,
        scored: Scored,
        n_rows: int,
        fallback: Reason | None = None,
    ) -> Any:
        """A served answer: ``ok``, or ``fallback`` with its reason (``served_by`` the champion,
        ``arm_version`` the assigned arm's); returns the JSON-able body."""
        jsonable, facts, write = self._answer(
            request, arm, arm_version, served_by, scored, n_rows, fallback
        )
        # The champion's score for these inputs: the answer served when the champion served it
        # (the covariate of challenger-served rows comes later, through answered_pending).
        write(facts.scores if served_by.role == Arm.CHAMPION.value else None)
        return jsonable

    def answered_pending(
        self,
        request: RequestFacts,
        *,
        arm: Arm,
        arm_version: str,
        served_by: ModelScorer,
        scored: Scored,
        n_rows: int,
        fallback: Reason | None = None,
    ) -> tuple[Any, Callable[[Sequence[float | None] | None], None]]:
        """As :meth:`answered`, metered now; the log rows wait for the champion's scores of the
        same inputs (``scoring/covariates.py``): the returned call writes them, exactly once."""
        jsonable, _, write = self._answer(
            request, arm, arm_version, served_by, scored, n_rows, fallback
        )
        return jsonable, write

    def _answer(
        self,
        request: RequestFacts,
        arm: Arm,
        arm_version: str,
        served_by: ModelScorer,
        scored: Scored,
        n_rows: int,
        fallback: Reason | None,
    ) -> tuple[Any, RowFacts, Callable[[Sequence[float | None] | None], None]]:
        """Meter a served answer; its JSON body, its row facts and the writer of its log rows."""
        status = RowStatus.OK if fallback is None else RowStatus.FALLBACK
        jsonable = to_jsonable(scored.prediction)
        facts = row_facts(scored.prediction, jsonable, n_rows, served_by.kind.reading)
        m = self._metrics
        m.count_request(arm.value, arm_version, status.value)
        if fallback is not None:
            m.count_fallback(fallback.value)
        role, version = served_by.role, served_by.version
        if facts.unread is not None:  # never guessed: the rows keep their JSON only
            m.output_unread.labels(role, version, facts.unread.value).inc()
        m.observe_predict_latency(role, version, scored.latency_s)
        m.observe_scores(role, version, facts.scores)
        m.count_classes(role, version, facts.classes)
        now = time.time()  # when the answer was made, whenever the rows are written

        def write(champion_scores: Sequence[float | None] | None) -> None:
            self._rows(
                request,
                arm,
                version,
                status,
                fallback,
                scored.latency_s,
                n_rows,
                facts,
                champion_scores=champion_scores,
                ts=now,
            )

        return jsonable, facts, write

    def failed(
        self,
        request: RequestFacts,
        *,
        arm: Arm,
        arm_version: str,
        reason: Reason,
        n_rows: int | None,
        row_version: str | None = None,
    ) -> None:
        """Nothing served: ``client_error`` rows for ``Reason.BAD_INPUT`` (the input's fault),
        ``error`` rows for any other reason (a model fault, or the shadow's input unfit).

        The rows carry ``row_version`` (the model that refused or failed) when it is not the
        assigned arm's. ``n_rows`` None: the input never parsed, one row (row_index 0) stands for
        the request.
        """
        status = RowStatus.CLIENT_ERROR if reason is Reason.BAD_INPUT else RowStatus.ERROR
        self._metrics.count_request(arm.value, arm_version, status.value)
        version = row_version or arm_version
        self._rows(request, arm, version, status, reason, 0.0, n_rows or 1, None)

    def skipped(self, arm: Arm, arm_version: str) -> None:
        """Shadow scoring not attempted (overload, or the challenger's circuit is open)."""
        self._metrics.count_request(arm.value, arm_version, "skipped")

    def feedback(self, result: FeedbackResult) -> None:
        """Meter the outcomes one feedback call stored (a repeated outcome counts once): every
        metric's sum and the rows it judged, by ``logschema.row_metric`` as the evaluator judges
        them (served rows, the stored numeric outcome)."""
        m = self._metrics
        sums = {
            "accuracy": m.feedback_correct,
            "abs_error": m.feedback_abs_error,
            "squared_error": m.feedback_squared_error,
            "log_loss": m.feedback_log_loss,
            "brier": m.feedback_brier,
            "outcome": m.feedback_outcome,
        }
        for row in result.rows:
            if not row.created or row.arm not in _ARMS:
                continue
            labels = (row.arm, row.model_version)
            m.feedback.labels(*labels).inc()
            if row.status not in _SERVED:
                continue
            for metric in METRICS:
                value = row_metric(
                    metric, row.score, row.predicted_class, row.outcome, row.outcome_value
                )
                if value is not None and math.isfinite(value):
                    sums[metric].labels(*labels).inc(value)
                    m.feedback_judged.labels(*labels, metric).inc()

    def _rows(
        self,
        request: RequestFacts,
        arm: Arm,
        version: str,
        status: RowStatus,
        reason: Reason | None,
        latency_s: float,
        n_rows: int,
        facts: RowFacts | None,
        *,
        champion_scores: Sequence[float | None] | None = None,
        ts: float | None = None,
    ) -> None:
        now = time.time() if ts is None else ts
        if champion_scores is not None and len(champion_scores) != n_rows:
            champion_scores = None  # an output not one per row: no per-row covariate
        self._log.enqueue(
            [
                PredictionRecord(
                    request_id=request.request_id,
                    row_index=i,
                    arm=arm.value,  # plain str: a database driver may adapt enums by name
                    experiment_id=request.experiment_id,
                    model_name=self._model_name,
                    model_version=version,
                    ts=now,
                    latency_s=latency_s,
                    status=status.value,
                    routing_key_hash=request.key_hash,
                    reason=reason.value if reason is not None else None,
                    score=facts.scores[i] if facts else None,
                    predicted_class=facts.classes[i] if facts else None,
                    output=facts.outputs[i] if facts else None,
                    champion_score=champion_scores[i] if champion_scores else None,
                    challenger_weight=request.challenger_weight,
                )
                for i in range(n_rows)
            ]
        )
