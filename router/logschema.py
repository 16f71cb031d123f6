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
from enum import StrEnum

import sqlalchemy as sa


class Arm(StrEnum):
    """The arm a row counts in: the assigned arm, or ``shadow`` for shadow scoring."""

    CHAMPION = "champion"
    CHALLENGER = "challenger"
    SHADOW = "shadow"


class RoutingMode(StrEnum):
    """How the router uses the challenger (``routing.mode``)."""

    SPLIT = "split"  # each request is assigned to one arm by weight
    SHADOW = "shadow"  # the champion answers every request; the challenger scores it afterwards


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


def outcome_matches(predicted_class: str, outcome_json: str) -> bool:
    """Is a predicted class "correct" for a stored outcome (JSON text)? :func:`class_matches`."""
    try:
        outcome: object = json.loads(outcome_json)
    except ValueError:
        outcome = outcome_json
    return class_matches(predicted_class, outcome)


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
