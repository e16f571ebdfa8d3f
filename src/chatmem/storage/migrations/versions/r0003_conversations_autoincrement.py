"""Conversation row numbers are never used again (SQLite ``AUTOINCREMENT``).

SQLite numbers a new row one above the highest it holds, so a conversation deleted while
it was the newest gave its number to the next one created.  A turn checks at commit that
the conversation it read is still the one it appends to by its number and ``last_seq``
(``pairing.overtaken``), and so did take a conversation deleted and made again for the
one it read: its answer, made from the deleted history, was stored in the new one.
With ``AUTOINCREMENT`` SQLite never gives a number back, as PostgreSQL never does.  The
table is made anew (``migrate`` runs SQLite's migrations with foreign keys off, so that
dropping the old table deletes no message); nothing changes on PostgreSQL.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "conversations",
        recreate="always",
        table_kwargs={"sqlite_autoincrement": autoincrement},
    ):
        pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
