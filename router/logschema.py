"""The log contract: the tables, arm names, row statuses and reasons, the experiment id and what
makes an outcome "correct". The router writes through it, the evaluator reads through it; neither
side spells any of these as a string literal of its own.

Intent-to-treat: a request counts in the arm it was *assigned* to, whatever happened to it. One
``predictions`` row per input row and per assigned arm (``champion`` or ``challenger``); in shadow
mode the same request also has a ``shadow`` row. The row's ``model_version``, ``score`` and
``predicted_class`` are those of the answer actually served for that row (a challenger row whose
challenger failed carries the champion's fallback answer, ``status`` ``fallback`` and a ``reason``).
``outcomes`` holds the feedback, keyed by (request_id, row_index), so it joins every arm's row of
that request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from enum import StrEnum
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:  # config imports this module; the names only annotate here
    from router.config import MetricName


class Arm(StrEnum):
    """The arm a row counts in: the assigned arm, or ``shadow`` for shadow scoring."""

    CHAMPION = "champion"
    CHALLENGER = "challenger"
    SHADOW = "shadow"


class RoutingMode(StrEnum):
    """How the router uses the challenger (``routing.mode``)."""

    SPLIT = "split"  # each request is assigned to one arm by weight
    SHADOW = "shadow"  # the champion answers every request; the challenger scores it afterwards


def challenger_arm(mode: RoutingMode | None) -> Arm:
    """The arm the challenger's rows are logged in under ``mode``: ``shadow`` rows in shadow mode,
    ``challenger`` rows otherwise. The router asks it of its configured mode, the evaluator of the
    mode its log shows."""
    return Arm.SHADOW if mode == RoutingMode.SHADOW else Arm.CHALLENGER


class RowStatus(StrEnum):
    """What happened to a logged row."""

    OK = "ok"  # the assigned arm's model answered
    FALLBACK = "fallback"  # the challenger could not answer; the champion's answer was served
    ERROR = "error"  # the arm's model failed and nothing was served (champion 5xx, shadow fault)
    CLIENT_ERROR = "client_error"  # the input was at fault (4xx): no model's error, not judged


class Reason(StrEnum):
    """Why a row is ``fallback`` or ``error``. Only MODEL_FAULTS count against a model."""

    ERROR = "error"  # the model raised
    TIMEOUT = "timeout"  # the model did not answer within its predict timeout
    INVALID_OUTPUT = "invalid_output"  # wrong row count, or non-finite where the kind cannot be
    CIRCUIT_OPEN = "circuit_open"  # the challenger's circuit breaker was open; never tried
    SCHEMA = "schema"  # the input fits the champion's signature, not the challenger's
    BAD_INPUT = "bad_input"  # client_error rows: the input fits no arm or the model rejected it


#: Reasons that are the model's fault: the error-rate guardrail and the circuit breaker count these.
MODEL_FAULTS: frozenset[Reason] = frozenset({Reason.ERROR, Reason.TIMEOUT, Reason.INVALID_OUTPUT})

#: Statuses whose rows carry a served answer that outcomes can judge (intent-to-treat).
SERVED_STATUSES: frozenset[RowStatus] = frozenset({RowStatus.OK, RowStatus.FALLBACK})

metadata = sa.MetaData()

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("row_index", sa.Integer, primary_key=True),
    sa.Column("arm", sa.String(16), primary_key=True),  # an Arm: the assigned arm, or shadow
    sa.Column("experiment_id", sa.String(256), nullable=False, index=True),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),  # unix seconds when the prediction was made
    sa.Column("latency_s", sa.Float, nullable=False),  # model time for the whole request
    sa.Column("status", sa.String(16), nullable=False),  # a RowStatus
    sa.Column("reason", sa.String(32), nullable=True),  # a Reason, for fallback / error rows
    sa.Column("routing_key_hash", sa.String(64), nullable=True),  # never the raw key
    sa.Column("score", sa.Float, nullable=True),  # numeric output, or positive-class probability
    sa.Column("predicted_class", sa.String(256), nullable=True),
    sa.Column("output", sa.Text, nullable=True),  # the row's raw prediction, JSON
    # The champion's score for this row's input, whichever arm served it: the served score on
    # champion and fallback rows, the champion scored after the response on challenger rows (NULL
    # when that was skipped under load). The evaluator's covariate (experiments/covariate.py).
    sa.Column("champion_score", sa.Float, nullable=True),
    # The challenger weight the request was assigned with (split mode with a challenger; NULL
    # otherwise, and in logs written before the column): the evaluator judges each split as its
    # own randomised period (experiments/strata.py).
    sa.Column("challenger_weight", sa.Float, nullable=True),
)

#: One assigned arm per (request_id, row_index): a request id reused by a later request that was
#: assigned to the other arm leaves no row there (ignored and counted as a duplicate, as a reuse
#: in the same arm is), so one outcome can never join rows of both arms and count twice. Shadow
#: rows (a second scoring of the same request) are outside it.
ONE_ASSIGNED_ARM = sa.Index(
    "predictions_one_assigned_arm",
    predictions.c.request_id,
    predictions.c.row_index,
    unique=True,
    sqlite_where=predictions.c.arm != Arm.SHADOW.value,
    postgresql_where=predictions.c.arm != Arm.SHADOW.value,
)

outcomes = sa.Table(
    "outcomes",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("row_index", sa.Integer, primary_key=True),
    sa.Column("outcome", sa.Text, nullable=False),  # JSON of the observed value
    sa.Column("outcome_value", sa.Float, nullable=True),  # numeric form when there is one
    sa.Column("ts", sa.Float, nullable=False),  # unix seconds when the feedback arrived
)


_NO_CHALLENGER = "-vs-vnone"


def serves_challenger(champion_version: str | None, challenger_version: str | None) -> bool:
    """Does the router serve a challenger beside the champion? Not when ``@challenger`` is unset
    or names the champion's version (both aliases on one version leave nothing to compare: that
    version is served as the champion alone). The evaluator asks the same question: without a
    challenger served there is no experiment to judge (``evaluate_and_promote`` exits 6).
    """
    return challenger_version is not None and challenger_version != champion_version


def experiment_id(model_name: str, champion_version: str, challenger_version: str | None) -> str:
    """Derive the experiment id from the version pair: moving an alias starts a new experiment."""
    if not challenger_version:
        return f"{model_name}:v{champion_version}{_NO_CHALLENGER}"
    return f"{model_name}:v{champion_version}-vs-v{challenger_version}"


def has_challenger(eid: str) -> bool:
    """Is ``eid`` an experiment (a challenger beside the champion), not champion-only traffic?"""
    return not eid.endswith(_NO_CHALLENGER)


def hash_routing_key(secret: bytes, key: str) -> str:
    """Stored in place of the raw routing key so no user id lands in the log.

    HMAC-SHA256 under a secret no endpoint shows (``router/log/keyhash.py``): deterministic per
    (secret, key), so a user's rows stay one unit, yet not reversible by hashing guesses.
    """
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:32]


def decoded_outcome(outcome_json: str) -> object:
    """A stored outcome (``outcomes.outcome``, JSON text) as the value the client sent."""
    try:
        outcome: object = json.loads(outcome_json)
    except ValueError:
        outcome = outcome_json
    return outcome


def outcome_matches(predicted_class: str, outcome_json: str) -> bool:
    """Is a predicted class "correct" for a stored outcome (JSON text)? :func:`class_matches`."""
    return class_matches(predicted_class, decoded_outcome(outcome_json))


def class_matches(predicted_class: str, outcome: object) -> bool:
    """Is a predicted class "correct" for an outcome? The one definition of accuracy's event: the
    live metric (``router_feedback_correct_total``) and the evaluator both ask this.

    Outcomes arrive as JSON values (``1``, ``"1"``, ``true``, ``"churn"``); predicted classes are
    strings (``"1"``, ``"01"``, ``"churn"``). Numbers compare numerically, booleans as 0/1,
    anything else as text.
    """
    if isinstance(outcome, bool):
        outcome = int(outcome)
    if isinstance(outcome, int | float):
        try:
            return float(predicted_class) == float(outcome)
        except ValueError:
            return False
    return predicted_class == str(outcome)


def outcome_number(outcome: object) -> float | None:
    """The numeric form of an outcome (``outcomes.outcome_value``): numbers and booleans (0/1);
    None for anything else. Error metrics (absolute, squared) are computed from it."""
    if isinstance(outcome, bool | int | float):
        return float(outcome)
    return None


# Log loss of a probability of exactly 0 or 1 is infinite; sklearn clips the same way.
LOG_LOSS_EPS = 1e-15


def row_metric(
    metric: MetricName,
    score: float | None,
    predicted_class: str | None,
    outcome: object,
    outcome_value: float | None,
) -> float | None:
    """One row's metric in its natural units, or None when the row cannot carry it.

    ``outcome`` is the value the client sent (:func:`decoded_outcome` of the stored text),
    ``outcome_value`` its stored numeric form. The one Python definition of what the evaluator
    computes in SQL (``experiments/aggregate.py``; tests hold the two equal) and of what the live
    feedback metrics sum (``router/recording.py``).
    """
    if metric == "accuracy":
        if predicted_class is None:
            return None
        return 1.0 if class_matches(predicted_class, outcome) else 0.0
    if metric == "outcome":
        return outcome_value
    if score is None or outcome_value is None or not math.isfinite(score):
        return None
    if metric in ("log_loss", "brier"):
        if outcome_value not in (0.0, 1.0):
            return None
        if metric == "brier":
            return (score - outcome_value) ** 2
        p = min(max(score, LOG_LOSS_EPS), 1.0 - LOG_LOSS_EPS)
        return -math.log(p) if outcome_value == 1.0 else -math.log(1.0 - p)
    if metric == "abs_error":
        return abs(score - outcome_value)
    return (score - outcome_value) ** 2


#: What one row's outcome must be for each metric (README "Feedback"): what the evaluator's
#: metric and the live metrics can judge. ``/feedback`` refuses anything else (400), stores nothing.
OUTCOME_NEEDS: dict[MetricName, str] = {
    "accuracy": "a class label (a string, an integer or a boolean)",
    "log_loss": "a 0/1 label (0, 1, true or false)",
    "brier": "a 0/1 label (0, 1, true or false)",
    "abs_error": "a number",
    "squared_error": "a number",
    "outcome": "a number or a boolean",
}


def outcome_fits(metric: MetricName, outcome: object) -> bool:
    """Can ``metric`` judge one row's ``outcome`` (a decoded JSON value)? :data:`OUTCOME_NEEDS`.

    Accuracy compares the outcome with a predicted class (:func:`class_matches`): a float counts
    as a class only when it is a whole number (``1.0``; a ``0.7`` is a probability sent by
    mistake). Log loss and Brier compare the positive-class score with a 0/1 outcome, as the
    evaluator does (``outcome_value IN (0, 1)``); a string ``"1"`` is no such outcome. The errors
    need a number (a boolean is no regression target); ``outcome`` averages numbers or booleans.
    """
    if isinstance(outcome, float) and not math.isfinite(outcome):
        return False
    if metric == "accuracy":
        if isinstance(outcome, str):
            return outcome != ""
        return isinstance(outcome, bool | int) or (
            isinstance(outcome, float) and outcome.is_integer()
        )
    if metric in ("log_loss", "brier"):
        return isinstance(outcome, bool | int | float) and outcome in (0, 1)
    if metric in ("abs_error", "squared_error"):
        return isinstance(outcome, int | float) and not isinstance(outcome, bool)
    return isinstance(outcome, bool | int | float)  # outcome


# -- warehouse views ----------------------------------------------------------------------------
# The shapes warehouse-native experiment tools read (GrowthBook's and Eppo's assignment source and
# fact tables), as views over the two tables above: nothing is copied, nothing can drift. Created
# by ``python -m router.log views`` (router/log/warehouse.py), not by the router: a view pins the
# tables it reads on PostgreSQL. docs/deploy.md maps them to each tool.

#: One row per (experiment, unit, assigned arm): the unit is the hashed routing key, else the
#: request (the evaluator's unit). Requests that were the client's fault are nobody's exposure and
#: are left out, as the evaluator leaves them out; shadow rows are a second scoring, not an
#: assignment.
ASSIGNMENTS_VIEW = "experiment_assignments"
#: One row per logged prediction row with its outcome, if any: the served answer, latency, status.
FACTS_VIEW = "prediction_facts"


def _as_time(dialect: str, seconds: str) -> str:
    if dialect == "postgresql":
        return f"to_timestamp({seconds})"
    return f"strftime('%Y-%m-%d %H:%M:%f', {seconds}, 'unixepoch')"  # SQLite: UTC text


def view_selects(dialect: str) -> dict[str, str]:
    """The SELECT behind each warehouse view, for ``dialect`` (``sqlite`` or ``postgresql``)."""
    unit = "COALESCE({a}routing_key_hash, {a}request_id)"
    assigned = ", ".join(f"'{a.value}'" for a in (Arm.CHAMPION, Arm.CHALLENGER))
    # Within one experiment id each arm has one version (the id is the version pair); a fallback
    # row carries the champion's (the answer served), so the arm's version is read elsewhere.
    versions = (
        "SELECT experiment_id, arm, MAX(model_version) AS model_version "
        f"FROM {predictions.name} WHERE row_index = 0 "
        f"AND status <> '{RowStatus.FALLBACK.value}' GROUP BY experiment_id, arm"
    )
    units = (
        f"SELECT experiment_id, {unit.format(a='')} AS unit_id, "
        "CASE WHEN routing_key_hash IS NULL THEN 'request' ELSE 'routing_key' END AS unit_type, "
        "arm, MIN(ts) AS first_exposure_ts, COUNT(*) AS requests "
        f"FROM {predictions.name} WHERE row_index = 0 AND arm IN ({assigned}) "
        f"AND status <> '{RowStatus.CLIENT_ERROR.value}' "
        f"GROUP BY experiment_id, {unit.format(a='')}, "
        "CASE WHEN routing_key_hash IS NULL THEN 'request' ELSE 'routing_key' END, arm"
    )
    assignments = (
        "SELECT u.experiment_id, u.unit_id, u.unit_type, u.arm, v.model_version, "
        f"u.first_exposure_ts, {_as_time(dialect, 'u.first_exposure_ts')} AS first_exposure, "
        f"u.requests FROM ({units}) u LEFT JOIN ({versions}) v "
        "ON v.experiment_id = u.experiment_id AND v.arm = u.arm"
    )
    facts = (
        f"SELECT p.request_id, p.row_index, p.experiment_id, {unit.format(a='p.')} AS unit_id, "
        f"p.arm, p.model_version, p.ts, {_as_time(dialect, 'p.ts')} AS prediction_time, "
        "p.status, p.reason, p.latency_s, p.score, p.predicted_class, p.output, "
        "o.outcome, o.outcome_value, o.ts AS outcome_ts "
        f"FROM {predictions.name} p LEFT JOIN {outcomes.name} o "
        "ON o.request_id = p.request_id AND o.row_index = p.row_index"
    )
    return {ASSIGNMENTS_VIEW: assignments, FACTS_VIEW: facts}
