"""The split of record: the challenger weight that every worker of every replica serves.

It is kept in the registry, where every router already looks on each poll: a tag
``champion_challenger.split`` on the challenger's model version (the version behind
``@challenger``), holding a JSON object::

    {"challenger_weight": 0.2, "experiment_id": "churn:v1-vs-v2", "epoch": 2, "previous": 0.05,
     "changed_at": 1700000000.0, "changed_by": "alice@host", "reason": "PUT /admin/weights",
     "run_id": "<the audit run>"}

Routers read it with the challenger's alias (the same registry call, nothing more per poll), so a
change reaches every process within ``model.poll_interval_s``. A record applies only to the
experiment it names: a new challenger, or a new champion, starts at the configured default
(:func:`default_split`: ``experiment.ramp``'s first stage, else ``routing.challenger_weight``).
``epoch`` counts the changes within the experiment (0: the configured default is in force).

Writers (``PUT /admin/weights``, ``set_weight``, a ramp's next stage in ``evaluate_and_promote``)
go through :func:`write_split`: under the registry's change lock (``router/changes.py``, the one
promotions take), the aliases re-read and compared, an audit run (who, when, from, to) in
``champion-challenger/<model>``, then the tag.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from router.changes import (
    TAG_PREFIX,
    alias_versions,
    audit_experiment,
    registry_lock,
    translated,
)
from router.config import Settings
from router.errors import Conflict
from router.logschema import experiment_id, has_challenger
from router.registryfault import REGISTRY_FAILURES

#: The model-version tag holding the split of record.
SPLIT_TAG = f"{TAG_PREFIX}split"
#: ``action`` tag of a split change's audit run (promotions' runs say promoted, rejected...).
SPLIT_ACTION = "split_changed"

Source = Literal["registry", "experiment.ramp", "routing.challenger_weight", "no_challenger"]


class SplitTagInvalid(ValueError):
    """The registry's split tag is not a record this router can read (edited by hand?)."""


