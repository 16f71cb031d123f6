"""Changes the whole fleet follows, made in the registry: who makes them, the lock that serialises
them, and the MLflow experiment that audits them.

Alias moves (``experiments/promote.py``: promote, reject, rollback) and changes of the traffic
split (``router/splitrecord.py``: ``PUT /admin/weights``, ``set_weight``, a ramp's next stage)
are all made by whoever holds ``<model>.promotion-lock``, and each is recorded as a run of the
experiment ``champion-challenger/<model>``. One lock for both: a split written while a promotion
moves the aliases would otherwise land on an experiment that just ended.

MLflow has no conditional update, so the lock is a registered model that the holder *creates*: the
store's unique name constraint lets exactly one concurrent create succeed (SQLite, PostgreSQL or a
tracking server alike). The holder deletes it when done, only if it still carries the holder's
token. A lock left by a killed process is never broken automatically: a person should look at what
it was changing; the error names the lock to delete.
"""

from __future__ import annotations

import getpass
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import sqlalchemy as sa
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from router.errors import Conflict, RegistryUnavailable
from router.registryfault import REGISTRY_FAILURES, describe

#: Prefix of every tag the project writes on versions, runs and the registered model.
TAG_PREFIX = "champion_challenger."
LOCK_SUFFIX = ".promotion-lock"


class RegistryLocked(Conflict):
    """Another change (a promotion, a rollback, a split change) holds the lock (HTTP 409)."""

    code = "change_in_progress"


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


def tracking_experiment_name(model_name: str) -> str:
    """The MLflow experiment whose runs audit every change of ``model_name``'s experiments."""
    return f"champion-challenger/{model_name}"


def actor() -> str:
    """``user@host`` of whoever runs this, for the audit tags."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def iso_now() -> str:
    return datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="seconds")


@contextmanager
def registry_lock(client: MlflowClient, model_name: str, by: str) -> Iterator[str]:
    """Hold ``<model>.promotion-lock`` for the block; :class:`RegistryLocked` when another holds
    it, :class:`RegistryUnavailable` when the registry cannot be changed."""
    name = lock_name(model_name)
    token = uuid.uuid4().hex
    tags = {"token": token, "holder": by, "acquired_at": iso_now()}
    try:
        client.create_registered_model(
            name, tags=tags, description=f"Held while {by} changes {model_name}'s experiment."
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise RegistryUnavailable(f"taking the lock {name!r}: {exc.message}") from exc
        raise RegistryLocked(_held_message(client, name)) from exc
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise RegistryUnavailable(f"taking the lock {name!r}: {exc}") from exc
    try:
        yield token
    finally:
        _release(client, name, token)


def _held_message(client: MlflowClient, name: str) -> str:
    try:
        held = client.get_registered_model(name).tags
    except MlflowException:  # released in between: still a concurrent change
        held = {}
    return (
        f"another promotion is under way ({held.get('holder', '?')} since "
        f"{held.get('acquired_at', '?')}); if none is, delete registered model {name!r}"
    )


def _release(client: MlflowClient, name: str, token: str) -> None:
    with translated(f"releasing the lock {name!r}"):
        if client.get_registered_model(name).tags.get("token") == token:
            client.delete_registered_model(name)


def alias_versions(client: MlflowClient, model_name: str) -> dict[str, str]:
    """The registered model's aliases and their versions, in one read (one consistent snapshot).
    MLflow errors pass through: each caller names what it was doing."""
    # Versions come back as int from the SQL store and as str over REST: normalise.
    return {k: str(v) for k, v in client.get_registered_model(model_name).aliases.items()}


@contextmanager
def translated(
    doing: str, error: Callable[[str], Exception] = RegistryUnavailable
) -> Iterator[None]:
    """MLflow and database failures while changing the registry become one ``error`` naming
    what was being done (the router's :class:`RegistryUnavailable` unless told otherwise)."""
    try:
        yield
    except REGISTRY_FAILURES as exc:
        raise error(f"{doing}: {describe(exc)}") from exc


def audit_experiment(client: MlflowClient, model_name: str) -> str:
    """The id of ``champion-challenger/<model>``, created on first use."""
    name = tracking_experiment_name(model_name)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:  # created concurrently by another writer?
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)
