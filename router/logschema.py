"""The prediction log's tables: the contract between the router (writes) and the evaluator (reads).

One ``predictions`` row per scored input row and per arm that scored it (in shadow mode the same
request has a ``champion`` row and a ``shadow`` row). ``outcomes`` holds the feedback, keyed by
(request_id, row_index), so it joins every arm's row of that request.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa

metadata = sa.MetaData()

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("row_index", sa.Integer, primary_key=True),
    sa.Column("arm", sa.String(16), primary_key=True),  # champion | challenger | shadow
    sa.Column("experiment_id", sa.String(256), nullable=False, index=True),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),  # unix seconds when the prediction was made
    sa.Column("latency_s", sa.Float, nullable=False),  # model time for the whole request
    # ok | fallback (challenger failed, champion answered) | error (this arm raised)
    sa.Column("status", sa.String(16), nullable=False),
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


def hash_routing_key(salt: str, key: str) -> str:
    """Stored in place of the raw routing key so no user id lands in the log."""
    return hashlib.sha256(f"log:{salt}:{key}".encode()).hexdigest()[:32]
