"""The scorers in service: one :class:`ModelScorer` per model of the current :class:`ArmSet`.

A reload brings a new ``ArmSet``; :meth:`Scorers.for_arms` then builds a new :class:`ScorerSet`,
keeping the scorer (threads, batcher, breaker, fallback counts) of a model that stays in service,
as the champion does when only the challenger changes. Retired scorers need no closing: their idle
threads retire by themselves, and a call still in flight on the old models finishes there.

Each arm's options come from the settings: the champion's and the challenger's own timeout, and
for the challenger a :class:`CircuitBreaker` whose state ``router_challenger_circuit_open`` shows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from router.arms import ArmSet
from router.config import Settings
from router.logschema import Arm
from router.metrics import RouterMetrics
from router.registry import LoadedModel
from router.scoring.breaker import BreakerState, CircuitBreaker
from router.scoring.scorer import ModelScorer, ScorerOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScorerSet:
    """The scorers of one :class:`ArmSet`."""

    arms: ArmSet
    champion: ModelScorer
    challenger: ModelScorer | None
    # Both arms' column names when their signatures differ (else None): a column is unknown only
    # when neither arm takes it.
    known_columns: frozenset[str] | None = None

    @property
    def shared_input(self) -> bool:
        """Both arms take the same input: a request parsed for one fits the other."""
        return self.arms.signatures.same and self.arms.signatures.comparable


class Scorers:
    """Builds and keeps the :class:`ScorerSet` of the arms in service; lives on the event loop."""

    def __init__(self, settings: Settings, metrics: RouterMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._current: ScorerSet | None = None

    def for_arms(self, arms: ArmSet) -> ScorerSet:
        """The scorers of ``arms`` (built on the first request after a reload)."""
        current = self._current
        if current is not None and current.arms is arms:
            return current
        old = (
            {id(s.model): s for s in (current.champion, current.challenger) if s} if current else {}
        )
        champion = old.pop(id(arms.champion), None) or self._new(arms.champion, Arm.CHAMPION)
        challenger = None
        if arms.challenger is not None:
            challenger = old.pop(id(arms.challenger), None) or self._new(
                arms.challenger, self._settings.routing.challenger_arm
            )
        known = None
        if challenger is not None and not arms.signatures.same:
            known = _column_names(champion) | _column_names(challenger)
        self._current = ScorerSet(arms, champion, challenger, known)
        breaker = challenger.breaker if challenger is not None else None
        self._metrics.circuit_open.set(
            0 if breaker is None or breaker.state is BreakerState.CLOSED else 1
        )
        return self._current

    def reset_circuit(self) -> None:
        """An operator's reload: give the challenger another chance now."""
        current = self._current
        if current is not None and current.challenger and current.challenger.breaker:
            current.challenger.breaker.reset()

    def describe(self, arms: ArmSet) -> dict[str, Any]:
        """The challenger's breaker and this process's fallback counts, for ``/experiment``."""
        challenger = self.for_arms(arms).challenger
        if challenger is None or challenger.breaker is None:
            return {}
        return {
            "challenger_circuit": challenger.breaker.describe(),
            # This process's count for the version in service (router_fallback_total: all time).
            "challenger_fallbacks": dict(challenger.fallbacks),
        }

    def _new(self, model: LoadedModel, arm: Arm) -> ModelScorer:
        server, routing = self._settings.server, self._settings.routing
        champion = arm is Arm.CHAMPION
        options = ScorerOptions(
            threads=server.predict_threads,
            timeout_s=server.champion_timeout_s if champion else server.challenger_timeout_s,
            batch_max_rows=server.batch_max_rows,
            batch_wait_s=server.batch_wait_ms / 1000.0,
            batch_custom_models=server.batch_custom_models,
        )
        breaker = None
        if not champion:
            breaker = CircuitBreaker(
                routing.breaker_failures,
                routing.breaker_cooldown_s,
                on_change=self._circuit_changed,
            )
        return ModelScorer(
            model,
            arm.value,
            options,
            breaker=breaker,
            on_batch=self._metrics.batch_rows.labels(model.version).observe,
        )

    def _circuit_changed(self, state: BreakerState) -> None:
        self._metrics.circuit_open.set(0 if state is BreakerState.CLOSED else 1)
        log.warning("challenger circuit breaker: %s", state.value)


def _column_names(scorer: ModelScorer) -> frozenset[str]:
    plan = scorer.column_plan
    return frozenset(plan.names) if plan is not None else frozenset()
