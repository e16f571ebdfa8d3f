"""History blocks: a long conversation's window read in a few rows (``storage.blocks``).

A new table, filled by SQLite's chat turns as conversations go on; conversations stored
before it get blocks as they grow.  On SQLite two triggers keep every block an exact copy
whatever changes a message, the gateway or anyone with the file: a message deleted or
changed drops the blocks that hold it and the block of the message after it, whose
reasoning may go upstream again by the role before it (``rows.resends_reasoning``).  On
PostgreSQL the table stays empty.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # IF NOT EXISTS: a database adopted from before migrations may have been made from
    # models that already had this table.
    op.create_table(
        "history_blocks",
        sa.Column(
            "conversation_pk",
            sa.Integer(),
            sa.ForeignKey("conversations.pk", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("last_seq", sa.Integer(), primary_key=True),
        sa.Column("first_seq", sa.Integer(), nullable=False),
        sa.Column("resend", sa.String(16), nullable=False),
        sa.Column("roles", sa.LargeBinary(), nullable=False),
        sa.Column("ends", sa.LargeBinary(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        if_not_exists=True,
    )
    if op.get_bind().dialect.name == "sqlite":
        for trigger in _TRIGGERS:
            op.execute(trigger)


# The blocks from a changed message's number to that of the next message still stored.
_DROP = """DELETE FROM history_blocks WHERE conversation_pk = OLD.conversation_pk
    AND last_seq >= OLD.seq AND first_seq <= coalesce((SELECT min(seq) FROM messages
    WHERE conversation_pk = OLD.conversation_pk AND seq > OLD.seq), OLD.seq);"""
_TRIGGERS = [
    "CREATE TRIGGER IF NOT EXISTS history_blocks_message_deleted AFTER DELETE ON messages"
    f" BEGIN {_DROP} END",
    # A change of number or conversation (never made by chatmem) drops all that follow.
    "CREATE TRIGGER IF NOT EXISTS history_blocks_message_updated AFTER UPDATE ON messages"
    f" BEGIN {_DROP} DELETE FROM history_blocks WHERE conversation_pk = NEW.conversation_pk"
    " AND last_seq >= min(OLD.seq, NEW.seq) AND (NEW.seq <> OLD.seq"
    " OR NEW.conversation_pk <> OLD.conversation_pk); END",
]


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":  # they are the messages table's
        for name in ("history_blocks_message_deleted", "history_blocks_message_updated"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("history_blocks")