@dataclass(frozen=True)
class SplitRecord:
    """One change of the split, as the tag stores it."""

    challenger_weight: float
    experiment_id: str
    epoch: int
    previous: float
    changed_at: float
    changed_by: str
    reason: str
    run_id: str | None = None

    def to_tag(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Split:
    """The split in force for one experiment and where it came from."""

    challenger_weight: float
    source: Source
    epoch: int = 0  # 0: the configured default
    changed_at: float | None = None
    changed_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default_split(settings: Settings) -> Split:
    """The split when no record applies: a ramp's first stage, else routing.challenger_weight."""
    ramp = settings.experiment.ramp
    if ramp:
        return Split(ramp[0], "experiment.ramp")
    return Split(settings.routing.challenger_weight, "routing.challenger_weight")


def parse_tag(text: str | None) -> SplitRecord | None:
    """The record a tag holds (None: no tag); :class:`SplitTagInvalid` naming what is wrong."""
    if text is None:
        return None
    try:
        raw = json.loads(text)
        record = SplitRecord(
            challenger_weight=float(raw["challenger_weight"]),
            experiment_id=str(raw["experiment_id"]),
            epoch=int(raw["epoch"]),
            previous=float(raw["previous"]),
            changed_at=float(raw["changed_at"]),
            changed_by=str(raw["changed_by"]),
            reason=str(raw["reason"]),
            run_id=None if raw.get("run_id") is None else str(raw["run_id"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise SplitTagInvalid(
            f"tag {SPLIT_TAG} is not a split record ({exc!r}): {text[:200]!r}"
        ) from exc
    if not 0.0 <= record.challenger_weight <= 1.0 or not math.isfinite(record.changed_at):
        raise SplitTagInvalid(f"tag {SPLIT_TAG} holds a weight outside [0, 1]: {text[:200]!r}")
    return record


def split_in_force(settings: Settings, record: SplitRecord | None, eid: str) -> Split:
    """The record's split when it is this experiment's, else the configured default; 0 when
    the champion is served alone (after a rejection, say): no share goes to a challenger."""
    if not has_challenger(eid):
        return Split(0.0, "no_challenger")
    if record is None or record.experiment_id != eid:
        return default_split(settings)
    return Split(
        record.challenger_weight, "registry", record.epoch, record.changed_at, record.changed_by
    )


def read_split(client: MlflowClient, settings: Settings, champion: str, challenger: str) -> Split:
    """The split in force for the experiment ``champion`` vs ``challenger`` (evaluator's read)."""
    eid = experiment_id(settings.model.name, champion, challenger)
    return split_in_force(settings, _read_record(client, settings, challenger), eid)


def write_split(
    client: MlflowClient,
    settings: Settings,
    *,
    champion: str,
    challenger: str,
    weight: float,
    by: str,
    reason: str,
    expected: Split | None = None,
) -> SplitRecord:
    """Make ``weight`` the split of record of the experiment ``champion`` vs ``challenger``.

    Under the change lock: the aliases must still name these versions (else :class:`Conflict`,
    nothing written); ``expected``, when given, must still be the split in force (a ramp's
    compare-and-set). Then an audit run, then the tag. Raises :class:`RegistryLocked` (another
    change under way) or :class:`RegistryUnavailable`.
    """
    if not 0.0 <= weight <= 1.0:  # also NaN
        raise ValueError(f"challenger_weight must be within [0, 1], got {weight}")
    name = settings.model.name
    eid = experiment_id(name, champion, challenger)
    with registry_lock(client, name, by), translated(f"changing the split of {name}"):
        aliases = alias_versions(client, name)
        m = settings.model
        now = (aliases.get(m.champion_alias), aliases.get(m.challenger_alias))
        if now != (champion, challenger):
            raise Conflict(
                f"the aliases moved (@{m.champion_alias} v{now[0]}, @{m.challenger_alias} "
                f"v{now[1]}; expected v{champion} vs v{challenger}): the split was not changed"
            )
        current = split_in_force(settings, _read_record(client, settings, challenger), eid)
        if expected is not None and current != expected:
            raise Conflict(
                f"the split moved since it was read ({expected.challenger_weight:g} -> "
                f"{current.challenger_weight:g}, epoch {current.epoch}): not changed"
            )
        record = SplitRecord(
            challenger_weight=weight,
            experiment_id=eid,
            epoch=current.epoch + 1,
            previous=current.challenger_weight,
            changed_at=time.time(),
            changed_by=by,
            reason=reason,
        )
        run_id = _audit(client, settings, record)
        record = replace(record, run_id=run_id)
        try:
            client.set_model_version_tag(name, challenger, SPLIT_TAG, record.to_tag())
        except REGISTRY_FAILURES:
            with suppress(*REGISTRY_FAILURES):  # best effort
                client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id)
    return record


def _read_record(client: MlflowClient, settings: Settings, version: str) -> SplitRecord | None:
    name = settings.model.name
    with translated(f"reading the split of {name}"):
        tags = client.get_model_version(name, version).tags
    return parse_tag(tags.get(SPLIT_TAG))


def _audit(client: MlflowClient, settings: Settings, record: SplitRecord) -> str:
    name = settings.model.name
    run = client.create_run(
        audit_experiment(client, name),
        run_name=f"split {record.previous:g} -> {record.challenger_weight:g}",
        tags={
            f"{TAG_PREFIX}action": SPLIT_ACTION,
            f"{TAG_PREFIX}by": record.changed_by,
            f"{TAG_PREFIX}reason": record.reason,
            f"{TAG_PREFIX}model_name": name,
        },
    )
    run_id = str(run.info.run_id)
    params = {
        "experiment_id": record.experiment_id,
        "from_weight": f"{record.previous:g}",
        "to_weight": f"{record.challenger_weight:g}",
        "epoch": str(record.epoch),
        "changed_at": f"{record.changed_at:.3f}",
    }
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    return run_id
