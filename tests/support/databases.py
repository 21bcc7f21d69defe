"""Databases for the store's tests: the PostgreSQL server on this machine and in CI
(127.0.0.1:5432, user ``postgres``, trust authentication) and SQLite files.

Each test session creates its own PostgreSQL database and drops it at the end, and each
test gets its own schema in it, so parallel and repeated runs never see each other's rows.
An unreachable server fails the tests instead of skipping them.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from sqlalchemy import URL

HOST = "127.0.0.1"
PORT = 5432
USER = "postgres"


def postgres_url(
    database: str, schema: str | None = None, password: str | None = None, port: int = PORT
) -> str:
    """A SQLAlchemy URL for ``database``; with ``schema``, every connection made with it
    puts that schema first on its search path (so tables are created and found there)."""
    query = {"options": f"-csearch_path={schema}"} if schema else {}
    url = URL.create(
        "postgresql+psycopg",
        username=USER,
        password=password,
        host=HOST,
        port=port,
        database=database,
        query=query,
    )
    return url.render_as_string(hide_password=False)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty database (its name) for the length of the block."""
    name = f"ehrmamba_test_{secrets.token_hex(6)}"
    with _connect("postgres") as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with _connect("postgres") as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def postgres_schema(database: str) -> Iterator[str]:
    """A URL for a new, empty schema in ``database``, for the length of the block."""
    name = f"test_{secrets.token_hex(6)}"
    with _connect(database) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield postgres_url(database, schema=name)
    finally:
        with _connect(database) as connection:
            connection.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def closed_port() -> int:
    """A loopback TCP port nothing listens on (one the kernel just handed out and freed)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


def _connect(database: str) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(
            host=HOST, port=PORT, user=USER, dbname=database, autocommit=True, connect_timeout=10
        )
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"the store tests need PostgreSQL at {HOST}:{PORT} (user {USER}, trust auth): {exc}"
        ) from exc
