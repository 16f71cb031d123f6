"""Evaluate the current experiment: read the registry and the prediction log, then judge.

The experiment is the version pair behind ``@champion``/``@challenger`` right now: the router
logs :func:`router.logschema.experiment_id` of the versions it has *loaded*, so the id read here is
the one it writes once it serves the current aliases (when the log has none, the report lists the
ids it does have). This module does the reading: the aliases from the registry, the experiment's
sufficient statistics from the prediction log (:mod:`experiments.aggregate`, in SQL) and, when
configured, Prometheus's guardrail series. :func:`experiments.judge.judge` turns them into the
:class:`~experiments.judge.Evaluation`, without I/O.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import sqlalchemy as sa
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments import ramp
from experiments.aggregate import MetricUnusable, read_summary
from experiments.audit import read_looks
from experiments.decision import CAPPED_BY_DEFAULT
from experiments.judge import AliasSnapshot, Evaluation, judge
from experiments.planner import ExperimentPlan, plan_experiment
from experiments.promquery import PrometheusGuardrails, read_guardrails
from experiments.sufficient import LogSummary
from router import logschema
from router.changes import alias_versions
from router.config import Settings
from router.errors import PredictionLogUnavailable, RegistryUnavailable, RouterError
from router.logschema import serves_challenger
from router.registry import connect, model_not_found
from router.registryfault import registry_unavailable
from router.splitrecord import Split, SplitTagInvalid, read_split

# AliasSnapshot and Evaluation live in experiments.judge; they are this module's inputs and output.
# RegistryUnavailable and PredictionLogUnavailable are the router's (router.errors): one definition
# of each dependency being down, whichever side finds it.
__all__ = [
    "AliasSnapshot",
    "Evaluation",
    "EvaluationError",
    "PredictionLogUnavailable",
    "RegistryUnavailable",
    "evaluate",
    "make_client",
    "no_experiment_reason",
    "plan",
    "read_aliases",
    "read_split_in_force",
]


class EvaluationError(Exception):
    """The evaluation could not run for a reason of its own (an unusable metric, an overflow, a
    promotion that failed): exit 1 with this message, like the two ``Unavailable`` errors."""


def make_client(settings: Settings) -> MlflowClient:
    """An MLflow client on the configured registry, probed as the router probes it: a missing
    SQLite file is an error (not a new registry), a database that is down fails in seconds."""
    return connect(settings.model.tracking_uri)


def read_aliases(client: MlflowClient, settings: Settings) -> AliasSnapshot:
    """One read of the registered model: the three aliases as one consistent snapshot."""
    m = settings.model
    try:
        aliases = alias_versions(client, m.name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            # The router's wording (router.registry): one message for one mistake.
            raise RegistryUnavailable(model_not_found(m.name, m.tracking_uri)) from exc
        raise registry_unavailable(m.tracking_uri, exc) from exc
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise registry_unavailable(m.tracking_uri, exc) from exc
    return AliasSnapshot(
        champion=aliases.get(m.champion_alias),
        challenger=aliases.get(m.challenger_alias),
        rollback=aliases.get(m.rollback_alias),
    )


def no_experiment_reason(settings: Settings, aliases: AliasSnapshot) -> str | None:
    """Why there is no experiment to judge, or None when there is one: the router serves no
    challenger (:func:`router.logschema.serves_challenger`, the rule the router itself applies)."""
    if serves_challenger(aliases.champion, aliases.challenger):
        return None
    m = settings.model
    champion = "unset" if aliases.champion is None else f"v{aliases.champion}"
    return (
        f"No experiment running: registered model {m.name!r} has no @{m.challenger_alias} "
        f"distinct from @{m.champion_alias} ({champion}); nothing to judge. "
        f"Set @{m.challenger_alias} on a new version to start one."
    )


def read_split_in_force(
    client: MlflowClient, settings: Settings, champion: str, challenger: str
) -> Split:
    """The split of record of the experiment (``router/splitrecord.py``), as routers serve it."""
    try:
        return read_split(client, settings, champion, challenger)
    except SplitTagInvalid as exc:
        raise EvaluationError(str(exc)) from exc


def _require_sqlite_file(url: str, what: str, error: type[RouterError]) -> None:
    prefix = "sqlite:///"
    if url.startswith(prefix) and ":memory:" not in url:
        path = Path(url[len(prefix) :].split("?", 1)[0])
        if not path.is_file():
            raise error(f"{what}: no database file at {path}")


def _cap_quantile(settings: Settings) -> float | None:
    exp = settings.experiment
    on = exp.capping == "on" or (exp.capping == "auto" and exp.metric in CAPPED_BY_DEFAULT)
    return exp.cap_quantile if on else None


def _load(
    settings: Settings, eid: str, cutoff: float, split: Split | None
) -> tuple[LogSummary, str | None]:
    """The experiment's sufficient statistics, and why there are none (ids the log does have)."""
    url = settings.prediction_log.url
    exp = settings.experiment
    _require_sqlite_file(url, "prediction log", PredictionLogUnavailable)
    p = logschema.predictions
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise PredictionLogUnavailable(f"prediction log URL {url!r}: {exc}") from exc
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            for table in (p.name, logschema.outcomes.name):
                if not inspector.has_table(table):
                    raise PredictionLogUnavailable(
                        f"prediction log at {engine.url!r} has no {table!r} table "
                        "(has a router run?)"
                    )
            summary = read_summary(
                conn,
                eid,
                metric=exp.metric,
                cutoff=cutoff,
                window_s=exp.outcome_window_s,
                cap_quantile=_cap_quantile(settings),
                # Rows logged before the weight was: the weight configured then.
                default_weight=settings.routing.challenger_weight,
                current_weight=None if split is None else split.challenger_weight,
            )
            missing = None
            if summary.empty:
                others = [
                    i
                    for (i,) in conn.execute(
                        sa.select(p.c.experiment_id)
                        .where(p.c.model_name == settings.model.name)
                        .distinct()
                        .limit(10)
                    )
                ]
                missing = (
                    f"No predictions are logged for experiment {eid!r} (the router writes the "
                    "versions it has loaded; has it picked up the current aliases?). "
                    + (
                        f"The log has: {', '.join(sorted(others))}."
                        if others
                        else f"The log has no rows for model {settings.model.name!r}."
                    )
                )
    except MetricUnusable as exc:
        raise EvaluationError(str(exc)) from exc
    except sa.exc.SQLAlchemyError as exc:
        reason = str(exc.orig) if isinstance(exc, sa.exc.DBAPIError) else str(exc)
        if "out of range" in reason or "overflow" in reason:
            raise EvaluationError(
                f"{exp.metric} overflows double precision in the database (a score or outcome of "
                "magnitude above ~1e154): cap the metric (experiment.capping: on) or fix the "
                "model's output"
            ) from exc
        raise PredictionLogUnavailable(f"prediction log at {engine.url!r}: {reason}") from exc
    finally:
        engine.dispose()
    return summary, missing


