"""Alembic's environment: run the migrations on the connection chatmem hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from chatmem.storage.schema import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("chatmem's migrations run through `chatmem db`, not the alembic command")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
