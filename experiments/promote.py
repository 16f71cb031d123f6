"""Acting on an evaluation: move the aliases (compare-and-set) and leave an audit trail.

Deciding happened in :func:`experiments.judge.judge` (which :mod:`experiments.evaluate` feeds from
the registry and the log); this module only applies the :class:`~experiments.judge.Evaluation`
it returned. Every applied evaluation, whatever its decision, is recorded as an MLflow run in
the experiment ``champion-challenger/<model name>`` (parameters, per-arm and difference metrics,
the decision as a tag, the report files as artifacts). A dry run never gets here: it writes
nothing to MLflow.

With ``experiment.ramp``, an evaluation that advances the ramp moves the split of record to the
next stage instead (:func:`_advance`, ``router/splitrecord.py``), audited the same way.

Decisions act and stick. PROMOTE moves ``@champion`` to the challenger (``@rollback`` to the old
champion) and removes ``@challenger``; REJECT removes ``@challenger`` (routers serve the champion
alone from their next poll) and tags the version rejected. Both end the experiment. A version
rejected in an experiment (same experiment id: same champion, same challenger) stays rejected: if
``@challenger`` points at it again, :func:`sticky_rejection` turns any later decision into REJECT
and the alias is removed again. The audit runs are the record that is searched, not version tags.

Compare-and-set. MLflow has no conditional alias update, so two evaluators could both read the
old aliases and both promote. Alias moves therefore happen under a lock that the registry itself
makes atomic: a registered model named ``<model>.promotion-lock``, *created* by the holder
(the store's unique name constraint lets exactly one concurrent create succeed, SQLite,
PostgreSQL or a tracking server alike) and deleted when done (``router/changes.py``: split changes
take the same lock). Inside the lock the aliases are
re-read and compared with the snapshot the evaluation was made on; any change aborts (exit 1).
An evaluation that only records its run (champion kept) records it under the same lock and check,
so a look on record was taken at aliases still in force: two evaluations started together end as
one promotion and one conflict, never a promotion and a "kept" written as the champion moved.
After the move they are read once more, so an out-of-band change (someone in the UI, a process
without the lock) during the move is reported, not silently overwritten. A lock left by a killed
process is never broken automatically: its aliases may be half-moved, which a person should look
at; the error message names the lock to delete.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from experiments.evaluate import EvaluationError, read_aliases
from experiments.judge import AliasSnapshot, Evaluation
from experiments.looks import record_params
from router.changes import (
    LOCK_SUFFIX,
    TAG_PREFIX,
    RegistryLocked,
    actor,
    audit_experiment,
    iso_now,
    lock_name,
    registry_lock,
    tracking_experiment_name,
    translated,
)
from router.config import Settings
from router.errors import Conflict, RegistryUnavailable
from router.logschema import Arm
from router.registryfault import REGISTRY_FAILURES
from router.splitrecord import write_split

# Defined in router.changes (the router writes split changes under the same lock and audit
# experiment); re-exported here, where promotion's callers and tests look for them.
__all__ = [
    "LOCK_SUFFIX",
    "TAG_PREFIX",
    "ActionResult",
    "PromotionConflict",
    "PromotionError",
    "PromotionInterfered",
    "actor",
    "apply",
    "lock_name",
    "prior_rejection",
    "rollback",
    "run_metrics",
    "run_params",
    "sticky_rejection",
    "tracking_experiment_name",
]

Action = Literal["promoted", "rejected", "kept", "advanced", "rolled_back", "aborted"]


class PromotionError(EvaluationError):
    """The registry could not be changed as asked (exit 1, one line)."""


class PromotionConflict(PromotionError):
    """The aliases moved since the evaluation began, or another promotion holds the lock."""


class PromotionInterfered(PromotionError):
    """The aliases were changed by someone else while this process moved them."""


@dataclass(frozen=True)
class ActionResult:
    action: Action
    run_id: str | None
    message: str
    aliases_before: AliasSnapshot
    aliases_after: AliasSnapshot


# --- the public entry points -----------------------------------------------------------------


def apply(
    client: MlflowClient,
    settings: Settings,
    evaluation: Evaluation,
    *,
    artifacts: Sequence[Path] = (),
    by: str | None = None,
) -> ActionResult:
    """Record ``evaluation`` as an MLflow run and act on its decision.

    PROMOTE and REJECT move aliases (see the module docstring); the other decisions only record
    the run. A challenger already rejected in this experiment is never promoted
    (:func:`sticky_rejection` is applied first). Raises :class:`PromotionConflict` (after
    recording the run as ``aborted``) when the aliases moved since the evaluation began or another
    promotion is under way.
    """
    by = by or actor()
    evaluation = sticky_rejection(client, settings, evaluation)
    if evaluation.decision == "promote":
        return _move(client, settings, evaluation, artifacts, by, "promoted")
    if evaluation.advances_ramp:
        return _advance(client, settings, evaluation, artifacts, by)
    if evaluation.decision == "reject" and evaluation.aliases.challenger is not None:
        return _move(client, settings, evaluation, artifacts, by, "rejected")
    before = evaluation.aliases
    # Recorded under the lock too: a look on record is a look at aliases still in force. Without
    # it, an evaluation racing a promotion could read that promotion's look, find no new units
    # (so "inconclusive") and record "champion kept" just as the champion moved.
    held = _holding_evaluated(client, settings, evaluation, artifacts, by)
    with held, _translated("recording the evaluation"):
        run_id = _record_run(client, settings, evaluation, artifacts, by, "kept")
    return ActionResult("kept", run_id, _kept_message(evaluation), before, before)


def sticky_rejection(
    client: MlflowClient, settings: Settings, evaluation: Evaluation
) -> Evaluation:
    """``evaluation``, its decision made REJECT if its challenger was rejected in this experiment.

    Read-only (``--dry-run`` reports what a real run would do). The reason names the earlier
    rejection's run and keeps what this evaluation alone found.
    """
    version = evaluation.aliases.challenger
    if version is None or evaluation.decision == "reject":
        return evaluation
    with _translated("reading earlier rejections"):
        run_id = prior_rejection(client, settings.model.name, evaluation.experiment_id)
    if run_id is None:
        return evaluation
    reason = (
        f"v{version} was already rejected in this experiment (evaluation run {run_id}); a "
        "rejection ends the experiment, so it is never promoted against this champion: register "
        f"a new version to try again. This evaluation alone: {evaluation.decision}: "
        f"{evaluation.reason}"
    )
    # A ramp never moves on with a rejected version: the rejection decides.
    ramp = evaluation.ramp
    if ramp is not None:
        ramp = dataclasses.replace(ramp, action="decide", next_weight=None)
    return dataclasses.replace(evaluation, decision="reject", reason=reason, ramp=ramp)


def prior_rejection(client: MlflowClient, model_name: str, experiment_id: str) -> str | None:
    """The run id of a finished rejection in experiment ``experiment_id``, or None."""
    found = client.get_experiment_by_name(tracking_experiment_name(model_name))
    if found is None:
        return None
    # Filter on the tag in the query and on the experiment id here: an experiment id holds the
    # model name, which may contain quotes that a filter string would have to escape.
    query = f"tags.`{TAG_PREFIX}action` = 'rejected' and attributes.status = 'FINISHED'"
    token: str | None = None
    while True:
        page = client.search_runs([found.experiment_id], query, page_token=token)
        for run in page:
            if run.data.params.get("experiment_id") == experiment_id:
                return str(run.info.run_id)
        token = page.token
        if not token:
            return None


def rollback(client: MlflowClient, settings: Settings, *, by: str | None = None) -> ActionResult:
    """``@champion`` back to the ``@rollback`` version, audited like a promotion.

    ``@rollback`` is removed afterwards (it has been used); ``@challenger`` is left alone.
    """
    by = by or actor()
    m = settings.model
    with _lock(client, m.name, by):
        before = read_aliases(client, settings)
        if before.rollback is None:
            raise PromotionError(
                f"registered model {m.name!r} has no @{m.rollback_alias} alias: "
                "nothing to roll back to"
            )
        if before.rollback == before.champion:
            raise PromotionError(
                f"@{m.champion_alias} already is v{before.rollback} (@{m.rollback_alias})"
            )
        with _translated("rolling back"):
            run_id = _record_rollback_run(client, settings, before, by)
            client.set_registered_model_alias(m.name, m.champion_alias, before.rollback)
            client.delete_registered_model_alias(m.name, m.rollback_alias)
            now = iso_now()
            roles = ((before.rollback, Arm.CHAMPION.value), (before.champion, "rolled_back"))
            for version, role in roles:
                if version is not None:
                    _tag_version(
                        client,
                        m.name,
                        version,
                        {
                            f"{TAG_PREFIX}rolled_back_at": now,
                            f"{TAG_PREFIX}rolled_back_by": by,
                            f"{TAG_PREFIX}rollback_run_id": run_id,
                            f"{TAG_PREFIX}role": role,
                        },
                    )
            expected = AliasSnapshot(before.rollback, before.challenger, None)
            after = _verify(client, settings, expected, run_id)
            client.set_terminated(run_id)
    message = f"Rolled back: @{m.champion_alias} v{before.champion} -> v{before.rollback}."
    return ActionResult("rolled_back", run_id, message, before, after)


# --- promotion and rejection ------------------------------------------------------------------


def _move(
    client: MlflowClient,
    settings: Settings,
    evaluation: Evaluation,
    artifacts: Sequence[Path],
    by: str,
    action: Literal["promoted", "rejected"],
) -> ActionResult:
    """Under the lock: check the aliases are still the evaluated ones, move them, tag, verify."""
    m = settings.model
    before = evaluation.aliases
    if before.champion is None or before.challenger is None:
        raise PromotionError("acting on an experiment needs both a champion and a challenger")
    roles: tuple[tuple[str, str], ...]
    if action == "promoted":
        expected = AliasSnapshot(before.challenger, None, before.champion)
        roles = ((before.challenger, Arm.CHAMPION.value), (before.champion, "rollback"))
    else:
        expected = AliasSnapshot(before.champion, None, before.rollback)
        roles = ((before.challenger, "rejected"),)
    run_id: str | None = None
    try:
        held = _holding_evaluated(client, settings, evaluation, artifacts, by)
        with held, _translated("promoting" if action == "promoted" else "rejecting"):
            run_id = _record_run(client, settings, evaluation, artifacts, by, action)
            if action == "promoted":
                client.set_registered_model_alias(m.name, m.rollback_alias, before.champion)
                client.set_registered_model_alias(m.name, m.champion_alias, before.challenger)
            client.delete_registered_model_alias(m.name, m.challenger_alias)
            for version, role in roles:
                _tag_version(client, m.name, version, _audit_tags(evaluation, run_id, by, role))
            after = _verify(client, settings, expected, run_id)
            client.set_terminated(run_id)
    except PromotionError:
        # Failed mid-move (registry gone?): our run must not stay RUNNING forever.
        if run_id is not None:
            with suppress(*REGISTRY_FAILURES):  # best effort
                client.set_terminated(run_id, status="FAILED")
        raise
    if action == "promoted":
        message = (
            f"Promoted: @{m.champion_alias} v{before.champion} -> v{before.challenger}, "
            f"@{m.rollback_alias} = v{before.champion}, @{m.challenger_alias} removed "
            f"(run {run_id})."
        )
    else:
        message = (
            f"Rejected: v{before.challenger} tagged rejected, @{m.challenger_alias} removed; "
            f"@{m.champion_alias} stays v{before.champion} and serves all traffic (run {run_id})."
        )
    return ActionResult(action, run_id, message, before, after)


def _advance(
    client: MlflowClient,
    settings: Settings,
    evaluation: Evaluation,
    artifacts: Sequence[Path],
    by: str,
) -> ActionResult:
    """A ramp's next stage: the evaluation's run, then the split of record moved to the next
    stage's weight (router/splitrecord.py: under the change lock, compare-and-set on the aliases
    and on the split the evaluation saw, its own audit run); every router follows within a poll."""
    ramp = evaluation.ramp
    before = evaluation.aliases
    assert ramp is not None and ramp.next_weight is not None
    if before.champion is None or before.challenger is None:
        raise PromotionError("advancing a ramp needs both a champion and a challenger")
    stage = f"ramp stage {ramp.stage + 1} of {len(ramp.stages)}"
    with _translated("recording the evaluation"):
        run_id = _record_run(client, settings, evaluation, artifacts, by, "advanced")
    try:
        record = write_split(
            client,
            settings,
            champion=before.champion,
            challenger=before.challenger,
            weight=ramp.next_weight,
            by=by,
            reason=f"evaluate_and_promote: {stage} (evaluation run {run_id})",
            expected=evaluation.split,
        )
    except (RegistryLocked, Conflict, RegistryUnavailable) as exc:
        with suppress(*REGISTRY_FAILURES):  # best effort
            client.set_terminated(run_id, status="FAILED")
        error = PromotionError if isinstance(exc, RegistryUnavailable) else PromotionConflict
        raise error(f"the ramp did not advance: {exc.message}") from exc
    with _translated("recording the evaluation"):
        client.set_tag(run_id, f"{TAG_PREFIX}split_run_id", str(record.run_id))
        client.set_terminated(run_id)
    poll = settings.model.poll_interval_s
    message = (
        f"Advanced to {stage}: challenger weight {record.previous:g} -> "
        f"{record.challenger_weight:g} (split epoch {record.epoch}, run {run_id}); every router "
        f"follows within model.poll_interval_s ({poll:g} s)."
    )
    return ActionResult("advanced", run_id, message, before, before)


def _verify(
    client: MlflowClient, settings: Settings, expected: AliasSnapshot, run_id: str
) -> AliasSnapshot:
    after = read_aliases(client, settings)
    if after != expected:
        client.set_tag(run_id, f"{TAG_PREFIX}interference", _describe(after))
        client.set_terminated(run_id, status="FAILED")
        raise PromotionInterfered(
            f"aliases changed by someone else during the move: expected {_describe(expected)}, "
            f"found {_describe(after)}; check the registry"
        )
    return after


@contextmanager
def _holding_evaluated(
    client: MlflowClient,
    settings: Settings,
    evaluation: Evaluation,
    artifacts: Sequence[Path],
    by: str,
) -> Iterator[None]:
    """The block runs holding the change lock, the aliases still the evaluated ones. When another
    change holds the lock or the aliases moved, the evaluation is recorded as ``aborted`` and
    :class:`PromotionConflict` raised: nothing changed."""
    before = evaluation.aliases
    try:
        with _lock(client, settings.model.name, by):
            current = read_aliases(client, settings)
            if current != before:
                raise PromotionConflict(
                    f"aliases moved since the evaluation began ({_describe(before)} -> "
                    f"{_describe(current)}); nothing changed, evaluate again"
                )
            yield
    except PromotionConflict as exc:
        with _translated("recording the aborted action"):
            _record_run(client, settings, evaluation, artifacts, by, "aborted", note=str(exc))
        raise


@contextmanager
def _lock(client: MlflowClient, model_name: str, by: str) -> Iterator[str]:
    """Hold the registry's change lock (``router/changes.py``) for the block, in this module's
    errors: :class:`PromotionConflict` when another change holds it."""
    try:
        with registry_lock(client, model_name, by) as token:
            yield token
    except RegistryLocked as exc:
        raise PromotionConflict(exc.message) from exc
    except RegistryUnavailable as exc:
        raise PromotionError(exc.message) from exc


# --- the audit trail -------------------------------------------------------------------------


def _audit_tags(evaluation: Evaluation, run_id: str, by: str, role: str) -> dict[str, str]:
    verb = "rejected" if role == "rejected" else "promoted"
    tags = {
        f"{TAG_PREFIX}{verb}_at": iso_now(),
        f"{TAG_PREFIX}{verb}_by": by,
        f"{TAG_PREFIX}evaluation_run_id": run_id,
        f"{TAG_PREFIX}decision": evaluation.decision,
        f"{TAG_PREFIX}role": role,
        f"{TAG_PREFIX}experiment_id": evaluation.experiment_id,
        f"{TAG_PREFIX}metric": evaluation.metric,
        f"{TAG_PREFIX}n": f"{evaluation.champion.n}/{evaluation.challenger.n}",
    }
    if evaluation.difference is not None:
        d = evaluation.difference.absolute
        tags[f"{TAG_PREFIX}difference"] = f"{d.estimate:+.4g} [{d.lower:+.4g}, {d.upper:+.4g}]"
    return tags


def _tag_version(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def run_params(evaluation: Evaluation) -> dict[str, str]:
    e = evaluation
    return {
        "alpha": str(e.alpha),
        "planned_samples": str(e.planned_samples),
        "metric": e.metric,
        "mode": e.mode,
        "champion_version": str(e.aliases.champion),
        "challenger_version": str(e.aliases.challenger),
        "outcome_window_s": str(e.outcome_window_s),
        "min_samples_per_arm": str(e.min_samples_per_arm),
        "min_effect": str(e.min_effect),
        "experiment_id": e.experiment_id,
        # The look on record (experiments.looks): written with the other parameters, before any
        # alias moves, so the next evaluation rebuilds the sequence of looks from it.
        **record_params(e.look),
    }


def run_metrics(evaluation: Evaluation) -> dict[str, float]:
    """Per-arm and difference figures; undefined ones are left out (MLflow wants numbers)."""
    e = evaluation
    out: dict[str, float | None] = {}
    for prefix, arm in ((Arm.CHAMPION.value, e.champion), (Arm.CHALLENGER.value, e.challenger)):
        out[f"{prefix}_n"] = arm.n
        out[f"{prefix}_requests"] = arm.requests
        out[f"{prefix}_metric_mean"] = arm.metric_mean
        out[f"{prefix}_error_rate"] = arm.error_rate
        out[f"{prefix}_latency_p50_s"] = arm.latency.p50
        out[f"{prefix}_latency_p95_s"] = arm.latency.p95
    if e.difference is not None:
        d, r = e.difference.absolute, e.difference.relative
        out.update(difference=d.estimate, difference_lower=d.lower, difference_upper=d.upper)
        if r is not None:
            out.update(relative=r.estimate, relative_lower=r.lower, relative_upper=r.upper)
    if e.srm is not None:
        out["srm_p_value"] = e.srm.p_value
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def _record_run(
    client: MlflowClient,
    settings: Settings,
    evaluation: Evaluation,
    artifacts: Sequence[Path],
    by: str,
    action: Action,
    *,
    note: str | None = None,
) -> str:
    e = evaluation
    run = client.create_run(
        audit_experiment(client, settings.model.name),
        run_name=f"{e.decision} v{e.aliases.champion} vs v{e.aliases.challenger}",
        tags={
            f"{TAG_PREFIX}decision": e.decision,
            f"{TAG_PREFIX}action": action,
            f"{TAG_PREFIX}reason": e.reason,
            f"{TAG_PREFIX}by": by,
            f"{TAG_PREFIX}model_name": e.model_name,
            **({f"{TAG_PREFIX}note": note} if note else {}),
        },
    )
    run_id = str(run.info.run_id)
    ts = int(e.evaluated_at * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, ts, 0) for k, v in run_metrics(e).items()],
        params=[Param(k, v) for k, v in run_params(e).items()],
        tags=[
            RunTag(f"{TAG_PREFIX}guardrail.{g.name}", "pass" if g.passed else "fail")
            for g in e.guardrails
        ],
    )
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    if action in ("kept", "aborted"):  # an acting run ends once its change is made
        client.set_terminated(run_id, status="FAILED" if action == "aborted" else "FINISHED")
    return run_id


def _record_rollback_run(
    client: MlflowClient, settings: Settings, before: AliasSnapshot, by: str
) -> str:
    run = client.create_run(
        audit_experiment(client, settings.model.name),
        run_name=f"rollback v{before.champion} -> v{before.rollback}",
        tags={
            f"{TAG_PREFIX}decision": "rollback",
            f"{TAG_PREFIX}action": "rolled_back",
            f"{TAG_PREFIX}by": by,
            f"{TAG_PREFIX}model_name": settings.model.name,
        },
    )
    run_id = str(run.info.run_id)
    client.log_batch(
        run_id,
        params=[
            Param("champion_version", str(before.champion)),
            Param("rollback_version", str(before.rollback)),
            Param("challenger_version", str(before.challenger)),
            Param("aliases_before", json.dumps(dataclasses.asdict(before))),
        ],
    )
    return run_id


# --- small helpers ---------------------------------------------------------------------------


def _translated(doing: str) -> AbstractContextManager[None]:
    """MLflow and database failures while acting become one-line :class:`PromotionError`s."""
    return translated(f"MLflow, {doing}", PromotionError)


def _describe(s: AliasSnapshot) -> str:
    def v(x: str | None) -> str:
        return f"v{x}" if x is not None else "unset"

    return f"champion={v(s.champion)} challenger={v(s.challenger)} rollback={v(s.rollback)}"


def _kept_message(evaluation: Evaluation) -> str:
    return f"Champion kept (v{evaluation.aliases.champion}): decision {evaluation.decision}."
