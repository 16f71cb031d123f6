"""PostgreSQL's bulk path for the prediction writer: ``COPY`` into a staging table, then one insert.

``executemany`` of an insert-ignore with ``RETURNING`` cost the writer 89 µs of CPU per row and
capped one process at about 8,000 rows/s (psycopg sends one statement per row and parses one result
per row). ``COPY`` streams the batch in one round trip; PostgreSQL then moves it into
``predictions`` with one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``, whose row count says how
many went in: the rest are duplicates, counted as before. Rows are inserted in the order they were
queued (``ORDER BY`` the staging table's ordinal), so the first record of a (request_id, row_index,
arm), or of a (request_id, row_index) in an assigned arm (``logschema.ONE_ASSIGNED_ARM``), still
wins, also within one batch.

The staging table is a temporary table per connection (``ON COMMIT DELETE ROWS``), created with
``LIKE predictions`` so it has the same types and NOT NULL constraints: a record the database would
refuse fails the ``COPY`` as it failed the insert (``IntegrityError``/``DataError``), and the
writer's row-by-row fallback drops it alone. Driver errors are translated to SQLAlchemy's, so the
writer's retry rules see the same exceptions on both paths.

The writer's transactions commit with ``synchronous_commit = off`` (that transaction only; feedback
and everything else keep the server's setting): a batch no longer waits for its WAL flush (that
wait halved the rows per second at batches of 500), and a PostgreSQL crash may lose the last few
hundred milliseconds of committed batches, never corrupt anything: the trade the SQLite log makes
with ``synchronous = NORMAL``. A graceful stop of the router is unaffected: its batches are
committed before it exits, and the server flushes its WAL within ``wal_writer_delay``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

STAGE = "router_predictions_in"
_ORD = "router_ord"
_ASYNC_COMMIT = "SET LOCAL synchronous_commit = off"


class CopyInsert:
    """Insert rows (tuples in ``columns`` order) into ``table``, ignoring rows already there."""

    def __init__(self, table: sa.Table, columns: Sequence[str]) -> None:
        unknown = set(columns) - set(table.columns.keys())
        if unknown:
            raise ValueError(f"columns not in {table.name!r}: {sorted(unknown)}")
        quoted = ", ".join(f'"{c}"' for c in columns)
        self._create = (
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGE} "
            f"(LIKE {table.name} INCLUDING DEFAULTS, {_ORD} integer NOT NULL) "
            "ON COMMIT DELETE ROWS"
        )
        self._copy_direct = f"COPY {table.name} ({quoted}) FROM STDIN"
        self._copy_stage = f"COPY {STAGE} ({quoted}, {_ORD}) FROM STDIN"
        self._move = (
            f"INSERT INTO {table.name} ({quoted}) SELECT {quoted} FROM {STAGE} "
            f"ORDER BY {_ORD} ON CONFLICT DO NOTHING"
        )

    def __call__(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
        """Write ``rows`` in ``conn``'s transaction; return how many were inserted.

        Most batches hold no duplicate: they are copied straight into the table (half the
        server's work of the staging path). A batch with a key already logged fails that copy
        with a unique violation, rolled back to a savepoint, and goes through the staging table.
        """
        conn.exec_driver_sql(_ASYNC_COMMIT)
        savepoint = conn.begin_nested()
        try:
            self._copy_rows(conn, self._copy_direct, rows, ordinals=False)
        except sa.exc.IntegrityError as exc:
            savepoint.rollback()
            if not isinstance(exc.orig, psycopg.errors.UniqueViolation):
                raise  # NOT NULL and the like: the writer's row-by-row fallback
        else:
            savepoint.commit()
            return len(rows)
        conn.exec_driver_sql(self._create)
        self._copy_rows(conn, self._copy_stage, rows, ordinals=True)
        return conn.exec_driver_sql(self._move).rowcount

    @staticmethod
    def _copy_rows(
        conn: Connection, sql: str, rows: Sequence[tuple[Any, ...]], *, ordinals: bool
    ) -> None:
        raw = conn.connection.driver_connection
        assert isinstance(raw, psycopg.Connection)  # create_engine always picks psycopg 3
        try:
            with raw.cursor() as cursor, cursor.copy(sql) as copy:
                if ordinals:
                    for ordinal, row in enumerate(rows):
                        copy.write_row((*row, ordinal))
                else:
                    for row in rows:
                        copy.write_row(row)
        except psycopg.Error as exc:
            # The same exception classes as the executemany path raised (IntegrityError for a
            # NOT NULL violation, DataError for a value too long, OperationalError for a lost
            # connection), so the writer treats them alike.
            raise sa.exc.DBAPIError.instance(
                sql, None, exc, psycopg.Error, dialect=conn.dialect
            ) from exc
