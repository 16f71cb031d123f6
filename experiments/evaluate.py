"""Evaluate the current experiment: read the registry and the prediction log, then judge.

The experiment is the version pair behind ``@champion``/``@challenger`` right now
(:func:`router.logschema.experiment_id`). This module does the reading: the aliases from the
registry, the experiment's rows from the prediction log (outcome windows closed by ``now``) and,
when configured, Prometheus's guardrail series. :func:`experiments.judge.judge` turns the rows into
the :class:`~experiments.judge.Evaluation`, without I/O.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import sqlalchemy as sa
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.decision import row_metric
from experiments.judge import AliasSnapshot, Evaluation, LoggedRequest, MetricRow, judge
from experiments.promquery import PrometheusGuardrails, read_guardrails
from router import logschema
from router.config import MetricName, Settings

# AliasSnapshot and Evaluation live in experiments.judge; they are this module's inputs and output.
__all__ = [
    "AliasSnapshot",
    "Evaluation",
    "EvaluationError",
    "PredictionLogUnavailable",
    "RegistryUnavailable",
    "evaluate",
    "make_client",
    "read_aliases",
]


class EvaluationError(Exception):
    """The evaluation could not run (config, registry, database): exit 1 with this message."""


class RegistryUnavailable(EvaluationError):
    pass


class PredictionLogUnavailable(EvaluationError):
    pass


def make_client(settings: Settings) -> MlflowClient:
    """An MLflow client on the configured registry; a missing SQLite file is an error, not new."""
    uri = settings.model.tracking_uri
    _require_sqlite_file(uri, "MLflow registry", RegistryUnavailable)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def read_aliases(client: MlflowClient, settings: Settings) -> AliasSnapshot:
    """One read of the registered model: the three aliases as one consistent snapshot."""
    m = settings.model
    try:
        # Versions come back as int from the SQL store and as str over REST: normalise.
        aliases = {k: str(v) for k, v in client.get_registered_model(m.name).aliases.items()}
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryUnavailable(
                f"registered model {m.name!r} not found at {m.tracking_uri}"
            ) from exc
        raise RegistryUnavailable(f"MLflow registry at {m.tracking_uri}: {exc.message}") from exc
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise RegistryUnavailable(f"MLflow registry at {m.tracking_uri}: {exc}") from exc
    return AliasSnapshot(
        champion=aliases.get(m.champion_alias),
        challenger=aliases.get(m.challenger_alias),
        rollback=aliases.get(m.rollback_alias),
    )


def _require_sqlite_file(url: str, what: str, error: type[EvaluationError]) -> None:
    prefix = "sqlite:///"
    if url.startswith(prefix) and ":memory:" not in url:
        path = Path(url[len(prefix) :].split("?", 1)[0])
        if not path.is_file():
            raise error(f"{what}: no database file at {path}")


def _load(
    url: str, eid: str, cutoff: float, window_s: float, metric: MetricName
) -> tuple[dict[str, list[LoggedRequest]], list[MetricRow], int]:
    """Requests (row 0 of each arm's rows) and metric rows with closed outcomes."""
    _require_sqlite_file(url, "prediction log", PredictionLogUnavailable)
    p, o = logschema.predictions, logschema.outcomes
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise PredictionLogUnavailable(f"prediction log URL {url!r}: {exc}") from exc
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(p.name):
                raise PredictionLogUnavailable(
                    f"prediction log at {engine.url!r} has no {p.name!r} table (has a router run?)"
                )
            has_outcomes = sa.inspect(conn).has_table(o.name)
            requests: dict[str, list[LoggedRequest]] = defaultdict(list)
            query = sa.select(
                p.c.request_id, p.c.arm, p.c.status, p.c.latency_s, p.c.ts, p.c.routing_key_hash
            ).where(p.c.experiment_id == eid, p.c.row_index == 0)
            for rid, arm, status, latency, ts, unit in conn.execute(query):
                requests[rid].append(LoggedRequest(arm, status, latency, ts, unit))
            scored: list[MetricRow] = []
            skipped = 0
            if has_outcomes:
                joined = (
                    sa.select(
                        p.c.request_id,
                        p.c.row_index,
                        p.c.arm,
                        p.c.ts,
                        p.c.score,
                        p.c.predicted_class,
                        o.c.outcome,
                        o.c.outcome_value,
                        o.c.ts,
                    )
                    .join(
                        o,
                        sa.and_(o.c.request_id == p.c.request_id, o.c.row_index == p.c.row_index),
                    )
                    .where(p.c.experiment_id == eid, p.c.status == "ok", p.c.ts <= cutoff)
                )
                for rid, idx, arm, ts, score, cls, outcome, value, o_ts in conn.execute(joined):
                    v = row_metric(metric, score, cls, outcome, value)
                    if v is None or not math.isfinite(v):
                        skipped += 1
                        continue
                    scored.append(MetricRow(rid, idx, arm, v, max(ts + window_s, o_ts)))
    except sa.exc.SQLAlchemyError as exc:
        reason = str(exc.orig) if isinstance(exc, sa.exc.DBAPIError) else str(exc)
        raise PredictionLogUnavailable(f"prediction log at {engine.url!r}: {reason}") from exc
    finally:
        engine.dispose()
    return requests, scored, skipped


def evaluate(
    settings: Settings,
    *,
    client: MlflowClient | None = None,
    now: float | None = None,
    aliases: AliasSnapshot | None = None,
) -> Evaluation:
    """Evaluate the experiment behind the current aliases (or ``aliases``, when given).

    Raises :class:`EvaluationError` when the registry or the prediction log cannot be read.
    """
    now = time.time() if now is None else now
    client = make_client(settings) if client is None else client
    snapshot = read_aliases(client, settings) if aliases is None else aliases
    name = settings.model.name
    if snapshot.champion is None:
        raise RegistryUnavailable(
            f"registered model {name!r} has no @{settings.model.champion_alias} alias"
        )
    exp = settings.experiment
    eid = logschema.experiment_id(name, snapshot.champion, snapshot.challenger)
    cutoff = now - exp.outcome_window_s
    requests, scored, skipped = _load(
        settings.prediction_log.url, eid, cutoff, exp.outcome_window_s, exp.metric
    )
    evaluation = judge(settings, snapshot, eid, requests, scored, now=now, skipped=skipped)
    if settings.prometheus.url and evaluation.started_at is not None:
        prom = read_guardrails(
            settings.prometheus.url,
            ("champion", evaluation.challenger.arm),
            now - evaluation.started_at,
            now,
        )
        evaluation = _with_prometheus(evaluation, prom)
    return evaluation


def _with_prometheus(evaluation: Evaluation, prom: PrometheusGuardrails) -> Evaluation:
    return replace(evaluation, prometheus=prom)
