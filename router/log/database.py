"""The prediction log's database: engine set-up per backend and the helpers both of its users need.

SQLite runs in WAL mode with ``BEGIN IMMEDIATE`` transactions, so the prediction writer and the
feedback store serialise on its single write lock instead of failing, and without a connection
pool: SQLite maps the ``-shm`` file into each connection, and a mapping kept idle in a pool is
what a ``-shm`` truncated or made unwritable later turns into a SIGBUS (a crash no Python code can
catch) at its next use. A new connection maps the file as it is, and refuses one it cannot write.
PostgreSQL goes through psycopg 3 with a pre-ping on checkout.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from router.logschema import metadata
from router.redact import redact

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000  # writer and feedback serialise on SQLite's single write lock


def create_engine(url: str) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql[+psycopg]://...``; anything else fails.

    Relative SQLite paths resolve against the working directory; in-memory SQLite is refused (each
    pooled connection would see its own empty database). Plain ``postgresql://`` uses psycopg 3.
    """
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
            # Each pooled connection would see its own empty database.
            raise ValueError(
                f"prediction log {url!r}: in-memory SQLite is not supported; use a file"
            )
        # No pool: a connection lives for one transaction (see _refuse_unwritable).
        engine = sa.create_engine(
            parsed, connect_args={"check_same_thread": False}, poolclass=sa.pool.NullPool
        )
        shm = Path(f"{Path(parsed.database).resolve()}-shm")
        sa.event.listen(engine, "do_connect", lambda *_: _refuse_unwritable(shm))
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg2 is not a dependency
        # pre_ping: a restarted server must not fail the first batch after it with a dead socket.
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    raise ValueError(
        f"prediction log {url!r}: unsupported database {backend!r} (use sqlite or postgresql)"
    )


class SqliteFile:
    """The file behind a SQLite engine, to notice when it is deleted or replaced while open.

    SQLite keeps writing to an unlinked file without complaint: every row written after the
    file (or its directory) was deleted would vanish without an error.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None

    def _current(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def remember(self) -> None:
        """Note the file the engine's connections now use (after they opened it)."""
        self._identity = self._current()

    def forget(self) -> None:
        self._identity = None

    def replaced(self) -> bool:
        """True when the remembered file is no longer at its path (one ``stat``, ~2 µs)."""
        return self._identity is not None and self._current() != self._identity


def sqlite_file(engine: Engine) -> SqliteFile | None:
    """A :class:`SqliteFile` for a SQLite engine's database, None for other databases."""
    if engine.dialect.name != "sqlite" or not engine.url.database:
        return None
    return SqliteFile(Path(engine.url.database).resolve())


def _refuse_unwritable(shm: Path) -> None:
    """Refuse to open a database whose ``-shm`` file this process cannot write.

    SQLite would map it read-only; a wal-index it cannot grow then ends in SIGBUS, a crash no
    Python code can catch. A clear, retried and counted error instead. Checked at every connect,
    and connections do not outlive a burst of writing (no pool; the writer closes its connection
    when its queue is empty): a file that becomes unwritable at run time is found by the next
    batch's connect. What remains is a fault that lands inside one open transaction
    (milliseconds).
    """
    # The file comes and goes: SQLite deletes it when the last connection closes, and another
    # connection of this process may be creating it right now. Only a file that is there and
    # still not writable on a second look is refused (checking exists() first refused a file
    # deleted in between). Never opened here: closing any descriptor of the file would drop
    # SQLite's POSIX locks on it.
    mode = os.R_OK | os.W_OK
    if not os.access(shm, mode) and shm.exists() and not os.access(shm, mode):
        raise sqlite3.OperationalError(
            f"{shm} is not writable by this process (uid {os.geteuid()}): fix its owner or mode"
        )


def safe_url(engine: Engine) -> str:
    """The engine's URL for messages, password hidden."""
    return engine.url.render_as_string(hide_password=True)


def insert_ignoring(engine: Engine, table: sa.Table) -> sa.Insert:
    """``INSERT`` that skips rows whose unique key is already present (either backend)."""
    if engine.dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    return postgresql.insert(table).on_conflict_do_nothing()


RowInserter = Callable[[Connection, Sequence[tuple[Any, ...]]], int]


def row_inserter(engine: Engine, table: sa.Table, columns: Sequence[str]) -> RowInserter:
    """``insert(conn, rows)``: rows (tuples in ``columns`` order) into ``table``, skipping rows
    whose unique key is present (the first of equal keys wins); returns how many went in.

    PostgreSQL: ``COPY`` and one insert (:mod:`router.log.pgcopy`). SQLite: one positional
    ``executemany`` (the driver sums its row counts); no per-row parameter dictionaries.
    """
    if engine.dialect.name == "postgresql":
        from router.log.pgcopy import CopyInsert  # psycopg is imported for PostgreSQL logs only

        return CopyInsert(table, columns)
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" for _ in columns)
    sql = f"INSERT INTO {table.name} ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING"

    def insert(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
        return conn.exec_driver_sql(sql, list(rows)).rowcount

    return insert


def add_missing_columns(conn: Connection) -> None:
    """Add nullable columns the contract gained since a log's tables were created.

    ``create_all`` never alters an existing table; a log written by an older router would otherwise
    refuse every insert that names a new column. Only nullable columns are ever added this way.
    """
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise ValueError(f"table {table.name!r} lacks non-nullable column {column.name!r}")
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
            logger.info("prediction log: added column %s.%s", table.name, column.name)


def add_missing_indexes(conn: Connection) -> None:
    """Create the contract's indexes a log created by an older router lacks.

    ``create_all`` creates a table's indexes only with the table. A unique index that the rows
    already logged violate (a request id reused across arms before the index existed) cannot be
    created: that is logged, and the log works on without it (``FeedbackStore`` still refuses
    outcomes for such ids) rather than stopping to write.
    """
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        present = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name in present:
                continue
            try:
                with conn.begin_nested():
                    index.create(conn)
            except sa.exc.IntegrityError as exc:
                logger.warning(
                    "prediction log: cannot create the unique index %s, rows already logged "
                    "violate it (%s); remove them to have it",
                    index.name,
                    brief(exc),
                )
            else:
                logger.info("prediction log: created index %s", index.name)


def short(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def brief(exc: BaseException) -> str:
    """The driver's message, first line, without SQLAlchemy's SQL and parameter dump."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return redact(f"{type(orig or exc).__name__}: {short(text[0] if text else '', 300)}")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Driver-level autocommit, so that _sqlite_on_begin alone decides how transactions start.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")  # first: WAL switch waits
        # WAL: the evaluator reads while the router writes; NORMAL sync is safe with WAL (a power
        # cut may lose the last commits, never corrupt the file).
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()
    if str(mode).lower() != "wal":
        logger.warning("prediction log: SQLite refused WAL mode (journal_mode=%s)", mode)


def _sqlite_on_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front: feedback reads then writes, and a deferred
    # transaction upgrading its lock fails with SQLITE_BUSY at once instead of waiting.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
