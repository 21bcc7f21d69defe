"""Alembic's environment for the store. Only ``service.store.database`` runs it, in
process, handing it an open connection inside the transaction that holds the migration
lock; Alembic never sees the database URL."""

from alembic import context
from sqlalchemy import Connection

from service.store.schema import Base

connection: Connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
