"""The models in service and their hot reload.

An :class:`ArmSet` is immutable; a reload builds a new one and swaps the reference, so a request
that picked up the old set finishes on the models it started with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from router.config import Settings
from router.errors import RegistryUnavailable
from router.logschema import Arm, experiment_id, serves_challenger
from router.metrics import RouterMetrics
from router.redact import redact
from router.registry import LoadedModel, ModelNotFound, ModelRef, Registry
from router.scoring.signatures import SignatureDiff, signature_diff

log = logging.getLogger(__name__)

STARTUP_FIRST_RETRY_S = 0.5

#: Told after every successful poll: the experiment in service and its challenger's split tag.
SplitListener = Callable[[str, str | None], None]


@dataclass(frozen=True)
class ArmSet:
    champion: LoadedModel
    challenger: LoadedModel | None
    experiment_id: str
    challenger_error: str | None = None  # why a challenger alias is set but not served
    # How the challenger's input signature differs from the champion's (each arm takes its own).
    signatures: SignatureDiff = field(default_factory=SignatureDiff)


class ModelManager:
    """Owns the current :class:`ArmSet`; polls the registry and swaps in alias changes."""

    def __init__(self, settings: Settings, registry: Registry, metrics: RouterMetrics) -> None:
        self._settings = settings
        self._registry = registry
        self._metrics = metrics
        self.current: ArmSet | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._split_listeners: list[SplitListener] = []

    @property
    def registry(self) -> Registry:
        return self._registry

    def on_split(self, listener: SplitListener) -> None:
        """Call ``listener`` after every successful poll (the split of record rides on it)."""
        self._split_listeners.append(listener)

    def _resolve(self) -> tuple[ModelRef, ModelRef | None]:
        model = self._settings.model
        champion = self._registry.resolve_champion(model.champion_alias)
        challenger = self._registry.resolve_challenger(model.challenger_alias)
        if challenger is not None and not serves_challenger(champion.version, challenger.version):
            challenger = None
        return champion, challenger

    def _load(self, ref: ModelRef, previous: ArmSet | None) -> LoadedModel:
        """Reuse an already-loaded version (a promotion moves v2 from challenger to champion)."""
        if previous is not None:
            for loaded in (previous.champion, previous.challenger):
                if loaded is not None and loaded.ref.version == ref.version:
                    return LoadedModel(ref, loaded.model, loaded.input_schema, loaded.loaded_at)
        return self._registry.load(ref)

    def _build(self, previous: ArmSet | None) -> tuple[ArmSet | None, ModelRef | None]:
        """The new arm set (None: nothing changed), and the challenger's ref as just read."""
        champion_ref, challenger_ref = self._resolve()
        if previous is not None and _same(previous, champion_ref, challenger_ref):
            return None, challenger_ref
        champion = self._load(champion_ref, previous)
        challenger = None
        challenger_error = None
        if challenger_ref is not None:
            try:
                challenger = self._load(challenger_ref, previous)
            except RegistryUnavailable as exc:
                # The champion alone is a working router; a broken challenger must not stop it.
                challenger_error = f"challenger v{challenger_ref.version} failed to load: {exc}"
                log.error("%s", challenger_error)
                self._metrics.model_reloads.labels(Arm.CHALLENGER.value, "error").inc()
        exp = experiment_id(
            self._registry.model_name,
            champion.version,
            challenger.version if challenger else None,
        )
        diff = (
            signature_diff(champion.input_schema, challenger.input_schema)
            if challenger is not None
            else SignatureDiff()
        )
        return ArmSet(champion, challenger, exp, challenger_error, diff), challenger_ref

    async def refresh(self) -> bool:
        """Resolve aliases and swap in what changed; True when the served set changed."""
        async with self._lock:
            previous = self.current
            try:
                built, challenger_ref = await anyio.to_thread.run_sync(self._build, previous)
            except Exception as exc:  # re-raised: only recorded and counted here
                known = isinstance(exc, RegistryUnavailable | ModelNotFound)
                self.last_error = redact(str(exc) if known else f"{type(exc).__name__}: {exc}")
                if previous is not None:
                    self._metrics.model_reloads.labels(Arm.CHAMPION.value, "error").inc()
                    log.error("reload failed, keeping the models in service: %s", self.last_error)
                raise
            self.last_error = None
            changed = False
            if built is not None:
                # The same versions may come back found another way (e.g. the missing @champion
                # set on the version served): described as they are now, nothing reloaded.
                changed = previous is None or _versions(built) != _versions(previous)
                self.current = built
                if changed:
                    self._publish(previous, built)
            self._tell_split(challenger_ref)
            return changed

    def _tell_split(self, challenger_ref: ModelRef | None) -> None:
        # In the same step as the swap above (no await between): a request never sees a new
        # experiment with the previous one's split.
        arms = self.current
        if arms is None:
            return
        tag = challenger_ref.split_tag if challenger_ref is not None else None
        for listener in self._split_listeners:
            listener(arms.experiment_id, tag)

    def _publish(self, previous: ArmSet | None, arms: ArmSet) -> None:
        metrics, name = self._metrics, self._registry.model_name
        if previous is not None:
            for arm, loaded in _served(previous, self._settings):
                metrics.retire_model(arm, name, loaded.version, loaded.ref.run_id or "")
        before = dict(_served(previous, self._settings)) if previous is not None else None
        for arm, loaded in _served(arms, self._settings):
            metrics.model_info.labels(arm, name, loaded.version, loaded.ref.run_id or "").set(1)
            old = before.get(arm) if before is not None else None
            if before is not None and (old is None or old.version != loaded.version):
                # Only an arm whose version changed was (re)loaded: an unchanged arm is not.
                metrics.model_reloads.labels(arm, "ok").inc()
        metrics.ready.set(1)
        described = ", ".join(
            f"{arm} v{m.version} ({m.ref.resolved_via})" for arm, m in _served(arms, self._settings)
        )
        log.info("serving %s: %s [experiment %s]", name, described, arms.experiment_id)
        if arms.challenger is not None and not arms.signatures.same:
            log.warning("input signatures differ: %s", arms.signatures.describe())

    async def load_until_ready(self) -> None:
        """Start-up: retry until the champion loads, saying why on each failure (no crash loop).

        Runs in the background (the app answers ``/healthz`` meanwhile); the wait between attempts
        doubles from ``STARTUP_FIRST_RETRY_S`` up to ``model.startup_retry_interval_s``.
        """
        ceiling = self._settings.model.startup_retry_interval_s
        attempt = 0
        while self.current is None:
            attempt += 1
            delay = min(STARTUP_FIRST_RETRY_S * 2 ** (attempt - 1), ceiling)
            try:
                await self.refresh()
            except (RegistryUnavailable, ModelNotFound) as exc:
                log.error(
                    "champion not loaded yet (attempt %d, retrying in %gs): %s", attempt, delay, exc
                )
                await asyncio.sleep(delay)
            except Exception:  # the poller task's outermost layer: log it, retry
                log.exception(
                    "champion not loaded yet (attempt %d, retrying in %gs): unexpected error",
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)

    async def poll_forever(self) -> None:
        await self.load_until_ready()
        while True:
            await asyncio.sleep(self._settings.model.poll_interval_s)
            try:
                await self.refresh()
            except (RegistryUnavailable, ModelNotFound):
                continue  # counted and logged in refresh(); the old models keep serving
            except Exception:  # the poller task's outermost layer
                # Counted in refresh() too. Uncaught, it would end hot reload silently for good.
                log.exception("alias poll failed unexpectedly; the models in service are unchanged")

    def describe(self) -> dict[str, Any]:
        arms = self.current
        if arms is None:
            return {"ready": False, "error": self.last_error}
        return {"ready": True, "experiment_id": arms.experiment_id}


def _served(arms: ArmSet, settings: Settings) -> list[tuple[str, LoadedModel]]:
    served = [(Arm.CHAMPION.value, arms.champion)]
    if arms.challenger is not None:
        served.append((settings.routing.challenger_arm.value, arms.challenger))
    return served


def _versions(arms: ArmSet) -> tuple[str, str | None]:
    return arms.champion.version, arms.challenger.version if arms.challenger else None


def _same(arms: ArmSet, champion: ModelRef, challenger: ModelRef | None) -> bool:
    current_challenger = arms.challenger.version if arms.challenger else None
    wanted_challenger = challenger.version if challenger else None
    return (
        arms.champion.version == champion.version
        and arms.champion.ref.resolved_via == champion.resolved_via
        and current_challenger == wanted_challenger
    )
