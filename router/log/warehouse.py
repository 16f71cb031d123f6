"""The warehouse views of the log contract (``logschema.view_selects``), created in the database.

``python -m router.log views --config config.yaml`` runs :func:`create_views` once per log
database; it is idempotent (PostgreSQL replaces the views, SQLite keeps what exists) and needs the
tables, which the router creates at its first start. Not done by the router itself: on PostgreSQL
a view makes ``DROP TABLE predictions`` fail, which an operator resetting a log should decide.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from router.logschema import metadata, view_selects

logger = logging.getLogger(__name__)


def create_views(conn: Connection) -> list[str]:
    """Create (PostgreSQL: create or replace) every warehouse view; return their names."""
    dialect = conn.dialect.name
    if not all(sa.inspect(conn).has_table(t.name) for t in metadata.sorted_tables):
        raise LookupError("the log has no predictions/outcomes tables yet (has a router run?)")
    verb = "CREATE OR REPLACE VIEW" if dialect == "postgresql" else "CREATE VIEW IF NOT EXISTS"
    names = []
    for name, select in view_selects(dialect).items():
        conn.exec_driver_sql(f"{verb} {name} AS {select}")
        logger.info("prediction log: view %s ready", name)
        names.append(name)
    return names