def evaluate(
    settings: Settings,
    *,
    client: MlflowClient | None = None,
    now: float | None = None,
    aliases: AliasSnapshot | None = None,
    split: Split | None = None,
) -> Evaluation:
    """Evaluate the experiment behind the current aliases (or ``aliases``, when given), at the
    split in force (the registry's, or ``split`` when given); with ``experiment.ramp``, the
    evaluation also says where the ramp stands and what to do with it (experiments/ramp.py).

    Raises :class:`RegistryUnavailable` or :class:`PredictionLogUnavailable` when the registry
    or the prediction log cannot be read, :class:`EvaluationError` when the log's figures cannot
    be judged (an unusable metric, an overflow).
    """
    now = time.time() if now is None else now
    registry = make_client(settings) if client is None else client
    snapshot = read_aliases(registry, settings) if aliases is None else aliases
    name = settings.model.name
    if snapshot.champion is None:
        raise RegistryUnavailable(
            f"registered model {name!r} has no @{settings.model.champion_alias} alias"
        )
    exp = settings.experiment
    no_experiment = no_experiment_reason(settings, snapshot)
    # The id the router writes: its served challenger (none when it serves the champion alone).
    served = None if no_experiment is not None else snapshot.challenger
    eid = logschema.experiment_id(name, snapshot.champion, served)
    cutoff = now - exp.outcome_window_s
    if split is None and served is not None:
        split = read_split_in_force(registry, settings, snapshot.champion, served)
    summary, missing = _load(settings, eid, cutoff, split)
    # Each "nothing to judge" reason is decided once: no experiment here, an empty log in _load
    # (naming the ids the log does have), mixed modes and overflows in judge.
    no_data = no_experiment or missing
    # The looks taken before this one, from the audit runs (experiments.looks says what a look
    # is and what happens when a record is missing).
    history = read_looks(registry, name, eid, exp.planned_samples)
    evaluation = judge(
        settings, snapshot, eid, summary, now=now, no_data_reason=no_data, looks=history
    )
    evaluation = replace(evaluation, split=split)
    if exp.ramp and split is not None and no_data is None:
        evaluation = ramp.step(settings, split, evaluation, summary, now)
    if settings.prometheus.url and evaluation.started_at is not None:
        prom = read_guardrails(
            settings.prometheus.url,
            (logschema.Arm.CHAMPION.value, evaluation.challenger.arm.value),
            now - evaluation.started_at,
            now,
        )
        evaluation = _with_prometheus(evaluation, prom)
    return evaluation


def _with_prometheus(evaluation: Evaluation, prom: PrometheusGuardrails) -> Evaluation:
    return replace(evaluation, prometheus=prom)


def plan(
    settings: Settings,
    *,
    effect: float,
    client: MlflowClient | None = None,
    now: float | None = None,
    aliases: AliasSnapshot | None = None,
) -> tuple[str, ExperimentPlan]:
    """The planner on the current experiment's log so far (``evaluate_and_promote --plan``):
    its experiment id and :class:`~experiments.planner.ExperimentPlan`. Reads only."""
    now = time.time() if now is None else now
    registry = make_client(settings) if client is None else client
    snapshot = read_aliases(registry, settings) if aliases is None else aliases
    name, exp = settings.model.name, settings.experiment
    if snapshot.champion is None:
        raise RegistryUnavailable(
            f"registered model {name!r} has no @{settings.model.champion_alias} alias"
        )
    eid = logschema.experiment_id(name, snapshot.champion, snapshot.challenger)
    split = (
        None
        if snapshot.challenger is None
        else read_split_in_force(registry, settings, snapshot.champion, snapshot.challenger)
    )
    summary, _ = _load(settings, eid, now - exp.outcome_window_s, split)
    history = read_looks(registry, name, eid, exp.planned_samples)
    elapsed_days = (now - summary.first_ts) / 86_400.0 if summary.first_ts is not None else 0.0
    looks_done = len(history.looks) + len(history.unrecorded)
    per_day = looks_done / elapsed_days if looks_done >= 2 and elapsed_days > 0 else 1.0
    return eid, plan_experiment(settings, summary, effect=effect, now=now, looks_per_day=per_day)
