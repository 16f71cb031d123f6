"""The traffic split in force in this process, and the arm each request takes.

One :class:`ChallengerSplit` per process, owned by the service. The split of record is shared by
every worker and replica: it lives in the registry (``router/splitrecord.py``) and this process
follows it on every poll of the model manager (:meth:`ChallengerSplit.follow`), so a change made
anywhere (``PUT /admin/weights`` on any worker, ``set_weight``, a ramp's next stage) is in force
everywhere within ``model.poll_interval_s``. Until a record applies to the experiment in service,
the configured default is (``experiment.ramp``'s first stage, else ``routing.challenger_weight``).

Within one experiment the split's epoch only grows: a poll that read the registry before a change
this process already follows (a ``PUT`` answered meanwhile) is a stale read, ignored.

The gauges say what is in force: ``router_arm_weight`` (the challenger's share is 0 in shadow
mode, where the champion answers every request), ``router_split_epoch`` and
``router_split_changed_timestamp_seconds``; with a ramp, its stage. Which arm a request takes is
the pure function in ``router/assignment.py``, called with this weight.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from router.assignment import Assignment, assign
from router.config import Settings
from router.logschema import Arm
from router.metrics import RouterMetrics
from router.splitrecord import (
    Split,
    SplitRecord,
    SplitTagInvalid,
    default_split,
    parse_tag,
    split_in_force,
)

log = logging.getLogger(__name__)


class ChallengerSplit:
    """This process's copy of the split of record, its gauges, and the assignment that reads it."""

    def __init__(
        self, settings: Settings, metrics: RouterMetrics, rng: random.Random | None = None
    ) -> None:
        self._settings = settings
        self._routing = settings.routing
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._split = default_split(settings)
        self._experiment: str | None = None
        self._since = time.time()  # when the split in force began, as this process saw it
        self.error: str | None = None  # why the registry's record could not be followed
        self._publish()

    @property
    def weight(self) -> float:
        """The challenger weight in force, in [0, 1]."""
        return self._split.challenger_weight

    @property
    def split(self) -> Split:
        return self._split

    def follow(self, experiment_id: str, tag: str | None) -> None:
        """The registry's split tag as read on a poll, for the experiment now in service."""
        try:
            record = parse_tag(tag)
        except SplitTagInvalid as exc:
            if self.error != str(exc):
                log.error("%s; keeping the split in force (%g)", exc, self.weight)
            self.error = str(exc)
            return
        self.error = None
        self.adopt(experiment_id, record)

    def adopt(self, experiment_id: str, record: SplitRecord | None) -> None:
        """Put ``record`` in force (the configured default when it is not this experiment's)."""
        split = split_in_force(self._settings, record, experiment_id)
        if experiment_id == self._experiment and split.epoch < self._split.epoch:
            return  # read before a change this process already follows
        if experiment_id == self._experiment and split == self._split:
            return
        if split != self._split:
            log.info(
                "split for %s: challenger weight %g -> %g (%s, epoch %d)",
                experiment_id,
                self._split.challenger_weight,
                split.challenger_weight,
                split.source,
                split.epoch,
            )
        self._experiment = experiment_id
        self._split = split
        self._since = split.changed_at if split.changed_at is not None else time.time()
        self._publish()

    def deciding_weight(self, challenger_loaded: bool) -> float | None:
        """The weight that decides a request's arm now (what its row was randomised under);
        None when none does: shadow mode, where the champion answers every request, or no
        challenger loaded."""
        if self._routing.shadow or not challenger_loaded:
            return None
        return self.weight

    def served_weight(self, challenger_loaded: bool) -> float:
        """The challenger's share of requests now: none in shadow mode or without a challenger."""
        weight = self.deciding_weight(challenger_loaded)
        return 0.0 if weight is None else weight

    def assign(self, routing_key: str | None, deciding_weight: float | None) -> Assignment:
        """The arm for one request under :meth:`deciding_weight`'s answer (None: the champion, as
        in shadow mode, where the challenger answers none)."""
        return assign(
            routing_key,
            self._routing.salt,
            self.weight if deciding_weight is None else deciding_weight,
            deciding_weight is not None,
            self._rng,
        )

    def describe(self) -> dict[str, Any]:
        """The split in force for ``/experiment``: weight, source, epoch, since, ramp stage."""
        body = {**self._split.to_json(), "in_force_since": self._since}
        ramp = self._settings.experiment.ramp
        if ramp:
            body["ramp"] = {"stages": list(ramp), "stage": self._stage()}
        if self.error is not None:
            body["error"] = self.error
        return body

    def _stage(self) -> int:
        """1-based stage of the weight in force on ``experiment.ramp``; 0 when it is none."""
        ramp = self._settings.experiment.ramp
        return ramp.index(self.weight) + 1 if self.weight in ramp else 0

    def _publish(self) -> None:
        # Independent of whether a challenger is loaded: the gauges show the split in force.
        weight = 0.0 if self._routing.shadow else self.weight
        m = self._metrics
        m.arm_weight.labels(Arm.CHAMPION.value).set(1.0 - weight)
        m.arm_weight.labels(Arm.CHALLENGER.value).set(weight)
        m.split_epoch.set(self._split.epoch)
        m.split_changed.set(self._since)
        ramp = self._settings.experiment.ramp
        m.ramp_stage.set(self._stage())
        m.ramp_stages.set(len(ramp))
        m.ramp_stage_min.set(self._settings.experiment.ramp_stage_min_s if ramp else 0.0)
