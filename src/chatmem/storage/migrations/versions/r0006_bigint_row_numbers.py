"""Row numbers and times in 64 bits on PostgreSQL, as they are on SQLite.

``conversations.pk`` and ``messages.pk`` were ``integer`` columns numbered by ``integer``
sequences, which PostgreSQL never gives back: every turn takes a number of each (an
upsert that finds its conversation takes one too), and so does every deleted item and
every readiness probe, so a gateway storing 100 turns a second stopped storing any after
about eight months ("nextval: reached maximum value of sequence"), once the model had
already answered.  The times (``created_at``, ``updated_at``: Unix seconds) would have
ended in January 2038.  The columns, those that point at a conversation, and the two
sequences become ``bigint``.  SQLite's integers are 64 bits already: nothing changes
there.

PostgreSQL rewrites both tables and their indexes, holding them locked while it does:
on a large database, run ``chatmem db upgrade`` with the gateways stopped, as for every
upgrade.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = {
    "conversations": ("pk", "created_at", "updated_at"),
    "messages": ("pk", "conversation_pk", "created_at"),
    "history_blocks": ("conversation_pk",),
}
_NUMBERED = ("conversations", "messages")


def _retype(kind: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table, columns in _COLUMNS.items():
        changes = ", ".join(f"ALTER COLUMN {column} TYPE {kind}" for column in columns)
        op.execute(f"ALTER TABLE {table} {changes}")
    for table in _NUMBERED:
        sequence = bind.execute(
            sa.text("SELECT pg_get_serial_sequence(:table, 'pk')"), {"table": table}
        ).scalar()
        if sequence is not None:  # a table made without one numbers nothing itself
            # Its limits follow the type when they were the old type's (PostgreSQL's
            # ALTER SEQUENCE ... AS).
            op.execute(f"ALTER SEQUENCE {sequence} AS {kind}")


def upgrade() -> None:
    _retype("BIGINT")


def downgrade() -> None:
    _retype("INTEGER")
