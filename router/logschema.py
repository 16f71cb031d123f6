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


def experiment_id(model_name: str, champion_version: str, challenger_version: str | None) -> str:
    """Derive the experiment id from the version pair: moving an alias starts a new experiment."""
    return f"{model_name}:v{champion_version}-vs-v{challenger_version or 'none'}"


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
