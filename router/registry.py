"""Resolving registry aliases to versions and loading them: the router's seam to the registry.

Every MLflow exception of the registry is translated here into :class:`RegistryUnavailable` or
:class:`ModelNotFound`; callers never see MLflow's registry types. All calls block: run them off
the event loop. Other MLflow use: the loaded ``PyFuncModel`` is called by ``router.scoring``,
signatures are read with ``mlflow.types``, and MLflow's non-public functions (the scoring
server's parsing and encoding) are reached through ``router/mlflow_private.py`` only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow
import sqlalchemy as sa
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from router.config import Settings
from router.errors import RegistryUnavailable
from router.registryfault import REGISTRY_FAILURES, describe, registry_unavailable
from router.splitrecord import SPLIT_TAG, SplitRecord, write_split

log = logging.getLogger(__name__)

ResolvedVia = Literal["alias", "stage:Production"]


class ModelNotFound(LookupError):
    """The registry answered, but has no version for what was asked."""


class ModelLoadFailed(RegistryUnavailable):
    """A version's artifacts were fetched but do not load (corrupt, incomplete or incompatible).

    A subclass of :class:`RegistryUnavailable`, so every caller keeps the models in service.
    """

    code = "model_load_failed"


@dataclass(frozen=True)
class ModelRef:
    """Which registry version an arm serves, and how it was found."""

    alias: str
    version: str
    run_id: str | None
    resolved_via: ResolvedVia
    # The version's split tag (router/splitrecord.py), read with the alias: the challenger's
    # holds the split of record.
    split_tag: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A loaded pyfunc model with the registry facts needed to attribute its predictions."""

    ref: ModelRef
    model: Any  # mlflow.pyfunc.PyFuncModel
    input_schema: Any  # mlflow.types.Schema | None
    loaded_at: float

    @property
    def version(self) -> str:
        return self.ref.version

    @property
    def params_schema(self) -> Any:  # mlflow.types.ParamSchema | None
        metadata = getattr(self.model, "metadata", None)
        return metadata.get_params_schema() if metadata is not None else None


def model_not_found(name: str, tracking_uri: str) -> str:
    """The one wording of a registered model the registry does not have (router and evaluator)."""
    return f"registered model {name!r} not found at {tracking_uri}"


def _is_not_found(exc: MlflowException) -> bool:
    return exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


# MLflow's database-backed stores (mlflow.store.db.db_types); the first word of the URI scheme.
_DATABASE_SCHEMES = frozenset({"sqlite", "postgresql", "mysql", "mssql"})
PROBE_TIMEOUT_S = 5


def probe_database(tracking_uri: str) -> None:
    """Raise ``RegistryUnavailable`` at once when a database-backed store cannot be reached.

    MLflow's own engine set-up retries for ~105 s before it gives up, and would create an empty
    SQLite registry where none exists: a router only reads a registry, so it must find one.
    """
    scheme = tracking_uri.partition(":")[0].partition("+")[0].lower()
    if scheme not in _DATABASE_SCHEMES:
        return
    try:
        url = sa.make_url(tracking_uri)
    except sa.exc.ArgumentError as exc:
        raise registry_unavailable(tracking_uri, exc) from exc
    if scheme == "sqlite":
        if not url.database or not Path(url.database).is_file():
            raise RegistryUnavailable(f"MLflow registry at {tracking_uri}: no database file")
        return
    connect_args = {"connect_timeout": PROBE_TIMEOUT_S} if scheme in ("postgresql", "mysql") else {}
    try:
        engine = sa.create_engine(url, connect_args=connect_args, poolclass=sa.pool.NullPool)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        raise registry_unavailable(tracking_uri, exc) from exc


def connect(tracking_uri: str) -> MlflowClient:
    """A client of the registry (and tracking store) at ``tracking_uri``, once it answers."""
    probe_database(tracking_uri)
    try:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except REGISTRY_FAILURES as exc:
        raise registry_unavailable(tracking_uri, exc) from exc


