"""PostgreSQL for the benchmarks: is it there, and a schema of its own for one run.

The URL comes from ``--postgres`` or ``$ROUTER_TEST_POSTGRES_URL`` (the tests' server); every run
writes into a fresh schema (through ``search_path``), dropped when the run ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from router.log.database import create_engine

ENV_VAR = "ROUTER_TEST_POSTGRES_URL"


def default_url() -> str | None:
    return os.environ.get(ENV_VAR) or None


@contextmanager
def postgres_schema(base: str, schema: str | None = None) -> Iterator[str]:
    """A URL on ``base`` whose ``search_path`` is a fresh schema (default ``bench_<pid>``),
    dropped afterwards with everything in it; the tests' isolated schemas are made here too."""
    schema = schema or f"bench_{os.getpid()}"
    admin = create_engine(base)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def postgres_reason(url: str | None) -> str | None:
    """None when ``url`` answers, else why PostgreSQL is left out."""
    if not url:
        return "no --postgres URL and no $ROUTER_TEST_POSTGRES_URL"
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[:1]
        return f"PostgreSQL not reachable: {''.join(first)}"
    finally:
        engine.dispose()
    return None
