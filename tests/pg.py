"""PostgreSQL for tests: where it is, whether it is reachable, and an isolated schema per test.

Tests that need it are marked ``@pytest.mark.postgres`` and call :func:`require_postgres` (or use
:func:`isolated_schema_url`), which skips with the reason when no server answers. CI starts one
with ``.ci/postgres.sh``; locally: ``sudo .ci/postgres.sh`` or point ``ROUTER_TEST_POSTGRES_URL``
at any server where the role may create schemas.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from bench.pglog import postgres_schema

ENV_VAR = "ROUTER_TEST_POSTGRES_URL"
DEFAULT_URL = "postgresql+psycopg://router:router@127.0.0.1:5432/router_test"


def postgres_url() -> str:
    """The PostgreSQL URL tests use: ``$ROUTER_TEST_POSTGRES_URL`` or the CI default."""
    return os.environ.get(ENV_VAR) or DEFAULT_URL


@functools.cache
def _unreachable_reason(url: str) -> str | None:
    # Cached per session: one connection attempt, not one per test.
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "skip", with its reason
        safe = sa.make_url(url).render_as_string(hide_password=True)
        first_line = str(getattr(exc, "orig", None) or exc).strip().splitlines()[:1]
        return (
            f"PostgreSQL not reachable at {safe} ({type(exc).__name__}: {''.join(first_line)}); "
            f"run .ci/postgres.sh as root or set {ENV_VAR}"
        )
    finally:
        engine.dispose()
    return None


def require_postgres() -> str:
    """Return a reachable PostgreSQL URL, or skip the calling test saying why there is none."""
    url = postgres_url()
    reason = _unreachable_reason(url)
    if reason is not None:
        pytest.skip(reason)
    return url


@contextmanager
def isolated_schema_url() -> Iterator[str]:
    """A URL whose ``search_path`` is a fresh schema, dropped afterwards (skips without a server).

    Tables created through it (``metadata.create_all``) land in that schema, so tests sharing one
    database never see each other's rows.
    """
    with postgres_schema(require_postgres(), f"test_{uuid.uuid4().hex[:16]}") as url:
        yield url


@contextmanager
def log_engine(backend: str, tmp_path: Path) -> Iterator[sa.Engine]:
    """An empty prediction-log database: a SQLite file in ``tmp_path`` (``backend`` "sqlite") or an
    isolated PostgreSQL schema (``"postgres"``); the tests that hold SQL to its Python definition
    run on both."""
    if backend == "sqlite":
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'log.db'}")
        try:
            yield engine
        finally:
            engine.dispose()
        return
    with isolated_schema_url() as url:
        engine = sa.create_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()