class Registry:
    """A thin client for one registered model.

    Nothing connects before the first call (and calls run off the event loop), so a registry that
    is down never blocks start-up; a client is only built once its store answers.
    """

    def __init__(self, tracking_uri: str, model_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self._client_lock = threading.Lock()
        self._mlflow_client: MlflowClient | None = None

    @property
    def _client(self) -> MlflowClient:
        with self._client_lock:
            if self._mlflow_client is None:
                self._mlflow_client = connect(self.tracking_uri)
            return self._mlflow_client

    def _by_alias(self, alias: str) -> ModelRef | None:
        try:
            mv = self._client.get_model_version_by_alias(self.model_name, alias)
        except MlflowException as exc:
            if _is_not_found(exc):
                return None
            raise registry_unavailable(self.tracking_uri, exc) from exc
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise registry_unavailable(self.tracking_uri, exc) from exc
        tags = getattr(mv, "tags", None) or {}
        return ModelRef(alias, str(mv.version), mv.run_id, "alias", tags.get(SPLIT_TAG))

    def _versions(self) -> list[Any]:
        try:
            return list(self._client.search_model_versions(f"name = '{self.model_name}'"))
        except REGISTRY_FAILURES as exc:
            raise registry_unavailable(self.tracking_uri, exc) from exc

    def _require_model(self) -> None:
        """ModelNotFound when the registered model itself does not exist (a name typo)."""
        try:
            self._client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ModelNotFound(model_not_found(self.model_name, self.tracking_uri)) from exc
            raise registry_unavailable(self.tracking_uri, exc) from exc
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise registry_unavailable(self.tracking_uri, exc) from exc

    def resolve_champion(self, alias: str) -> ModelRef:
        """The alias; else the legacy ``Production`` stage; else ModelNotFound saying why.

        Registry users moving from stages to aliases expect the stage as a fallback: putting a
        version in Production was someone's choice. No other version is ever served as the
        champion (the latest one is typically the untested challenger): the router is then not
        ready, and says how to set the alias.
        """
        ref = self._by_alias(alias)
        if ref is not None:
            return ref
        versions = self._versions()
        if not versions:
            self._require_model()
            raise ModelNotFound(f"registered model {self.model_name!r} has no versions")
        by_number = sorted(versions, key=lambda mv: int(mv.version))
        production = [mv for mv in by_number if getattr(mv, "current_stage", None) == "Production"]
        if production:
            mv = production[-1]
            log.warning(
                "alias @%s of %s is missing: serving version %s from the Production stage",
                alias,
                self.model_name,
                mv.version,
            )
            return ModelRef(alias, str(mv.version), mv.run_id, "stage:Production")
        known = ", ".join(str(mv.version) for mv in by_number[-5:])
        raise ModelNotFound(
            f"registered model {self.model_name!r} has no @{alias} alias and no version in the "
            f"Production stage, so no version was chosen to serve (versions: {known}); set it: "
            f"MlflowClient().set_registered_model_alias({self.model_name!r}, {alias!r}, VERSION), "
            "or check model.champion_alias"
        )

    def resolve_challenger(self, alias: str) -> ModelRef | None:
        """The challenger alias, or None: then the champion takes all traffic."""
        return self._by_alias(alias)

    def write_split(
        self, settings: Settings, champion: str, challenger: str, weight: float, *, by: str
    ) -> SplitRecord:
        """Make ``weight`` the fleet's split of record for this experiment (audited)."""
        return write_split(
            self._client,
            settings,
            champion=champion,
            challenger=challenger,
            weight=weight,
            by=by,
            reason="PUT /admin/weights",
        )

    def load(self, ref: ModelRef) -> LoadedModel:
        """Download and load one version (by number, so a concurrent alias move cannot race)."""
        uri = f"models:/{self.model_name}/{ref.version}"
        try:
            # The version's own artifact location: a models:/ URI would be resolved against
            # MLflow's process-global registry, not this router's.
            source = self._client.get_model_version_download_uri(self.model_name, ref.version)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=source, tracking_uri=self.tracking_uri
            )
        except (MlflowException, OSError) as exc:
            raise RegistryUnavailable(f"loading {uri}: {describe(exc, self.tracking_uri)}") from exc
        try:
            model = mlflow.pyfunc.load_model(local)
            schema = model.metadata.get_input_schema() if model.metadata else None
        except MlflowException as exc:
            raise ModelLoadFailed(f"loading {uri}: {exc.message}") from exc
        except Exception as exc:
            # Loading runs the flavor's and the model's own code (skops, cloudpickle, a
            # PythonModel's load_context): a corrupt or incompatible version raises anything
            # (BadZipFile, YAMLError, AttributeError, ImportError...). Any of them means "this
            # version cannot serve"; untranslated, it escaped the reload loop and ended it.
            raise ModelLoadFailed(f"loading {uri}: {type(exc).__name__}: {exc}") from exc
        return LoadedModel(ref=ref, model=model, input_schema=schema, loaded_at=time.time())
