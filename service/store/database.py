"""Engines and schema migrations for the store, from one database URL.

SQLite (the default: one file that several uvicorn workers share) and PostgreSQL get the
same tables from the same Alembic revisions, run in process when the store opens. Each run
holds a lock for its whole transaction (a PostgreSQL advisory lock, SQLite's write lock),
so workers that start together upgrade the database once, one after the other.

Database URLs may carry passwords and statements carry patient ids: engines hide statement
parameters, and no message made here holds a password.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

BACKENDS = ("sqlite", "postgresql")
MIGRATIONS = "service.store:migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
# Any fixed 64-bit key: every process that migrates this database takes the same one.
_MIGRATION_LOCK = 0x65_68_72_6D_61_6D_62_61  # b"ehrmamba"
# Alembic hands env.py and the revisions their context through module-global proxies
# (alembic.context, alembic.op), so one process runs one migration at a time.
_ALEMBIC = threading.Lock()


class StoreUnavailable(Exception):
    """The database failed or cannot be reached. The message names the database but holds
    no credentials and no patient data."""


def create_store_engine(url: str) -> Engine:
    """An engine for ``url`` (sqlite or postgresql); connects lazily."""
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if "connect_timeout" not in parsed.query:
        parsed = parsed.update_query_dict({"connect_timeout": str(POSTGRES_CONNECT_TIMEOUT_S)})
    return create_engine(parsed, hide_parameters=True, pool_pre_ping=True)


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema, creating it on an empty database
    (and, for SQLite, the file's folder)."""
    _migrate(url, command.upgrade, "head")


def downgrade(url: str, revision: str) -> None:
    """Take the schema back to ``revision`` ("base": no tables)."""
    _migrate(url, command.downgrade, revision)


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration for the store's migrations, run on ``connection``. Also for
    writing a revision after a change to ``schema.py``, against a database at head:
    ``command.revision(alembic_config(connection), "what changed", autogenerate=True)``."""
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


@contextmanager
def reported(url: URL) -> Iterator[None]:
    """Re-raise database failures inside the block as ``StoreUnavailable``."""
    try:
        yield
    except (DBAPIError, PoolTimeout) as exc:
        reason = str(getattr(exc, "orig", None) or exc).partition("\n")[0]
        raise StoreUnavailable(_safe(url, f"{_describe(url)} failed: {reason}")) from exc


def _migrate(url: str, step: Callable[[Config, str], None], revision: str) -> None:
    engine = create_store_engine(url)
    try:
        if engine.url.get_backend_name() == "sqlite" and engine.url.database:
            _make_folder(Path(engine.url.database).parent)
        with reported(engine.url), engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                lock = text("SELECT pg_advisory_xact_lock(:key)")
                connection.execute(lock, {"key": _MIGRATION_LOCK})
            with _ALEMBIC:
                step(alembic_config(connection), revision)
    except CommandError as exc:
        message = f"cannot migrate {_describe(engine.url)} to {revision}: {exc}"
        raise StoreUnavailable(_safe(engine.url, message)) from exc
    finally:
        engine.dispose()


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create the SQLite folder {folder}: {exc.strerror}") from exc


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # Some SQLAlchemy releases quote the URL, or part of its password, in these errors.
        raise ValueError("the database URL cannot be parsed") from None
    if parsed.get_backend_name() not in BACKENDS:
        raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use {BACKENDS}")
    return parsed


def _describe(url: URL) -> str:
    if url.get_backend_name() == "sqlite":
        return f"the SQLite database {url.database or ':memory:'}"
    return f"the PostgreSQL database {url.database} at {url.host}:{url.port or 5432}"


def _safe(url: URL, message: str) -> str:
    """``message`` without the URL's password, should a driver ever quote it."""
    return message.replace(url.password, "***") if url.password else message


def _sqlite_connect(connection: sqlite3.Connection, _: Any) -> None:
    # Transactions are begun by _sqlite_begin, not by the sqlite3 module (which would skip
    # BEGIN before DDL and reads).
    connection.isolation_level = None
    connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    _use_wal(connection)


def _use_wal(connection: sqlite3.Connection) -> None:
    """Switch the file to WAL (it stays so; later calls change nothing). While another
    connection holds the file, SQLite refuses the switch at once rather than waiting out the
    busy timeout, as happens when several workers open a new file together: so wait here."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not exc.sqlite_errorname.startswith("SQLITE_BUSY") or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _sqlite_begin(connection: Connection) -> None:
    # Take the write lock at BEGIN: a transaction that had to wait for another writer then
    # reads that writer's rows instead of failing on a stale snapshot, and two processes
    # that open an empty database run its migrations one after the other.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
